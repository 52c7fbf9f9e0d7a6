"""Fit an EG3D camera and its crop to a face's landmarks, and convert between crop, quad and camera.

Camera: a face's landmarks in the photo are the template's points (template.py) seen by the roll-free FFHQ camera
at some yaw and pitch (camera_utils.label_from_yaw_pitch), in normalised crop coordinates, carried into the photo by
a 2D similarity. For a given yaw and pitch the best similarity is a linear least-squares solve, so only the two
angles are searched: a coarse grid, then scipy's least_squares from the best grid point.

Crop: EG3D's construction (template.CROP_ANCHOR_MM): centre and side from the affine camera of five points, turned
by the roll of the camera fit so that the eyes come out level. A crop is a similarity from normalised crop
coordinates (u, v in [0, 1]) to photo pixels; its quad is the image of the unit square. Quad, similarity and
(quad, label) -> View convert into each other exactly.

Pixel coordinates are continuous: pixel (i, j) covers [j, j+1) x [i, i+1), its centre is (j + 0.5, i + 0.5).
"""
import dataclasses
import math
from typing import Optional, Tuple

import numpy as np
import scipy.optimize

import camera_utils
from photo_prep import template

YAW_GRID = np.radians(np.arange(-75, 76, 15))
PITCH_GRID = np.radians(np.arange(-45, 46, 15))
MAX_ANGLE = math.radians(89)


@dataclasses.dataclass
class View:
    """A face's fitted camera and crop."""
    yaw: float                 # radians, > 0: camera on the face's +x side (the photo's right in a frontal view)
    pitch: float               # radians, > 0: camera above the face
    similarity: np.ndarray     # [2, 3]: normalised crop coordinates (u, v in [0, 1]) -> photo pixels
    rms: float                 # landmark residual of the camera fit, in units of the fitted face size

    @property
    def label(self) -> np.ndarray:
        return camera_utils.label_from_yaw_pitch(self.yaw, self.pitch)

    @property
    def roll(self) -> float:
        """The crop's rotation in the photo, radians (image axes, y down: > 0 turns the crop clockwise)."""
        return math.atan2(self.similarity[1, 0], self.similarity[0, 0])

    @property
    def side(self) -> float:
        """The crop's side length in photo pixels."""
        return quad_side(self.similarity)

    @property
    def quad(self) -> np.ndarray:
        return quad_from_similarity(self.similarity)


def fit_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The similarity [2, 3] (rotation, uniform scale, translation) minimising |S(src) - dst|^2, [N, 2] each."""
    n = src.shape[0]
    design = np.zeros((2 * n, 4))
    design[0::2] = np.stack([src[:, 0], -src[:, 1], np.ones(n), np.zeros(n)], axis=1)
    design[1::2] = np.stack([src[:, 1], src[:, 0], np.zeros(n), np.ones(n)], axis=1)
    a, b, tx, ty = np.linalg.lstsq(design, dst.reshape(-1), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


def apply_similarity(similarity: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ similarity[:, :2].T + similarity[:, 2]


def quad_from_similarity(similarity: np.ndarray) -> np.ndarray:
    """The crop's top-left, top-right, bottom-right and bottom-left corners in photo pixels [4, 2]."""
    return apply_similarity(similarity, np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]))


def quad_side(similarity: np.ndarray) -> float:
    """The side length (photo pixels) of a crop similarity's square."""
    return float(np.hypot(similarity[0, 0], similarity[1, 0]))


def similarity_from_quad(quad: np.ndarray) -> np.ndarray:
    """Inverse of quad_from_similarity (a least-squares fit, exact for a square quad)."""
    return fit_similarity(np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]), np.asarray(quad, np.float64))


def projected_template(yaw: float, pitch: float, points_world: Optional[np.ndarray] = None) -> np.ndarray:
    """Template landmarks [68, 2] in normalised crop coordinates as the camera at (yaw, pitch) sees them."""
    points_world = template.world_points() if points_world is None else points_world
    return camera_utils.project_points(camera_utils.label_from_yaw_pitch(yaw, pitch), points_world)


def _residuals(angles: np.ndarray, landmarks: np.ndarray, points_world: np.ndarray) -> np.ndarray:
    """Landmark residuals [2N] (in crop-side units) of the best similarity for these angles."""
    projected = projected_template(angles[0], angles[1], points_world)[template.FIT_POINTS]
    similarity = fit_similarity(projected, landmarks)
    side = np.hypot(similarity[0, 0], similarity[1, 0])
    return (apply_similarity(similarity, projected) - landmarks).reshape(-1) / side


