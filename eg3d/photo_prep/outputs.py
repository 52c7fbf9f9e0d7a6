"""Write a prepared identity folder: image_N.png, dataset.json, prepare_report.json and contact_sheet.png.

Every file is written to a temporary name and renamed. With resume, a kept crop whose file already holds the
same pixels is left as it is (so its latent stays valid); one whose pixels changed loses its stale latent.
"""
import json
from pathlib import Path
from typing import List

import numpy as np
import PIL.Image

import dnnlib
from photo_prep import contact_sheet
from photo_prep.pipeline import PhotoRecord, PrepareError
from training.dataset_files import latent_name

REPORT = 'prepare_report.json'
SHEET = 'contact_sheet.png'
LABELS = 'dataset.json'


def check_outdir(outdir: Path, resume: bool) -> None:
    """A non-empty --outdir is an error unless resuming; an existing file in its place is always one."""
    if outdir.exists() and not outdir.is_dir():
        raise PrepareError(f'--outdir {outdir} exists and is not a folder')
    if outdir.is_dir() and any(outdir.iterdir()) and not resume:
        raise PrepareError(f'--outdir {outdir} is not empty; choose a new folder, or pass --resume to continue '
                           'a run that wrote there')
    if resume and outdir.is_dir() and any(outdir.iterdir()) and not (outdir / REPORT).is_file():
        raise PrepareError(f'--resume: {outdir} holds files but no {REPORT}; it was not written by '
                           'prepare_dataset.py, so nothing there is touched')


def _write_png(path: Path, pixels: np.ndarray) -> None:
    with dnnlib.util.atomic_write_path(path) as tmp:
        PIL.Image.fromarray(pixels).save(tmp, format='PNG')


def _write_json(path: Path, data) -> None:
    with dnnlib.util.atomic_write_path(path) as tmp:
        with open(tmp, 'w') as f:
            json.dump(data, f, indent=1)


def _same_pixels(path: Path, pixels: np.ndarray) -> bool:
    try:
        with PIL.Image.open(path) as image:
            return np.array_equal(np.asarray(image.convert('RGB')), pixels)
    except (OSError, ValueError):
        return False


def _remove_stale_images(outdir: Path, kept: int) -> None:
    """A resumed run that keeps fewer photos removes its own image_N.png (and latent) past the new count."""
    for path in outdir.glob('image_*.png'):
        index = path.stem[len('image_'):]
        if index.isdigit() and int(index) >= kept:
            path.unlink()
            (outdir / latent_name(path.name)).unlink(missing_ok=True)


def write_folder(outdir: Path, records: List[PhotoRecord]) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    kept = [r for r in records if r.status == 'kept']
    for record in kept:
        path = outdir / record.image
        if path.is_file() and _same_pixels(path, record.crop):
            continue
        (outdir / latent_name(record.image)).unlink(missing_ok=True)
        _write_png(path, record.crop)
    _remove_stale_images(outdir, len(kept))
    _write_json(outdir / LABELS, {'labels': [[r.image, [float(v) for v in r.label]] for r in kept]})
    _write_json(outdir / REPORT, {'photos': [r.report_entry() for r in records]})
    _write_png(outdir / SHEET, contact_sheet.render(records))
