"""Tests of training/networks_stylegan2.py: golden op cases of modulated_conv2d, golden backbone
mapping/synthesis of tiny128.pt, and behaviour of the StyleGAN2 networks on tiny configs."""
import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from training import networks_stylegan2 as nets

OPS_FN = 'training.networks_stylegan2.modulated_conv2d'
GOLDEN_DIR = Path(__file__).resolve().parent.parent / 'data' / 'golden'


def _load(golden_dir, name):
    return torch.load(golden_dir / name, weights_only=False)


@pytest.fixture(scope='module')
def ops_cases(golden_dir):
    cases = _load(golden_dir, 'ops.pt')
    return {k: v for k, v in cases.items() if v['fn'] == OPS_FN}


CASE_NAMES = sorted(k for k, v in torch.load(GOLDEN_DIR / 'ops.pt', weights_only=False).items() if v['fn'] == OPS_FN)


def test_all_modulated_conv2d_cases_collected():
    assert len(CASE_NAMES) == 17


@pytest.mark.parametrize('name', CASE_NAMES)
def test_modulated_conv2d_matches_golden(ops_cases, name):
    case = ops_cases[name]
    inputs = {k: v.clone().requires_grad_(k in case['grad_wrt']) for k, v in case['inputs'].items()}
    out = nets.modulated_conv2d(**inputs, **case['kwargs'])
    assert out.shape == case['output'].shape and out.dtype == torch.float32
    torch.testing.assert_close(out, case['output'], rtol=0, atol=1e-5)

    grads = torch.autograd.grad((out * case['cotangent']).sum(), [inputs[k] for k in case['grad_wrt']])
    for k, g in zip(case['grad_wrt'], grads):
        torch.testing.assert_close(g, case['grads'][k], rtol=0, atol=1e-5, msg=lambda m: f'grad {k}: {m}')


def test_normalize_2nd_moment_unit_mean_square():
    x = torch.randn(5, 7) * 3
    y = nets.normalize_2nd_moment(x)
    torch.testing.assert_close(y.square().mean(dim=1), torch.ones(5), rtol=0, atol=1e-5)

#----------------------------------------------------------------------------
# Golden backbone of tiny128.pt (official StyleGAN2 Generator inside TriPlaneGenerator).

BACKBONE_KWARGS = dict(z_dim=64, c_dim=25, w_dim=512, img_resolution=256, img_channels=96,
                       mapping_kwargs={'num_layers': 2}, channel_base=2048, channel_max=32,
                       fused_modconv_default='inference_only', num_fp16_res=0, conv_clamp=None)


@pytest.fixture(scope='module')
def golden_g(golden_dir):
    return _load(golden_dir, 'tiny128.pt')


@pytest.fixture(scope='module')
def backbone(golden_g):
    torch.manual_seed(0)
    G = nets.Generator(**BACKBONE_KWARGS)
    prefix = 'backbone.'
    sd = {k[len(prefix):]: v for k, v in golden_g['state_dict'].items() if k.startswith(prefix)}
    G.load_state_dict(sd, strict=True)
    assert list(G.state_dict().keys()) == list(sd.keys())  # same names, same order
    return G.eval()


def test_backbone_init_reproduces_official(golden_g):
    """The backbone is the first module with random init in the official TriPlaneGenerator, so
    with the same seed every unperturbed entry (weights, const, noise_const, ...) is bit-identical."""
    torch.manual_seed(golden_g['meta']['seeds']['init'])
    G = nets.Generator(**BACKBONE_KWARGS)
    for k, v in G.state_dict().items():
        if 'backbone.' + k not in golden_g['perturbed_entries']:
            assert torch.equal(v, golden_g['state_dict']['backbone.' + k]), k


def test_backbone_parameter_count(golden_g, backbone):
    assert backbone.num_ws == 14
    n = sum(p.numel() for p in backbone.parameters())
    assert n == 961245  # README: parameters by submodule


