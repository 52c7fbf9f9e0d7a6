"""Tri-plane volume renderer: chooses sample depths along each ray (stratified, then importance
sampled), queries the tri-plane features through the decoder, and composites them.

Randomness (global torch RNG, in this order per call): `torch.rand_like` for the stratified
jitter [B, M, D, 1], then `torch.rand` for the importance-sampling uniforms [B*M, Di]
(plus `torch.randn_like` for density noise when `density_noise` > 0).
"""

import torch

from training.volumetric_rendering import math_utils
from training.volumetric_rendering.ray_marcher import MipRayMarcher2


def generate_planes() -> torch.Tensor:
    """Axes of the three feature planes, [3, 3, 3], one 3x3 matrix per plane.

    `project_onto_planes` multiplies coordinates by the inverse of each matrix and keeps the first
    two components, which gives plane coordinates (x, y), (x, z) and (z, x). The third plane is
    therefore the transposed xz plane, not a zy plane; trained EG3D models depend on this, so
    it stays as it is.
    """
    return torch.tensor([[[1, 0, 0],
                          [0, 1, 0],
                          [0, 0, 1]],
                         [[1, 0, 0],
                          [0, 0, 1],
                          [0, 1, 0]],
                         [[0, 0, 1],
                          [1, 0, 0],
                          [0, 1, 0]]], dtype=torch.float32)


def project_onto_planes(planes: torch.Tensor, coordinates: torch.Tensor) -> torch.Tensor:
    """planes [P, 3, 3], coordinates [N, M, 3] -> 2-D plane coordinates [N*P, M, 2].

    Row vectors are right-multiplied by inv(plane), as in the official code.
    """
    N, M, _ = coordinates.shape
    P = planes.shape[0]
    coordinates = coordinates.unsqueeze(1).expand(-1, P, -1, -1).reshape(N * P, M, 3)
    inv_planes = torch.linalg.inv(planes).unsqueeze(0).expand(N, -1, -1, -1).reshape(N * P, 3, 3)
    return torch.bmm(coordinates, inv_planes)[..., :2]


def sample_from_planes(plane_axes, plane_features, coordinates, mode='bilinear', padding_mode='zeros', box_warp=None):
    """Bilinearly sample each plane at the projected points.

    plane_features [N, P, C, H, W], coordinates [N, M, 3] in world units -> [N, P, M, C].
    The cube of side `box_warp` centred at the origin maps onto the planes' [-1, 1] extent;
    points outside it read zeros.
    """
    assert padding_mode == 'zeros'
    N, P, C, H, W = plane_features.shape
    M = coordinates.shape[1]
    plane_features = plane_features.view(N * P, C, H, W)
    coordinates = (2 / box_warp) * coordinates
    grid = project_onto_planes(plane_axes, coordinates).unsqueeze(1)  # [N*P, 1, M, 2]
    sampled = torch.nn.functional.grid_sample(plane_features, grid.float(), mode=mode, padding_mode=padding_mode, align_corners=False)
    return sampled.permute(0, 3, 2, 1).reshape(N, P, M, C)  # [N*P, C, 1, M] -> [N, P, M, C]


def sample_from_3dgrid(grid: torch.Tensor, coordinates: torch.Tensor) -> torch.Tensor:
    """Trilinear sampling of a feature volume.

    grid [1 or B, C, H, W, D], coordinates [B, K, 3] in [-1, 1] -> features [B, K, C].
    """
    B, _, n_dims = coordinates.shape
    sampled = torch.nn.functional.grid_sample(grid.expand(B, -1, -1, -1, -1), coordinates.reshape(B, 1, 1, -1, n_dims),
                                              mode='bilinear', padding_mode='zeros', align_corners=False)
    N, C, H, W, D = sampled.shape
    return sampled.permute(0, 4, 3, 2, 1).reshape(N, H * W * D, C)


