"""Gradients of the reference op paths: first and second order against finite differences (float64).

The larger cases use gradcheck's fast mode (random projections of the Jacobian) to stay quick.
"""
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from torch_utils.ops import bias_act, conv2d_gradfix, conv2d_resample, fma, grid_sample_gradfix, upfirdn2d


def _randn(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)


@pytest.mark.parametrize('act', sorted(bias_act.activation_funcs))
def test_bias_act_first_order(act):
    x, b = _randn(2, 3, 4, 4, seed=1), _randn(3, seed=2)
    assert gradcheck(lambda x, b: bias_act.bias_act(x, b, act=act, gain=0.7, impl='ref'), (x, b))


@pytest.mark.parametrize('act', sorted(k for k, spec in bias_act.activation_funcs.items() if spec.has_2nd_grad))
def test_bias_act_second_order(act):
    x, b = _randn(2, 3, 4, 4, seed=1), _randn(3, seed=2)
    assert gradgradcheck(lambda x, b: bias_act.bias_act(x, b, act=act, gain=0.7, impl='ref'), (x, b))


def test_bias_act_clamp_and_dim_gradients():
    x, b = _randn(2, 3, 5, seed=3) * 2, _randn(5, seed=4)
    fn = lambda x, b: bias_act.bias_act(x, b, dim=2, act='swish', clamp=0.8, impl='ref')
    assert gradcheck(fn, (x, b)) and gradgradcheck(fn, (x, b))


_UPFIRDN_CONFIGS = {
    'up2_pad': dict(up=2, padding=[2, 1, 2, 1]),
    'down2_flip': dict(down=2, padding=1, flip_filter=True),
    'aniso_gain': dict(up=[2, 1], down=[1, 2], padding=[2, 1, 1, 2], gain=3),
    'crop': dict(padding=-1),
}


@pytest.mark.parametrize('separable', [False, True], ids=['2d', 'separable'])
@pytest.mark.parametrize('config', sorted(_UPFIRDN_CONFIGS))
def test_upfirdn2d_gradients(config, separable):
    f = upfirdn2d.setup_filter([1, 3, 3, 1], separable=separable)
    x = _randn(1, 1, 6, 6, seed=5)
    fn = lambda x: upfirdn2d.upfirdn2d(x, f, impl='ref', **_UPFIRDN_CONFIGS[config])
    assert gradcheck(fn, (x,), fast_mode=True) and gradgradcheck(fn, (x,), fast_mode=True)


_RESAMPLE_CONFIGS = {
    'plain_pad1': dict(padding=1),
    'asym_pad': dict(padding=[1, 0, 1, 0]),
    'up2_noflip': dict(up=2, padding=1, flip_weight=False),
    'down2': dict(down=2, padding=1),
    'up2_down2_groups2': dict(up=2, down=2, padding=1, groups=2),
}


@pytest.mark.parametrize('config', sorted(_RESAMPLE_CONFIGS))
def test_conv2d_resample_gradients(config):
    kwargs = _RESAMPLE_CONFIGS[config]
    groups = kwargs.get('groups', 1)
    x, w = _randn(1, 2, 4, 4, seed=6), _randn(2, 2 // groups, 3, 3, seed=7)
    f = upfirdn2d.setup_filter([1, 3, 3, 1])
    # The op asserts a float32 filter; upfirdn2d casts it to the input dtype.
    fn = lambda x, w: conv2d_resample.conv2d_resample(x, w, f=f, **kwargs)
    assert gradcheck(fn, (x, w), fast_mode=True) and gradgradcheck(fn, (x, w), fast_mode=True)


@pytest.fixture
def custom_conv(monkeypatch):
    """Route conv2d_gradfix through its custom autograd op on CPU (normally CUDA only)."""
    monkeypatch.setattr(conv2d_gradfix, '_should_use_custom_op', lambda input: True)


@pytest.mark.parametrize('transpose', [False, True], ids=['conv2d', 'conv_transpose2d'])
def test_conv2d_gradfix_custom_op_gradients(custom_conv, transpose):
    size = 2 if transpose else 3  # keeps the output small: gradgradcheck cost grows with it
    x, w, b = _randn(1, 4, size, size, seed=8), _randn(4, 2, 3, 3, seed=9), _randn(4, seed=10)
    if transpose:
        kwargs = dict(stride=2, padding=1, output_padding=1, groups=2)
        fn = lambda x, w, b: conv2d_gradfix.conv_transpose2d(x, w, b, **kwargs)
        ref = lambda x, w, b: torch.nn.functional.conv_transpose2d(x, w, b, **kwargs)
    else:
        kwargs = dict(stride=2, padding=1, groups=2)
        fn = lambda x, w, b: conv2d_gradfix.conv2d(x, w, b, **kwargs)
        ref = lambda x, w, b: torch.nn.functional.conv2d(x, w, b, **kwargs)
    torch.testing.assert_close(fn(x, w, b), ref(x, w, b))
    assert gradcheck(fn, (x, w, b), fast_mode=True) and gradgradcheck(fn, (x, w, b), fast_mode=True)


def test_no_weight_gradients_skips_weight_grad(custom_conv):
    x, w = _randn(2, 3, 6, 6, seed=11), _randn(4, 3, 3, 3, seed=12)
    with conv2d_gradfix.no_weight_gradients():
        conv2d_gradfix.conv2d(x, w, padding=1).square().sum().backward()
    assert w.grad is None and x.grad is not None
    expected, = torch.autograd.grad(torch.nn.functional.conv2d(x, w, padding=1).square().sum(), [x])
    torch.testing.assert_close(x.grad, expected)
    assert not conv2d_gradfix.weight_gradients_disabled


def test_fma_sums_gradients_to_input_shapes():
    a, b, c = _randn(3, 1, 4, seed=13), _randn(2, 1, 1, 1, seed=14), _randn(4, seed=15)
    torch.testing.assert_close(fma.fma(a, b, c), a * b + c)
    assert gradcheck(fma.fma, (a, b, c))


def test_grid_sample_gradfix_double_backward(monkeypatch):
    monkeypatch.setattr(grid_sample_gradfix, 'enabled', True)
    image = _randn(1, 2, 5, 6, seed=16)
    grid = (torch.rand(1, 4, 3, 2, generator=torch.Generator().manual_seed(17), dtype=torch.float64) * 2 - 1)
    expected = torch.nn.functional.grid_sample(image, grid, mode='bilinear', padding_mode='zeros', align_corners=False)
    torch.testing.assert_close(grid_sample_gradfix.grid_sample(image, grid), expected)
    fn = lambda image: grid_sample_gradfix.grid_sample(image, grid)
    assert gradcheck(fn, (image,)) and gradgradcheck(fn, (image,))
    grid.requires_grad_(True)
    assert gradcheck(grid_sample_gradfix.grid_sample, (image, grid))