def test_backbone_mapping_matches_golden(golden_g, backbone):
    z = golden_g['inputs']['z']
    c = torch.zeros_like(golden_g['inputs']['c'])  # c_gen_conditioning_zero: mapping sees zeros
    ws = backbone.mapping(z, c, truncation_psi=1)
    torch.testing.assert_close(ws, golden_g['outputs']['ws'], rtol=0, atol=1e-4)
    ws_t = backbone.mapping(z, c, truncation_psi=0.7, truncation_cutoff=None)
    torch.testing.assert_close(ws_t, golden_g['outputs']['ws_trunc'], rtol=0, atol=1e-4)


def test_backbone_synthesis_matches_golden_planes(golden_g, backbone):
    with torch.no_grad():
        planes = backbone.synthesis(golden_g['outputs']['ws'], noise_mode='const')
    assert list(planes.shape) == golden_g['intermediates']['planes_shape']
    torch.testing.assert_close(planes[:, :, ::16, ::16], golden_g['intermediates']['planes_strided16'], rtol=0, atol=1e-4)
    torch.testing.assert_close(planes.mean(dim=[2, 3]), golden_g['intermediates']['planes_channel_mean'], rtol=0, atol=1e-5)

#----------------------------------------------------------------------------
# Tiny generator behaviour.

TINY = dict(z_dim=8, c_dim=3, w_dim=16, img_resolution=16, img_channels=3,
            mapping_kwargs={'num_layers': 2}, channel_base=64, channel_max=8, num_fp16_res=0, conv_clamp=None)


def _tiny_generator(**overrides):
    torch.manual_seed(0)
    kwargs = dict(TINY)
    kwargs.update(overrides)
    return nets.Generator(**kwargs)


def test_generator_shapes_and_num_ws():
    G = _tiny_generator()
    # b4: conv1 (+ torgb shared with b8.conv0); b8, b16: conv0, conv1; + final torgb = 6.
    assert G.num_ws == G.synthesis.num_ws == G.mapping.num_ws == 6
    assert G.synthesis.block_resolutions == [4, 8, 16]
    assert [getattr(G.synthesis, f'b{r}').conv1.weight.shape[0] for r in (4, 8, 16)] == [8, 8, 4]
    z, c = torch.randn(3, 8), torch.randn(3, 3)
    ws = G.mapping(z, c)
    assert ws.shape == (3, 6, 16)
    img = G.synthesis(ws, noise_mode='const')
    assert img.shape == (3, 3, 16, 16) and img.dtype == torch.float32
    torch.testing.assert_close(G(z, c, noise_mode='const'), img)


def test_mapping_without_broadcast_or_label():
    M = nets.MappingNetwork(z_dim=0, c_dim=5, w_dim=7, num_ws=None, w_avg_beta=None, num_layers=3)
    assert not hasattr(M, 'w_avg') and not hasattr(M, 'fc3')
    assert M(None, torch.randn(4, 5)).shape == (4, 7)
    M2 = nets.MappingNetwork(z_dim=6, c_dim=0, w_dim=7, num_ws=2)
    assert not hasattr(M2, 'embed')
    assert M2(torch.randn(4, 6), None).shape == (4, 2, 7)


def test_truncation():
    G = _tiny_generator()
    with torch.no_grad():
        G.mapping.w_avg.copy_(torch.randn(16))
    z, c = torch.randn(2, 8), torch.randn(2, 3)
    ws = G.mapping(z, c)
    w_avg = G.mapping.w_avg
    torch.testing.assert_close(G.mapping(z, c, truncation_psi=0), w_avg.expand_as(ws))
    torch.testing.assert_close(G.mapping(z, c, truncation_psi=0.5), w_avg + 0.5 * (ws - w_avg))
    cut = G.mapping(z, c, truncation_psi=0.5, truncation_cutoff=2)
    torch.testing.assert_close(cut[:, :2], w_avg + 0.5 * (ws[:, :2] - w_avg))
    torch.testing.assert_close(cut[:, 2:], ws[:, 2:])


def test_update_emas_moves_w_avg():
    G = _tiny_generator()
    z, c = torch.randn(4, 8), torch.randn(4, 3)
    before = G.mapping.w_avg.clone()
    ws = G.mapping(z, c, update_emas=True)
    expected = ws[:, 0].mean(dim=0).lerp(before, 0.998)
    torch.testing.assert_close(G.mapping.w_avg, expected)
    G.mapping(z, c)  # no update without update_emas
    torch.testing.assert_close(G.mapping.w_avg, expected)


