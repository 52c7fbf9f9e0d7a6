"""Face detection, 68 landmarks and a 128-D identity embedding from dlib's models.

The models ship inside the `face_recognition_models` package (no download at run time): HOG + linear SVM
detector (built into dlib), the max-margin CNN detector `mmod_human_face_detector.dat` as a fallback for faces
the HOG detector misses (turned, small, dark), the 68-point `shape_predictor_68_face_landmarks.dat` (the iBUG
300-W markup FFHQ was aligned with) and `dlib_face_recognition_resnet_model_v1.dat` (a ResNet whose 128-D
descriptors are < 0.6 apart for one person, 99.38% on LFW). Licences in docs/datasets.md.
"""
import dataclasses
import importlib.util
from pathlib import Path
from typing import List, Optional

import numpy as np

DETECT_MAX_SIDE = 1024    # photos are scaled down to this longest side for detection
CNN_MAX_SIDE = 640        # and to this one for the (slower) CNN fallback


class ModelsMissing(RuntimeError):
    pass


@dataclasses.dataclass
class Face:
    box: np.ndarray           # [4] left, top, right, bottom in photo pixels
    landmarks: np.ndarray     # [68, 2] photo pixels, continuous coordinates (pixel centres at + 0.5)
    shape: object             # dlib.full_object_detection (for the embedding)

    @property
    def size(self) -> float:
        return float(max(self.box[2] - self.box[0], self.box[3] - self.box[1]))


def models_folder() -> Path:
    spec = importlib.util.find_spec('face_recognition_models')
    if spec is None or not spec.submodule_search_locations:
        raise ModelsMissing('the face models are not installed: pip install face_recognition_models==0.3.0 '
                            '(and dlib-bin); see README "Two commands"')
    return Path(list(spec.submodule_search_locations)[0]) / 'models'


class FaceModels:
    """dlib's detectors, landmark predictor and embedding network, loaded once."""

    def __init__(self):
        try:
            import dlib
        except ImportError as err:
            raise ModelsMissing(f'dlib is not installed ({err}): pip install dlib-bin==20.0.1.post1') from None
        folder = models_folder()
        files = {name: folder / name for name in ('mmod_human_face_detector.dat',
                                                   'shape_predictor_68_face_landmarks.dat',
                                                   'dlib_face_recognition_resnet_model_v1.dat')}
        for path in files.values():
            if not path.is_file():
                raise ModelsMissing(f'face model file missing: {path} (reinstall face_recognition_models)')
        self._dlib = dlib
        self._hog = dlib.get_frontal_face_detector()
        self._cnn = dlib.cnn_face_detection_model_v1(str(files['mmod_human_face_detector.dat']))
        self._landmarks = dlib.shape_predictor(str(files['shape_predictor_68_face_landmarks.dat']))
        self._embedding = dlib.face_recognition_model_v1(str(files['dlib_face_recognition_resnet_model_v1.dat']))

    def _boxes(self, image: np.ndarray, cnn_fallback: bool) -> List[np.ndarray]:
        """Face boxes in photo pixels: HOG on a copy at most DETECT_MAX_SIDE wide, upsampled once when the photo is
        small; the CNN detector when HOG finds nothing (and `cnn_fallback`)."""
        passes = ((DETECT_MAX_SIDE, 'hog'), (CNN_MAX_SIDE, 'cnn')) if cnn_fallback else ((DETECT_MAX_SIDE, 'hog'),)
        for max_side, detector in passes:
            scale = min(1.0, max_side / max(image.shape[:2]))
            small = image if scale == 1.0 else _resize(image, scale)
            upsample = 1 if max(small.shape[:2]) < 640 else 0
            if detector == 'hog':
                rects = list(self._hog(small, upsample))
            else:
                rects = [d.rect for d in self._cnn(small, upsample)]
            if rects:
                return [np.array([r.left(), r.top(), r.right() + 1, r.bottom() + 1], np.float64) / scale
                        for r in rects]
        return []

    def detect(self, image: np.ndarray, cnn_fallback: bool = True) -> List[Face]:
        """Every face in an RGB photo [H, W, 3] uint8, with its 68 landmarks."""
        faces = []
        for box in self._boxes(image, cnn_fallback):
            rect = self._dlib.rectangle(*(int(round(v)) for v in (box[0], box[1], box[2] - 1, box[3] - 1)))
            shape = self._landmarks(image, rect)
            points = np.array([[p.x + 0.5, p.y + 0.5] for p in shape.parts()], np.float64)
            faces.append(Face(box=box, landmarks=points, shape=shape))
        return faces

    def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        """The face's 128-D identity descriptor [128] (float64)."""
        return np.asarray(self._embedding.compute_face_descriptor(image, face.shape), np.float64)

    def embed_aligned(self, crop: np.ndarray) -> Optional[np.ndarray]:
        """The descriptor of the largest face in an aligned crop [H, W, 3], or None if no face is found there (HOG
        only: an aligned face is upright and large, and renders without a face should not cost the CNN's time)."""
        faces = self.detect(crop, cnn_fallback=False)
        if not faces:
            return None
        return self.embed(crop, max(faces, key=lambda f: f.size))


def _resize(image: np.ndarray, scale: float) -> np.ndarray:
    import PIL.Image
    h, w = image.shape[:2]
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    return np.asarray(PIL.Image.fromarray(image).resize(size, PIL.Image.BILINEAR, reducing_gap=2.0))
