"""The CUDA paths of bias_act and upfirdn2d agree with the reference paths.

Two parts:
- the custom-op wiring (autograd formulas, fake tensors for torch.compile), checked on CPU with
  a stand-in plugin that has the compiled plugin's call signature but computes with the reference;
- the compiled kernels themselves against the reference, which needs a GPU (skipped otherwise).
"""
import itertools

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from torch_utils import custom_ops
from torch_utils.ops import bias_act, upfirdn2d

_ACT_BY_IDX = {spec.cuda_idx: name for name, spec in bias_act.activation_funcs.items()}


def _act_derivatives(name, s, alpha):
    """First and second derivative of activation `name` at s (one-sided at kinks, like autograd)."""
    one, zero = torch.ones_like(s), torch.zeros_like(s)
    p, t = torch.sigmoid(s), torch.tanh(s)
    scale, selu_alpha = 1.0507009873554804934193349852946, 1.6732632423543772848170429916717
    return {
        'linear': (one, zero),
        'relu': ((s > 0).to(s.dtype), zero),
        'lrelu': (torch.where(s > 0, one, alpha * one), zero),
        'tanh': (1 - t * t, -2 * t * (1 - t * t)),
        'sigmoid': (p * (1 - p), p * (1 - p) * (1 - 2 * p)),
        'elu': (torch.where(s > 0, one, s.exp()), torch.where(s > 0, zero, s.exp())),
        'selu': (scale * torch.where(s > 0, one, selu_alpha * s.exp()),
                 torch.where(s > 0, zero, scale * selu_alpha * s.exp())),
        'softplus': (torch.where(s > 20, one, p), torch.where(s > 20, zero, p * (1 - p))),
        'swish': (p * (1 + s * (1 - p)), p * (1 - p) * (2 + s * (1 - 2 * p))),
    }[name]


class _ReferencePlugin:
    """Stand-in for the compiled extensions: same functions and arguments, computed with torch ops.

    (Autograd is off inside custom-op implementations, so the derivatives are written out.)
    """

    @staticmethod
    def bias_act(mode, x, b, g, dy, dim, act, alpha, gain, clamp):
        name = _ACT_BY_IDX[act]
        s = x + b.reshape([-1 if i == dim else 1 for i in range(x.ndim)]) if b.numel() else x
        y0 = gain * bias_act.activation_funcs[name].func(s, alpha=alpha)
        if mode == 0:
            return y0.clamp(-clamp, clamp) if clamp >= 0 else y0
        inside = (y0.abs() <= clamp).to(x.dtype) if clamp >= 0 else 1
        d1, d2 = _act_derivatives(name, s, alpha)
        return g * gain * d1 * inside if mode == 1 else g * dy * gain * d2 * inside

    @staticmethod
    def upfirdn2d(x, f, upx, upy, downx, downy, padx0, padx1, pady0, pady1, flip_filter, gain):
        return upfirdn2d._upfirdn2d_ref(x, f, up=[upx, upy], down=[downx, downy],
                                        padding=[padx0, padx1, pady0, pady1], flip_filter=flip_filter, gain=gain)


@pytest.fixture
def reference_plugin(monkeypatch):
    monkeypatch.setattr(bias_act, '_plugin', _ReferencePlugin)
    monkeypatch.setattr(upfirdn2d, '_plugin', _ReferencePlugin)