def test_noise_buffers_and_modes():
    G = _tiny_generator()
    layer = G.synthesis.b8.conv0
    assert layer.noise_const.shape == (8, 8) and layer.noise_strength.shape == ()
    names = dict(G.named_buffers())
    assert 'synthesis.b8.conv0.noise_const' in names and 'synthesis.b8.conv0.resample_filter' in names
    assert 'mapping.w_avg' in names
    with torch.no_grad():
        for m in G.modules():
            if isinstance(m, nets.SynthesisLayer):
                m.noise_strength.fill_(0.5)
    ws = G.mapping(torch.randn(2, 8), torch.randn(2, 3))
    const_a = G.synthesis(ws, noise_mode='const')
    const_b = G.synthesis(ws, noise_mode='const')
    torch.testing.assert_close(const_a, const_b, rtol=0, atol=0)
    none = G.synthesis(ws, noise_mode='none')
    rand = G.synthesis(ws, noise_mode='random')
    assert not torch.allclose(const_a, none) and not torch.allclose(rand, none)
    with pytest.raises(AssertionError):
        G.synthesis(ws, noise_mode='bogus')


@pytest.mark.parametrize('default, training, expected', [
    (True, True, True), (True, False, True), (False, False, False),
    ('inference_only', True, False), ('inference_only', False, True)])
def test_fused_modconv_default(monkeypatch, default, training, expected):
    G = _tiny_generator(fused_modconv_default=default).train(training)
    seen = []
    orig = nets.modulated_conv2d

    def spy(*args, **kwargs):
        seen.append(kwargs['fused_modconv'])
        return orig(*args, **kwargs)
    monkeypatch.setattr(nets, 'modulated_conv2d', spy)
    ws = G.mapping(torch.randn(2, 8), torch.randn(2, 3))
    G.synthesis(ws, noise_mode='const')
    assert len(seen) == 5 + 3 and set(seen) == {expected}  # 5 SynthesisLayers + 3 ToRGBLayers
    seen.clear()
    G.synthesis(ws, noise_mode='const', fused_modconv=not expected)  # explicit value wins
    assert set(seen) == {not expected}


def test_fused_and_unfused_synthesis_agree():
    G = _tiny_generator()
    ws = G.mapping(torch.randn(2, 8), torch.randn(2, 3))
    a = G.synthesis(ws, noise_mode='const', fused_modconv=True)
    b = G.synthesis(ws, noise_mode='const', fused_modconv=False)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_fp16_settings_run_in_float32_on_cpu():
    G = _tiny_generator(num_fp16_res=3, conv_clamp=256, fp16_channels_last=True)
    blocks = [G.synthesis.b4, G.synthesis.b8, G.synthesis.b16]
    # fp16_resolution = max(2 ** (log2(16) + 1 - 3), 8) = 8: b8 and b16 are fp16 blocks.
    assert [b.use_fp16 for b in blocks] == [False, True, True]
    assert [b.channels_last for b in blocks] == [False, True, True]
    assert G.synthesis.b16.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    dtypes = []
    hooks = [m.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
             for m in G.modules() if isinstance(m, (nets.SynthesisLayer, nets.ToRGBLayer))]
    z, c = torch.randn(2, 8), torch.randn(2, 3)
    img = G(z, c, noise_mode='const')
    for h in hooks:
        h.remove()
    assert img.dtype == torch.float32 and len(dtypes) == 8 and set(dtypes) == {torch.float32}
    # Same numbers as the plain fp32 configuration with the same weights (up to float32 rounding:
    # the channels_last weights change the CPU convolution's accumulation order).
    ref = _tiny_generator(num_fp16_res=0, conv_clamp=256)
    ref.load_state_dict(G.state_dict())
    torch.testing.assert_close(ref(z, c, noise_mode='const'), img, rtol=0, atol=1e-5)


def test_fp16_block_with_force_fp32_false_still_float32_on_cpu():
    torch.manual_seed(0)
    block = nets.SynthesisBlock(4, 4, w_dim=8, resolution=8, img_channels=3, is_last=True, use_fp16=True)
    x, img = block(torch.randn(2, 4, 4, 4), None, torch.randn(2, 3, 8), force_fp32=False)
    assert x.dtype == torch.float32 and img.dtype == torch.float32


