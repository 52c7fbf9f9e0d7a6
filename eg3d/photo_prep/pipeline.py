"""Photos -> kept, aligned, labelled crops and a report of every decision (used by eg3d/prepare_dataset.py)."""
import dataclasses
import math
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

import numpy as np

from photo_prep import alignment, crop, filters, photos
from photo_prep.face_models import FaceModels


class PrepareError(Exception):
    """Bad input for the whole run: the message names the folder and the problem."""


@dataclasses.dataclass
class PrepareOptions:
    resolution: int = crop.OUTPUT_SIZE  # crop size in pixels (EG3D FFHQ: 512)
    identity_filter: bool = True       # keep the majority identity; in each photo its largest face
    dedupe: bool = True                # reject near-duplicates of an earlier kept crop
    max_hash_distance: int = 6         # near-duplicate: difference hashes of the crops differ in <= this many bits
    min_sharpness: float = 15.0        # filters.sharpness of the crop
    min_face: float = 256.0            # crop side in photo pixels; 512 / 256 = at most 2x upscaling
    max_yaw: float = 60.0              # degrees
    identity_threshold: float = filters.SAME_PERSON_DISTANCE


@dataclasses.dataclass
class PhotoRecord:
    """One photo's outcome; `report_entry` is its prepare_report.json entry."""
    source: str
    status: str = 'rejected'
    reason: Optional[str] = None
    image: Optional[str] = None
    quad: Optional[np.ndarray] = None
    yaw: Optional[float] = None        # degrees
    pitch: Optional[float] = None
    roll: Optional[float] = None
    identity_similarity: Optional[float] = None
    sharpness: Optional[float] = None
    label: Optional[np.ndarray] = None
    crop: Optional[np.ndarray] = None
    preview: Optional[np.ndarray] = None   # the photo, for the contact sheet of rejections

    def reject(self, reason: str) -> None:
        self.status, self.reason = 'rejected', reason

    def report_entry(self) -> dict:
        return {
            'source': self.source, 'status': self.status, 'reason': self.reason, 'image': self.image,
            'quad': None if self.quad is None else [[float(x), float(y)] for x, y in self.quad],
            'yaw': self.yaw, 'pitch': self.pitch, 'roll': self.roll,
            'identity_similarity': self.identity_similarity, 'sharpness': self.sharpness,
        }


@dataclasses.dataclass
class _Detected:
    record: PhotoRecord
    photo: np.ndarray
    faces: list
    embeddings: Optional[List[np.ndarray]]


def _preview(photo: np.ndarray, size: int = 160) -> np.ndarray:
    import PIL.Image
    image = PIL.Image.fromarray(photo)
    image.thumbnail((size, size), PIL.Image.BILINEAR)
    return np.asarray(image)


def _detect(path: Path, root: Path, models: FaceModels, embed_all: bool) -> _Detected:
    record = PhotoRecord(source=path.relative_to(root).as_posix())
    try:
        photo = photos.load_photo(path)
    except photos.PhotoError as err:
        record.reject(str(err))
        return _Detected(record, None, [], None)
    record.preview = _preview(photo)
    faces = models.detect(photo)
    if not faces:
        record.reject('no face found')
    embeddings = [models.embed(photo, f) for f in faces] if (embed_all and faces) else None
    return _Detected(record, photo, faces, embeddings)


def _align(item: _Detected, face_index: int, options: PrepareOptions) -> None:
    """Fit the camera and crop of the chosen face and apply the pose, size and blur filters."""
    record, face = item.record, item.faces[face_index]
    view = alignment.fit_view(face.landmarks)
    record.quad = view.quad
    record.yaw, record.pitch, record.roll = (math.degrees(v) for v in (view.yaw, view.pitch, view.roll))
    record.label = view.label
    if abs(record.yaw) > options.max_yaw:
        record.reject(f'head turned {abs(record.yaw):.0f} deg, more than --max-yaw={options.max_yaw:g}')
        return
    if view.side < options.min_face:
        record.reject(f'face too small: the crop would be {view.side:.0f} px of the photo, '
                      f'less than --min-face={options.min_face:g} (more than {crop.OUTPUT_SIZE / options.min_face:.1f}x '
                      'upscaling)')
        return
    record.crop = crop.extract(item.photo, view.similarity, options.resolution)
    record.sharpness = filters.sharpness(record.crop)
    if record.sharpness < options.min_sharpness:
        record.reject(f'blurry: sharpness {record.sharpness:.1f} < --min-sharpness={options.min_sharpness:g}')
        return
    record.status = 'kept'


def analyse(photo_dir: Path, options: PrepareOptions, models: FaceModels,
            progress: Callable[[Iterable], Iterable] = lambda it: it) -> List[PhotoRecord]:
    """Every file under `photo_dir`, in sorted order, kept or rejected with its reason. Kept records carry their
    crop and label; their `image` names are given by `number_kept`."""
    paths = photos.find_photos(photo_dir)
    items = [_detect(p, photo_dir, models, options.identity_filter) for p in progress(paths)]
    identity = None
    if options.identity_filter:
        identity = filters.majority_identity([i.embeddings or [] for i in items], options.identity_threshold)
    kept_hashes: List[tuple] = []
    for item in items:
        if not item.faces:
            continue
        index, distance = filters.pick_face([f.size for f in item.faces], item.embeddings, identity,
                                            options.identity_threshold)
        if identity is not None:
            chosen = item.embeddings[index] if index is not None else None
            item.record.identity_similarity = None if chosen is None else filters.cosine(chosen, identity)
        if index is None:
            item.record.reject(f'other person: no face within {options.identity_threshold:g} of the majority '
                               f'identity (closest {distance:.2f})')
            continue
        _align(item, index, options)
        if item.record.status != 'kept' or not options.dedupe:
            continue
        digest = filters.difference_hash(item.record.crop)
        twin = next((src for src, h in kept_hashes if filters.hash_distance(h, digest) <= options.max_hash_distance),
                    None)
        if twin is not None:
            item.record.reject(f'near-duplicate of {twin}')
            continue
        kept_hashes.append((item.record.source, digest))
    records = [i.record for i in items]
    number_kept(records)
    return records


def number_kept(records: List[PhotoRecord]) -> None:
    """Name the kept crops image_0.png, image_1.png, ... in photo order."""
    n = 0
    for record in records:
        record.image = None
        if record.status == 'kept':
            record.image = f'image_{n}.png'
            n += 1


def summarise_rejections(records: List[PhotoRecord], limit: int = 20) -> str:
    lines = [f'  {r.source}: {r.reason}' for r in records if r.status != 'kept']
    more = len(lines) - limit
    return '\n'.join(lines[:limit] + ([f'  ... and {more} more'] if more > 0 else []))


def check_kept(photo_dir: Path, records: List[PhotoRecord]) -> None:
    """PrepareError naming the folder and every reason when nothing was kept."""
    if not records:
        raise PrepareError(f'{photo_dir}: no files found')
    if not any(r.status == 'kept' for r in records):
        raise PrepareError(f'{photo_dir}: no photo was kept ({len(records)} file(s)):\n'
                           f'{summarise_rejections(records)}')


def counts(records: List[PhotoRecord]) -> Dict[str, int]:
    kept = sum(r.status == 'kept' for r in records)
    return {'kept': kept, 'rejected': len(records) - kept}
