"""Volume rendering pieces: plane projection, sampling, ray generation, ray marching, and the
importance renderer's use of the global RNG (checked against a replay of the documented draws)."""
import pytest
import torch

from training.volumetric_rendering import math_utils
from training.volumetric_rendering.ray_marcher import MipRayMarcher2
from training.volumetric_rendering.ray_sampler import RaySampler
from training.volumetric_rendering.renderer import (ImportanceRenderer, generate_planes, project_onto_planes,
                                                    sample_from_3dgrid, sample_from_planes)

OPTIONS = {
    'depth_resolution': 6,
    'depth_resolution_importance': 5,
    'ray_start': 2.25,
    'ray_end': 3.3,
    'box_warp': 1,
    'clamp_mode': 'softplus',
    'disparity_space_sampling': False,
}


class LinearDecoder(torch.nn.Module):
    """Deterministic stand-in for OSGDecoder: mean plane feature -> (sigma, rgb)."""

    def forward(self, sampled_features, ray_directions):
        x = sampled_features.mean(1)
        return {'rgb': torch.sigmoid(x[..., 1:]), 'sigma': 4 * x[..., 0:1] + 2}


def frontal_camera(batch_size=1, radius=2.7):
    """Label rows: camera on +z looking at the origin, focal 4.2647 (OpenCV convention)."""
    cam2world = torch.tensor([[1., 0, 0, 0], [0, -1, 0, 0], [0, 0, -1, radius], [0, 0, 0, 1]])
    intrinsics = torch.tensor([[4.2647, 0, 0.5], [0, 4.2647, 0.5], [0, 0, 1]])
    return cam2world.expand(batch_size, 4, 4).clone(), intrinsics.expand(batch_size, 3, 3).clone()


def test_generate_planes_values():
    expected = torch.tensor([[[1, 0, 0], [0, 1, 0], [0, 0, 1]],
                             [[1, 0, 0], [0, 0, 1], [0, 1, 0]],
                             [[0, 0, 1], [1, 0, 0], [0, 1, 0]]], dtype=torch.float32)
    assert torch.equal(generate_planes(), expected)


def test_projection_gives_xy_xz_zx():
    # The official axes make the third plane (z, x), not (z, y): trained models depend on it.
    coords = torch.tensor([[[0.1, 0.2, 0.3], [-0.4, 0.5, -0.6]]])
    proj = project_onto_planes(generate_planes(), coords)
    assert proj.shape == (3, 2, 2)
    x, y, z = coords[0].unbind(-1)
    torch.testing.assert_close(proj[0], torch.stack([x, y], -1), atol=1e-7, rtol=0)
    torch.testing.assert_close(proj[1], torch.stack([x, z], -1), atol=1e-7, rtol=0)
    torch.testing.assert_close(proj[2], torch.stack([z, x], -1), atol=1e-7, rtol=0)


def test_plane_axes_is_plain_attribute():
    renderer = ImportanceRenderer()
    assert isinstance(renderer.plane_axes, torch.Tensor)
    assert 'plane_axes' not in dict(renderer.named_buffers())
    assert len(renderer.state_dict()) == 0
    assert isinstance(renderer.ray_marcher, MipRayMarcher2)


