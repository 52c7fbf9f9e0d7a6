"""Cut a crop (a similarity from normalised crop coordinates to photo pixels) out of a photo.

As FFHQ's alignment does: a photo much larger than the crop is first shrunk by an integer factor (box filter) so
that resampling does not alias; where the crop reaches past the photo's border, the photo is extended by
reflection and the extension fades into a blurred copy and then into the photo's median colour, so that the
network never sees a hard edge.
"""
import math

import numpy as np
import PIL.Image
import PIL.ImageFilter

from photo_prep import alignment

OUTPUT_SIZE = 512


def _shrink(photo: np.ndarray, similarity: np.ndarray, size: int):
    factor = int(math.floor(alignment.quad_side(similarity) / size))
    if factor < 2:
        return photo, similarity
    image = PIL.Image.fromarray(photo).reduce(factor)
    return np.asarray(image), similarity / factor


def _pad(photo: np.ndarray, similarity: np.ndarray):
    """The photo extended past its border where the crop needs it, and the similarity in the extended frame."""
    h, w = photo.shape[:2]
    quad = alignment.quad_from_similarity(similarity)
    side = alignment.quad_side(similarity)
    margin = int(math.ceil(side * 0.02)) + 2
    left = max(0, margin - int(math.floor(quad[:, 0].min())))
    top = max(0, margin - int(math.floor(quad[:, 1].min())))
    right = max(0, int(math.ceil(quad[:, 0].max())) + margin - w)
    bottom = max(0, int(math.ceil(quad[:, 1].max())) + margin - h)
    if not (left or top or right or bottom):
        return photo, similarity
    ox, oy = left, top
    # Reflection cannot reach further than the photo's own size: repeat it until the pads are done.
    padded = photo.astype(np.float32)
    while left or top or right or bottom:
        rows, cols = padded.shape[0] - 1, padded.shape[1] - 1
        step = (min(top, rows), min(bottom, rows), min(left, cols), min(right, cols))
        padded = np.pad(padded, ((step[0], step[1]), (step[2], step[3]), (0, 0)), mode='reflect')
        top, bottom, left, right = top - step[0], bottom - step[1], left - step[2], right - step[3]
    # Distance (in pixels) of each padded pixel from the original photo, for the fade.
    ys = np.arange(padded.shape[0])[:, None] - oy
    xs = np.arange(padded.shape[1])[None, :] - ox
    dist = np.maximum(np.maximum(-ys, ys - (h - 1)), np.maximum(-xs, xs - (w - 1))).clip(min=0).astype(np.float32)
    fade = max(side * 0.1, 1.0)
    blur_radius = max(side * 0.02, 1.0)
    blurred = np.asarray(PIL.Image.fromarray(np.uint8(padded.clip(0, 255))).filter(
        PIL.ImageFilter.GaussianBlur(blur_radius)), np.float32)
    weight = (dist / fade).clip(0, 1)[..., None]
    padded = padded + (blurred - padded) * (weight * 3).clip(0, 1)
    padded = padded + (np.median(photo.reshape(-1, 3), axis=0) - padded) * weight
    shifted = similarity.copy()
    shifted[:, 2] += (ox, oy)
    return np.uint8(np.round(padded.clip(0, 255))), shifted


def extract(photo: np.ndarray, similarity: np.ndarray, size: int = OUTPUT_SIZE) -> np.ndarray:
    """The crop [size, size, 3] uint8 whose normalised coordinates map to photo pixels through `similarity`."""
    photo, similarity = _shrink(photo, similarity, size)
    photo, similarity = _pad(photo, similarity)
    # PIL's affine transform maps output pixel coordinates to input ones: photo = S_lin (x_out / size) + t.
    coefficients = (similarity[0, 0] / size, similarity[0, 1] / size, similarity[0, 2],
                    similarity[1, 0] / size, similarity[1, 1] / size, similarity[1, 2])
    image = PIL.Image.fromarray(photo).transform((size, size), PIL.Image.AFFINE, coefficients,
                                                 resample=PIL.Image.BICUBIC)
    return np.asarray(image)
