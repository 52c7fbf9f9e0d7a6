"""One identity's aligned selfies: images, camera labels and latents, validated before training.

Layout (a folder or a .zip of it; EG3D's `dataset.json` convention plus one latent per image):

    image_0.png  image_0_latent.npy  image_1.png  image_1_latent.npy  ...  dataset.json

`dataset.json` (each image's camera) and the latents are read by `training/dataset_files.py`, the
one reader of both formats.

`IdentityDataset(path, ...)` reads everything up front (an identity has tens of selfies), checks
all of it and raises one `DatasetError` that lists every problem with its file. The source is
only ever read.

A folder of identity folders (or zips) holds several people: `IdentitySet` reads them all (one
error for all their problems) and `balanced_batch_indices` draws batches in which every identity
gets the same share of samples. One identity is the special case K = 1.
"""

import io
import os
import zipfile
from typing import Dict, List, Optional, Tuple

import numpy as np
import PIL.Image
import torch

from training.dataset_files import LABELS_FILE, LABELS_LAYOUT, FileProblem, latent_name, parse_labels, parse_latent

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
# Pictures that prepare_dataset.py writes beside the crops for people to look at; never training images.
REVIEW_IMAGES = ('contact_sheet.png',)

#----------------------------------------------------------------------------


class DatasetError(ValueError):
    """Invalid identity dataset; `problems` lists (file, message) pairs, all of them."""

    def __init__(self, path: str, problems: List[Tuple[str, str]]):
        self.path = path
        self.problems = list(problems)
        lines = [f'Dataset {path!r} has {len(problems)} problem(s):']
        lines += [f'  {name}: {message}' for name, message in problems]
        lines += ['See docs/datasets.md for the expected layout.']
        super().__init__('\n'.join(lines))


def mirror_camera(label: np.ndarray) -> np.ndarray:
    """Camera of the x-flipped image: the scene mirrored across the world plane x = 0.

    cam2world' = S @ cam2world @ S with S = diag(-1, 1, 1, 1): entries with exactly one index 0
    change sign ([0,1], [0,2], [0,3], [1,0], [2,0]), as EG3D's dataset_preprocessing/mirror_dataset.py
    (`flip_yaw`). A flipped image also moves its principal point to 1 - cx; EG3D keeps the
    intrinsics, which is the same thing for the centred cx = 0.5 of every EG3D dataset.
    """
    label = np.asarray(label, dtype=np.float64)
    pose = label[:16].reshape(4, 4).copy()
    intrinsics = label[16:25].reshape(3, 3).copy()
    for i, j in [(0, 1), (0, 2), (1, 0), (2, 0), (0, 3)]:
        pose[i, j] *= -1
    intrinsics[0, 2] = 1 - intrinsics[0, 2]
    return np.concatenate([pose.reshape(-1), intrinsics.reshape(-1)]).astype(np.float32)

#----------------------------------------------------------------------------


