"""Camera poses and intrinsics in the EG3D label format (cam2world 4x4 + normalised intrinsics 3x3).

World frame: y up. Angles: `horizontal` is the azimuth (rotation about y), `vertical` the polar
angle from +y; (pi/2, pi/2) puts the camera on the +z axis looking back at the target. The
cam2world matrices use the OpenCV camera convention (camera looks along its +z, y down).

The samplers draw their angle noise from the global torch RNG even when the stddevs are zero
(two draws of [batch_size, 1]), as the official code does, so seeded scripts consume the same
random stream.
"""

import math
from typing import Optional, Tuple

import numpy as np
import torch

from training.volumetric_rendering import math_utils


def _orbit_origins(h: torch.Tensor, v: torch.Tensor, radius: float) -> torch.Tensor:
    """Camera centres on a sphere of `radius` around the origin for azimuth h, polar angle v ([B, 1] each).

    The polar angle is clamped away from the poles and remapped through arccos(1 - 2 v/pi), which
    makes uniformly drawn v uniform in area on the sphere.
    """
    v = torch.clamp(v, 1e-5, math.pi - 1e-5)
    phi = torch.arccos(1 - 2 * (v / math.pi))
    origins = torch.zeros((h.shape[0], 3), device=h.device)
    origins[:, 0:1] = radius * torch.sin(phi) * torch.cos(math.pi - h)
    origins[:, 2:3] = radius * torch.sin(phi) * torch.sin(math.pi - h)
    origins[:, 1:2] = radius * torch.cos(phi)
    return origins


def _standard_normal(batch_size: int, device) -> torch.Tensor:
    return torch.randn((batch_size, 1), device=device)


def _symmetric_uniform(batch_size: int, device) -> torch.Tensor:
    return torch.rand((batch_size, 1), device=device) * 2 - 1


def _draw_angles(noise, horizontal_mean, vertical_mean, horizontal_stddev, vertical_stddev, batch_size, device):
    """(azimuth, polar) [B, 1] each as mean + stddev * noise; the azimuth noise is drawn first."""
    horizontal = noise(batch_size, device) * horizontal_stddev + horizontal_mean
    vertical = noise(batch_size, device) * vertical_stddev + vertical_mean
    return horizontal, vertical


class GaussianCameraPoseSampler:
    """Yaw/pitch ~ Normal(mean, stddev), camera looking at the origin.

    Example: camera at [0, 0, 1] looking at the origin:
    `GaussianCameraPoseSampler.sample(math.pi/2, math.pi/2, radius=1)`.
    """

    @staticmethod
    def sample(horizontal_mean, vertical_mean, horizontal_stddev=0, vertical_stddev=0, radius=1, batch_size=1, device='cpu'):
        h, v = _draw_angles(_standard_normal, horizontal_mean, vertical_mean, horizontal_stddev, vertical_stddev,
                            batch_size, device)
        origins = _orbit_origins(h, v, radius)
        return create_cam2world_matrix(math_utils.normalize_vecs(-origins), origins)


class LookAtPoseSampler:
    """Like GaussianCameraPoseSampler, but the camera looks at `lookat_position` (a 3-vector);
    the orbit itself stays centred at the origin.

    Example: `LookAtPoseSampler.sample(math.pi/2, math.pi/2, torch.tensor([0, 0, 0]), radius=1)`.
    """

    @staticmethod
    def sample(horizontal_mean, vertical_mean, lookat_position, horizontal_stddev=0, vertical_stddev=0, radius=1, batch_size=1, device='cpu'):
        h, v = _draw_angles(_standard_normal, horizontal_mean, vertical_mean, horizontal_stddev, vertical_stddev,
                            batch_size, device)
        origins = _orbit_origins(h, v, radius)
        return create_cam2world_matrix(math_utils.normalize_vecs(lookat_position - origins), origins)


