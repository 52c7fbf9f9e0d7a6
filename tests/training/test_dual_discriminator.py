"""Tests of training/dual_discriminator.py: golden filtered_resizing cases, the golden tiny128_D.pt
discriminator (logits, resized raw image, gradients), and the other discriminator variants."""
from pathlib import Path

import pytest
import torch

from training import dual_discriminator as dd
from training import networks_stylegan2 as nets

OPS_FN = 'training.dual_discriminator.filtered_resizing'
GOLDEN_DIR = Path(__file__).resolve().parent.parent / 'data' / 'golden'


@pytest.fixture(scope='module')
def ops_cases(golden_dir):
    cases = torch.load(golden_dir / 'ops.pt', weights_only=False)
    return {k: v for k, v in cases.items() if v['fn'] == OPS_FN}


CASE_NAMES = sorted(k for k, v in torch.load(GOLDEN_DIR / 'ops.pt', weights_only=False).items() if v['fn'] == OPS_FN)


def test_all_filtered_resizing_cases_collected():
    assert len(CASE_NAMES) == 7


@pytest.mark.parametrize('name', CASE_NAMES)
def test_filtered_resizing_matches_golden(ops_cases, name):
    case = ops_cases[name]
    inputs = {k: v.clone().requires_grad_(k in case['grad_wrt']) for k, v in case['inputs'].items()}
    out = dd.filtered_resizing(**inputs, **case['kwargs'])
    assert out.shape == case['output'].shape
    torch.testing.assert_close(out, case['output'], rtol=0, atol=1e-5)
    grads = torch.autograd.grad((out * case['cotangent']).sum(), [inputs[k] for k in case['grad_wrt']])
    for k, g in zip(case['grad_wrt'], grads):
        torch.testing.assert_close(g, case['grads'][k], rtol=0, atol=1e-5, msg=lambda m: f'grad {k}: {m}')


def test_filtered_resizing_rejects_unknown_mode():
    with pytest.raises(ValueError):
        dd.filtered_resizing(torch.zeros(1, 3, 8, 8), 16, f=None, filter_mode='bicubic')

#----------------------------------------------------------------------------
# Golden dual discriminator.

@pytest.fixture(scope='module')
def golden_d(golden_dir):
    return torch.load(golden_dir / 'tiny128_D.pt', weights_only=False)


@pytest.fixture(scope='module')
def D(golden_d):
    torch.manual_seed(10)
    D = dd.DualDiscriminator(**golden_d['init_kwargs'])
    D.load_state_dict(golden_d['state_dict'], strict=True)
    return D.eval()


def _assert_rel_close(actual, expected, rel, name):
    """max |a - b| <= rel * max |b| over the whole tensor.

    The reference gradients are small (~1e-4 for the images), so an absolute 1e-4 bound would
    accept almost anything, while an elementwise relative bound is ill-posed at entries that are
    (near) zero. Float32 rounding differences from a different accumulation order scale with the
    magnitude of the values being summed, i.e. with the tensor's overall scale, so we normalise the
    worst absolute error by the tensor's largest magnitude. The reference must not be all zeros.
    """
    scale = expected.abs().max()
    assert scale > 0, f'{name}: reference is all zeros'
    err = (actual - expected).abs().max()
    assert err <= rel * scale, f'{name}: max abs err {err:.3e} > {rel} * max|ref| ({scale:.3e})'


def test_structure_matches_golden(golden_d, D):
    assert list(D.state_dict().keys()) == list(golden_d['state_dict'].keys())
    assert sum(p.numel() for p in D.parameters()) == golden_d['num_params']
    assert sum(b.numel() for b in D.buffers()) == golden_d['num_buffer_elements']
    assert D.img_channels == 6 and D.block_resolutions == [128, 64, 32, 16, 8]
    assert D.b4.mbstd.group_size == 4 and D.b4.cmap_dim == 32


def test_construction_reproduces_official_init(golden_d):
    """Same random draws in the same order as the official constructor: every entry that the
    golden recipe did not perturb after construction is bit-identical."""
    torch.manual_seed(golden_d['meta']['seeds']['init'])
    D = dd.DualDiscriminator(**golden_d['init_kwargs'])
    for k, v in D.state_dict().items():
        if k not in golden_d['perturbed_entries']:
            assert torch.equal(v, golden_d['state_dict'][k]), k


