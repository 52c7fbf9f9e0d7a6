"""A procedural family of 3D heads and an exact renderer for them, at EG3D's cameras.

A head is a parameter vector [NUM_PARAMS] in [0, 1] (PARAM_NAMES say what each entry shapes or
colours); `params_from_latent` ties a mapping-network latent z to one head (the normal CDF of its
first NUM_PARAMS entries), so the family is a fixed function of z. Values outside [0, 1] extrapolate
the family: heads no latent can reach (the demo identity is one).

The head is a union of signed distance functions (ellipsoids, capsules, tori) in EG3D's world frame
(y up, the face looks along +z, centred near the origin, inside the tri-plane box [-0.5, 0.5]^3).
`render` sphere-traces it along the rays EG3D's own RaySampler makes from a 25-float label, so an
image of the renderer and one of a TriPlaneGenerator share cameras pixel for pixel. Colours are
albedo times a fixed world-space light (view-independent, like EG3D's colour features).

    params = params_from_seed(7)                   # [1, NUM_PARAMS]
    out = render(HeadScene(params), labels, 128)   # image [B, 3, R, R] in [-1, 1], depth, mask
"""

import math
from typing import Dict, Tuple

import torch

from camera_utils import FFHQ_RADIUS

PARAM_NAMES = (
    'head_width', 'head_height', 'head_depth', 'skin_tone', 'skin_redness',
    'hair_colour', 'hair_thickness', 'hairline', 'eye_spacing', 'eye_size', 'iris_colour',
    'nose_length', 'nose_width', 'mouth_width', 'lip_colour', 'ear_size', 'glasses',
)
NUM_PARAMS = len(PARAM_NAMES)
GLASSES_THRESHOLD = 0.7  # heads whose `glasses` entry is above this wear glasses (30% of the family)
BACKGROUND = (0.80, 0.84, 0.90)
T_NEAR, T_FAR = FFHQ_RADIUS - 0.55, FFHQ_RADIUS + 0.55  # ray segment that holds the whole head

# Materials, in the order HeadScene.sdf reports them.
SKIN, EYE, LIPS, HAIR, GLASSES = range(5)

_SKIN_LIGHT, _SKIN_DARK = (0.96, 0.80, 0.69), (0.42, 0.27, 0.19)
_HAIR_PALETTE = ((0.07, 0.05, 0.04), (0.33, 0.19, 0.09), (0.62, 0.27, 0.10), (0.86, 0.70, 0.40), (0.66, 0.66, 0.68))
_IRIS_PALETTE = ((0.30, 0.17, 0.07), (0.25, 0.45, 0.70), (0.28, 0.50, 0.30))
_LIGHT = (0.45, 0.55, 0.70)  # towards the key light, upper front right (normalised in _shade)


def params_from_latent(z: torch.Tensor) -> torch.Tensor:
    """Head parameters [B, NUM_PARAMS] in (0, 1) of latents z [B, z_dim >= NUM_PARAMS]: the normal CDF of z[:, :P]."""
    if z.ndim != 2 or z.shape[1] < NUM_PARAMS:
        raise ValueError(f'latents must be [B, z_dim >= {NUM_PARAMS}], got {list(z.shape)}')
    return 0.5 * (1 + torch.erf(z[:, :NUM_PARAMS].float() / math.sqrt(2)))


def latent_from_seed(seed: int, z_dim: int) -> torch.Tensor:
    """The latent [1, z_dim] of `seed` (standard normal, its own generator)."""
    return torch.randn([1, z_dim], generator=torch.Generator().manual_seed(seed))


def params_from_seed(seed: int, z_dim: int = 64) -> torch.Tensor:
    """Head parameters [1, NUM_PARAMS] of `seed`: params_from_latent(latent_from_seed(seed, z_dim))."""
    return params_from_latent(latent_from_seed(seed, z_dim))

#----------------------------------------------------------------------------
# Signed distance primitives; points [B, N, 3], shape arguments broadcast against them.