class UniformCameraPoseSampler:
    """Like GaussianCameraPoseSampler, but yaw/pitch ~ Uniform(mean - stddev, mean + stddev).

    Example: 16 cameras with yaw in [-pi/2, pi/2] around the front view:
    `UniformCameraPoseSampler.sample(math.pi/2, math.pi/2, horizontal_stddev=math.pi/2, batch_size=16)`.
    """

    @staticmethod
    def sample(horizontal_mean, vertical_mean, horizontal_stddev=0, vertical_stddev=0, radius=1, batch_size=1, device='cpu'):
        h, v = _draw_angles(_symmetric_uniform, horizontal_mean, vertical_mean, horizontal_stddev, vertical_stddev,
                            batch_size, device)
        origins = _orbit_origins(h, v, radius)
        return create_cam2world_matrix(math_utils.normalize_vecs(-origins), origins)


def create_cam2world_matrix(forward_vector: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
    """cam2world [B, 4, 4] for cameras at `origin` [B, 3] looking along `forward_vector` [B, 3].

    No roll: the camera's x axis stays horizontal (y up in the world). The rotation columns are
    (right, up, forward) with right = -normalize(world_up x forward).
    """
    fwd = math_utils.normalize_vecs(forward_vector)
    world_y = torch.tensor([0, 1, 0], dtype=torch.float, device=origin.device).expand_as(fwd)
    right = -math_utils.normalize_vecs(torch.cross(world_y, fwd, dim=-1))
    up = math_utils.normalize_vecs(torch.cross(fwd, right, dim=-1))

    def identity_batch():
        return torch.eye(4, device=origin.device).unsqueeze(0).repeat(fwd.shape[0], 1, 1)

    rotation = identity_batch()
    rotation[:, :3, :3] = torch.stack((right, up, fwd), dim=-1)
    translation = identity_batch()
    translation[:, :3, 3] = origin
    cam2world = translation @ rotation  # rotate first, then move to the camera centre
    assert cam2world.shape[1:] == (4, 4)
    return cam2world


def FOV_to_intrinsics(fov_degrees: float, device='cpu') -> torch.Tensor:
    """Normalised 3x3 intrinsics (principal point at the image centre) for a field of view in degrees.

    The constants 3.14159 and 1.414 are the official approximations of pi and sqrt(2), kept so
    that values match the official scripts (18.837 degrees -> focal length 4.2634, close to the
    4.2647 of the FFHQ/AFHQ dataset labels).
    """
    focal_length = float(1 / (math.tan(fov_degrees * 3.14159 / 360) * 1.414))
    return torch.tensor([[focal_length, 0, 0.5], [0, focal_length, 0.5], [0, 0, 1]], device=device)


# ----------------------------------------------------------------------------------------------
# The FFHQ label convention of EG3D's datasets: the one place that holds its constants.
#
# A label is 25 floats: the cam2world 4x4 (row-major) followed by the normalised 3x3 intrinsics. EG3D's
# in-the-wild preprocessing puts the camera on a sphere of radius 2.7 about the origin; the generator's
# average camera looks at the pivot (0, 0, 0.2). The focal length 4.2647 is 2985.29 / 700 (the pixel focal
# length of its 1024 px reconstruction crop over the 700 px centre crop); official sampling scripts use
# FOV_to_intrinsics(18.837) = 4.2634 instead, which inference keeps for pixel parity with them.

FFHQ_FOCAL = 4.2647
FFHQ_INTRINSICS = (FFHQ_FOCAL, 0.0, 0.5, 0.0, FFHQ_FOCAL, 0.5, 0.0, 0.0, 1.0)
FFHQ_RADIUS = 2.7
FFHQ_PIVOT = (0.0, 0.0, 0.2)
SAMPLING_FOV_DEG = 18.837


def ffhq_intrinsics() -> np.ndarray:
    """The normalised intrinsics of the FFHQ dataset labels, [3, 3] float64."""
    return np.asarray(FFHQ_INTRINSICS, dtype=np.float64).reshape(3, 3)


def make_label(cam2world: np.ndarray, intrinsics: Optional[np.ndarray] = None) -> np.ndarray:
    """The 25-float EG3D label [25] (float64) of a cam2world [4, 4]; FFHQ intrinsics unless given."""
    intrinsics = ffhq_intrinsics() if intrinsics is None else np.asarray(intrinsics)
    return np.concatenate([np.asarray(cam2world, np.float64).reshape(16), intrinsics.reshape(9)])


def split_label(label: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(cam2world [4, 4], intrinsics [3, 3]) of a 25-float label, float64."""
    label = np.asarray(label, dtype=np.float64).reshape(25)
    return label[:16].reshape(4, 4), label[16:].reshape(3, 3)


def camera_looking_along(direction: np.ndarray, radius: float = FFHQ_RADIUS, pivot=FFHQ_PIVOT) -> np.ndarray:
    """cam2world [4, 4] of the roll-free camera on the sphere of `radius` about the origin that looks at `pivot`
    along the unit vector `direction` (world: y up, frontal camera on +z looking along -z).

    The centre is pivot - s * direction with s > 0 chosen so that |centre| = radius: the camera LookAtPoseSampler
    makes for the same view, written in closed form so that any viewing direction maps to exactly one label.
    """
    d = np.asarray(direction, dtype=np.float64)
    d = d / np.linalg.norm(d)
    p = np.asarray(pivot, dtype=np.float64)
    pd = float(p @ d)
    s = pd + math.sqrt(pd * pd - float(p @ p) + radius * radius)
    centre = p - s * d
    world_up = np.array([0.0, 1.0, 0.0])
    right = -np.cross(world_up, d)
    right /= np.linalg.norm(right)
    up = np.cross(d, right)
    cam2world = np.eye(4)
    cam2world[:3, :3] = np.stack([right, up, d], axis=1)
    cam2world[:3, 3] = centre
    return cam2world


def direction_from_yaw_pitch(yaw: float, pitch: float) -> np.ndarray:
    """The viewing direction (unit, world frame) of a camera at `yaw` / `pitch` radians about the head.

    yaw > 0 puts the camera on the +x side, pitch > 0 above: the camera centre's direction from the head is
    (sin(yaw) cos(pitch), sin(pitch), cos(yaw) cos(pitch)), and the camera looks the opposite way.
    """
    return -np.array([math.sin(yaw) * math.cos(pitch), math.sin(pitch), math.cos(yaw) * math.cos(pitch)])


def yaw_pitch_from_direction(direction: np.ndarray) -> Tuple[float, float]:
    """Inverse of direction_from_yaw_pitch (radians)."""
    d = -np.asarray(direction, dtype=np.float64)
    d = d / np.linalg.norm(d)
    return math.atan2(d[0], d[2]), math.asin(max(-1.0, min(1.0, d[1])))


def viewing_direction(label: np.ndarray) -> np.ndarray:
    """The unit viewing direction (the camera's +z axis, world frame) of a label."""
    cam2world, _ = split_label(label)
    d = cam2world[:3, 2]
    return d / np.linalg.norm(d)


def label_from_yaw_pitch(yaw: float, pitch: float) -> np.ndarray:
    """The FFHQ-convention label [25] of the roll-free camera at `yaw` / `pitch` radians."""
    return make_label(camera_looking_along(direction_from_yaw_pitch(yaw, pitch)))


def project_points(label: np.ndarray, points: np.ndarray) -> np.ndarray:
    """World points [N, 3] -> normalised image coordinates [N, 2] (x right, y down, [0, 1] across the image)."""
    cam2world, intrinsics = split_label(label)
    world2cam = np.linalg.inv(cam2world)
    cam = np.asarray(points, np.float64) @ world2cam[:3, :3].T + world2cam[:3, 3]
    uvw = cam @ intrinsics.T
    return uvw[:, :2] / uvw[:, 2:3]
