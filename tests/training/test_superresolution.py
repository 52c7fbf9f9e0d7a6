"""Tests of training/superresolution.py: golden SR output of tiny128.pt, shapes, the hard-coded
channel widths, the last-w-only quirk and the float16 fallback on CPU."""
import pytest
import torch

from training import networks_stylegan2 as nets
from training import superresolution as sr

SR_KWARGS = dict(channel_base=2048, channel_max=32, fused_modconv_default='inference_only')

# class, img_resolution, input resolution, (block0 width, block1 width), block0 class
SR_CLASSES = [
    (sr.SuperresolutionHybrid2X, 128, 64, (128, 64), sr.SynthesisBlockNoUp),
    (sr.SuperresolutionHybrid4X, 256, 128, (128, 64), sr.SynthesisBlockNoUp),
    (sr.SuperresolutionHybrid8X, 512, 128, (128, 64), nets.SynthesisBlock),
    (sr.SuperresolutionHybrid8XDC, 512, 128, (256, 128), nets.SynthesisBlock),
]


def _build(cls, img_resolution, channels=8, sr_num_fp16_res=0, **kwargs):
    torch.manual_seed(0)
    all_kwargs = dict(SR_KWARGS)
    all_kwargs.update(kwargs)
    return cls(channels=channels, img_resolution=img_resolution, sr_num_fp16_res=sr_num_fp16_res,
               sr_antialias=True, **all_kwargs)


@pytest.fixture(scope='module')
def golden_g(golden_dir):
    return torch.load(golden_dir / 'tiny128.pt', weights_only=False)


def test_hybrid2x_matches_golden(golden_g):
    """tiny128.pt: image = superresolution(feature_image[:, :3], feature_image, ws, noise_mode='none')."""
    module = _build(sr.SuperresolutionHybrid2X, 128, channels=32)
    prefix = 'superresolution.'
    sd = {k[len(prefix):]: v for k, v in golden_g['state_dict'].items() if k.startswith(prefix)}
    module.load_state_dict(sd, strict=True)
    assert list(module.state_dict().keys()) == list(sd.keys())
    assert sum(p.numel() for p in module.parameters()) == 574954
    module.eval()
    feature_image = golden_g['intermediates']['feature_image']
    with torch.no_grad():
        image = module(feature_image[:, :3], feature_image, golden_g['outputs']['ws'], noise_mode='none')
    torch.testing.assert_close(feature_image[:, :3], golden_g['outputs']['image_raw'], rtol=0, atol=1e-5)
    torch.testing.assert_close(image, golden_g['outputs']['image'], rtol=0, atol=1e-4)


def test_hybrid2x_init_reproduces_official(golden_g):
    """Officially the SR module is built right after the StyleGAN2 backbone from the same global
    RNG stream; replaying that gives bit-identical unperturbed entries (same draws, same order)."""
    torch.manual_seed(golden_g['meta']['seeds']['init'])
    nets.Generator(z_dim=64, c_dim=25, w_dim=512, img_resolution=256, img_channels=96,
                   mapping_kwargs={'num_layers': 2}, num_fp16_res=0, conv_clamp=None, **SR_KWARGS)
    module = sr.SuperresolutionHybrid2X(channels=32, img_resolution=128, sr_num_fp16_res=0, sr_antialias=True,
                                        **SR_KWARGS)
    for k, v in module.state_dict().items():
        name = 'superresolution.' + k
        if name not in golden_g['perturbed_entries']:
            assert torch.equal(v, golden_g['state_dict'][name]), k


