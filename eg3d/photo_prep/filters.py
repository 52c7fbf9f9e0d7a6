"""The measures behind the photo filters: sharpness, a perceptual hash for near-duplicates, and the majority
identity among the faces of all photos."""
from typing import List, Optional, Sequence, Tuple

import numpy as np
import PIL.Image
import scipy.ndimage

SAME_PERSON_DISTANCE = 0.6     # dlib's threshold on the Euclidean distance of two 128-D descriptors
SHARPNESS_SIZE = 256


def sharpness(crop: np.ndarray) -> float:
    """Variance of the Laplacian of the crop's grey levels (0-255) over its central half, at 256 px: the face's
    fine detail, independent of the photo's resolution. The five test faces (tests/data/faces) score 175-520; a
    Gaussian blur of radius 3 px brings one of them to 15 (the default threshold), 6 px to 4."""
    grey = np.asarray(PIL.Image.fromarray(crop).convert('L').resize((SHARPNESS_SIZE, SHARPNESS_SIZE),
                                                                      PIL.Image.BILINEAR), np.float64)
    q = SHARPNESS_SIZE // 4
    return float(scipy.ndimage.laplace(grey)[q:-q, q:-q].var())


def difference_hash(crop: np.ndarray) -> np.ndarray:
    """A 64-bit perceptual hash [64] bool: whether each of 8x8 grey cells is brighter than its right neighbour."""
    grey = np.asarray(PIL.Image.fromarray(crop).convert('L').resize((9, 8), PIL.Image.BOX), np.float64)
    return (grey[:, 1:] > grey[:, :-1]).reshape(-1)


def hash_distance(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.count_nonzero(a != b))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def majority_identity(embeddings: Sequence[Sequence[np.ndarray]],
                      threshold: float = SAME_PERSON_DISTANCE) -> Optional[np.ndarray]:
    """The mean descriptor [128] of the person seen in most photos, or None if there is no face at all.

    `embeddings[p]` holds the descriptors of the faces in photo p. Every face is a candidate; its support is the
    number of photos that have a face within `threshold` of it. The best-supported candidate's matches (the
    closest one per photo) are averaged."""
    candidates = [e for photo in embeddings for e in photo]
    if not candidates:
        return None
    best_support, best_matches = -1, []
    for candidate in candidates:
        matches = []
        for photo in embeddings:
            if photo:
                distances = [np.linalg.norm(e - candidate) for e in photo]
                i = int(np.argmin(distances))
                if distances[i] < threshold:
                    matches.append(photo[i])
        if len(matches) > best_support:
            best_support, best_matches = len(matches), matches
    return np.mean(best_matches, axis=0)


def pick_face(sizes: Sequence[float], embeddings: Optional[Sequence[np.ndarray]], identity: Optional[np.ndarray],
              threshold: float = SAME_PERSON_DISTANCE) -> Tuple[Optional[int], Optional[float]]:
    """(index of the face to keep, its distance to the identity) in one photo: the largest face, or with an
    identity the largest face within `threshold` of it (None if no face matches)."""
    order = list(np.argsort(-np.asarray(sizes), kind='stable'))
    if identity is None or embeddings is None:
        return int(order[0]), None
    distances: List[float] = [float(np.linalg.norm(e - identity)) for e in embeddings]
    for i in order:
        if distances[i] < threshold:
            return int(i), distances[i]
    return None, min(distances)
