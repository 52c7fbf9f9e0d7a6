"""Helpers shared by the adapter tests: the golden tiny TriPlaneGenerator, a fixed render, random adapters."""
import torch


def build_tiny_generator(golden: dict) -> torch.nn.Module:
    """The golden tiny128 TriPlaneGenerator (official weights), in eval mode."""
    from training.triplane import TriPlaneGenerator
    torch.manual_seed(0)
    G = TriPlaneGenerator(**golden['init_kwargs'])
    G.load_state_dict(golden['state_dict'])
    return G.eval()


def render(G: torch.nn.Module, golden: dict, noise_mode: str = 'const', seed: int = 3) -> dict:
    """G.synthesis on the golden ws / cameras with a fixed renderer seed (deterministic on CPU)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        return G.synthesis(golden['outputs']['ws'], golden['inputs']['c'], neural_rendering_resolution=32,
                           noise_mode=noise_mode)


def assert_renders_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f'{key} differs (max abs diff {(a[key] - b[key]).abs().max().item():.3g})'


def randomize_adapters(G: torch.nn.Module, std: float = 0.05, seed: int = 0) -> None:
    """Give every adapter tensor (factors, Lambda, extras) random values so that deltas are non-zero."""
    from training import adapters
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.trainable_parameters(G):
            p.copy_(torch.randn(p.shape, generator=gen) * std)