def test_resnet_and_orig_architectures():
    for arch in ['orig', 'resnet']:
        G = _tiny_generator(architecture=arch)
        ws = G.mapping(torch.randn(2, 8), torch.randn(2, 3))
        assert G.synthesis(ws).shape == (2, 3, 16, 16)
        assert hasattr(G.synthesis.b16, 'torgb') and not hasattr(G.synthesis.b8, 'torgb')
        assert hasattr(G.synthesis.b8, 'skip') == (arch == 'resnet')


def test_children_are_looked_up_through_attributes():
    """Adapters replace layers with setattr on the parent; the parent must use the new child."""
    G = _tiny_generator()
    z, c = torch.randn(2, 8), torch.randn(2, 3)
    ref = G.synthesis(G.mapping(z, c), noise_mode='const')

    class Shifted(torch.nn.Module):  # a shift, not a scale: demodulation would cancel a scale of the styles
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            return self.inner(*args, **kwargs) + 0.25

    for parent_name, child in [('synthesis.b8', 'conv0'), ('synthesis.b16', 'torgb'),
                               ('synthesis.b16.conv1', 'affine'), ('mapping', 'fc1')]:
        G2 = copy.deepcopy(G)
        parent = G2.get_submodule(parent_name)
        setattr(parent, child, Shifted(getattr(parent, child)))
        out = G2.synthesis(G2.mapping(z, c), noise_mode='const')
        assert not torch.allclose(out, ref), f'{parent_name}.{child} replacement was ignored'

#----------------------------------------------------------------------------
# Discriminator pieces.

def test_discriminator_shapes_and_freeze_layers():
    torch.manual_seed(0)
    D = nets.Discriminator(c_dim=3, img_resolution=16, img_channels=3, channel_base=64, channel_max=8,
                           num_fp16_res=2, conv_clamp=256, block_kwargs={'freeze_layers': 4})
    assert D.block_resolutions == [16, 8]
    # b16: fromrgb, conv0, conv1, skip = layers 0..3 (frozen -> buffers); b8: conv0, conv1, skip trainable.
    assert D.b16.num_layers == 4 and D.b8.num_layers == 3 and D.b8.first_layer_idx == 4
    assert 'b16.conv0.weight' in dict(D.named_buffers()) and 'b8.conv0.weight' in dict(D.named_parameters())
    assert D.b16.skip.bias is None
    out = D(torch.randn(4, 3, 16, 16), torch.randn(4, 3))
    assert out.shape == (4, 1) and out.dtype == torch.float32
    D0 = nets.Discriminator(c_dim=0, img_resolution=16, img_channels=3, channel_base=64, channel_max=8)
    assert not hasattr(D0, 'mapping') and D0(torch.randn(2, 3, 16, 16), None).shape == (2, 1)


def test_minibatch_std_layer():
    x = torch.randn(6, 4, 3, 3)
    y = nets.MinibatchStdLayer(group_size=3)(x)
    assert y.shape == (6, 5, 3, 3)
    # Sample i belongs to group i % n (n = N / G = 2).
    for i in range(6):
        grp = x[i % 2::2]
        expected = (grp.var(dim=0, unbiased=False) + 1e-8).sqrt().mean()
        torch.testing.assert_close(y[i, 4], expected.expand(3, 3))
    # group_size larger than the batch is clipped to the batch.
    assert nets.MinibatchStdLayer(group_size=8)(torch.randn(2, 4, 3, 3)).shape == (2, 5, 3, 3)


def test_layer_attributes_match_official_types():
    fc = nets.FullyConnectedLayer(4, 5, lr_multiplier=0.01, bias_init=1)
    assert isinstance(fc.weight_gain, np.floating) and fc.bias_gain == 0.01
    torch.testing.assert_close(fc.bias.detach(), torch.ones(5))
    conv = nets.Conv2dLayer(4, 5, kernel_size=3, activation='lrelu')
    assert isinstance(conv.weight_gain, np.floating) and conv.padding == 1
    assert conv.resample_filter.shape == (4, 4)
    fc_out = fc(torch.randn(3, 4))
    assert fc_out.shape == (3, 5)
