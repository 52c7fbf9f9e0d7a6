"""Identity descriptors for the identity-similarity metric: dlib's face network (shipped in a registry package,
the one prepare_dataset.py's identity filter uses; the default) or ArcFace IR-SE50 (downloaded weights, the
network My3DGen reports)."""
from typing import List, Optional

import numpy as np
import torch


class DlibIdentity:
    """128-D dlib descriptors of the largest face found in each image; None where no face is found (the metric
    then skips that image, and says how many it scored)."""
    name = 'dlib'

    def __init__(self):
        from photo_prep.face_models import FaceModels
        self.models = FaceModels()

    def __call__(self, images: torch.Tensor) -> List[Optional[np.ndarray]]:
        pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return [self.models.embed_aligned(np.ascontiguousarray(p)) for p in pixels]


class ArcFaceIdentity:
    """ArcFace IR-SE50 embeddings of whole aligned images (pooled to 112x112, as My3DGen)."""
    name = 'arcface'

    def __init__(self, path: str, device: torch.device):
        from training.arcface import IRSE50
        self.net = IRSE50.load(path, device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> List[Optional[np.ndarray]]:
        from training.loss import identity_embedding
        return list(identity_embedding(self.net, images).float().cpu().numpy())


def similarities(a: List[Optional[np.ndarray]], b: List[Optional[np.ndarray]]) -> List[float]:
    """Cosine similarity of each pair; NaN where either image has no face."""
    return [float('nan') if (x is None or y is None) else float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))
            for x, y in zip(a, b)]
