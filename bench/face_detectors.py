"""Which face detector finds the faces: dlib HOG, dlib CNN (MMOD), and, when installed, facenet-pytorch's MTCNN and
OpenCV's Haar cascades (neither is a dependency of the project; docs/datasets.md says why).

    python bench/face_detectors.py [--extra-site DIR]   # DIR: a pip --target folder holding the optional packages

Photos: the five real faces of tests/data/faces and their mirror images (yaw -33 to +33 degrees), each placed 3
times in a larger photo by a random similarity (rotation +-20 deg, scale 0.7-1.8x), 30 photos, each scaled to at
most 640 px (the size prepare_dataset.py gives the CNN detector). A detection counts when a box's centre lies within
a quarter of the crop's side of the true face centre.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'eg3d'))

from photo_prep import face_models, placement  # noqa: E402


def dlib_detectors():
    import dlib
    hog = dlib.get_frontal_face_detector()
    cnn = dlib.cnn_face_detection_model_v1(str(face_models.models_folder() / 'mmod_human_face_detector.dat'))

    def run_hog(image):
        return [(r.left(), r.top(), r.right(), r.bottom()) for r in hog(image, 0)]

    def run_cnn(image):
        return [(d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()) for d in cnn(image, 0)]
    return {'dlib HOG': run_hog, 'dlib CNN (MMOD)': run_cnn}


def optional_detectors():
    found = {}
    try:
        import torch
        from facenet_pytorch import MTCNN
        mtcnn = MTCNN(keep_all=True, device=torch.device('cpu'))

        def run_mtcnn(image):
            boxes, _ = mtcnn.detect(PIL.Image.fromarray(image))
            return [] if boxes is None else [tuple(b) for b in boxes]
        found['MTCNN (facenet-pytorch)'] = run_mtcnn
    except Exception as err:    # optional: any import or load failure means "not available"
        print(f'MTCNN not available: {type(err).__name__}: {err}')
    try:
        import cv2
        cascades = [Path(cv2.data.haarcascades) / n for n in ('haarcascade_frontalface_default.xml',
                                                              'haarcascade_profileface.xml')]
        classifiers = [cv2.CascadeClassifier(str(c)) for c in cascades if c.is_file()]
        if len(classifiers) == 2:
            def run_haar(image):
                grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
                return [(x, y, x + w, y + h) for c in classifiers for (x, y, w, h) in c.detectMultiScale(grey, 1.1, 5)]
            found['OpenCV Haar (frontal + profile)'] = run_haar
        else:
            print(f'OpenCV {cv2.__version__} ships no Haar cascade files')
    except Exception as err:
        print(f'OpenCV not available: {type(err).__name__}: {err}')
    return found


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--extra-site', help='folder with optional packages (pip install --target)')
    parser.add_argument('--placements', type=int, default=3)
    args = parser.parse_args()
    if args.extra_site:
        sys.path.append(args.extra_site)
    rng = np.random.default_rng(0)
    photos = []
    for path in sorted((ROOT / 'tests' / 'data' / 'faces').glob('*.png')):
        crop = np.asarray(PIL.Image.open(path).convert('RGB'))
        for image in (crop, crop[:, ::-1].copy()):
            for _ in range(args.placements):
                photo, quad = placement.place_crop(image, rng)
                scale = min(1.0, 640 / max(photo.shape[:2]))
                photos.append((face_models._resize(photo, scale), quad * scale))
    detectors = {**dlib_detectors(), **optional_detectors()}
    print('| detector | found | seconds per photo |\n|---|---:|---:|')
    for name, detect in detectors.items():
        hits, seconds = 0, []
        for photo, quad in photos:
            start = time.perf_counter()
            boxes = detect(photo)
            seconds.append(time.perf_counter() - start)
            centre, side = quad.mean(0), np.linalg.norm(quad[1] - quad[0])
            hits += any(np.hypot((b[0] + b[2]) / 2 - centre[0], (b[1] + b[3]) / 2 - centre[1]) < side / 4
                        for b in boxes)
        print(f'| {name} | {hits} / {len(photos)} | {np.median(seconds):.3f} |')


if __name__ == '__main__':
    main()
