"""Put an aligned crop into a larger photo by a known similarity: the ground truth of the crop benchmark."""
import math
from typing import Tuple

import numpy as np
import PIL.Image

from photo_prep import alignment


def place_crop(crop: np.ndarray, rng: np.random.Generator, max_rotation: float = 20.0,
               scale_range: Tuple[float, float] = (0.7, 1.8), background=(128, 128, 128),
               margin: float = 0.3) -> Tuple[np.ndarray, np.ndarray]:
    """(photo [H, W, 3] uint8, quad [4, 2]): `crop` turned by up to +-max_rotation degrees, scaled in
    scale_range, at a random offset on a plain background; quad is where the crop's corners landed."""
    size = crop.shape[0]
    angle = math.radians(rng.uniform(-max_rotation, max_rotation))
    side = size * rng.uniform(*scale_range)
    extent = side * (abs(math.cos(angle)) + abs(math.sin(angle)))     # the turned square's bounding box
    width = int(math.ceil(extent * (1 + 2 * margin) + rng.uniform(0, side)))
    height = int(math.ceil(extent * (1 + 2 * margin) + rng.uniform(0, side)))
    centre = np.array([rng.uniform(extent / 2 + 1, width - extent / 2 - 1),
                       rng.uniform(extent / 2 + 1, height - extent / 2 - 1)])
    similarity = alignment.similarity_from_centre(centre, side, angle)
    # Inverse map for PIL: photo pixel -> crop pixel.
    linear_inv = np.linalg.inv(similarity[:, :2]) * size
    offset = -linear_inv @ similarity[:, 2]
    coefficients = (linear_inv[0, 0], linear_inv[0, 1], offset[0], linear_inv[1, 0], linear_inv[1, 1], offset[1])
    face = PIL.Image.fromarray(crop).convert('RGBA')
    warped = face.transform((width, height), PIL.Image.AFFINE, coefficients, resample=PIL.Image.BICUBIC)
    photo = PIL.Image.new('RGBA', (width, height), tuple(background) + (255,))
    photo.alpha_composite(warped)
    return np.asarray(photo.convert('RGB')), alignment.quad_from_similarity(similarity)


def quad_error(quad: np.ndarray, truth: np.ndarray) -> float:
    """Mean corner distance over the true crop's side."""
    side = float(np.linalg.norm(truth[1] - truth[0]))
    return float(np.linalg.norm(np.asarray(quad) - truth, axis=1).mean() / side)