def test_sample_from_planes_box_warp_and_zero_padding():
    # Features linear in the plane's first coordinate u: f = u (align_corners=False is exact for
    # linear functions away from the border half-pixel).
    H = W = 16
    u = (torch.arange(W, dtype=torch.float32) + 0.5) / W * 2 - 1
    planes = u.expand(1, 3, 1, H, W).clone()
    box_warp = 1.6
    coords = torch.tensor([[[0.3, -0.2, 0.1], [-0.5, 0.4, 0.25], [0.9, 0.0, 0.0]]])
    out = sample_from_planes(generate_planes(), planes, coords, box_warp=box_warp)
    assert out.shape == (1, 3, 3, 1)
    scaled = coords[0] * 2 / box_warp
    # Planes 0 and 1 read x, plane 2 reads z.
    torch.testing.assert_close(out[0, 0, :2, 0], scaled[:2, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[0, 1, :2, 0], scaled[:2, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[0, 2, :2, 0], scaled[:2, 2], atol=1e-6, rtol=0)
    # x = 0.9 lies outside the box of side 1.6 for the x-reading planes: zeros padding.
    assert out[0, 0, 2, 0].item() == 0 and out[0, 1, 2, 0].item() == 0


def test_sample_from_3dgrid_shape_and_values():
    grid = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4, 4)
    coords = torch.zeros(3, 5, 3)
    out = sample_from_3dgrid(grid, coords)
    assert out.shape == (3, 5, 2)
    # Centre of the volume = mean of the 8 central voxels of each channel.
    torch.testing.assert_close(out[0, 0], grid[0, :, 1:3, 1:3, 1:3].mean(dim=(1, 2, 3)))


def test_linspace_matches_torch():
    start = torch.tensor([[0.5], [1.0]])
    stop = torch.tensor([[1.5], [4.0]])
    out = math_utils.linspace(start, stop, 7)
    assert out.shape == (7, 2, 1)
    torch.testing.assert_close(out[:, 1, 0], torch.linspace(1.0, 4.0, 7))


def test_ray_limits_box():
    rays_o = torch.tensor([[[0., 0., 2.7], [0., 3., 2.7]]])
    rays_d = torch.tensor([[[0., 0., -1.], [0., 0., -1.]]])
    t_min, t_max = math_utils.get_ray_limits_box(rays_o, rays_d, box_side_length=1)
    assert t_min.shape == t_max.shape == (1, 2, 1)
    assert t_min[0, 0, 0].item() == pytest.approx(2.2) and t_max[0, 0, 0].item() == pytest.approx(3.2)
    assert t_min[0, 1, 0].item() == -1 and t_max[0, 1, 0].item() == -2  # misses the box


def test_vector_helpers():
    v = torch.tensor([[3., 4., 0.]])
    torch.testing.assert_close(math_utils.normalize_vecs(v), torch.tensor([[0.6, 0.8, 0.]]))
    assert math_utils.torch_dot(v, v).item() == 25
    M = torch.tensor([[0., -1.], [1., 0.]])
    torch.testing.assert_close(math_utils.transform_vectors(M, torch.tensor([[1., 0.]])), torch.tensor([[0., 1.]]))


def test_ray_sampler_pixel_order_and_directions():
    cam2world, intrinsics = frontal_camera(2)
    R = 8
    origins, dirs = RaySampler()(cam2world, intrinsics, R)
    assert origins.shape == dirs.shape == (2, R * R, 3)
    torch.testing.assert_close(origins, cam2world[:, None, :3, 3].expand(2, R * R, 3))
    torch.testing.assert_close(dirs.norm(dim=-1), torch.ones(2, R * R))
    # Ray m is pixel (row m // R, column m % R); with y down in the camera, row 0 looks up (+y)
    # and column 0 looks to -x for this camera.
    grid = dirs[0].reshape(R, R, 3)
    assert (grid[0, :, 1] > 0).all() and (grid[-1, :, 1] < 0).all()
    assert (grid[:, 0, 0] < 0).all() and (grid[:, -1, 0] > 0).all()
    # Pixel centres are at (k + 0.5) / R: the four central rays are symmetric about the axis.
    centre = grid[R // 2 - 1:R // 2 + 1, R // 2 - 1:R // 2 + 1].mean(dim=(0, 1))
    torch.testing.assert_close(centre / centre.norm(), torch.tensor([0., 0., -1.]), atol=1e-6, rtol=0)
    # Focal length: the first pixel centre is at x_cam = (0.5/R - 0.5) / f.
    expected_x = (0.5 / R - 0.5) / 4.2647
    assert (grid[0, 0, 0] / -grid[0, 0, 2]).item() == pytest.approx(expected_x, rel=1e-5)


def test_ray_marcher_opaque_and_empty_rays():
    marcher = MipRayMarcher2()
    depths = torch.linspace(2.0, 3.0, 5).reshape(1, 1, 5, 1).repeat(1, 2, 1, 1)
    colors = torch.full((1, 2, 5, 3), 0.25)
    densities = torch.stack([torch.full((5, 1), 1e4), torch.full((5, 1), -1e4)])[None]
    rgb, depth, weights = marcher(colors, densities, depths, {'clamp_mode': 'softplus'})
    assert rgb.shape == (1, 2, 3) and depth.shape == (1, 2, 1) and weights.shape == (1, 2, 4, 1)
    # Opaque ray: all weight on the first interval, colour 0.25 -> 0.25 * 2 - 1.
    torch.testing.assert_close(rgb[0, 0], torch.full((3,), -0.5))
    assert depth[0, 0, 0].item() == pytest.approx(2.125)
    # Empty ray: no weight, colour -1, depth 0/0 -> inf -> clamped to the global max depth.
    torch.testing.assert_close(rgb[0, 1], torch.full((3,), -1.0))
    assert depth[0, 1, 0].item() == 3.0
    # white_back adds the missing opacity.
    rgb_white, _, _ = marcher(colors, densities, depths, {'clamp_mode': 'softplus', 'white_back': True})
    torch.testing.assert_close(rgb_white[0, 1], torch.full((3,), 1.0))
    with pytest.raises(ValueError):
        marcher(colors, densities, depths, {'clamp_mode': 'relu'})


def test_ray_marcher_depth_clamp_is_batch_global():
    marcher = MipRayMarcher2()
    # Batch item 0 samples [2, 3], item 1 samples [5, 6]: item 0's empty ray clamps to 6, not 3.
    depths = torch.stack([torch.linspace(2, 3, 4), torch.linspace(5, 6, 4)]).reshape(2, 1, 4, 1)
    colors = torch.zeros(2, 1, 4, 3)
    densities = torch.full((2, 1, 4, 1), -1e4)
    _, depth, _ = marcher(colors, densities, depths, {'clamp_mode': 'softplus'})
    assert depth.flatten().tolist() == [6.0, 6.0]


def _planes(seed=0, B=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 4, 16, 16, generator=g) * 0.5


def _render(options, B=2, R=4, seed=11):
    cam2world, intrinsics = frontal_camera(B)
    origins, dirs = RaySampler()(cam2world, intrinsics, R)
    torch.manual_seed(seed)
    return ImportanceRenderer()(_planes(B=B), LinearDecoder(), origins, dirs, options), origins, dirs


def test_renderer_rng_calls_in_documented_order():
    B, R = 2, 4
    M, D, Di = R * R, OPTIONS['depth_resolution'], OPTIONS['depth_resolution_importance']
    (rgb, depth, wsum), origins, dirs = _render(OPTIONS, B, R)
    assert rgb.shape == (B, M, 3) and depth.shape == (B, M, 1) and wsum.shape == (B, M, 1)
    assert torch.isfinite(rgb).all() and torch.isfinite(depth).all()
    state_after = torch.get_rng_state()

    # Replay: exactly rand [B, M, D, 1] then rand [B*M, Di], nothing else.
    torch.manual_seed(11)
    jitter = torch.rand(B, M, D, 1)
    torch.rand(B * M, Di)  # the importance draw: consumed, its values are not needed here
    assert torch.equal(torch.get_rng_state(), state_after)

    # The first draw is the jitter of the coarse depths: t_k + u * delta.
    renderer = ImportanceRenderer()
    delta = (OPTIONS['ray_end'] - OPTIONS['ray_start']) / (D - 1)
    t = torch.linspace(OPTIONS['ray_start'], OPTIONS['ray_end'], D).reshape(1, 1, D, 1)
    torch.manual_seed(11)
    depths = renderer.sample_stratified(origins, OPTIONS['ray_start'], OPTIONS['ray_end'], D)
    torch.testing.assert_close(depths, t + jitter * delta, atol=1e-6, rtol=0)


def test_renderer_is_reproducible_and_depth_in_range():
    (rgb1, depth1, _), _, _ = _render(OPTIONS)
    (rgb2, depth2, _), _, _ = _render(OPTIONS)
    assert torch.equal(rgb1, rgb2) and torch.equal(depth1, depth2)
    assert depth1.min() >= OPTIONS['ray_start'] and depth1.max() <= OPTIONS['ray_end'] + 1.05 / 5


def test_density_noise_absent_or_zero_draws_nothing_extra():
    _render(OPTIONS)
    state_absent = torch.get_rng_state()
    _render({**OPTIONS, 'density_noise': 0})
    assert torch.equal(torch.get_rng_state(), state_absent)
    _render({**OPTIONS, 'density_noise': 1.0})
    assert not torch.equal(torch.get_rng_state(), state_absent)


def test_coarse_only_and_disparity_and_auto_modes():
    (rgb, depth, _), _, _ = _render({**OPTIONS, 'depth_resolution_importance': 0})
    assert rgb.shape == (2, 16, 3) and torch.isfinite(depth).all()
    (rgb, depth, _), _, _ = _render({**OPTIONS, 'disparity_space_sampling': True})
    assert torch.isfinite(rgb).all()
    (rgb, depth, _), _, _ = _render({**OPTIONS, 'ray_start': 'auto', 'ray_end': 'auto'})
    assert torch.isfinite(rgb).all()
    # All frontal rays hit the unit box between depth 2.2 and ~3.2.
    assert depth.min() >= 2.2 - 1e-4 and depth.max() <= 3.3


def test_sample_pdf_inverse_cdf():
    renderer = ImportanceRenderer()
    bins = torch.tensor([[0., 1., 2., 3.]])
    weights = torch.tensor([[0., 1., 0.]])  # all mass in [1, 2]
    torch.manual_seed(0)
    samples = renderer.sample_pdf(bins, weights, 64)
    torch.manual_seed(0)
    u = torch.rand(1, 64)
    assert samples.shape == (1, 64)
    assert ((samples > 0.99) & (samples < 2.01)).float().mean() > 0.99
    # With uniform weights the inverse CDF is the identity map scaled to the bins.
    torch.manual_seed(0)
    uniform = renderer.sample_pdf(bins, torch.ones(1, 3), 64)
    torch.testing.assert_close(uniform, u * 3, atol=1e-5, rtol=0)
    det = renderer.sample_pdf(bins, torch.ones(1, 3), 4, det=True)
    torch.testing.assert_close(det, torch.tensor([[0., 1., 2., 3.]]), atol=1e-5, rtol=0)


def test_sample_importance_single_ray():
    renderer = ImportanceRenderer()
    z = torch.linspace(2, 3, 6).reshape(1, 1, 6, 1)
    weights = torch.rand(1, 1, 5, 1)
    out = renderer.sample_importance(z, weights, 4)
    assert out.shape == (1, 1, 4, 1)
    assert (out >= 2).all() and (out <= 3).all()
