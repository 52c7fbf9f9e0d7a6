"""Helpers shared by the adapter tests: the golden tiny TriPlaneGenerator, a fixed render, random adapters,
one test layer of every family."""
import torch

from training import adapters
from training.adapters import AdapterConfig
from training.networks_stylegan2 import Conv2dLayer, FullyConnectedLayer, SynthesisLayer, ToRGBLayer


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
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.trainable_parameters(G):
            p.copy_(torch.randn(p.shape, generator=gen) * std)

# --- one layer of every family --------------------------------------------------------------------

W_DIM = 8
N = 3


def make_layers() -> torch.nn.ModuleDict:
    """One layer of every family (and resampling variant), with non-zero biases and noise strengths."""
    torch.manual_seed(0)
    layers = torch.nn.ModuleDict(dict(
        fc=FullyConnectedLayer(8, 6),
        fc_lrelu=FullyConnectedLayer(8, 6, activation='lrelu', lr_multiplier=0.01),
        conv=Conv2dLayer(4, 5, 3, activation='lrelu'),
        conv_up=Conv2dLayer(4, 5, 3, up=2),
        conv_down=Conv2dLayer(4, 5, 3, down=2, conv_clamp=1.0),
        conv_1x1=Conv2dLayer(4, 5, 1, bias=False),
        syn=SynthesisLayer(4, 5, w_dim=W_DIM, resolution=8),
        syn_up=SynthesisLayer(4, 5, w_dim=W_DIM, resolution=16, up=2, conv_clamp=0.5),
        torgb=ToRGBLayer(5, 3, w_dim=W_DIM),
    ))
    with torch.no_grad():
        for name, p in layers.named_parameters():
            if name.endswith('bias') or name.endswith('noise_strength'):
                p.add_(0.3 * torch.randn_like(p))
    return layers


class Holder(torch.nn.Module):
    """Minimal 'generator' whose synthesis component is the dict of test layers."""

    def __init__(self):
        super().__init__()
        self.synthesis = make_layers()


def layer_inputs(name: str, layer: torch.nn.Module, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    if name.startswith('fc'):
        return (torch.randn([N, layer.in_features], generator=gen),), {}
    if name.startswith('conv'):
        return (torch.randn([N, layer.in_channels, 8, 8], generator=gen),), {}
    w = torch.randn([N, W_DIM], generator=gen)
    if name == 'torgb':
        return (torch.randn([N, layer.in_channels, 8, 8], generator=gen), w), {}
    res = layer.resolution // layer.up
    return (torch.randn([N, layer.in_channels, res, res], generator=gen), w), {'noise_mode': 'const'}


def run_layer(name, layer, fused=None, seed=1):
    args, kwargs = layer_inputs(name, layer, seed)
    if fused is not None and (name.startswith('syn') or name == 'torgb'):
        kwargs['fused_modconv'] = fused
    return layer(*args, **kwargs)


def injected(cfg: AdapterConfig, K: int = 1) -> Holder:
    """A Holder with K adapters per layer, injected by `cfg`."""
    H = Holder()
    adapters.inject(H, cfg, num_adapters=K)
    return H


FAMILIES = ['fc', 'fc_lrelu', 'conv', 'conv_up', 'conv_down', 'conv_1x1', 'syn', 'syn_up', 'torgb']
