"""Fused bias + activation + gain + clamp (`bias_act`).

`impl='ref'` is plain PyTorch (defines the semantics, any device, gradients of any order).
`impl='cuda'` (default) uses the compiled kernel for CUDA tensors when it is available and falls
back to the reference otherwise (see docs/cuda_ops.md); it supports first and second order
gradients.
"""

import dataclasses
import math
import os
from typing import Callable, Optional

import torch

from .. import custom_ops


@dataclasses.dataclass(frozen=True)
class ActivationSpec:
    """One activation function: reference formula and defaults.

    `cuda_idx` selects the function in the CUDA kernel; `ref` says which forward tensor its
    derivative is naturally written in ('x' input, 'y' output, '' none); `has_2nd_grad` is False
    when the second derivative is zero almost everywhere.
    """
    func: Callable[..., torch.Tensor]
    def_alpha: float
    def_gain: float
    cuda_idx: int
    ref: str
    has_2nd_grad: bool


_SQRT2 = math.sqrt(2)

activation_funcs = {
    'linear':   ActivationSpec(lambda x, **_: x,                                         0,   1,      1, '',  False),
    'relu':     ActivationSpec(lambda x, **_: torch.nn.functional.relu(x),               0,   _SQRT2, 2, 'y', False),
    'lrelu':    ActivationSpec(lambda x, alpha, **_: torch.nn.functional.leaky_relu(x, alpha),
                                                                                          0.2, _SQRT2, 3, 'y', False),
    'tanh':     ActivationSpec(lambda x, **_: torch.tanh(x),                             0,   1,      4, 'y', True),
    'sigmoid':  ActivationSpec(lambda x, **_: torch.sigmoid(x),                          0,   1,      5, 'y', True),
    'elu':      ActivationSpec(lambda x, **_: torch.nn.functional.elu(x),                0,   1,      6, 'y', True),
    'selu':     ActivationSpec(lambda x, **_: torch.nn.functional.selu(x),               0,   1,      7, 'y', True),
    'softplus': ActivationSpec(lambda x, **_: torch.nn.functional.softplus(x),           0,   1,      8, 'y', True),
    'swish':    ActivationSpec(lambda x, **_: torch.sigmoid(x) * x,                      0,   _SQRT2, 9, 'x', True),
}


def bias_act(x: torch.Tensor, b: Optional[torch.Tensor] = None, dim: int = 1, act: str = 'linear',
             alpha: Optional[float] = None, gain: Optional[float] = None, clamp: Optional[float] = None,
             impl: str = 'cuda') -> torch.Tensor:
    r"""Add bias `b` along dimension `dim` of `x`, apply `act`, multiply by `gain`, clamp to `[-clamp, clamp]`.

    Args:
        x:     Input tensor of any shape.
        b:     1-D bias of length `x.shape[dim]` and the dtype of `x`, or None.
        dim:   The dimension of `x` that `b` runs along (ignored without `b`).
        act:   Name of an entry of `activation_funcs` ('linear' for none).
        alpha: Activation shape parameter (lrelu slope); None = the activation's default.
        gain:  Output scale; None = the activation's default (sqrt(2) for relu/lrelu/swish).
        clamp: Clamp the output to `[-clamp, clamp]`; None = no clamping.
        impl:  'cuda' (compiled kernel where available, else reference) or 'ref'.

    Returns:
        Tensor of the shape and dtype of `x`.
    """
    assert isinstance(x, torch.Tensor)
    assert impl in ('ref', 'cuda')
    if impl == 'cuda' and x.device.type == 'cuda' and _cuda_available():
        return _bias_act_cuda(x, b, dim=dim, act=act, alpha=alpha, gain=gain, clamp=clamp)
    return _bias_act_ref(x, b, dim=dim, act=act, alpha=alpha, gain=gain, clamp=clamp)


def _resolve(act: str, alpha: Optional[float], gain: Optional[float], clamp: Optional[float]):
    """Fill in defaults: returns (spec, alpha, gain, clamp) with clamp = -1 meaning 'no clamp'."""
    if clamp is not None:
        assert clamp >= 0, f'clamp must be non-negative, got {clamp}'
    spec = activation_funcs[act]
    return (spec,
            float(spec.def_alpha if alpha is None else alpha),
            float(spec.def_gain if gain is None else gain),
            -1.0 if clamp is None else float(clamp))


def _bias_act_ref(x: torch.Tensor, b: Optional[torch.Tensor] = None, dim: int = 1, act: str = 'linear',
                  alpha: Optional[float] = None, gain: Optional[float] = None,
                  clamp: Optional[float] = None) -> torch.Tensor:
    """Reference implementation with standard PyTorch ops."""
    spec, alpha, gain, clamp = _resolve(act, alpha, gain, clamp)
    if b is not None:
        assert isinstance(b, torch.Tensor) and b.ndim == 1
        assert 0 <= dim < x.ndim and b.shape[0] == x.shape[dim]
        bias_shape = [1] * x.ndim
        bias_shape[dim] = -1
        x = x + b.reshape(bias_shape)
    x = spec.func(x, alpha=alpha)
    if gain != 1:
        x = x * gain
    if clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x