class _Source:
    """Read-only access to the files of a folder or a zip, by '/'-separated relative name."""

    def __init__(self, path: str):
        self.path = path
        self._zip = None
        if os.path.isdir(path):
            names = []
            for root, _dirs, files in os.walk(path):
                for fname in files:
                    names.append(os.path.relpath(os.path.join(root, fname), path).replace(os.sep, '/'))
            self.names = set(names)
        elif os.path.isfile(path) and zipfile.is_zipfile(path):
            self._zip = zipfile.ZipFile(path, 'r')
            self.names = set(n for n in self._zip.namelist() if not n.endswith('/'))
        elif os.path.exists(path):
            raise DatasetError(path, [(os.path.basename(path), 'is neither a folder nor a .zip file')])
        else:
            raise DatasetError(path, [(os.path.basename(path) or path, 'does not exist')])

    def read(self, name: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(name)
        with open(os.path.join(self.path, name), 'rb') as f:
            return f.read()

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None

#----------------------------------------------------------------------------


def _read_labels(source: _Source, problems: list) -> Optional[Dict[str, Optional[np.ndarray]]]:
    if LABELS_FILE not in source.names:
        problems.append((LABELS_FILE, f'missing: the camera labels of the images must be in {LABELS_FILE} '
                         f'({LABELS_LAYOUT})'))
        return None
    try:
        labels, entry_problems = parse_labels(source.read(LABELS_FILE))
    except FileProblem as err:
        problems.append((err.file, err.message))
        return None
    problems.extend(entry_problems)
    return labels


def _check_image(source: _Source, name: str, resolution: Optional[int], problems: list) -> Optional[np.ndarray]:
    try:
        with PIL.Image.open(io.BytesIO(source.read(name))) as img:
            img.load()
            if img.mode != 'RGB':
                img = img.convert('RGB')
            image = np.array(img)
    except Exception as err:  # PIL raises many types for broken files.
        problems.append((name, f'unreadable image ({type(err).__name__}: {err})'))
        return None
    h, w = image.shape[:2]
    if h != w:
        problems.append((name, f'image is {w}x{h}; it must be square (aligned and cropped as in EG3D)'))
        return None
    if resolution is not None and h != resolution:
        problems.append((name, f'image is {w}x{h}; the generator renders {resolution}x{resolution}'))
        return None
    return image.transpose(2, 0, 1)  # HWC -> CHW, uint8


def _check_latent(source: _Source, name: str, num_ws: Optional[int], w_dim: int,
                  problems: list) -> Optional[np.ndarray]:
    try:
        return parse_latent(source.read(name), name, num_ws, w_dim)
    except FileProblem as err:
        problems.append((err.file, err.message))
        return None


def read_identity(path: str, resolution: Optional[int] = None, num_ws: Optional[int] = None,
                  w_dim: int = 512) -> Tuple[List[str], np.ndarray, np.ndarray, np.ndarray]:
    """Read and check a whole identity folder or zip; raise one DatasetError listing every problem.

    Returns (names, images uint8 [N, 3, R, R], cameras float32 [N, 25], latents float32 [N, num_ws, w_dim]).
    `resolution` / `num_ws`: the generator's; None skips that check (and keeps W latents as [1, w_dim]).
    """
    problems: List[Tuple[str, str]] = []
    source = _Source(path)
    try:
        labels = _read_labels(source, problems)
        image_names = sorted(n for n in source.names if n.lower().endswith(IMAGE_EXTENSIONS) and n not in REVIEW_IMAGES)
        labelled = labels or {}
        for name in labelled:
            if name not in source.names:
                problems.append((name, 'is labelled in dataset.json but the file does not exist'))
        if labels is not None:
            for name in image_names:
                if name not in labelled:
                    problems.append((name, 'image has no label in dataset.json'))
        if labels is not None and not labelled and not image_names:
            problems.append(('dataset.json', 'lists no images'))

        names, images, cameras, latents = [], [], [], []
        for name in sorted(labelled):
            if name not in source.names:
                continue
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                problems.append((name, f'is not an image file ({", ".join(IMAGE_EXTENSIONS)})'))
                continue
            image = _check_image(source, name, resolution, problems)
            lname = latent_name(name)
            if lname not in source.names:
                problems.append((name, f'image has no latent: expected {lname} beside it '
                                 '(the projector writes one per selfie; see docs/datasets.md)'))
                latent = None
            else:
                latent = _check_latent(source, lname, num_ws, w_dim, problems)
            if image is None or latent is None or labelled[name] is None:
                continue
            names.append(name)
            images.append(image)
            cameras.append(labelled[name])
            latents.append(latent)
    finally:
        source.close()

    if len({img.shape for img in images}) > 1:
        sizes = sorted({f'{img.shape[2]}x{img.shape[1]}' for img in images})
        problems.append(('dataset', f'images have different resolutions ({", ".join(sizes)})'))
    if len({lat.shape for lat in latents}) > 1:
        problems.append(('dataset', 'latents mix W and W+ shapes; give num_ws to broadcast them'))
    if problems:
        raise DatasetError(path, problems)
    return names, np.stack(images), np.stack(cameras), np.stack(latents)

#----------------------------------------------------------------------------


class IdentityDataset(torch.utils.data.Dataset):
    """Validated selfies of one identity, held in memory; item = (image uint8 [3,R,R], camera [25], ws [num_ws, w_dim]).

    `xflip=True` appends an x-flipped copy of every image with its mirrored camera (`mirror_camera`)
    and the same latent: the latent codes the person, the camera codes the pose.
    """

    def __init__(self, path: str, resolution: Optional[int] = None, num_ws: Optional[int] = None,
                 w_dim: int = 512, xflip: bool = False):
        self.path = path
        self.xflip = bool(xflip)
        names, images, cameras, latents = read_identity(path, resolution=resolution, num_ws=num_ws, w_dim=w_dim)
        if self.xflip:
            names = names + [os.path.splitext(n)[0] + '_mirror' + os.path.splitext(n)[1] for n in names]
            images = np.concatenate([images, images[:, :, :, ::-1]])
            cameras = np.concatenate([cameras, np.stack([mirror_camera(c) for c in cameras])])
            latents = np.concatenate([latents, latents])
        self.names = names
        self.images = np.ascontiguousarray(images)
        self.cameras = cameras.astype(np.float32)
        self.latents = latents.astype(np.float32)

    @property
    def name(self) -> str:
        """Dataset name for the run directory: the folder or zip name."""
        return os.path.splitext(os.path.basename(os.path.normpath(self.path)))[0]

    @property
    def resolution(self) -> int:
        return int(self.images.shape[2])

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, idx: int):
        return torch.from_numpy(self.images[idx].copy()), torch.from_numpy(self.cameras[idx]), \
            torch.from_numpy(self.latents[idx])

