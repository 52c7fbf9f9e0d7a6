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
        if rendering_options['clamp_mode'] != 'softplus':
            raise ValueError(f"MipRayMarcher2 supports only clamp_mode='softplus', got {rendering_options['clamp_mode']!r}")

        def interval_mean(t):  # value of each interval = mean of its two end samples
            return (t[:, :, :-1] + t[:, :, 1:]) / 2

        spacing = depths[:, :, 1:] - depths[:, :, :-1]
        # The -1 shift makes freshly initialised decoders start out mostly transparent.
        sigma = F.softplus(interval_mean(densities) - 1)
        alpha = 1 - torch.exp(-sigma * spacing)
        # Transmittance before each interval: prod_{j<i} (1 - alpha_j); 1e-10 avoids exact zeros.
        survive = torch.cat([torch.ones_like(alpha[:, :, :1]), 1 - alpha + 1e-10], -2)
        weights = alpha * torch.cumprod(survive, -2)[:, :, :-1]

        opacity = weights.sum(2)
        rgb = torch.sum(weights * interval_mean(colors), -2)
        depth = torch.sum(weights * interval_mean(depths), -2) / opacity
        # Empty rays (0/0) become +inf and are then clamped. The clamp range is the min/max over
        # every depth sample of the whole batch, not per ray (as in the official code).
        depth = torch.clamp(torch.nan_to_num(depth, float('inf')), torch.min(depths), torch.max(depths))

        if rendering_options.get('white_back', False):
            rgb = rgb + 1 - opacity
        return rgb * 2 - 1, depth, weights

    def forward(self, colors, densities, depths, rendering_options):
        return self.run_forward(colors, densities, depths, rendering_options)
