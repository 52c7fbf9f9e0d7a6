"""Training data of the encoder: the generator's own samples, or folders of aligned photos with dataset.json.

Generator samples: z ~ N(0, I) mapped with the sample's camera, truncated towards w_avg with a psi drawn
uniformly in a range, and cameras drawn from the FFHQ-like pose distribution of the demo (yaw ~ N(0, 0.3)
clipped to +-0.8, pitch ~ N(0, 0.12) clipped to +-0.35, on the generator's average orbit, FFHQ intrinsics).
Their latent is known, so the latent loss applies. A batch is a pure function of its seed.

Folders (`--data`): image_N.png + dataset.json as an identity dataset (docs/datasets.md); the
`image_N_latent.npy` beside an image is used for the latent loss when it is there, and is optional.
"""

import dataclasses
import math
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from training import inference as inf
from training import dataset_files
from training.dataset import IMAGE_EXTENSIONS
from training.dataset_files import LATENT_SUFFIX

FFHQ_INTRINSICS = (4.2647, 0.0, 0.5, 0.0, 4.2647, 0.5, 0.0, 0.0, 1.0)
YAW_STD, YAW_MAX, PITCH_STD, PITCH_MAX = 0.3, 0.8, 0.12, 0.35  # radians, as demo.training_poses


@dataclasses.dataclass
class Batch:
    images: torch.Tensor            # [N, 3, R, R] in [-1, 1]
    cameras: torch.Tensor           # [N, 25]
    ws: torch.Tensor                # [N, num_ws, w_dim]; rows without a known latent are zeros
    has_ws: torch.Tensor            # [N] bool: the latent of the row is known

    def to(self, device: torch.device) -> 'Batch':
        return Batch(*(t.to(device) for t in (self.images, self.cameras, self.ws, self.has_ws)))


def mirror_cameras(c: torch.Tensor) -> torch.Tensor:
    """Cameras [N, 25] of the x-flipped images (as training.dataset.mirror_camera, batched): the scene mirrored
    across x = 0 flips the sign of cam2world entries [0,1], [0,2], [0,3], [1,0], [2,0]; cx becomes 1 - cx."""
    sign = torch.ones(25, dtype=c.dtype, device=c.device)
    sign[[1, 2, 3, 4, 8]] = -1
    out = c * sign
    out[:, 18] = 1 - c[:, 18]
    return out


def sample_cameras(G: torch.nn.Module, count: int, seed: int) -> torch.Tensor:
    """`count` FFHQ-like cameras [count, 25] on G's average orbit (the demo's pose distribution)."""
    from camera_utils import LookAtPoseSampler
    rnd = np.random.RandomState(seed % (2**32))
    yaws = np.clip(rnd.normal(0, YAW_STD, count), -YAW_MAX, YAW_MAX)
    pitches = np.clip(rnd.normal(0, PITCH_STD, count), -PITCH_MAX, PITCH_MAX)
    rk = G.rendering_kwargs
    pivot = torch.tensor(rk.get('avg_camera_pivot', [0, 0, 0]), dtype=torch.float32)
    radius = float(rk.get('avg_camera_radius', 2.7))
    horizontal = torch.from_numpy(math.pi / 2 + yaws).float().reshape(-1, 1)
    vertical = torch.from_numpy(math.pi / 2 + pitches).float().reshape(-1, 1)
    with torch.random.fork_rng(devices=[]):  # the sampler draws (zero-scaled) noise
        poses = LookAtPoseSampler.sample(horizontal, vertical, pivot, radius=radius, batch_size=count)
    intrinsics = torch.tensor(FFHQ_INTRINSICS, dtype=torch.float32).expand(count, -1)
    return torch.cat([poses.reshape(count, 16), intrinsics], dim=1)


@torch.no_grad()
def generator_batch(G: torch.nn.Module, count: int, seed: int, psi_range: Tuple[float, float],
                    neural_rendering_resolution: Optional[int]) -> Batch:
    """`count` samples of G (images, cameras, W+), a pure function of `seed`, on G's device."""
    device = next(G.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn([count, G.z_dim], generator=gen).to(device)
    psi = (torch.rand([count, 1, 1], generator=gen) * (psi_range[1] - psi_range[0]) + psi_range[0]).to(device)
    c = sample_cameras(G, count, seed).to(device)
    ws = G.mapping(z, c, truncation_psi=1)
    w_avg = G.backbone.mapping.w_avg.reshape(1, 1, -1)
    ws = w_avg + psi * (ws - w_avg)
    images = inf.render(G, ws, c, neural_rendering_resolution, seed=seed)
    return Batch(images.float(), c, ws, torch.ones(count, dtype=torch.bool, device=device))


class FolderSet:
    """Aligned photos with cameras (and optional latents) from one or more folders, checked before training.

    Every problem (no dataset.json, an image without a label, a wrong resolution, a bad latent) is
    collected with its file and reported in one `inf.InputError`.
    """

    def __init__(self, folders: Sequence[str], resolution: int, num_ws: int, w_dim: int):
        problems: List[str] = []
        images, cameras, latents, known = [], [], [], []
        self.files: List[str] = []
        for folder in folders:
            folder = Path(folder)
            if not folder.is_dir():
                problems.append(f'{folder}: not a folder')
                continue
            try:
                labels = inf.read_labels(folder)
            except inf.InputError as err:
                problems.append(str(err))
                continue
            paths = inf.list_images(folder)
            if not paths:
                problems.append(f'{folder}: no images ({", ".join(IMAGE_EXTENSIONS)})')
            for path in paths:
                if path.name not in labels:
                    problems.append(f'{path}: no camera label in {folder / "dataset.json"}')
                    continue
                try:
                    image = inf.load_image(path)
                except inf.InputError as err:
                    problems.append(str(err))
                    continue
                if image.shape[-1] != resolution:
                    problems.append(f'{path}: image is {image.shape[-1]}x{image.shape[-2]}; the generator renders '
                                    f'{resolution}x{resolution} (align and crop the photos at that size)')
                    continue
                latent = self._latent(path, num_ws, w_dim, problems)
                images.append(image[0])
                cameras.append(torch.from_numpy(labels[path.name]))
                latents.append(latent if latent is not None else torch.zeros(num_ws, w_dim))
                known.append(latent is not None)
                self.files.append(str(path))
        if problems:
            raise inf.InputError(f'--data has {len(problems)} problem(s):\n  ' + '\n  '.join(problems))
        self.images = torch.stack(images)
        self.cameras = torch.stack(cameras)
        self.ws = torch.stack(latents)
        self.has_ws = torch.tensor(known, dtype=torch.bool)

    @staticmethod
    def _latent(image_path: Path, num_ws: int, w_dim: int, problems: List[str]) -> Optional[torch.Tensor]:
        path = image_path.with_name(image_path.stem + LATENT_SUFFIX)
        if not path.is_file():
            return None
        try:
            return torch.from_numpy(dataset_files.parse_latent(path.read_bytes(), str(path), num_ws, w_dim))
        except dataset_files.FileProblem as err:
            problems.append(str(err))
            return None

    def __len__(self) -> int:
        return len(self.files)

    def batch(self, indices: np.ndarray) -> Batch:
        idx = torch.from_numpy(indices)
        return Batch(self.images[idx], self.cameras[idx], self.ws[idx], self.has_ws[idx])