def _randn(*shape, seed=0, dtype=torch.float64, device='cpu', requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_(requires_grad)


# --- Custom-op wiring (CPU) ------------------------------------------------------------------

@pytest.mark.parametrize('act', sorted(bias_act.activation_funcs))
def test_bias_act_op_gradients(reference_plugin, act):
    x, b = (_randn(2, 3, 4, seed=1, requires_grad=False) * 2).requires_grad_(True), _randn(4, seed=2)
    fn = lambda x, b: bias_act._bias_act_cuda(x, b, dim=2, act=act, alpha=None, gain=0.8, clamp=1.1)
    torch.testing.assert_close(fn(x, b), bias_act.bias_act(x, b, dim=2, act=act, gain=0.8, clamp=1.1, impl='ref'))
    assert gradcheck(fn, (x, b))
    assert gradgradcheck(fn, (x, b))


_UPFIRDN_WIRING = {
    'up2': dict(up=2, padding=[2, 1, 2, 1]),
    'down2_flip': dict(down=2, padding=1, flip_filter=True),
    'aniso_gain': dict(up=[2, 1], down=[1, 2], padding=[2, 1, 1, 2], gain=3),
    'crop': dict(padding=-1),
    'up3_down2_mixed_pad': dict(up=3, down=2, padding=[0, 2, 3, -1]),
}


@pytest.mark.parametrize('separable', [False, True], ids=['2d', 'separable'])
@pytest.mark.parametrize('config', sorted(_UPFIRDN_WIRING))
def test_upfirdn2d_op_gradients(reference_plugin, config, separable):
    """The registered backward (upfirdn2d with swapped factors and adjusted padding) is the adjoint."""
    f = upfirdn2d.setup_filter([1, 3, 3, 1], separable=separable)
    x = _randn(1, 1, 6, 6, seed=3)
    fn = lambda x: upfirdn2d._upfirdn2d_cuda(x, f, **_UPFIRDN_WIRING[config])
    torch.testing.assert_close(fn(x), upfirdn2d.upfirdn2d(x, f, impl='ref', **_UPFIRDN_WIRING[config]))
    assert gradcheck(fn, (x,), fast_mode=True)


def test_upfirdn2d_op_second_order(reference_plugin):
    f = upfirdn2d.setup_filter([1, 3, 3, 1], separable=True)
    x = _randn(1, 1, 5, 6, seed=4)
    fn = lambda x: upfirdn2d._upfirdn2d_cuda(x, f, up=2, down=[1, 2], padding=[2, 1, 0, 1])
    assert gradgradcheck(fn, (x,), fast_mode=True)


def test_ops_trace_with_torch_compile(reference_plugin):
    f = upfirdn2d.setup_filter([1, 3, 3, 1])

    def fn(x, b):
        y = bias_act._bias_act_cuda(x, b, dim=1, act='lrelu', alpha=None, gain=None, clamp=256)
        return upfirdn2d._upfirdn2d_cuda(y, f, up=2, padding=[2, 1, 2, 1])

    x, b = _randn(2, 3, 8, 8, seed=4, dtype=torch.float32), _randn(3, seed=5, dtype=torch.float32)
    compiled = torch.compile(fn, backend='aot_eager', fullgraph=True)
    out = compiled(x, b)
    torch.testing.assert_close(out, fn(x, b))
    grads = torch.autograd.grad(out.square().sum(), [x, b])
    expected = torch.autograd.grad(fn(x, b).square().sum(), [x, b])
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


# --- Compiled kernels (GPU) ------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device (compiled kernels)')
_TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-2, rtol=1e-2)}


@pytest.fixture
def cuda_plugins(monkeypatch):
    monkeypatch.delenv(custom_ops.IMPL_ENV, raising=False)
    if bias_act._plugin() is None or upfirdn2d._plugin() is None:
        pytest.fail('the CUDA plugins did not build on a machine with a GPU (see the warning above)')


def _compare(fn, inputs, dtype, cotangent_seed=99):
    """fn(impl, *inputs) for 'cuda' and 'ref': outputs and input gradients agree."""
    outs, grads = {}, {}
    for impl in ('cuda', 'ref'):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        outs[impl] = fn(impl, *leaves)
        cot = _randn(*outs[impl].shape, seed=cotangent_seed, dtype=dtype, device='cuda', requires_grad=False)
        grads[impl] = torch.autograd.grad((outs[impl] * cot).sum(), leaves)
    torch.testing.assert_close(outs['cuda'], outs['ref'], **_TOLERANCE[dtype])
    for g_cuda, g_ref in zip(grads['cuda'], grads['ref']):
        torch.testing.assert_close(g_cuda, g_ref, **_TOLERANCE[dtype])


