"""Volume rendering equation: composites per-sample colours and densities along each ray.

MipNeRF-style quadrature without cone tracing: each interval between consecutive samples takes the
average colour/density of its two end samples.
"""

import torch
import torch.nn.functional as F


class MipRayMarcher2(torch.nn.Module):
    def __init__(self):
        super().__init__()

    def run_forward(self, colors, densities, depths, rendering_options):
        """colors [B, M, S, C], densities [B, M, S, 1], depths [B, M, S, 1] (sorted along S).

        Returns composite rgb [B, M, C] scaled to [-1, 1], depth [B, M, 1], and the per-interval
        weights [B, M, S-1, 1].
        """
        deltas = depths[:, :, 1:] - depths[:, :, :-1]
        colors_mid = (colors[:, :, :-1] + colors[:, :, 1:]) / 2
        densities_mid = (densities[:, :, :-1] + densities[:, :, 1:]) / 2
        depths_mid = (depths[:, :, :-1] + depths[:, :, 1:]) / 2

        if rendering_options['clamp_mode'] != 'softplus':
            raise ValueError(f"MipRayMarcher2 supports only clamp_mode='softplus', got {rendering_options['clamp_mode']!r}")
        # The -1 shift makes freshly initialised decoders start out mostly transparent.
        densities_mid = F.softplus(densities_mid - 1)

        alpha = 1 - torch.exp(-densities_mid * deltas)
        # Transmittance before each interval: prod_{j<i} (1 - alpha_j); 1e-10 avoids exact zeros.
        transmittance = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :, :1]), 1 - alpha + 1e-10], -2), -2)[:, :, :-1]
        weights = alpha * transmittance

        composite_rgb = torch.sum(weights * colors_mid, -2)
        weight_total = weights.sum(2)
        composite_depth = torch.sum(weights * depths_mid, -2) / weight_total
        # Empty rays (0/0) become +inf and are then clamped. The clamp range is the min/max over
        # every depth sample of the whole batch, not per ray (as in the official code).
        composite_depth = torch.nan_to_num(composite_depth, float('inf'))
        composite_depth = torch.clamp(composite_depth, torch.min(depths), torch.max(depths))

        if rendering_options.get('white_back', False):
            composite_rgb = composite_rgb + 1 - weight_total

        composite_rgb = composite_rgb * 2 - 1
        return composite_rgb, composite_depth, weights

    def forward(self, colors, densities, depths, rendering_options):
        return self.run_forward(colors, densities, depths, rendering_options)
