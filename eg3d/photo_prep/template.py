"""A 3D template of dlib's 68 face landmarks, placed in EG3D's world.

Shape: an average adult face written here in millimetres (x: the image's right in a frontal view, y up, z out of
the face, the nose tip at the origin). The x/y proportions follow frontal landmark statistics, the depths common
anthropometric values; the jaw line (points 0-16) is a silhouette whose 3D position changes with the view, so it
is kept for drawing but never fitted.

Placement: scale, tilt about x and offset that carry the template into EG3D's world (metres-like units, head near
the origin, y up, the frontal camera on +z). These four numbers were fitted once, by
`bench/prepare_dataset.py --calibrate`, to real faces that EG3D's own preprocessing aligned and labelled
(tests/data/faces): with them, the label camera of such a face projects the template onto the face's landmarks in
its crop. They encode the crop convention of EG3D's FFHQ processing (where the face sits in the 512 px crop and how
large it is) and the zero of its pitch.
"""
import numpy as np

# dlib 68-point landmarks: (x, y, z) in mm.
TEMPLATE_MM = np.array([
    # jaw line 0-16 (drawing only)
    [-69, -11, -95], [-67, -29, -88], [-65, -47, -80], [-62, -64, -70], [-57, -81, -58], [-48, -95, -45],
    [-34, -107, -33], [-19, -115, -24], [0, -117, -20], [19, -115, -24], [34, -107, -33], [48, -95, -45],
    [57, -81, -58], [62, -64, -70], [65, -47, -80], [67, -29, -88], [69, -11, -95],
    # eyebrows 17-21, 22-26
    [-59, 9, -40], [-51, 19, -30], [-38, 23, -24], [-24, 22, -20], [-11, 18, -18],
    [11, 18, -18], [24, 22, -20], [38, 23, -24], [51, 19, -30], [59, 9, -40],
    # nose bridge 27-30 (30 = tip), nostrils 31-35
    [0, 4, -22], [0, -7, -15], [0, -18, -8], [0, -30, 0],
    [-13, -40, -17], [-7, -42, -11], [0, -44, -9], [7, -42, -11], [13, -40, -17],
    # eyes 36-41, 42-47 (outer corner, upper lid, inner corner, lower lid)
    [-44, -1, -40], [-36, 4, -31], [-27, 5, -29], [-18, -1, -30], [-27, -3, -30], [-36, -4, -33],
    [18, -1, -30], [27, 5, -29], [36, 4, -31], [44, -1, -40], [36, -4, -33], [27, -3, -30],
    # outer lips 48-59
    [-29, -65, -30], [-19, -59, -20], [-8, -57, -14], [0, -58, -12], [8, -57, -14], [19, -59, -20],
    [29, -65, -30], [19, -73, -21], [9, -76, -15], [0, -76, -14], [-9, -76, -15], [-19, -73, -21],
    # inner lips 60-67
    [-25, -65, -28], [-8, -63, -16], [0, -63, -14], [8, -63, -16], [25, -65, -28], [8, -67, -17],
    [0, -68, -16], [-8, -67, -17],
], dtype=np.float64)

# The pose is fitted to the eyebrows, nose and eyes: the mouth moves with expression (a smile lifts its corners, a
# moustache hides them), which tilts the fitted pitch (bench/prepare_dataset.py compared the choices).
FIT_POINTS = np.arange(17, 48)

# Mirror image of each landmark (for symmetry checks and flipped photos).
MIRROR = np.array(list(range(16, -1, -1)) + list(range(26, 16, -1)) + [27, 28, 29, 30] + [35, 34, 33, 32, 31]
                  + [45, 44, 43, 42, 47, 46] + [39, 38, 37, 36, 41, 40]
                  + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55] + [64, 63, 62, 61, 60, 67, 66, 65])

# Placement in EG3D's world: x_world = SCALE * Rx(TILT) @ (x_mm with z * DEPTH_SCALE) + OFFSET (fitted, see the
# module docstring).
SCALE = 0.0024913
TILT = 0.021612
DEPTH_SCALE = 1.35971
OFFSET = np.array([0.0, 0.075195, 0.29562])

# EG3D's crop (its in-the-wild preprocessing) is centred on a 3D anchor point of a face template, seen through the
# affine camera that best maps five template points (eye centres, nose tip, mouth corners) to the five landmarks,
# and its side is proportional to that camera's scale. The same construction on this template (depth scaled as
# above), with the anchor (mm, template frame, before the depth scale) and the factor fitted like the placement:
CROP_ANCHOR_MM = np.array([0.0, -26.4154, -41.6256])
CROP_SIDE_PER_SCALE = 241.302


def five_points(landmarks: np.ndarray) -> np.ndarray:
    """Eye centres, nose tip and mouth corners [5, D] of 68 landmarks [68, D] (the points EG3D's crop uses)."""
    return np.stack([landmarks[36:42].mean(0), landmarks[42:48].mean(0), landmarks[30], landmarks[48], landmarks[54]])


def shape_mm(points_mm: np.ndarray = TEMPLATE_MM, depth_scale: float = None) -> np.ndarray:
    """Template points [N, 3] (mm) with their depth scaled (DEPTH_SCALE unless given)."""
    depth_scale = DEPTH_SCALE if depth_scale is None else depth_scale
    return np.asarray(points_mm, np.float64) * np.array([1.0, 1.0, depth_scale])


def rotation_x(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def place(points_mm: np.ndarray, scale: float, tilt: float, depth_scale: float, offset: np.ndarray) -> np.ndarray:
    """Template points [N, 3] (mm) -> world points [N, 3] under a placement."""
    return scale * shape_mm(points_mm, depth_scale) @ rotation_x(tilt).T + np.asarray(offset)


def world_points() -> np.ndarray:
    """The 68 template landmarks in EG3D's world [68, 3] with the fitted placement."""
    return place(TEMPLATE_MM, SCALE, TILT, DEPTH_SCALE, OFFSET)
