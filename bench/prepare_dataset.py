"""Accuracy and speed of prepare_dataset.py's alignment on real faces that EG3D's own pipeline labelled.

    python bench/prepare_dataset.py                 # accuracy (a) and (b) of issue 14, and seconds per photo
    python bench/prepare_dataset.py --calibrate     # refit template.py's placement and crop constants

(a) the angle between the fitted camera's viewing direction and the label's; (b) each face placed in a larger
photo by a random similarity (rotation +-20 deg, scale 0.7-1.8, offset, plain background): the mean corner distance
of the reported quad from where the labelled crop went, over the crop's width. Both are given in-sample (the
constants fitted to all faces, as shipped) and leave-one-out (fitted without the face that is scored).
"""
import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'eg3d'))

import camera_utils  # noqa: E402
from photo_prep import alignment, calibration, placement, template  # noqa: E402
from photo_prep.face_models import FaceModels  # noqa: E402
from photo_prep import pipeline  # noqa: E402
from photo_prep.photos import PHOTO_SUFFIXES  # noqa: E402


def load_faces(folder: Path):
    labels = {n: np.array(l) for n, l in json.loads((folder / 'dataset.json').read_text())['labels']}
    crops = {n: np.asarray(PIL.Image.open(folder / n).convert('RGB')) for n in sorted(labels)}
    return crops, labels


def angle_deg(view: alignment.View, label: np.ndarray) -> float:
    d = camera_utils.viewing_direction(view.label) @ camera_utils.viewing_direction(label)
    return math.degrees(math.acos(float(np.clip(d, -1, 1))))


def with_constants(placement_fit, crop_fit):
    """Set template.py's fitted constants (in this process)."""
    template.SCALE, template.TILT, template.DEPTH_SCALE, template.OFFSET = placement_fit
    template.CROP_ANCHOR_MM, template.CROP_SIDE_PER_SCALE = crop_fit


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--faces', default=str(ROOT / 'tests' / 'data' / 'faces'))
    parser.add_argument('--placements', type=int, default=5, help='random placements per face for (b)')
    parser.add_argument('--calibrate', action='store_true', help='print refitted constants for template.py')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()

    crops, labels = load_faces(Path(args.faces))
    models = FaceModels()
    landmarks = {n: max(models.detect(c), key=lambda f: f.size).landmarks for n, c in crops.items()}
    size = next(iter(crops.values())).shape[0]
    if args.calibrate:
        scale, tilt, depth, offset = calibration.fit_placement(landmarks, labels, size)
        anchor, side = calibration.fit_crop(landmarks, size, depth)
        print(f'SCALE = {scale:.7f}\nTILT = {tilt:.6f}\nDEPTH_SCALE = {depth:.5f}\nOFFSET = {offset.round(6).tolist()}'
              f'\nCROP_ANCHOR_MM = {anchor.round(4).tolist()}\nCROP_SIDE_PER_SCALE = {side:.3f}')
        return

    shipped = ((template.SCALE, template.TILT, template.DEPTH_SCALE, template.OFFSET),
               (template.CROP_ANCHOR_MM, template.CROP_SIDE_PER_SCALE))
    rng = np.random.default_rng(args.seed)
    placed = {n: [placement.place_crop(c, rng) for _ in range(args.placements)] for n, c in crops.items()}
    rows, seconds = [], []
    for name in crops:
        row = {'face': name}
        for mode in ('in-sample', 'leave-one-out'):
            if mode == 'in-sample':
                with_constants(*shipped)
            else:
                others = {n: l for n, l in landmarks.items() if n != name}
                placement_fit = calibration.fit_placement(others, labels, size)
                with_constants(placement_fit, calibration.fit_crop(others, size, placement_fit[2]))
            view = alignment.fit_view(landmarks[name])
            errors = []
            for photo, quad in placed[name]:
                start = time.perf_counter()
                faces = models.detect(photo)
                found = alignment.fit_view(max(faces, key=lambda f: f.size).landmarks)
                seconds.append(time.perf_counter() - start)
                errors.append(placement.quad_error(found.quad, quad))
            row[mode] = (angle_deg(view, labels[name]), float(np.mean(errors)), float(np.max(errors)))
        row['yaw'] = math.degrees(camera_utils.yaw_pitch_from_direction(camera_utils.viewing_direction(labels[name]))[0])
        rows.append(row)
    with_constants(*shipped)

    print('| face | label yaw | angle (in-sample) | quad mean / max (in-sample) | angle (leave-one-out) | '
          'quad mean / max (leave-one-out) |')
    print('|---|---:|---:|---:|---:|---:|')
    for r in rows:
        a, b = r['in-sample'], r['leave-one-out']
        print(f"| {r['face']} | {r['yaw']:+.1f} | {a[0]:.2f} deg | {100 * a[1]:.2f} / {100 * a[2]:.2f} % | "
              f"{b[0]:.2f} deg | {100 * b[1]:.2f} / {100 * b[2]:.2f} % |")
    for mode in ('in-sample', 'leave-one-out'):
        angles = [r[mode][0] for r in rows]
        quads = [r[mode][1] for r in rows]
        print(f'{mode}: viewing direction mean {np.mean(angles):.2f} deg, max {np.max(angles):.2f} deg; '
              f'quad mean {100 * np.mean(quads):.2f} %, worst face {100 * np.max(quads):.2f} %')
    print(f'detection + landmarks + fit: {np.median(seconds):.3f} s per photo (median of {len(seconds)})')

    # The whole per-photo path of prepare_dataset.py (load, detect, embed, fit, crop, filters), without latents.
    folder = Path(args.faces)
    start = time.perf_counter()
    records = pipeline.analyse(folder, pipeline.PrepareOptions(), models)
    total = time.perf_counter() - start
    photos = sum(Path(r.source).suffix.lower() in PHOTO_SUFFIXES for r in records)
    print(f'pipeline.analyse with the identity filter: {total / photos:.3f} s per photo ({photos} photos, '
          'model loading excluded)')

    # Phone-sized JPEGs (the face about 1500 px wide in a photo of about 10 megapixels).
    with tempfile.TemporaryDirectory() as tmp:
        for name, crop in crops.items():
            photo, _ = placement.place_crop(crop, rng, scale_range=(3.0, 3.0), margin=0.3)
            PIL.Image.fromarray(photo).save(Path(tmp) / f'{Path(name).stem}.jpg', quality=92)
        size = PIL.Image.open(next(Path(tmp).iterdir())).size
        start = time.perf_counter()
        records = pipeline.analyse(Path(tmp), pipeline.PrepareOptions(), models)
        total = time.perf_counter() - start
        print(f'the same on {len(records)} JPEG photos of about {size[0]}x{size[1]}: {total / len(records):.3f} s per photo')


if __name__ == '__main__':
    main()