#----------------------------------------------------------------------------


def batch_indices(dataset_size: int, batch_size: int, step: int, seed: int, start: Optional[int] = None) -> np.ndarray:
    """Dataset indices of the global batch of training step `step`: epochs of seeded permutations.

    A pure function of (step, seed), so a resumed run and any number of processes see the same
    global batches as one uninterrupted process. `start` overrides the stream position
    (default: step * batch_size).
    """
    start = step * batch_size if start is None else start
    out = []
    pos = start
    while len(out) < batch_size:
        epoch, offset = divmod(pos, dataset_size)
        perm = np.random.RandomState((seed * 1000003 + epoch) % (2**32)).permutation(dataset_size)
        take = min(batch_size - len(out), dataset_size - offset)
        out.extend(perm[offset:offset + take].tolist())
        pos += take
    return np.asarray(out, dtype=np.int64)

#----------------------------------------------------------------------------


def identity_folders(path: str) -> Optional[List[Tuple[str, str]]]:
    """(name, path) of each identity in a folder of identity folders/zips; None if `path` is one identity.

    `path` holds several identities when it is a folder without its own dataset.json whose
    entries include folders with a dataset.json or .zip files. Every non-hidden sub-folder must
    then be an identity, so that a misplaced folder is reported rather than skipped; names are
    folder names, or zip names without `.zip`, and must be unique.
    """
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, 'dataset.json')):
        return None
    entries = sorted(e for e in os.listdir(path) if not e.startswith('.'))
    folders = [e for e in entries if os.path.isdir(os.path.join(path, e))]
    zips = [e for e in entries if e.lower().endswith('.zip') and os.path.isfile(os.path.join(path, e))]
    if not zips and not any(os.path.isfile(os.path.join(path, e, 'dataset.json')) for e in folders):
        return None
    problems = [(f'{e}/dataset.json', 'missing: every sub-folder of a folder of identities must be one identity '
                 '(image_N.png, image_N_latent.npy, dataset.json)')
                for e in folders if not os.path.isfile(os.path.join(path, e, 'dataset.json'))]
    named = [(e, os.path.join(path, e)) for e in folders] + [(os.path.splitext(e)[0], os.path.join(path, e)) for e in zips]
    seen = set()
    for name, _ in named:
        if name in seen:
            problems.append((name, 'two identities have this name (a folder and a zip?); names must be unique'))
        seen.add(name)
    if problems:
        raise DatasetError(path, problems)
    return sorted(named)