@pytest.mark.parametrize('cls, img_res, in_res, widths, block0_cls', SR_CLASSES)
def test_channel_widths_are_hard_coded(cls, img_res, in_res, widths, block0_cls):
    # channel_base / channel_max / num_fp16_res / conv_clamp are accepted and ignored.
    a = _build(cls, img_res, channel_base=4, channel_max=1, num_fp16_res=7, conv_clamp=3)
    b = _build(cls, img_res, channel_base=1 << 20, channel_max=1024)
    assert type(a.block0) is block0_cls and type(a.block1) is nets.SynthesisBlock
    for m in (a, b):
        assert m.input_resolution == in_res
        assert m.block0.conv0.weight.shape == (widths[0], 8, 3, 3)
        assert m.block0.conv1.weight.shape == (widths[0], widths[0], 3, 3)
        assert m.block1.conv0.weight.shape == (widths[1], widths[0], 3, 3)
        assert m.block1.torgb.weight.shape == (3, widths[1], 1, 1)
        assert m.block0.w_dim == m.block1.w_dim == 512
        assert m.block0.conv0.conv_clamp is None and not m.block0.use_fp16
    assert a.block1.resolution == img_res
    assert hasattr(a, 'resample_filter') == (cls is not sr.SuperresolutionHybrid8XDC)
    with pytest.raises(AssertionError):
        _build(cls, img_res * 2)


@pytest.mark.parametrize('cls, img_res, in_res, widths, block0_cls', SR_CLASSES[:2])
def test_forward_shapes(cls, img_res, in_res, widths, block0_cls):
    m = _build(cls, img_res).eval()
    ws = torch.randn(2, 5, 512)
    x = torch.randn(2, 8, 32, 32)
    with torch.no_grad():
        out = m(x[:, :3], x, ws, noise_mode='const')
    assert out.shape == (2, 3, img_res, img_res) and out.dtype == torch.float32


def test_forward_shape_512():
    m = _build(sr.SuperresolutionHybrid8X, 512, channels=4).eval()
    x = torch.randn(1, 4, 64, 64)
    with torch.no_grad():
        out = m(x[:, :3], x, torch.randn(1, 2, 512), noise_mode='none')
    assert out.shape == (1, 3, 512, 512)


class _RecordingBlock(torch.nn.Module):
    """Stands in for a synthesis block: records what it is given, returns inputs unchanged."""
    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, img, ws, **kwargs):
        self.calls.append((tuple(x.shape), tuple(img.shape), ws.clone(), kwargs))
        return x, img


@pytest.mark.parametrize('cls, img_res, in_res, widths, block0_cls', SR_CLASSES)
def test_forward_wiring(cls, img_res, in_res, widths, block0_cls):
    """Inputs are resized to the input resolution and both blocks get the last w repeated 3x
    (cheap check of the forward pass for every class, including the 512 ones)."""
    m = _build(cls, img_res, channels=4)
    m.block0, m.block1 = _RecordingBlock(), _RecordingBlock()  # children are used through attributes
    x, ws = torch.randn(2, 4, 32, 32), torch.randn(2, 5, 512)
    m(x[:, :3], x, ws, noise_mode='const')
    for block in (m.block0, m.block1):
        (x_shape, img_shape, block_ws, kwargs), = block.calls
        assert x_shape == (2, 4, in_res, in_res) and img_shape == (2, 3, in_res, in_res)
        torch.testing.assert_close(block_ws, ws[:, -1:].repeat(1, 3, 1), rtol=0, atol=0)
        assert kwargs == {'noise_mode': 'const'}


def test_only_last_w_is_used():
    m = _build(sr.SuperresolutionHybrid2X, 128).eval()
    x = torch.randn(2, 8, 32, 32)
    ws = torch.randn(2, 4, 512)
    ws2 = ws.clone()
    ws2[:, :-1] = torch.randn(2, 3, 512)
    with torch.no_grad():
        a = m(x[:, :3], x, ws, noise_mode='const')
        b = m(x[:, :3], x, ws2, noise_mode='const')
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_backward_works_when_rgb_is_a_view_of_the_features_at_input_resolution():
    # TriPlaneGenerator passes `feature_image[:, :3]` as rgb; at the SR input resolution it is not
    # resampled, so an in-place add into it would invalidate what conv0 saved for backward.
    m = _build(sr.SuperresolutionHybrid2X, 128).eval()
    x = torch.randn(1, 8, 64, 64, requires_grad=True)
    rgb = x[:, :3]
    before = rgb.detach().clone()
    out = m(rgb, x, torch.randn(1, 1, 512), noise_mode='none')
    out.square().sum().backward()
    assert torch.equal(rgb.detach(), before)
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad[:, :3].abs().sum() > 0


