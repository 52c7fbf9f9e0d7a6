"""Small vector helpers shared by the ray sampler, the renderer and the camera utilities.

Names and semantics follow the official EG3D `math_utils` module so that code written against
it (camera scripts, renderer) works unchanged.
"""

import torch


def transform_vectors(matrix: torch.Tensor, vectors4: torch.Tensor) -> torch.Tensor:
    """Apply an [M, M] matrix to a batch of row vectors [N, M]; returns [N, M] (= (matrix @ v.T).T)."""
    return torch.matmul(vectors4, matrix.T)


def normalize_vecs(vectors: torch.Tensor) -> torch.Tensor:
    """Scale every vector along the last dimension to unit Euclidean length."""
    return vectors / torch.norm(vectors, dim=-1, keepdim=True)


def torch_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Dot product over the last dimension (broadcasting over the others)."""
    return (x * y).sum(-1)


def get_ray_limits_box(rays_o: torch.Tensor, rays_d: torch.Tensor, box_side_length):
    """Intersect rays with the axis-aligned cube of side `box_side_length` centred at the origin.

    Slab method: intersect with the x, y and z slabs in turn, keeping the latest entry and the
    earliest exit. Inputs are [..., 3]; returns (t_min, t_max), each [..., 1]. Rays that miss the
    box get t_min = -1 and t_max = -2 (so t_max < t_min marks them). No gradient flows through.
    """
    batch_shape = rays_o.shape[:-1]
    origins = rays_o.detach().reshape(-1, 3)
    dirs = rays_d.detach().reshape(-1, 3)

    half = box_side_length / 2
    # Row 0: lower corner, row 1: upper corner.
    bounds = torch.tensor([[-half, -half, -half], [half, half, half]], dtype=origins.dtype, device=origins.device)
    hits = torch.ones(origins.shape[:-1], dtype=torch.bool, device=origins.device)

    inv_dir = 1 / dirs
    negative = (inv_dir < 0).long()  # a ray going in -axis direction enters through the upper face

    def slab(axis):
        near = (bounds.index_select(0, negative[..., axis])[..., axis] - origins[..., axis]) * inv_dir[..., axis]
        far = (bounds.index_select(0, 1 - negative[..., axis])[..., axis] - origins[..., axis]) * inv_dir[..., axis]
        return near, far

    t_min, t_max = slab(0)
    for axis in (1, 2):
        near, far = slab(axis)
        hits[torch.logical_or(t_min > far, near > t_max)] = False
        t_min = torch.max(t_min, near)
        t_max = torch.min(t_max, far)

    t_min[~hits] = -1
    t_max[~hits] = -2
    return t_min.reshape(*batch_shape, 1), t_max.reshape(*batch_shape, 1)


def linspace(start: torch.Tensor, stop: torch.Tensor, num: int) -> torch.Tensor:
    """Element-wise `numpy.linspace` for tensors: returns [num, *start.shape], both ends included."""
    steps = torch.arange(num, dtype=torch.float32, device=start.device) / (num - 1)
    steps = steps.reshape(num, *([1] * start.ndim))
    return start[None] + steps * (stop - start)[None]