def test_dual_discriminator_matches_golden(golden_d, D):
    image = golden_d['inputs']['img']['image'].clone().requires_grad_(True)
    image_raw = golden_d['inputs']['img']['image_raw'].clone().requires_grad_(True)
    c = golden_d['inputs']['c'].clone()
    logits = D({'image': image, 'image_raw': image_raw}, c)
    torch.testing.assert_close(logits, golden_d['outputs']['logits'], rtol=0, atol=1e-4)
    torch.testing.assert_close(c, golden_d['inputs']['c'], rtol=0, atol=0)  # disc_c_noise = 0: c untouched

    resized = dd.filtered_resizing(golden_d['inputs']['img']['image_raw'], size=128, f=D.resample_filter)
    torch.testing.assert_close(resized, golden_d['intermediates']['image_raw_resized'], rtol=0, atol=1e-5)

    param_names = list(golden_d['grads']['params'].keys())
    params = dict(D.named_parameters())
    grads = torch.autograd.grad((logits * golden_d['cotangent']).sum(),
                                [image, image_raw] + [params[n] for n in param_names])
    _assert_rel_close(grads[0], golden_d['grads']['image'], 1e-4, 'image')
    _assert_rel_close(grads[1], golden_d['grads']['image_raw'], 1e-4, 'image_raw')
    for n, g in zip(param_names, grads[2:]):
        _assert_rel_close(g, golden_d['grads']['params'][n], 1e-4, n)


def test_dual_discriminator_num_fp16_res_runs_float32_on_cpu(golden_d, D):
    kwargs = dict(golden_d['init_kwargs'], num_fp16_res=4, conv_clamp=256)
    D16 = dd.DualDiscriminator(**kwargs)
    assert [getattr(D16, f'b{r}').use_fp16 for r in D16.block_resolutions] == [True, True, True, True, False]
    D16.load_state_dict(golden_d['state_dict'], strict=True)
    D16.eval()
    dtypes = []
    hooks = [m.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
             for m in D16.modules() if isinstance(m, nets.Conv2dLayer)]
    with torch.no_grad():
        logits = D16(golden_d['inputs']['img'], golden_d['inputs']['c'])
    for h in hooks:
        h.remove()
    assert set(dtypes) == {torch.float32}
    # Same function as the fp32 golden model (conv_clamp=256 is inactive at these magnitudes).
    torch.testing.assert_close(logits, golden_d['outputs']['logits'], rtol=0, atol=1e-4)

#----------------------------------------------------------------------------
# Other variants.

SMALL = dict(c_dim=5, img_resolution=16, img_channels=3, channel_base=64, channel_max=8, num_fp16_res=0, conv_clamp=None)


def _img(n=4):
    return {'image': torch.randn(n, 3, 16, 16), 'image_raw': torch.randn(n, 3, 8, 8)}


def test_disc_c_noise_perturbs_the_label():
    torch.manual_seed(0)
    D0 = dd.DualDiscriminator(**SMALL)
    Dn = dd.DualDiscriminator(**SMALL, disc_c_noise=1.0)
    Dn.load_state_dict(D0.state_dict())
    img, c = _img(), torch.randn(4, 5)
    assert not torch.allclose(D0(img, c.clone()), Dn(img, c.clone()))


def test_single_discriminator_ignores_raw_image():
    torch.manual_seed(0)
    D = dd.SingleDiscriminator(**SMALL, sr_upsample_factor=2)
    assert D.img_channels == 3 and D.b16.fromrgb.weight.shape[1] == 3
    img, c = _img(), torch.randn(4, 5)
    a = D(img, c)
    b = D({'image': img['image'], 'image_raw': torch.randn(4, 3, 8, 8)}, c)
    assert a.shape == (4, 1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_dummy_dual_discriminator_fades_raw_image():
    torch.manual_seed(0)
    D = dd.DummyDualDiscriminator(**SMALL)
    assert D.raw_fade == 1 and D.b16.fromrgb.weight.shape[1] == 6
    out = D(_img(), torch.randn(4, 5))
    assert out.shape == (4, 1)
    assert D.raw_fade == pytest.approx(1 - 32 / 500000)


def test_unconditional_dual_discriminator():
    torch.manual_seed(0)
    D = dd.DualDiscriminator(**dict(SMALL, c_dim=0))
    assert not hasattr(D, 'mapping') and D.b4.cmap_dim == 0
    assert D(_img(2), None).shape == (2, 1)