@needs_cuda
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16], ids=['fp32', 'fp16'])
@pytest.mark.parametrize('act', sorted(bias_act.activation_funcs))
@pytest.mark.parametrize('variant', ['plain', 'bias', 'bias_gain_clamp', 'dim2', 'fc', 'channels_last'])
def test_bias_act_cuda_matches_ref(cuda_plugins, act, dtype, variant):
    shape, dim, kwargs = [4, 8, 6, 5], 1, {}
    if variant == 'fc':
        shape = [16, 32]
    if variant == 'dim2':
        dim = 2
    if variant == 'bias_gain_clamp':
        kwargs = dict(gain=1.7, clamp=0.9, alpha=0.1)
    x = _randn(*shape, seed=1, dtype=dtype, device='cuda') * 2
    if variant == 'channels_last':
        x = x.detach().contiguous(memory_format=torch.channels_last)
    inputs = [x] if variant == 'plain' else [x, _randn(shape[dim], seed=2, dtype=dtype, device='cuda')]
    fn = lambda impl, x, b=None: bias_act.bias_act(x, b, dim=dim, act=act, impl=impl, **kwargs)
    _compare(fn, inputs, dtype)


@needs_cuda
@pytest.mark.parametrize('act', sorted(k for k, s in bias_act.activation_funcs.items() if s.has_2nd_grad))
def test_bias_act_cuda_second_order(cuda_plugins, act):
    x = (_randn(2, 3, 4, seed=1, device='cuda', requires_grad=False) * 2).requires_grad_(True)
    b = _randn(3, seed=2, device='cuda')
    fn = lambda x, b: bias_act.bias_act(x, b, act=act, gain=0.8, clamp=1.1, impl='cuda')
    assert gradcheck(fn, (x, b)) and gradgradcheck(fn, (x, b))


_UPFIRDN_GRID = list(itertools.product(
    [1, 2, [2, 1]],                              # up
    [1, 2, [1, 3]],                              # down
    [0, -1, [2, 1, 0, 3]],                       # padding
    [False, True],                               # flip_filter
    ['4x4', '4sep', '2x3', 'none', '12sep'],     # filter
))


@needs_cuda
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16], ids=['fp32', 'fp16'])
@pytest.mark.parametrize('up,down,padding,flip_filter,filt', _UPFIRDN_GRID, ids=str)
def test_upfirdn2d_cuda_matches_ref(cuda_plugins, up, down, padding, flip_filter, filt, dtype):
    f = {'4x4': upfirdn2d.setup_filter([1, 3, 3, 1]), '4sep': upfirdn2d.setup_filter([1, 3, 3, 1], separable=True),
         '2x3': upfirdn2d.setup_filter([[1, 2, 1], [0, 1, 3]]), 'none': None,
         '12sep': upfirdn2d.setup_filter([1, 2, 3, 4, 5, 6, 6, 5, 4, 3, 2, 1])}[filt]
    f = None if f is None else f.cuda()
    x = _randn(2, 3, 13, 11, seed=3, dtype=dtype, device='cuda')
    fw, fh = upfirdn2d._get_filter_size(f)
    upx, upy = upfirdn2d._parse_scaling(up)
    p = upfirdn2d._parse_padding(padding)
    if 11 * upx + p[0] + p[1] < fw or 13 * upy + p[2] + p[3] < fh:
        pytest.skip('padded image smaller than the filter')
    fn = lambda impl, x: upfirdn2d.upfirdn2d(x, f, up=up, down=down, padding=padding, flip_filter=flip_filter,
                                             gain=2.5, impl=impl)
    _compare(fn, [x], dtype)


@needs_cuda
def test_upfirdn2d_cuda_channels_last_and_second_order(cuda_plugins):
    f = upfirdn2d.setup_filter([1, 3, 3, 1]).cuda()
    x = _randn(2, 3, 8, 8, seed=4, dtype=torch.float32, device='cuda').detach()
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    _compare(lambda impl, x: upfirdn2d.upsample2d(x, f, impl=impl), [x], torch.float32)
    x64 = _randn(1, 2, 6, 5, seed=5, device='cuda')
    fn = lambda x: upfirdn2d.downsample2d(upfirdn2d.upsample2d(x, f, impl='cuda'), f, impl='cuda')
    assert gradcheck(fn, (x64,)) and gradgradcheck(fn, (x64,))