def test_input_resizing_rules():
    m2 = _build(sr.SuperresolutionHybrid2X, 128).eval()
    ws = torch.randn(1, 3, 512)
    with torch.no_grad():
        # 2X resizes any input that is not 64x64, larger ones included.
        big = torch.randn(1, 8, 96, 96)
        assert m2(big[:, :3], big, ws, noise_mode='none').shape == (1, 3, 128, 128)
        # At the input resolution no resize happens: equal to calling the blocks directly.
        x = torch.randn(1, 8, 64, 64)
        w3 = ws[:, -1:].repeat(1, 3, 1)
        h, img = m2.block0(x, x[:, :3].clone(), w3, noise_mode='none')
        _, img = m2.block1(h, img, w3, noise_mode='none')
        torch.testing.assert_close(m2(x[:, :3].clone(), x, ws, noise_mode='none'), img)
    m4 = _build(sr.SuperresolutionHybrid4X, 256).eval()
    with torch.no_grad(), pytest.raises(AssertionError):
        # 4X only resizes smaller inputs; a larger one reaches block0 and fails its shape check.
        big = torch.randn(1, 8, 160, 160)
        m4(big[:, :3], big, ws, noise_mode='none')


def test_synthesis_block_no_up():
    torch.manual_seed(0)
    block = sr.SynthesisBlockNoUp(4, 6, w_dim=16, resolution=8, img_channels=3, is_last=False)
    assert block.num_conv == 2 and block.num_torgb == 1
    assert block.conv0.up == 1 and block.conv0.resolution == 8
    x, img = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 8, 8)
    ws = torch.randn(2, 3, 16)
    h, out = block(x, img.clone(), ws, noise_mode='const')
    assert h.shape == (2, 6, 8, 8) and out.shape == (2, 3, 8, 8)
    # The skip image is added to as is (no upsampling): out - img is the toRGB output.
    rgb = block.torgb(h, ws[:, 2], fused_modconv=True)
    torch.testing.assert_close(out - img, rgb, rtol=0, atol=1e-5)


@pytest.mark.parametrize('cls, img_res', [(sr.SuperresolutionHybrid2X, 128), (sr.SuperresolutionHybrid4X, 256)])
def test_fp16_falls_back_to_float32_on_cpu(cls, img_res):
    m = _build(cls, img_res, sr_num_fp16_res=4, fp16_channels_last=True).eval()
    # sr_num_fp16_res > 0 switches both blocks to fp16 with conv_clamp 256 (ignoring conv_clamp=None).
    assert m.block0.use_fp16 and m.block1.use_fp16 and m.block0.channels_last
    assert m.block1.conv1.conv_clamp == 256 and m.block1.torgb.conv_clamp == 256
    dtypes = []
    hooks = [mod.register_forward_hook(lambda mod, i, o: dtypes.append(o.dtype))
             for mod in m.modules() if isinstance(mod, (nets.SynthesisLayer, nets.ToRGBLayer))]
    x = torch.randn(1, 8, 32, 32)
    with torch.no_grad():
        out = m(x[:, :3], x, torch.randn(1, 3, 512), noise_mode='const')
    for h in hooks:
        h.remove()
    assert out.dtype == torch.float32 and len(dtypes) == 6 and set(dtypes) == {torch.float32}


def test_legacy_deepfp32_module():
    torch.manual_seed(0)
    m = sr.SuperresolutionHybridDeepfp32(channels=8, img_resolution=256, sr_num_fp16_res=0, **SR_KWARGS).eval()
    x = torch.randn(1, 8, 64, 64)
    with torch.no_grad():
        assert m(x[:, :3], x, torch.randn(1, 2, 512), noise_mode='none').shape == (1, 3, 256, 256)