class IdentitySet(IdentityDataset):
    """The selfies of K >= 1 identities, concatenated; item = (image, camera, ws, identity index).

    `path` is one identity (K = 1) or a folder of identities (`identity_folders`). Every identity
    is validated before anything else happens, and one DatasetError lists the problems of all of
    them, each prefixed with its identity's folder name.
    """

    def __init__(self, path: str, resolution: Optional[int] = None, num_ws: Optional[int] = None,
                 w_dim: int = 512, xflip: bool = False):  # pylint: disable=super-init-not-called
        self.path = path
        self.xflip = bool(xflip)
        folders = identity_folders(path)
        self.multi = folders is not None
        if folders is None:
            parts = [IdentityDataset(path, resolution=resolution, num_ws=num_ws, w_dim=w_dim, xflip=xflip)]
            self.identity_names = [parts[0].name]
        else:
            parts, problems = [], []
            for name, sub in folders:
                try:
                    parts.append(IdentityDataset(sub, resolution=resolution, num_ws=num_ws, w_dim=w_dim, xflip=xflip))
                except DatasetError as err:
                    problems += [(f'{os.path.basename(sub)}/{file}', message) for file, message in err.problems]
            if len({p.images.shape[1:] for p in parts}) > 1:
                problems.append(('dataset', 'identities have images of different resolutions'))
            if len({p.latents.shape[1:] for p in parts}) > 1:
                problems.append(('dataset', 'identities have latents of different shapes'))
            if problems:
                raise DatasetError(path, problems)
            self.identity_names = [name for name, _ in folders]
        self.sizes = [len(p) for p in parts]
        self.offsets = np.cumsum([0] + self.sizes[:-1]).astype(np.int64)
        self.names = [n for p in parts for n in p.names]
        self.images = np.concatenate([p.images for p in parts])
        self.cameras = np.concatenate([p.cameras for p in parts])
        self.latents = np.concatenate([p.latents for p in parts])
        self.identity = np.repeat(np.arange(len(parts), dtype=np.int64), self.sizes)

    @property
    def num_identities(self) -> int:
        return len(self.sizes)

    def __getitem__(self, idx: int):
        return super().__getitem__(idx) + (int(self.identity[idx]),)

    def batch_indices(self, batch_size: int, step: int, seed: int) -> np.ndarray:
        """Indices into this set of the global batch of step `step` (see `balanced_batch_indices`)."""
        identity, within = balanced_batch_indices(self.sizes, batch_size, step, seed)
        return self.offsets[identity] + within


def balanced_batch_indices(sizes: List[int], batch_size: int, step: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(identity, index within the identity) of each sample of the global batch of step `step`.

    The samples of all steps form one stream in which identities take turns (position p belongs
    to identity p % K), so over any K consecutive samples every identity gets one; identity k's
    own samples follow `batch_indices` of its own size at position p // K. An identity therefore
    sees the same images, in the same order, as in a single-identity run with the same seed and
    batch_size / K, and K = 1 is exactly `batch_indices`.
    """
    K = len(sizes)
    positions = step * batch_size + np.arange(batch_size, dtype=np.int64)
    identity = positions % K
    within = np.empty(batch_size, dtype=np.int64)
    for k in range(K):
        sel = identity == k
        if not sel.any():
            continue
        own = positions[sel] // K
        first = int(own[0])
        within[sel] = batch_indices(sizes[k], len(own), 0, seed, start=first)
    return identity, within
