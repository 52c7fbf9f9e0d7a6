"""Turns camera parameters into one ray per pixel of the neural-rendering image.

Cameras follow the OpenCV convention (x right, y down, z forward), with intrinsics normalised by
the image size (principal point around 0.5).
"""

import torch


class RaySampler(torch.nn.Module):
    """Pixel-centre rays for a batch of cameras. Stateless; the None attributes exist only so the
    module's state matches the official class (and official pickles)."""

    def __init__(self):
        super().__init__()
        self.ray_origins_h = None
        self.ray_directions = None
        self.depths = None
        self.image_coords = None
        self.rendering_options = None

    def forward(self, cam2world_matrix: torch.Tensor, intrinsics: torch.Tensor, resolution: int):
        """cam2world_matrix [N, 4, 4], intrinsics [N, 3, 3] -> (ray_origins, ray_dirs), each [N, R*R, 3].

        Ray m covers pixel row m // R, column m % R; directions have unit length.
        """
        N, M = cam2world_matrix.shape[0], resolution ** 2
        device = cam2world_matrix.device
        cam_origin = cam2world_matrix[:, :3, 3]
        fx = intrinsics[:, 0, 0].unsqueeze(-1)
        fy = intrinsics[:, 1, 1].unsqueeze(-1)
        cx = intrinsics[:, 0, 2].unsqueeze(-1)
        cy = intrinsics[:, 1, 2].unsqueeze(-1)
        skew = intrinsics[:, 0, 1].unsqueeze(-1)

        # Normalised pixel-centre coordinates; (u, v) = (column, row).
        idx = torch.arange(resolution, dtype=torch.float32, device=device)
        rows, cols = torch.meshgrid(idx, idx, indexing='ij')
        uv = torch.stack((rows, cols)) * (1. / resolution) + (0.5 / resolution)
        uv = uv.flip(0).reshape(2, -1).transpose(1, 0).unsqueeze(0).repeat(N, 1, 1)
        u = uv[:, :, 0].view(N, -1)
        v = uv[:, :, 1].view(N, -1)
        z = torch.ones((N, M), device=device)

        # Back-project through the (skewed) pinhole at depth 1, in camera space.
        x_cam = (u - cx + cy * skew / fy - skew * v / fy) / fx * z
        y_cam = (v - cy) / fy * z
        points_cam = torch.stack((x_cam, y_cam, z, torch.ones_like(z)), dim=-1)

        points_world = torch.bmm(cam2world_matrix, points_cam.permute(0, 2, 1)).permute(0, 2, 1)[:, :, :3]
        ray_dirs = torch.nn.functional.normalize(points_world - cam_origin[:, None, :], dim=2)
        ray_origins = cam_origin.unsqueeze(1).repeat(1, ray_dirs.shape[1], 1)
        return ray_origins, ray_dirs