# CUDA path: the kernel in bias_act.cu, exposed as torch.library custom ops (traceable by
# torch.compile). Forward, gradient and second derivative are three modes of one kernel.

_PLUGIN_SPEC = dict(module_name='bias_act_plugin', sources=['bias_act.cpp', 'bias_act.cu'], headers=['bias_act.h'],
                    source_dir=os.path.dirname(__file__))
_FORWARD, _GRAD, _GRAD2 = 0, 1, 2  # BiasActMode in bias_act.h


def _plugin():
    """The compiled extension, or None (one warning) when it cannot be built."""
    return custom_ops.load_plugin(**_PLUGIN_SPEC)


def _cuda_available() -> bool:
    return not custom_ops.reference_forced() and _plugin() is not None


def _bias_act_cuda(x: torch.Tensor, b: Optional[torch.Tensor], dim: int, act: str, alpha: Optional[float],
                   gain: Optional[float], clamp: Optional[float]) -> torch.Tensor:
    spec, alpha, gain, clamp = _resolve(act, alpha, gain, clamp)
    if b is not None:
        assert isinstance(b, torch.Tensor) and b.ndim == 1
        assert 0 <= dim < x.ndim and b.shape[0] == x.shape[dim]
    elif act == 'linear' and gain == 1 and clamp < 0:
        return x  # identity, as in the reference
    return torch.ops.eg3d.bias_act(x, b, dim, spec.cuda_idx, alpha, gain, clamp)


def _run(mode: int, x: torch.Tensor, b: Optional[torch.Tensor], g: Optional[torch.Tensor],
         dy: Optional[torch.Tensor], dim: int, act: int, alpha: float, gain: float, clamp: float) -> torch.Tensor:
    empty = x.new_empty(0)
    return _plugin().bias_act(mode, x, empty if b is None else b, empty if g is None else g,
                              empty if dy is None else dy, dim, act, alpha, gain, clamp)


def _sum_except(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.sum([i for i in range(t.ndim) if i != dim])


@torch.library.custom_op('eg3d::bias_act', mutates_args=())
def _op_forward(x: torch.Tensor, b: Optional[torch.Tensor], dim: int, act: int, alpha: float, gain: float,
                clamp: float) -> torch.Tensor:
    """clamp(gain * act(x + b))."""
    return _run(_FORWARD, x, b, None, None, dim, act, alpha, gain, clamp)


@torch.library.custom_op('eg3d::bias_act_grad', mutates_args=())
def _op_grad(dy: torch.Tensor, x: torch.Tensor, b: Optional[torch.Tensor], dim: int, act: int, alpha: float,
             gain: float, clamp: float) -> torch.Tensor:
    """dL/dx from dL/dy = dy (linear in dy)."""
    return _run(_GRAD, x, b, dy, None, dim, act, alpha, gain, clamp)


@torch.library.custom_op('eg3d::bias_act_grad2', mutates_args=())
def _op_grad2(d_dx: torch.Tensor, dy: torch.Tensor, x: torch.Tensor, b: Optional[torch.Tensor], dim: int, act: int,
              alpha: float, gain: float, clamp: float) -> torch.Tensor:
    """Derivative w.r.t. x of <d_dx, bias_act_grad(dy, x, b)>."""
    return _run(_GRAD2, x, b, d_dx, dy, dim, act, alpha, gain, clamp)


@_op_forward.register_fake
def _(x, b, dim, act, alpha, gain, clamp):
    return torch.empty_like(x)


@_op_grad.register_fake
def _(dy, x, b, dim, act, alpha, gain, clamp):
    return torch.empty_like(x)


@_op_grad2.register_fake
def _(d_dx, dy, x, b, dim, act, alpha, gain, clamp):
    return torch.empty_like(x)


def _setup_forward(ctx, inputs, output):
    x, b, *params = inputs
    ctx.save_for_backward(x, b)
    ctx.params = params


def _backward_forward(ctx, dy):
    x, b = ctx.saved_tensors
    dx = torch.ops.eg3d.bias_act_grad(dy, x, b, *ctx.params)
    db = _sum_except(dx, ctx.params[0]) if b is not None and ctx.needs_input_grad[1] else None
    return (dx, db) + (None,) * len(ctx.params)


def _setup_grad(ctx, inputs, output):
    dy, x, b, *params = inputs
    ctx.save_for_backward(dy, x, b)
    ctx.params = params


def _backward_grad(ctx, d_dx):
    dy, x, b = ctx.saved_tensors
    d_dy = torch.ops.eg3d.bias_act_grad(d_dx, x, b, *ctx.params) if ctx.needs_input_grad[0] else None
    d_x = d_b = None
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        d_x = torch.ops.eg3d.bias_act_grad2(d_dx, dy, x, b, *ctx.params)
        d_b = _sum_except(d_x, ctx.params[0]) if b is not None and ctx.needs_input_grad[2] else None
    return (d_dy, d_x, d_b) + (None,) * len(ctx.params)


torch.library.register_autograd('eg3d::bias_act', _backward_forward, setup_context=_setup_forward)
torch.library.register_autograd('eg3d::bias_act_grad', _backward_grad, setup_context=_setup_grad)
