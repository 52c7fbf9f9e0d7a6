"""Helpers of the encoder tests: a tiny encoder with non-zero heads, and a cheap stand-in for G's render."""
import torch

from training.encoder import EncoderConfig, W3DEncoder

NUM_WS, W_DIM = 14, 512


def tiny_config(input_resolution: int = 32, confidence_channels: int = 0) -> EncoderConfig:
    return EncoderConfig(num_ws=NUM_WS, w_dim=W_DIM, input_resolution=input_resolution, stem_channels=8,
                         stage_channels=(8, 8, 16, 16), stage_blocks=(1, 1, 1, 1), pyramid_channels=16,
                         camera_channels=8, coarse_layers=3, middle_layers=4, confidence_channels=confidence_channels)


def tiny_encoder(seed: int = 0, input_resolution: int = 32, confidence_channels: int = 0) -> W3DEncoder:
    """A tiny encoder whose heads are randomised (a fresh one outputs zeros by design)."""
    torch.manual_seed(seed)
    encoder = W3DEncoder(tiny_config(input_resolution, confidence_channels))
    with torch.no_grad():
        for head in encoder.heads:
            head.linear.weight.normal_(0, 0.05)
            head.linear.bias.normal_(0, 0.05)
    return encoder


def fake_render(ws: torch.Tensor, c: torch.Tensor, resolution: int = 32) -> torch.Tensor:
    """A differentiable image [N, 3, R, R] that depends on ws and on the camera (stands in for G.synthesis)."""
    colour = torch.tanh(ws[:, :3, :8].mean(-1) + c[:, :3])  # [N, 3]
    ramp = torch.linspace(-1, 1, resolution)
    image = colour[:, :, None, None] * 0.5 + 0.5 * torch.tanh(ramp[None, None, :, None] * ws[:, 3:6, :1, None])
    return image.expand(-1, -1, -1, resolution)