class ImportanceRenderer(torch.nn.Module):
    """Two-pass (coarse + importance) volume renderer over tri-plane features.

    `plane_axes` is a plain tensor attribute (not a buffer), so it is not part of the state_dict.
    """

    def __init__(self):
        super().__init__()
        self.ray_marcher = MipRayMarcher2()
        self.plane_axes = generate_planes()

    def forward(self, planes, decoder, ray_origins, ray_directions, rendering_options):
        """planes [B, 3, 32, H, W], rays [B, M, 3] -> (features [B, M, C], depth [B, M, 1], weight sum [B, M, 1])."""
        self.plane_axes = self.plane_axes.to(ray_origins.device)
        depth_resolution = rendering_options['depth_resolution']
        disparity = rendering_options['disparity_space_sampling']

        if rendering_options['ray_start'] == rendering_options['ray_end'] == 'auto':
            ray_start, ray_end = math_utils.get_ray_limits_box(ray_origins, ray_directions, box_side_length=rendering_options['box_warp'])
            valid = ray_end > ray_start
            if torch.any(valid).item():
                # Rays that miss the box borrow the range of the valid ones. (The end uses the
                # maximum *start*, exactly as in the official code.)
                ray_start[~valid] = ray_start[valid].min()
                ray_end[~valid] = ray_start[valid].max()
            depths_coarse = self.sample_stratified(ray_origins, ray_start, ray_end, depth_resolution, disparity)
        else:
            depths_coarse = self.sample_stratified(ray_origins, rendering_options['ray_start'], rendering_options['ray_end'], depth_resolution, disparity)

        # Coarse pass.
        colors_coarse, densities_coarse = self._query(planes, decoder, ray_origins, ray_directions, depths_coarse, rendering_options)

        # Fine pass: importance samples from the coarse weights, merged with the coarse samples.
        n_importance = rendering_options['depth_resolution_importance']
        if n_importance > 0:
            _, _, weights = self.ray_marcher(colors_coarse, densities_coarse, depths_coarse, rendering_options)
            depths_fine = self.sample_importance(depths_coarse, weights, n_importance)
            colors_fine, densities_fine = self._query(planes, decoder, ray_origins, ray_directions, depths_fine, rendering_options)
            all_depths, all_colors, all_densities = self.unify_samples(depths_coarse, colors_coarse, densities_coarse,
                                                                       depths_fine, colors_fine, densities_fine)
            rgb_final, depth_final, weights = self.ray_marcher(all_colors, all_densities, all_depths, rendering_options)
        else:
            rgb_final, depth_final, weights = self.ray_marcher(colors_coarse, densities_coarse, depths_coarse, rendering_options)

        return rgb_final, depth_final, weights.sum(2)

    def _query(self, planes, decoder, ray_origins, ray_directions, depths, options):
        """Decode the points at `depths` [B, M, S, 1] along the rays -> colors [B, M, S, C], densities [B, M, S, 1]."""
        B, M, S, _ = depths.shape
        coordinates = (ray_origins.unsqueeze(-2) + depths * ray_directions.unsqueeze(-2)).reshape(B, -1, 3)
        directions = ray_directions.unsqueeze(-2).expand(-1, -1, S, -1).reshape(B, -1, 3)
        out = self.run_model(planes, decoder, coordinates, directions, options)
        colors = out['rgb'].reshape(B, M, S, out['rgb'].shape[-1])
        densities = out['sigma'].reshape(B, M, S, 1)
        return colors, densities

    def run_model(self, planes, decoder, sample_coordinates, sample_directions, options):
        """Decoder output {'rgb': [B, K, C], 'sigma': [B, K, 1]} at arbitrary points [B, K, 3]."""
        sampled_features = sample_from_planes(self.plane_axes, planes, sample_coordinates, padding_mode='zeros', box_warp=options['box_warp'])
        out = decoder(sampled_features, sample_directions)
        if options.get('density_noise', 0) > 0:
            out['sigma'] += torch.randn_like(out['sigma']) * options['density_noise']
        return out

    def sort_samples(self, all_depths, all_colors, all_densities):
        """Sort samples along each ray by depth (dim -2)."""
        _, order = torch.sort(all_depths, dim=-2)

        def reorder(t):
            return torch.gather(t, -2, order.expand(-1, -1, -1, t.shape[-1]))
        return reorder(all_depths), reorder(all_colors), reorder(all_densities)

    def unify_samples(self, depths1, colors1, densities1, depths2, colors2, densities2):
        """Concatenate two sample sets along the ray and sort them by depth."""
        return self.sort_samples(torch.cat([depths1, depths2], dim=-2),
                                 torch.cat([colors1, colors2], dim=-2),
                                 torch.cat([densities1, densities2], dim=-2))

    def sample_stratified(self, ray_origins, ray_start, ray_end, depth_resolution, disparity_space_sampling=False):
        """Evenly spaced depths [N, M, D, 1], each jittered forward by U[0, 1) of one spacing.

        `ray_start`/`ray_end` are floats, or [N, M, 1] tensors (the 'auto' box limits). With
        disparity sampling the jitter is applied in inverse depth.
        """
        n_batch, n_rays, _ = ray_origins.shape

        def evenly_spaced(first, last):
            ramp = torch.linspace(first, last, depth_resolution, device=ray_origins.device)
            return ramp.reshape(1, 1, depth_resolution, 1).repeat(n_batch, n_rays, 1, 1)

        if disparity_space_sampling:
            frac = evenly_spaced(0, 1)
            frac = frac + torch.rand_like(frac) * (1 / (depth_resolution - 1))
            return 1. / (1. / ray_start * (1. - frac) + 1. / ray_end * frac)
        spacing = (ray_end - ray_start) / (depth_resolution - 1)
        if isinstance(ray_start, torch.Tensor):
            depths = math_utils.linspace(ray_start, ray_end, depth_resolution).permute(1, 2, 0, 3)
            spacing = spacing[..., None]
        else:
            depths = evenly_spaced(ray_start, ray_end)
        return depths + torch.rand_like(depths) * spacing

    def sample_importance(self, z_vals, weights, N_importance):
        """Draw N_importance depths per ray [B, M, Di, 1] from the coarse weights (NeRF-style).

        The weights are smoothed with a 2-tap max filter followed by a 2-tap average filter and
        floored by 0.01 before inverse-CDF sampling over the midpoints of the coarse depths.
        """
        with torch.no_grad():
            n_batch, n_rays, n_samples, _ = z_vals.shape
            edges = z_vals.reshape(n_batch * n_rays, n_samples)
            w = weights.reshape(n_batch * n_rays, -1).unsqueeze(1).float()  # S - 1 interval weights per ray
            w = torch.nn.functional.avg_pool1d(torch.nn.functional.max_pool1d(w, 2, 1, padding=1), 2, 1).squeeze(1)
            w = w + 0.01
            midpoints = 0.5 * (edges[:, :-1] + edges[:, 1:])
            samples = self.sample_pdf(midpoints, w[:, 1:-1], N_importance)
            return samples.detach().reshape(n_batch, n_rays, N_importance, 1)

    def sample_pdf(self, bins, weights, N_importance, det=False, eps=1e-5):
        """Inverse-transform sampling of a piecewise-constant pdf.

        bins [R, K+1] (bin edges), weights [R, K] -> samples [R, N_importance]. With det=False the
        uniforms come from `torch.rand(R, N_importance)` on the global RNG.
        """
        n_rays, n_bins = weights.shape
        mass = weights + eps
        cdf = torch.cumsum(mass / torch.sum(mass, -1, keepdim=True), -1)
        cdf = torch.cat([torch.zeros_like(cdf[:, :1]), cdf], -1)  # [R, K+1], from 0 to 1

        if det:
            u = torch.linspace(0, 1, N_importance, device=bins.device).expand(n_rays, N_importance)
        else:
            u = torch.rand(n_rays, N_importance, device=bins.device)
        u = u.contiguous()

        # Bin containing each u: edges [below, above].
        idx = torch.searchsorted(cdf, u, right=True)
        below = torch.clamp_min(idx - 1, 0)
        above = torch.clamp_max(idx, n_bins)
        idx_pairs = torch.stack([below, above], -1).view(n_rays, 2 * N_importance)
        cdf_pairs = torch.gather(cdf, 1, idx_pairs).view(n_rays, N_importance, 2)
        bin_pairs = torch.gather(bins, 1, idx_pairs).view(n_rays, N_importance, 2)

        denom = cdf_pairs[..., 1] - cdf_pairs[..., 0]
        denom[denom < eps] = 1  # zero-mass bin: never selected in practice, any value works
        return bin_pairs[..., 0] + (u - cdf_pairs[..., 0]) / denom * (bin_pairs[..., 1] - bin_pairs[..., 0])
