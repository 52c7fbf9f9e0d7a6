"""dataset.json and latent files: the one reader of both, strict, for every tool that takes them.

    dataset.json          {"labels": [[filename, [25 floats]], ...]}: each image's camera, cam2world
                          (4x4, row-major) then the intrinsics (3x3, normalised by the image size)
    image_N_latent.npy    the latent of image_N.png: W ([w_dim] or [1, w_dim], repeated to all num_ws
                          layers) or W+ ([num_ws, w_dim] or [1, num_ws, w_dim]), float, finite

Problems are (file, message) pairs, so that callers can list all of them (the training data) or stop
at the first (one image for a command): `parse_labels` returns the problems of single entries with
the labels, and raises `FileProblem` when the file as a whole is unusable; `parse_latent` raises
`FileProblem`. Parsing works on bytes: the files may sit in a folder or in a zip.
"""

import io
import json
import os
from typing import Dict, List, Optional, Tuple

import numpy as np

LABELS_FILE = 'dataset.json'
LABEL_LENGTH = 25  # cam2world 4x4 (16) + intrinsics 3x3 (9)
LATENT_SUFFIX = '_latent.npy'
LABELS_LAYOUT = '{"labels": [[filename, [25 floats]], ...]}'


class FileProblem(ValueError):
    """What is wrong (`message`) with one file (`file`)."""

    def __init__(self, file: str, message: str):
        self.file, self.message = file, message
        super().__init__(f'{file}: {message}')


def latent_name(image_name: str) -> str:
    """`image_3.png` -> `image_3_latent.npy` (beside the image)."""
    return os.path.splitext(image_name)[0] + LATENT_SUFFIX


def _parse_entry(entry) -> Tuple[Optional[str], Optional[np.ndarray], Optional[Tuple[str, str]]]:
    """(image name, label float32 [25], problem): name None when the entry is not [name, values] at all."""
    if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)):
        return None, None, (LABELS_FILE, f'label entry {str(entry)[:60]!r} is not [filename, [25 floats]]')
    name, values = entry
    try:
        label = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        return name, None, (name, f'label in {LABELS_FILE} is not a list of numbers')
    if np.asarray(values, dtype=object).ndim != 1:
        return name, None, (name, f'label in {LABELS_FILE} is nested; expected a flat list of {LABEL_LENGTH} numbers')
    if label.size != LABEL_LENGTH:
        return name, None, (name, f'label in {LABELS_FILE} has {label.size} values; expected {LABEL_LENGTH} '
                            '(cam2world 4x4 row-major + intrinsics 3x3)')
    if not np.all(np.isfinite(label)):
        return name, None, (name, f'label in {LABELS_FILE} contains NaN or inf')
    return name, label.astype(np.float32), None


def parse_labels(raw: bytes) -> Tuple[Dict[str, Optional[np.ndarray]], List[Tuple[str, str]]]:
    """The cameras of a dataset.json's bytes: ({image name: float32 [25]}, problems of single entries).

    An image whose entry is wrong maps to None (its problem is listed), so that callers do not report
    it again as unlabelled. A name listed twice is a problem.
    """
    try:
        data = json.loads(raw.decode('utf-8'))
    except (ValueError, UnicodeDecodeError) as err:
        raise FileProblem(LABELS_FILE, f'is not valid JSON ({err})') from None
    entries = data.get('labels') if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise FileProblem(LABELS_FILE, f'has no "labels" list ({LABELS_LAYOUT})')
    labels: Dict[str, Optional[np.ndarray]] = {}
    problems: List[Tuple[str, str]] = []
    for entry in entries:
        name, label, problem = _parse_entry(entry)
        if problem is not None:
            problems.append(problem)
        if name is None:
            continue
        if name in labels:
            problems.append((name, f'appears more than once in {LABELS_FILE}'))
            continue
        labels[name] = label
    return labels, problems


def parse_latent(raw: bytes, file: str, num_ws: Optional[int], w_dim: Optional[int]) -> np.ndarray:
    """A latent file's bytes -> float32 [num_ws, w_dim] (W repeated to every layer).

    num_ws None: any W+ layer count is accepted and W stays [1, w_dim]. w_dim None: the file's last
    dimension (tools that read latents without a generator).
    """
    try:
        latent = np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as err:  # numpy raises several types for broken files
        raise FileProblem(file, f'unreadable latent ({type(err).__name__}: {err})') from None
    if w_dim is None:
        w_dim = latent.shape[-1] if latent.ndim > 0 else 0
    layers = num_ws or 'num_ws'
    expected = f'W [{w_dim}] or [1, {w_dim}], or W+ [{layers}, {w_dim}] or [1, {layers}, {w_dim}]'
    shape = tuple(latent.shape)
    if not np.issubdtype(latent.dtype, np.floating):
        raise FileProblem(file, f'latent has dtype {latent.dtype}; expected a float array')
    squeezed = latent.reshape(shape[1:]) if (len(shape) >= 2 and shape[0] == 1) else latent
    if squeezed.ndim == 1 and squeezed.shape[0] == w_dim:
        ws = squeezed[np.newaxis]  # W: one vector for every layer
    elif squeezed.ndim == 2 and squeezed.shape[1] == w_dim and (num_ws is None or squeezed.shape[0] == num_ws):
        ws = squeezed
    else:
        raise FileProblem(file, f'latent has shape {list(shape)}; expected {expected}')
    if not np.all(np.isfinite(ws)):
        raise FileProblem(file, 'latent contains NaN or inf')
    ws = ws.astype(np.float32)
    return np.broadcast_to(ws, (num_ws, w_dim)).copy() if num_ws is not None else ws