def _ellipsoid(p: torch.Tensor, centre: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Approximate distance to an axis-aligned ellipsoid (exact on the surface, a bound elsewhere)."""
    q = p - centre
    k0 = (q / radii).norm(dim=-1)
    k1 = (q / (radii * radii)).norm(dim=-1).clamp_min(1e-8)
    return k0 * (k0 - 1) / k1


def _capsule(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor, radius) -> torch.Tensor:
    pa, ba = p - a, b - a
    h = ((pa * ba).sum(-1, keepdim=True) / (ba * ba).sum(-1, keepdim=True)).clamp(0, 1)
    return (pa - ba * h).norm(dim=-1) - radius


def _torus_facing_z(p: torch.Tensor, centre: torch.Tensor, ring: float, tube: float) -> torch.Tensor:
    q = p - centre
    return torch.stack([q[..., :2].norm(dim=-1) - ring, q[..., 2]], dim=-1).norm(dim=-1) - tube


def _smooth_union(a: torch.Tensor, b: torch.Tensor, k: float) -> torch.Tensor:
    """Polynomial smooth minimum: blends the two surfaces over a distance of about k."""
    h = (0.5 + 0.5 * (b - a) / k).clamp(0, 1)
    return b + (a - b) * h - k * h * (1 - h)


def _lerp(lo: float, hi: float, t: torch.Tensor) -> torch.Tensor:
    return lo + (hi - lo) * t


def _palette(colours, t: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear colour ramp through `colours` at t [B] (clamped to the ends) -> [B, 3]."""
    table = torch.tensor(colours, dtype=torch.float32)
    x = t.clamp(0, 1) * (len(colours) - 1)
    lo = x.floor().long().clamp(max=len(colours) - 2)
    w = (x - lo).unsqueeze(-1)
    return table[lo] * (1 - w) + table[lo + 1] * w

#----------------------------------------------------------------------------


class HeadScene:
    """The heads of a batch of parameter vectors [B, NUM_PARAMS]: distances, materials and albedo."""

    def __init__(self, params: torch.Tensor):
        if params.ndim != 2 or params.shape[1] != NUM_PARAMS:
            raise ValueError(f'head parameters must be [B, {NUM_PARAMS}], got {list(params.shape)}')
        self.params = params.float()
        g = {name: self.params[:, i].view(-1, 1, 1) for i, name in enumerate(PARAM_NAMES)}
        self.radii = torch.cat([_lerp(0.15, 0.19, g['head_width']), _lerp(0.19, 0.23, g['head_height']),
                                _lerp(0.17, 0.21, g['head_depth'])], dim=-1)  # [B, 1, 3]
        self.centre = torch.tensor([0.0, 0.01, -0.02]).view(1, 1, 3)
        self.eye_x = _lerp(0.05, 0.072, g['eye_spacing'])
        self.eye_r = _lerp(0.018, 0.027, g['eye_size'])
        self.eye_y = torch.full_like(self.eye_x, 0.035)
        self.eye_z = self._surface_z(self.eye_x, self.eye_y) - 0.6 * self.eye_r
        self.nose_len = _lerp(0.025, 0.06, g['nose_length'])
        self.nose_r = _lerp(0.011, 0.022, g['nose_width'])
        self.mouth_w = _lerp(0.03, 0.055, g['mouth_width'])
        self.ear = _lerp(0.03, 0.05, g['ear_size'])
        self.hair = _lerp(0.012, 0.045, g['hair_thickness'])
        self.hairline = _lerp(0.07, 0.14, g['hairline'])
        self.glasses = g['glasses'][..., 0] > GLASSES_THRESHOLD  # [B, 1]
        skin = _palette((_SKIN_LIGHT, _SKIN_DARK), g['skin_tone'].view(-1))
        skin = skin + torch.stack([0.08 * g['skin_redness'].view(-1), -0.02 * g['skin_redness'].view(-1),
                                   -0.02 * g['skin_redness'].view(-1)], dim=-1)
        lips = skin * torch.tensor([0.72, 0.38, 0.40]) + 0.15 * g['lip_colour'].view(-1, 1) * torch.tensor([1.0, 0.1, 0.2])
        self.albedos = {SKIN: skin, LIPS: lips, HAIR: _palette(_HAIR_PALETTE, g['hair_colour'].view(-1)),
                        GLASSES: torch.tensor([0.08, 0.08, 0.10]).expand_as(skin)}
        self.iris = _palette(_IRIS_PALETTE, g['iris_colour'].view(-1))

    def _surface_z(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """z of the head ellipsoid's front surface above (x, y) (inside its outline)."""
        r = self.radii
        inside = 1 - ((x - self.centre[..., 0:1]) / r[..., 0:1]) ** 2 - ((y - self.centre[..., 1:2]) / r[..., 1:2]) ** 2
        return self.centre[..., 2:3] + r[..., 2:3] * inside.clamp_min(0).sqrt()

    def _point(self, x, y, z) -> torch.Tensor:
        x, y, z = [torch.as_tensor(v, dtype=torch.float32).expand_as(self.eye_x) for v in (x, y, z)]
        return torch.cat([x, y, z], dim=-1)

    def _eye_centres(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self._point(self.eye_x, self.eye_y, self.eye_z), self._point(-self.eye_x, self.eye_y, self.eye_z)

    def sdf(self, p: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Points [B, N, 3] -> (signed distance [B, N], material index [B, N])."""
        r, c = self.radii, self.centre
        skin = _ellipsoid(p, c, r)
        chin = _ellipsoid(p, self._point(0.0, -0.11, 0.02), r * torch.tensor([0.62, 0.45, 0.75]))
        skin = _smooth_union(skin, chin, 0.04)
        neck = _capsule(p, self._point(0.0, -0.12, -0.04), self._point(0.0, -0.5, -0.06), 0.085)
        skin = _smooth_union(skin, neck, 0.03)
        nose_top = self._point(0.0, 0.0, self._surface_z(torch.zeros_like(self.eye_x), torch.zeros_like(self.eye_x)) - 0.01)
        nose_tip = nose_top + torch.cat([torch.zeros_like(self.nose_len), -0.9 * self.nose_len, self.nose_len], -1)
        skin = _smooth_union(skin, _capsule(p, nose_top, nose_tip, self.nose_r[..., 0]), 0.015)
        for side in (1.0, -1.0):
            ear_centre = self._point(side * (r[..., 0:1] - 0.005), torch.zeros_like(self.eye_x) + 0.0, -0.03)
            ear_radii = torch.cat([torch.full_like(self.ear, 0.016), self.ear, 0.6 * self.ear], -1)
            skin = _smooth_union(skin, _ellipsoid(p, ear_centre, ear_radii), 0.01)

        left, right = self._eye_centres()
        eyes = torch.minimum((p - left).norm(dim=-1) - self.eye_r[..., 0], (p - right).norm(dim=-1) - self.eye_r[..., 0])
        mouth_y = torch.full_like(self.eye_x, -0.105)
        chin_front = 0.02 + 0.75 * r[..., 2:3]  # the chin ellipsoid's front, which the mouth sits on
        mouth_centre = self._point(0.0, mouth_y, chin_front - 0.006)
        lips = _ellipsoid(p, mouth_centre, torch.cat([self.mouth_w, torch.full_like(self.mouth_w, 0.013),
                                                      torch.full_like(self.mouth_w, 0.018)], -1))
        hair = self._hair(p)
        brows = torch.minimum(*[_capsule(p, self._point(s * (self.eye_x - 0.025), self.eye_y + 0.038,
                                                        self.eye_z + 0.5 * self.eye_r),
                                         self._point(s * (self.eye_x + 0.028), self.eye_y + 0.043,
                                                     self.eye_z + 0.2 * self.eye_r), 0.007)
                                for s in (1.0, -1.0)])
        hair = torch.minimum(hair, brows)
        glasses = torch.where(self.glasses, self._glasses(p, left, right), torch.full_like(skin, 1e3))
        distances = torch.stack([skin, eyes, lips, hair, glasses], dim=-1)
        dist, material = distances.min(dim=-1)
        return dist, material

    def _hair(self, p: torch.Tensor) -> torch.Tensor:
        """A shell around the skull above a hairline that runs from the forehead down to the nape."""
        shell = _ellipsoid(p, self.centre, self.radii + self.hair)
        front_z, back_z, back_y = self.radii[..., 2:3], -self.radii[..., 2:3], torch.full_like(self.hairline, -0.12)
        slope = (self.hairline - back_y) / (front_z - back_z)
        line_y = back_y + slope * (p[..., 2:3] - back_z)
        below = ((line_y - p[..., 1:2]) / (1 + slope ** 2).sqrt())[..., 0]
        return torch.maximum(shell, below)

    def _glasses(self, p: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        ring = 0.036
        lift = torch.tensor([0.0, 0.0, 0.03])
        rims = [_torus_facing_z(p, e + lift, ring, 0.0045) for e in (left, right)]
        bridge = _capsule(p, left + lift - torch.tensor([ring, 0, 0]), right + lift + torch.tensor([ring, 0, 0]), 0.004)
        arms = [_capsule(p, e + lift + torch.tensor([s * ring, 0, 0]),
                         self._point(s * (self.radii[..., 0:1] + 0.01), self.eye_y, -0.04), 0.004)
                for e, s in ((left, 1.0), (right, -1.0))]
        return torch.stack(rims + [bridge] + arms, dim=-1).min(dim=-1).values

    def albedo(self, p: torch.Tensor, material: torch.Tensor) -> torch.Tensor:
        """Surface colour [B, N, 3] in [0, 1] at points [B, N, 3] of the given materials."""
        colour = torch.zeros(p.shape)
        for index, table in self.albedos.items():
            colour = torch.where((material == index).unsqueeze(-1), table.unsqueeze(1), colour)
        # Eyes look along +z: sclera, then the iris, then the pupil around each eye's optical axis.
        left, right = self._eye_centres()
        centre = torch.where(p[..., 0:1] > 0, left, right)
        gaze = torch.nn.functional.normalize(p - centre, dim=-1)[..., 2:3]
        eye = torch.where(gaze > 0.93, torch.tensor([0.03, 0.03, 0.03]),
                          torch.where(gaze > 0.72, self.iris.unsqueeze(1), torch.tensor([0.95, 0.95, 0.93])))
        return torch.where((material == EYE).unsqueeze(-1), eye, colour)

#----------------------------------------------------------------------------


def rays_of_labels(labels: torch.Tensor, resolution: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(origins, unit directions) [B, R*R, 3] of 25-float labels [B, 25], through EG3D's own RaySampler."""
    from training.volumetric_rendering.ray_sampler import RaySampler
    if labels.ndim != 2 or labels.shape[1] != 25:
        raise ValueError(f'camera labels must be [B, 25], got {list(labels.shape)}')
    labels = labels.float()
    return RaySampler()(labels[:, :16].view(-1, 4, 4), labels[:, 16:].view(-1, 3, 3), resolution)


def _normals(scene, p: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Unit surface normals [B, N, 3] by central differences of the distance."""
    grads = []
    for axis in range(3):
        offset = torch.zeros(3)
        offset[axis] = eps
        grads.append(scene.sdf(p + offset)[0] - scene.sdf(p - offset)[0])
    return torch.nn.functional.normalize(torch.stack(grads, dim=-1), dim=-1)


def _shade(albedo: torch.Tensor, normal: torch.Tensor) -> torch.Tensor:
    light = torch.nn.functional.normalize(torch.tensor(_LIGHT), dim=0)
    diffuse = (normal * light).sum(-1, keepdim=True).clamp_min(0)
    sky = 0.5 + 0.5 * normal[..., 1:2]  # soft fill from above
    return (albedo * (0.25 + 0.6 * diffuse + 0.2 * sky)).clamp(0, 1)


@torch.no_grad()
def render(scene, labels: torch.Tensor, resolution: int, steps: int = 64,
           tolerance: float = 2e-3) -> Dict[str, torch.Tensor]:
    """Sphere-trace `scene` (anything with .sdf and .albedo, batch B) from labels [B, 25].

    Returns image [B, 3, R, R] in [-1, 1] (EG3D's range), depth [B, 1, R, R] (distance along the unit
    ray, as EG3D's image_depth; T_FAR where a ray misses) and mask [B, 1, R, R] (1 on the head).
    """
    origins, dirs = rays_of_labels(labels, resolution)
    t = torch.full(origins.shape[:2], T_NEAR)
    for _ in range(steps):
        dist, _ = scene.sdf(origins + t.unsqueeze(-1) * dirs)
        t = (t + 0.9 * dist).clamp(max=T_FAR)  # 0.9: the blended distances are bounds, not exact
    p = origins + t.unsqueeze(-1) * dirs
    dist, material = scene.sdf(p)
    hit = (dist.abs() < tolerance) & (t < T_FAR)
    colour = _shade(scene.albedo(p, material), _normals(scene, p))
    colour = torch.where(hit.unsqueeze(-1), colour, torch.tensor(BACKGROUND))
    depth = torch.where(hit, t, torch.full_like(t, T_FAR))
    B, R = labels.shape[0], resolution
    return dict(image=(colour * 2 - 1).permute(0, 2, 1).reshape(B, 3, R, R),
                depth=depth.reshape(B, 1, R, R), mask=hit.float().reshape(B, 1, R, R))
