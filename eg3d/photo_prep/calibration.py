"""Fit the template's placement and crop constants (template.py) to faces that EG3D's own preprocessing labelled.

Each labelled face is a 512 px EG3D crop with its camera label, so its crop is the whole image and its camera is
known. `fit_placement` finds the scale, tilt, depth scale and offset that make every label camera project the
template onto the face's landmarks; `fit_crop` finds the anchor and side factor that make the five-point crop of
every face the whole image, with the depth scale of the placement. bench/prepare_dataset.py --calibrate runs both
and prints the constants.
"""
from typing import Dict, Tuple

import numpy as np
import scipy.optimize

import camera_utils
from photo_prep import alignment, template


def fit_placement(landmarks: Dict[str, np.ndarray], labels: Dict[str, np.ndarray],
                  size: int) -> Tuple[float, float, float, np.ndarray]:
    """(scale, tilt, depth_scale, offset [3]) from 68 landmarks per face (crop pixels) and its label."""
    names = sorted(landmarks)

    def residuals(p):
        scale, tilt, depth_scale, offset_y, offset_z = p
        points = template.place(template.TEMPLATE_MM, scale, tilt, depth_scale, np.array([0.0, offset_y, offset_z]))
        return np.concatenate([
            (camera_utils.project_points(labels[n], points)[template.FIT_POINTS]
             - landmarks[n][template.FIT_POINTS] / size).reshape(-1) for n in names])

    start = [template.SCALE, template.TILT, template.DEPTH_SCALE, template.OFFSET[1], template.OFFSET[2]]
    scale, tilt, depth_scale, offset_y, offset_z = scipy.optimize.least_squares(residuals, start).x
    return float(scale), float(tilt), float(depth_scale), np.array([0.0, offset_y, offset_z])


def fit_crop(landmarks: Dict[str, np.ndarray], size: int, depth_scale: float) -> Tuple[np.ndarray, float]:
    """(anchor [3] in template mm, side per affine scale) that make each face's crop the whole image, for a
    template whose depth is scaled by `depth_scale` (fit_placement's)."""
    names = sorted(landmarks)
    flip = np.array([1.0, -1.0])
    cameras = [alignment.affine_camera(template.five_points(landmarks[n]) * flip,
                                       template.five_points(template.shape_mm(depth_scale=depth_scale))) for n in names]

    def residuals(p):
        anchor = template.shape_mm(np.array([0.0, p[0], p[1]]), depth_scale)
        out = []
        for A, t in cameras:
            centre = (A @ anchor + t) * flip
            side = p[2] * (np.linalg.norm(A[0]) + np.linalg.norm(A[1])) / 2
            out += [(centre[0] - size / 2) / size, (centre[1] - size / 2) / size, (side - size) / size]
        return np.array(out)

    start = [template.CROP_ANCHOR_MM[1], template.CROP_ANCHOR_MM[2], template.CROP_SIDE_PER_SCALE]
    anchor_y, anchor_z, side_per_scale = scipy.optimize.least_squares(residuals, start).x
    return np.array([0.0, anchor_y, anchor_z]), float(side_per_scale)