def fit_camera(landmarks: np.ndarray, points_world: Optional[np.ndarray] = None) -> Tuple[float, float, float, float]:
    """(yaw, pitch, roll, rms) of the camera that explains 68 landmarks [68, 2] (photo pixels)."""
    points_world = template.world_points() if points_world is None else points_world
    fitted = np.asarray(landmarks, np.float64)[template.FIT_POINTS]
    grid = [(yaw, pitch) for yaw in YAW_GRID for pitch in PITCH_GRID]
    costs = [np.square(_residuals(np.array(g), fitted, points_world)).sum() for g in grid]
    start = np.array(grid[int(np.argmin(costs))])
    result = scipy.optimize.least_squares(_residuals, start, args=(fitted, points_world), method='trf',
                                          bounds=([-MAX_ANGLE] * 2, [MAX_ANGLE] * 2), xtol=1e-12, ftol=1e-12)
    yaw, pitch = (float(v) for v in result.x)
    similarity = fit_similarity(projected_template(yaw, pitch, points_world)[template.FIT_POINTS], fitted)
    roll = math.atan2(similarity[1, 0], similarity[0, 0])
    rms = float(np.sqrt(np.mean(np.square(result.fun)) * 2))
    return yaw, pitch, roll, rms


def affine_camera(points_2d: np.ndarray, points_3d: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The affine camera x = A X + t [(2, 3), (2,)] that maps points_3d [N, 3] closest to points_2d [N, 2]."""
    n = points_3d.shape[0]
    design = np.concatenate([points_3d, np.ones((n, 1))], axis=1)
    solution = np.linalg.lstsq(design, points_2d, rcond=None)[0]      # [4, 2]
    return solution[:3].T, solution[3]


def crop_similarity(landmarks: np.ndarray, roll: float) -> np.ndarray:
    """EG3D's crop of a face [2, 3], turned by `roll` (template.CROP_ANCHOR_MM)."""
    # The template is y-up, the photo y-down: fit against flipped y, so that the camera keeps its handedness.
    flip = np.array([1.0, -1.0])
    A, t = affine_camera(template.five_points(np.asarray(landmarks, np.float64)) * flip,
                         template.five_points(template.shape_mm()))
    centre = (A @ template.shape_mm(template.CROP_ANCHOR_MM) + t) * flip
    side = template.CROP_SIDE_PER_SCALE * (np.linalg.norm(A[0]) + np.linalg.norm(A[1])) / 2
    return similarity_from_centre(centre, side, roll)


def similarity_from_centre(centre: np.ndarray, side: float, roll: float) -> np.ndarray:
    """The crop similarity of a square of `side` pixels centred at `centre`, turned by `roll` radians."""
    a, b = side * math.cos(roll), side * math.sin(roll)
    linear = np.array([[a, -b], [b, a]])
    return np.concatenate([linear, (np.asarray(centre) - linear @ np.array([0.5, 0.5]))[:, None]], axis=1)


def ffhq_roll(landmarks: np.ndarray) -> float:
    """The in-plane angle (radians) that FFHQ's alignment takes out: its crop's x axis is the eye-to-eye vector
    minus the eye-to-mouth vector turned by 90 degrees, which stays level when the head turns or tilts."""
    landmarks = np.asarray(landmarks, np.float64)
    eye_left, eye_right = landmarks[36:42].mean(0), landmarks[42:48].mean(0)
    eye_to_eye = eye_right - eye_left
    eye_to_mouth = (landmarks[48] + landmarks[54]) / 2 - (eye_left + eye_right) / 2
    x_axis = eye_to_eye + np.array([eye_to_mouth[1], -eye_to_mouth[0]])
    return math.atan2(x_axis[1], x_axis[0])


def fit_view(landmarks: np.ndarray, points_world: Optional[np.ndarray] = None) -> View:
    """The camera and crop [View] of a face's 68 landmarks [68, 2] (photo pixels, continuous coordinates)."""
    yaw, pitch, _, rms = fit_camera(landmarks, points_world)
    return View(yaw=yaw, pitch=pitch, similarity=crop_similarity(landmarks, ffhq_roll(landmarks)), rms=rms)


def view_from_quad(quad: np.ndarray, label: np.ndarray) -> View:
    """The View of a known quad and FFHQ-convention label (the inverse of View.quad and View.label)."""
    yaw, pitch = camera_utils.yaw_pitch_from_direction(camera_utils.viewing_direction(label))
    return View(yaw=yaw, pitch=pitch, similarity=similarity_from_quad(quad), rms=0.0)
