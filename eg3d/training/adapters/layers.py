"""Persistent low-rank adapter layers wrapping the EG3D / StyleGAN2 layers.

Each wrapper holds K = `num_adapters` adapters (leading K dim on every adapter tensor) around a
frozen base layer, attached after construction as the child `base_layer`. The delta is added to
the base's raw (un-scaled) weight, so merging is `weight += delta`:

    LoRA:    delta_k = scaling * B_k @ A_k                A_k [R, fan_in], B_k [O, R]
    AdaLoRA: delta_k = scaling * B_k @ (A_k * E_k)        E_k [R, 1] (P = A, Lambda = E, Q = B)

with fan_in = I*kh*kw for convolutions (delta reshaped to [O, I, kh, kw]). The sample i of a
batch uses adapter `adapter_index` (an int for the whole batch, or a LongTensor [N]); the index is
transient (not in state_dict, not pickled).

NOTE: this module's source is embedded into snapshot pickles and executed by the official EG3D
code when it loads them, so it may import only torch, numpy, the standard library and official
EG3D names (torch_utils.*, training.networks_stylegan2).
"""

import math
import os

import numpy as np
import torch

from torch_utils import misc
from torch_utils import persistence
from torch_utils.ops import bias_act
from torch_utils.ops import conv2d_resample

#----------------------------------------------------------------------------

def _batched(t):
    """A factor as [1 or N, rows, cols]: shared factors get a batch dim of one."""
    return t if t.ndim == 3 else t[None]


def _merged_weight(weight, A, B):
    """W + B @ A as [1 or N, O, I*kh*kw] (one merged weight, or one per sample for per-sample factors)."""
    return torch.baddbmm(weight.reshape(1, weight.shape[0], -1), _batched(B), _batched(A))


def _spatial_dot(a, b):
    """sum over H, W of a * b for [N, C, H, W] tensors -> [N, C], as dot products (no temporary a * b)."""
    N, C = a.shape[0], a.shape[1]
    return torch.einsum('ncp,ncp->nc', a.reshape(N, C, -1), b.reshape(N, C, -1))


_HALF = (torch.float16, torch.bfloat16)


def _wide(t):
    """t in float32 if it is float16 / bfloat16. Factor gradients are sums over every pixel of the batch:
    in fp16 blocks (no loss scaling) a half-precision result overflows or flushes to zero, so they are
    accumulated and returned in float32, the precision of the factors themselves."""
    return t.float() if t.dtype in _HALF else t


class _Modulate(torch.autograd.Function):
    """x * styles per input channel. The styles' gradient is a batched dot product rather than
    autograd's full-size product tensor summed over H, W."""

    @staticmethod
    def forward(ctx, x, styles):  # pylint: disable=arguments-differ
        s = styles.to(x.dtype).reshape(x.shape[0], -1, 1, 1)
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, s)
        ctx.styles_dtype = styles.dtype
        return x * s

    @staticmethod
    def backward(ctx, grad):  # pylint: disable=arguments-differ
        x, s = ctx.saved_tensors
        grad_x = grad * s if ctx.needs_input_grad[0] else None
        grad_s = _spatial_dot(grad, x).to(ctx.styles_dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_s


class _DemodulateBiasAct(torch.autograd.Function):
    """clamp(gain * act(y * dcoefs + noise + bias)) for act 'linear' (alpha None) or 'lrelu' (slope
    alpha); dcoefs, noise and bias may each be None, gain > 0.

    The forward arithmetic of the base's `fma` + reference `bias_act`, op for op, but every step
    after the first runs in place on one tensor (on CPU each fresh full-size tensor costs more in
    page faults than the arithmetic), and backward allocates one tensor: the activation's
    derivative comes from the output's sign, the gradients of dcoefs, noise and bias are
    reductions. Without dcoefs, y itself is updated in place.
    """

    @staticmethod
    def forward(ctx, y, dcoefs, noise, bias, alpha, gain, clamp):  # pylint: disable=arguments-differ
        if dcoefs is not None:
            out = y * dcoefs if noise is None else torch.addcmul(noise, y, dcoefs)
        else:
            out = y if noise is None else y.add_(noise)
            ctx.mark_dirty(y)
        if bias is not None:
            out.add_(bias)
        if alpha is not None:
            torch.nn.functional.leaky_relu_(out, alpha)
        if gain != 1:
            out.mul_(gain)
        keep = None
        if clamp is not None:
            keep = out.abs() <= clamp  # where clamp passes the gradient (its bounds included)
            out.clamp_(-clamp, clamp)
        ctx.save_for_backward(y if ctx.needs_input_grad[1] else None, dcoefs, out if alpha is not None else None, keep)
        ctx.shapes = (None if noise is None else noise.shape, None if bias is None else bias.shape)
        ctx.act = (alpha, gain)
        return out

    @staticmethod
    def backward(ctx, grad):  # pylint: disable=arguments-differ
        y, dcoefs, out, keep = ctx.saved_tensors
        alpha, gain = ctx.act
        noise_shape, bias_shape = ctx.shapes
        g, owned = grad, False  # owned: g is a tensor of ours, free to update in place
        if alpha is not None:  # lrelu'(v) from the output: gain > 0 and clamp keep v's sign
            g, owned = torch.ops.aten.leaky_relu_backward(g, out, alpha, True), True
        if gain != 1:
            g, owned = (g.mul_(gain) if owned else g * gain), True
        if keep is not None:
            g, owned = (g.mul_(keep) if owned else g * keep), True
        grad_noise = g.sum_to_size(noise_shape) if ctx.needs_input_grad[2] else None
        grad_bias = g.sum_to_size(bias_shape) if ctx.needs_input_grad[3] else None
        grad_d = _spatial_dot(g, y).reshape(dcoefs.shape) if ctx.needs_input_grad[1] else None
        if dcoefs is not None and ctx.needs_input_grad[0]:
            g = g.mul_(dcoefs) if owned else g * dcoefs
        return g if ctx.needs_input_grad[0] else None, grad_d, grad_noise, grad_bias, None, None, None


class _DemodCoefficients(torch.autograd.Function):
    """dcoefs [N, O] = (sum over i, taps of ((W + B @ A) * s)^2 + 1e-8)^(-1/2) for a frozen W.

    Forward with the base's arithmetic on the per-sample weights [N, O, I, kh, kw] (so with B == 0
    the result is the base's bit for bit), keeping none of them for backward. Backward in weight
    space: with Q[o, i] = sum over taps (W + B @ A)^2, dcoefs^-2 = s^2 @ Q^T + 1e-8, so the
    gradients need only Q, matmuls over [N, I] x [I, O] and one pass over W + B @ A.
    """

    @staticmethod
    def forward(ctx, styles, weight, A, B):  # pylint: disable=arguments-differ
        N = styles.shape[0]
        O, I, kh, kw = weight.shape
        w = _merged_weight(weight, A, B).reshape(-1, O, I, kh, kw)  # [1 or N, O, I, kh, kw]
        d = (w * styles.reshape(N, 1, -1, 1, 1)).square_().sum(dim=[2, 3, 4]).add_(1e-8).rsqrt_()
        ctx.save_for_backward(styles, weight, A, B, d)
        return d

    @staticmethod
    def backward(ctx, grad):  # pylint: disable=arguments-differ
        styles, weight, A, B, d = ctx.saved_tensors
        O, I = weight.shape[0], weight.shape[1]
        w = _merged_weight(weight, A, B).reshape(-1, O, I, weight.shape[2] * weight.shape[3])  # [1 or N, O, I, taps]
        q = w.square().sum(-1)  # [1 or N, O, I]
        grad_sq = grad * d.pow(3) * -0.5  # dL/d(sum of squares) [N, O]
        grad_s = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_s = 2 * styles * torch.matmul(grad_sq.unsqueeze(1), q).squeeze(1)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            # dL/dw[o, i, t] = 2 w[o, i, t] * sum_n grad_sq[n, o] s[n, i]^2 (per sample: no sum over n)
            coef = grad_sq.unsqueeze(2) * styles.square().unsqueeze(1)  # [N, O, I]
            coef = coef if B.ndim == 3 else coef.sum(0, keepdim=True)
            grad_w = (w * (2 * coef).unsqueeze(-1)).reshape(coef.shape[0], O, -1)  # [1 or N, O, I*kh*kw]
            if ctx.needs_input_grad[2]:
                grad_A = torch.bmm(_batched(B).transpose(1, 2), grad_w).reshape(A.shape)
            if ctx.needs_input_grad[3]:
                grad_B = torch.bmm(grad_w, _batched(A).transpose(1, 2)).reshape(B.shape)
        return grad_s, None, grad_A, grad_B


def _tap_factor(A, in_channels, kh, kw, dtype):
    """A [.., R, I*kh*kw] -> [.., R*kh*kw, I]: row (r, dy, dx) mixes the input channels for kernel tap (dy, dx)."""
    lead, R = A.shape[:-2], A.shape[-2]
    taps = A.to(dtype).reshape(*lead, R, in_channels, kh * kw).transpose(-1, -2)
    return taps.reshape(*lead, R * kh * kw, in_channels)


def _thin_branch(x, A, kh, kw, f=None, up=1, down=1, padding=0, flip_weight=True):
    """(taps, h): h = conv2d_resample(x, A.reshape(R, I, kh, kw)) as [N, R, H'*W'], taps = `_tap_factor(A)`.

    A is [R, I*kh*kw] (shared) or [N, R, I*kh*kw] (sample i uses A[i]).

    Computed as z = taps @ x ([N, R*kh*kw, H, W], a matmul over the I input channels), then
    conv2d_resample(z, selector, groups=R), where group r adds up its kh*kw maps, map (dy, dx)
    at kernel tap (dy, dx). The convolution is linear in its input, so this is the same
    convolution for any padding, resampling and flip; but its only full-width operation is a
    matmul, which CPUs run much faster than a convolution with R output channels. Layers with
    few input channels (I <= R*kh*kw, where z would be wider than x) use the thin convolution.
    """
    N, I, H, W = x.shape
    R = A.shape[-2]
    taps = _tap_factor(A, I, kh, kw, x.dtype)
    geometry = dict(f=f, up=up, down=down, padding=padding, flip_weight=flip_weight)
    if R * kh * kw >= I and A.ndim == 2:  # z would be wider than x: the plain thin convolution moves less data
        h = conv2d_resample.conv2d_resample(x=x, w=A.to(x.dtype).reshape(R, I, kh, kw), **geometry)
        return taps, h.reshape(N, R, -1)
    z = torch.bmm(taps.expand(N, -1, -1), x.reshape(N, I, H * W)).reshape(N, R * kh * kw, H, W)
    if kh * kw == 1 and up == 1 and down == 1 and padding == 0:  # the selector would be an identity convolution
        return taps, z.reshape(N, R, -1)
    selector = torch.eye(kh * kw, dtype=x.dtype, device=x.device).reshape(1, kh * kw, kh, kw)
    h = conv2d_resample.conv2d_resample(x=z, w=selector.expand(R, -1, -1, -1).contiguous(), groups=R, **geometry)
    return taps, h.reshape(N, R, -1)


def _shifted_taps(grad_h, H, W, kh, kw, padding, flip_weight):
    """dL/dZ [N, R*kh*kw, H*W] for the stride-1 selector convolution: map (r, dy, dx) is dL/dh[r]
    shifted by the tap (dy, dx) relative to `padding` (zero outside)."""
    N, R = grad_h.shape[0], grad_h.shape[1]
    if kh * kw == 1 and padding == 0:  # one tap, no shift
        return grad_h.reshape(N, R, H * W)
    g = torch.nn.functional.pad(grad_h, [kw - 1 - padding] * 2 + [kh - 1 - padding] * 2)
    taps = torch.stack([g[:, :, kh - 1 - dy: kh - 1 - dy + H, kw - 1 - dx: kw - 1 - dx + W]
                        for dy in range(kh) for dx in range(kw)], dim=2)
    if not flip_weight:  # true convolution: map (dy, dx) sits at the mirrored tap
        taps = taps.reshape(N, R, kh, kw, H, W).flip([2, 3])
    return taps.reshape(N, R * kh * kw, H * W)


class _StrideOneAdaptedConv(torch.autograd.Function):
    """conv2d_resample(x * styles, W + B @ A) without resampling (stride 1, `padding`), for a frozen
    W; styles [N, I] or None (no modulation); A [R, I*kh*kw] and B [O, R] shared by the batch, or
    [N, R, I*kh*kw] and [N, O, R] per sample.

    Forward: the modulated input xs and the base convolution exactly as the base computes them, the
    thin branch h (`_thin_branch`), then y += B @ h per pixel, in place. xs is not kept: backward
    needs only x and styles. Backward: the input gradient of W alone (no weight gradient), the thin
    branch's input gradient added into it in place, then the modulation applied to it in place;
    the factors' and styles' gradients as matmuls and dot products: no full-size temporaries beyond
    the base's own.
    """

    @staticmethod
    def forward(ctx, x, styles, A, B, weight, padding, flip_weight):  # pylint: disable=arguments-differ
        N = x.shape[0]
        O, _, kh, kw = weight.shape
        xs = x if styles is None else x * styles.to(x.dtype).reshape(N, -1, 1, 1)
        y = conv2d_resample.conv2d_resample(x=xs, w=weight.to(x.dtype), padding=padding,
                                            flip_weight=flip_weight).contiguous()
        taps, h = _thin_branch(xs, A, kh, kw, padding=padding, flip_weight=flip_weight)
        B = B.to(x.dtype)
        y.view(N, O, -1).baddbmm_(B.expand(N, -1, -1), h)  # adds into y
        ctx.save_for_backward(x, styles, taps, B, weight, h)
        ctx.conv = (padding, flip_weight, A.dtype)
        return y

    @staticmethod
    def backward(ctx, grad):  # pylint: disable=arguments-differ
        x, styles, taps, B, weight, h = ctx.saved_tensors
        padding, flip_weight, factor_dtype = ctx.conv
        N, I, H, W = x.shape
        O, _, kh, kw = weight.shape
        R = B.shape[-1]
        s = None if styles is None else styles.to(x.dtype).reshape(N, I, 1)
        shared = (B.ndim == 2)  # per-sample factors keep their batch dim; shared ones sum over it
        grad = grad.contiguous()
        g3 = grad.reshape(N, O, -1)
        grad_h = torch.bmm(B.expand(N, -1, -1).transpose(1, 2), g3)
        grad_B = grad_A = grad_xs = None
        if ctx.needs_input_grad[3]:
            grad_B = torch.bmm(_wide(g3), _wide(h).transpose(1, 2))
            grad_B = (grad_B.sum(0) if shared else grad_B).to(factor_dtype)
        grad_h = grad_h.reshape(N, R, *grad.shape[2:])
        w = weight.to(x.dtype)
        w = w if flip_weight else w.flip([2, 3])
        needs_xs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        if shared and R * kh * kw >= I:  # narrow layer (see _thin_branch): gradients of the thin convolution
            xs = x if s is None else x * s.unsqueeze(-1)  # narrow: recomputing xs is cheap
            thin = taps.reshape(R, kh * kw, I).transpose(1, 2).reshape(R, I, kh, kw)
            thin = thin if flip_weight else thin.flip([2, 3])
            half = x.dtype in _HALF  # then the weight gradient is taken apart, in float32 (`_wide`)
            grad_xs_thin, grad_thin, _ = torch.ops.aten.convolution_backward(
                grad_h, xs, thin, None, [1, 1], [padding, padding], [1, 1], False, [0, 0], 1,
                [needs_xs_grad, ctx.needs_input_grad[2] and not half, False])
            if ctx.needs_input_grad[2] and half:
                grad_thin = torch.ops.aten.convolution_backward(
                    _wide(grad_h), _wide(xs), _wide(thin), None, [1, 1], [padding, padding], [1, 1], False, [0, 0], 1,
                    [False, True, False])[1]
            if ctx.needs_input_grad[2]:
                grad_A = (grad_thin if flip_weight else grad_thin.flip([2, 3])).reshape(R, -1).to(factor_dtype)
            if needs_xs_grad:
                grad_xs = _conv_input_grad(grad, x, w, padding).add_(grad_xs_thin)
        else:
            grad_z = _shifted_taps(grad_h, H, W, kh, kw, padding, flip_weight)
            if ctx.needs_input_grad[2]:
                # dL/dtaps = dL/dz @ xs^T = (dL/dz @ x^T) * s per sample
                grad_taps = torch.bmm(_wide(grad_z), _wide(x).reshape(N, I, H * W).transpose(1, 2))  # [N, R*kh*kw, I]
                if s is not None:
                    grad_taps.mul_(s.transpose(1, 2))
                grad_taps = grad_taps.sum(0) if shared else grad_taps
                grad_A = grad_taps.reshape(*grad_taps.shape[:-2], R, kh * kw, I).transpose(-1, -2)
                grad_A = grad_A.reshape(*grad_taps.shape[:-2], R, -1).to(factor_dtype)
            if needs_xs_grad:
                grad_xs = _conv_input_grad(grad, x, w, padding).contiguous()
                grad_xs.view(N, I, -1).baddbmm_(taps.expand(N, -1, -1).transpose(1, 2), grad_z)  # adds into it
        grad_styles = None
        if ctx.needs_input_grad[1]:
            grad_styles = _spatial_dot(grad_xs, x).to(styles.dtype)
        if s is not None and ctx.needs_input_grad[0]:
            grad_xs.view(N, I, -1).mul_(s)  # dL/dx = dL/dxs * s, in place
        return (grad_xs if ctx.needs_input_grad[0] else None), grad_styles, grad_A, grad_B, None, None, None


def _conv_input_grad(grad, x, w, padding):
    """dL/dx of conv2d(x, w, padding) (stride 1, correlation), without the weight gradient."""
    return torch.ops.aten.convolution_backward(grad, x, w, None, [1, 1], [padding, padding], [1, 1], False, [0, 0], 1,
                                               [True, False, False])[0]


# Relative cost of the low-rank branch's operations: they make about three passes (forward, input
# and factor gradients) and run on CPU at roughly a fifth of the FLOP rate of a full convolution
# (docs/benchmarks.md), so 3 * 5.
BRANCH_COST_FACTOR = 15.0


def merged_weight_is_cheaper(in_channels: int, out_channels: int, rank_rows: int, taps: int) -> bool:
    """Whether training through the merged weight W + B @ A (one weight-gradient convolution,
    O*I*taps multiply-adds per pixel) costs less than the low-rank branch (R*(taps*I + O) per pixel
    and pass). True for narrow layers: the 8- to 32-channel layers of small configs and, at FFHQ 512,
    only the 3-channel superresolution torgb layers."""
    return BRANCH_COST_FACTOR * rank_rows * (taps * in_channels + out_channels) > out_channels * in_channels * taps


# Environment variable choosing how frozen adapted convolutions train: 'auto' (default: per layer,
# by `merged_weight_is_cheaper`), 'branch' (every layer takes the low-rank branch, as all FFHQ 512
# layers but the 3-channel torgb do: the narrow test configs then run the path real runs take) or
# 'merged' (the merged weight wherever the batch shares the factors). Read at every call, so spawned
# and torchrun processes follow it too.
CONV_PATH_VARIABLE = 'EG3D_ADAPTER_CONV_PATH'


def _trains_through_merged_weight(in_channels, out_channels, rank_rows, taps):
    choice = os.environ.get(CONV_PATH_VARIABLE, 'auto')
    if choice == 'auto':
        return merged_weight_is_cheaper(in_channels, out_channels, rank_rows, taps)
    if choice not in ('branch', 'merged'):
        raise ValueError(f'{CONV_PATH_VARIABLE}={choice!r}: use auto, branch or merged')
    return choice == 'merged'


def _adapted_conv(x, weight, A, B, dropout=None, f=None, up=1, down=1, padding=0, flip_weight=True, styles=None):
    """conv2d_resample(x * styles, W + B @ A); A [R, I*k*k], B [O, R] (shared) or [N, R, I*k*k], [N, O, R];
    styles [N, I] or None (no modulation); `dropout` (or None) acts on the low-rank branch's input only.

    For a frozen W and no dropout, W gets no weight gradient: the low-rank branch costs matmuls
    plus a convolution with R*k*k input and R output channels (a custom autograd function for
    stride 1), or, for narrow layers with shared factors, the merged weight's gradient
    (`merged_weight_is_cheaper`, or `EG3D_ADAPTER_CONV_PATH`). With B == 0 the result is the base's bit for bit.
    """
    O, I, kh, kw = weight.shape
    geometry = dict(f=f, up=up, down=down, padding=padding, flip_weight=flip_weight)
    frozen = (dropout is None and not weight.requires_grad and A.shape[-2] > 0)
    # Never in half precision: the merged weight's gradient would be a half-precision sum over all pixels.
    merged = (frozen and A.ndim == 2 and x.dtype not in _HALF
              and _trains_through_merged_weight(I, O, A.shape[0], kh * kw))
    if frozen and not merged and up == 1 and down == 1 and isinstance(padding, int) and padding >= 0:
        return _StrideOneAdaptedConv.apply(x, styles, A, B, weight, padding, flip_weight)
    if styles is not None:
        x = _Modulate.apply(x, styles)
    if A.shape[-2] == 0:  # fully pruned AdaLoRA layer: the base alone
        return conv2d_resample.conv2d_resample(x=x, w=weight.to(x.dtype), **geometry)
    if merged:
        return conv2d_resample.conv2d_resample(x=x, w=_merged_weight(weight, A, B).reshape(weight.shape).to(x.dtype),
                                               **geometry)
    # Resampling, dropout or an unfrozen base: plain autograd over the base and the branch.
    y = conv2d_resample.conv2d_resample(x=x, w=weight.to(x.dtype), **geometry)
    N = y.shape[0]
    branch_input = dropout(x) if dropout is not None else x
    out = y.reshape(N, O, -1)
    if x.dtype in _HALF:  # the branch in float32, so that autograd sums the factor gradients in float32 (`_wide`)
        _, h = _thin_branch(_wide(branch_input), A, kh, kw, **geometry)
        out.add_(torch.bmm(B.expand(N, -1, -1), h).to(out.dtype))
    else:
        _, h = _thin_branch(branch_input, A, kh, kw, **geometry)
        out.baddbmm_(B.to(x.dtype).expand(N, -1, -1), h)  # in place: no second full-size tensor
    return out.reshape(y.shape)


def modulated_conv2d_lora(
    x,                      # [N, I, H, W] activations.
    weight,                 # [O, I, kh, kw] frozen base weight.
    styles,                 # [N, I] modulation.
    A,                      # [R, I*kh*kw] or per-sample [N, R, I*kh*kw] (AdaLoRA: A * E).
    B,                      # [O, R] or [N, O, R], already multiplied by the scaling.
    noise=None, up=1, down=1, padding=0, resample_filter=None, demodulate=True, flip_weight=True,
    fused_modconv=True,
    dropout=None,           # Callable applied to the adapter branch input (non-fused only), or None.
    bias=None,              # [O] or per-sample [N, O]: `bias_act` of the output, as the layers apply it.
    activation='linear', act_gain=1.0, act_clamp=None,
):
    """StyleGAN2 modulated convolution with weight W + B @ A, then bias_act(y, bias, activation,
    act_gain, act_clamp): the arithmetic of `modulated_conv2d` followed by `bias_act`.

    The delta enters the weight before modulation and demodulation. Fused: the per-sample weights
    (W + delta) * s are built explicitly. Non-fused (training): conv(x*s, W) + B @ conv(x*s, A) per
    pixel (`_adapted_conv`), so the frozen W gets no weight gradient; the demodulation coefficients
    come from ||(W + delta) * s|| in weight space, exactly as the base computes them. With delta == 0
    every intermediate equals the base's bit for bit. In float16 the max-abs pre-normalisation
    factor is taken from the frozen W (demodulation cancels it, so the choice does not change the
    result mathematically). Off CUDA, the non-fused path applies demodulation, noise, bias and a
    linear or lrelu activation in place (`_DemodulateBiasAct`); on CUDA, `bias_act`'s kernel does.
    """
    batch_size = x.shape[0]
    out_channels, in_channels, kh, kw = weight.shape
    misc.assert_shape(x, [batch_size, in_channels, None, None])
    misc.assert_shape(styles, [batch_size, in_channels])
    per_sample = (A.ndim == 3)

    if x.dtype == torch.float16 and demodulate:
        cw = (1 / np.sqrt(in_channels * kh * kw) / weight.norm(float('inf'), dim=[1, 2, 3], keepdim=True))
        weight = weight * cw
        B = B * cw.reshape(out_channels, 1)
        styles = styles / styles.norm(float('inf'), dim=1, keepdim=True)

    w = None
    dcoefs = None
    if demodulate and not fused_modconv and not weight.requires_grad:  # weight space, no base weight gradient
        dcoefs = _DemodCoefficients.apply(styles, weight, A, B)
    elif demodulate or fused_modconv:
        delta = torch.matmul(B, A)
        if per_sample:
            w = weight.unsqueeze(0) + delta.reshape(batch_size, out_channels, in_channels, kh, kw)
        else:
            w = (weight + delta.reshape(out_channels, in_channels, kh, kw)).unsqueeze(0)
        w = w * styles.reshape(batch_size, 1, -1, 1, 1)
    if demodulate and dcoefs is None:
        dcoefs = (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()
    if demodulate and fused_modconv:
        w = w * dcoefs.reshape(batch_size, -1, 1, 1, 1)

    if not fused_modconv:
        y = _adapted_conv(x, weight, A, B, dropout=dropout, f=resample_filter, up=up, down=down, padding=padding,
                          flip_weight=flip_weight, styles=styles)
        dcoefs = dcoefs.to(x.dtype).reshape(batch_size, -1, 1, 1) if demodulate else None
        noise = None if noise is None else noise.to(x.dtype)
        if x.device.type != 'cuda' and activation in ('linear', 'lrelu') and act_gain > 0:
            alpha = bias_act.activation_funcs['lrelu'].def_alpha if activation == 'lrelu' else None
            bias = None if bias is None else bias.to(x.dtype).reshape(-1 if bias.ndim == 2 else 1, out_channels, 1, 1)
            return _DemodulateBiasAct.apply(y, dcoefs, noise, bias, alpha, act_gain, act_clamp)
        if dcoefs is not None or noise is not None:
            y = _DemodulateBiasAct.apply(y, dcoefs, noise, None, None, 1, None)
        return _bias_act(y, bias, activation, act_gain, act_clamp)

    with misc.suppress_tracer_warnings():
        batch_size = int(batch_size)
    x = x.reshape(1, -1, *x.shape[2:])
    w = w.reshape(-1, in_channels, kh, kw)
    x = conv2d_resample.conv2d_resample(x=x, w=w.to(x.dtype), f=resample_filter,
        up=up, down=down, padding=padding, groups=batch_size, flip_weight=flip_weight)
    x = x.reshape(batch_size, -1, *x.shape[2:])
    if noise is not None:
        x = x.add_(noise)
    return _bias_act(x, bias, activation, act_gain, act_clamp)


def _bias_act(x, bias, activation, gain, clamp):
    """bias_act.bias_act for a bias [O] or per-sample [N, O] (added first; x + (b + 0) == x + b)."""
    if bias is not None and bias.ndim == 2:
        x = x + bias.to(x.dtype).reshape(*bias.shape, 1, 1)
        bias = None
    if bias is None and activation == 'linear' and gain == 1 and clamp is None:
        return x
    return bias_act.bias_act(x, None if bias is None else bias.to(x.dtype), act=activation, gain=gain, clamp=clamp)

#----------------------------------------------------------------------------

class AdapterLayer(torch.nn.Module):
    """Common part of the adapter wrappers: K adapters of rank R on a weight with fan_in/fan_out.

    Own tensors: lora_A [K, R, fan_in], lora_B [K, fan_out, R], and for AdaLoRA lora_E [K, R, 1]
    plus the buffer rank_mask [K, R] (1 = triplet kept by the rank allocator). Optional extras
    (zero-initialised per-adapter deltas): bias_delta [K, out], noise_strength_delta [K],
    const_delta [K, C, H, W] (the block's constant input, for the first layer of a network).
    """

    def _init_adapter(self, fan_in, fan_out, rank, num_adapters, scaling, dropout, adalora, rank_unit,
                      bias_features=0, noise_delta=False, const_shape=None):
        K = int(num_adapters)
        self.fan_in = int(fan_in)
        self.fan_out = int(fan_out)
        self.rank = int(rank)
        self.num_adapters = K
        self.scaling = float(scaling)
        self.dropout = float(dropout)
        self.adalora = bool(adalora)
        self.rank_unit = int(rank_unit)
        # Every adapter starts from the same draw (one adapter's worth of random numbers), so adapter k
        # of a K-identity run starts exactly where a single-identity run with the same seed starts.
        if self.adalora:
            # PEFT AdaLoRA init: P, Q ~ N(0, 0.02), Lambda = 0.
            self.lora_A = torch.nn.Parameter((torch.randn([1, self.rank, self.fan_in]) * 0.02).repeat(K, 1, 1))
            self.lora_E = torch.nn.Parameter(torch.zeros([K, self.rank, 1]))
            self.lora_B = torch.nn.Parameter((torch.randn([1, self.fan_out, self.rank]) * 0.02).repeat(K, 1, 1))
            self.register_buffer('rank_mask', torch.ones([K, self.rank]))
        else:
            # PEFT LoRA init: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)), B = 0.
            bound = 1 / math.sqrt(max(self.fan_in, 1))
            self.lora_A = torch.nn.Parameter(torch.empty([1, self.rank, self.fan_in]).uniform_(-bound, bound).repeat(K, 1, 1))
            self.lora_B = torch.nn.Parameter(torch.zeros([K, self.fan_out, self.rank]))
        if bias_features:
            self.bias_delta = torch.nn.Parameter(torch.zeros([K, int(bias_features)]))
        if noise_delta:
            self.noise_strength_delta = torch.nn.Parameter(torch.zeros([K]))
        if const_shape is not None:
            self.const_delta = torch.nn.Parameter(torch.zeros([K] + [int(s) for s in const_shape]))
        self.adapter_index = 0

    # -- attribute access ----------------------------------------------------------------------

    def __getattr__(self, name):
        # Unknown attributes (resolution, in_channels, affine, weight, ...) come from the base layer.
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get('_modules', {}).get('base_layer', None)
            if base is None or name.startswith('__'):
                raise
            return getattr(base, name)

    def __getstate__(self):
        state = super().__getstate__()
        state['adapter_index'] = 0  # the selection is transient
        return state

    def adapter_parameters(self):
        """This layer's own adapter tensors (not the base layer's), in registration order."""
        return list(self._parameters.values())

    # -- adapter math --------------------------------------------------------------------------

    def _batch_index(self, batch_size):
        """The adapter index: an int (one adapter for the batch) or a LongTensor [batch_size]."""
        idx = self.adapter_index
        if isinstance(idx, torch.Tensor):
            if idx.ndim != 1 or idx.shape[0] != batch_size:
                raise ValueError(f'adapters.select() was given {tuple(idx.shape)} indices but the batch has '
                                 f'{batch_size} samples; call adapters.select(G, idx) with one index per sample')
            return idx
        return int(idx)

    def factors(self, idx, gain=1):
        """(A, B) of adapter(s) idx in float32: A [.., R, fan_in] (times E for AdaLoRA), B [.., fan_out, R] times scaling * gain."""
        A = self.lora_A[idx]
        if self.adalora:
            A = A * self.lora_E[idx]
        return A, self.lora_B[idx] * (self.scaling * gain)

    def delta_weight(self, index=0):
        """The delta of adapter `index` in the base's raw weight layout (what `merge` adds)."""
        A, B = self.factors(int(index))
        return torch.matmul(B, A).reshape(self.base_layer.weight.shape)

    def _dropout_fn(self):
        if self.dropout > 0 and self.training:
            p = self.dropout
            return lambda t: torch.nn.functional.dropout(t, p=p, training=True)
        return None

    def _linear_delta(self, x, idx, gain):
        """Low-rank branch of a dense layer: x [rows, in] -> [rows, out]; rows = N * M for per-sample idx."""
        A, B = self.factors(idx, gain)
        drop = self._dropout_fn()
        if drop is not None:
            x = drop(x)
        if not isinstance(idx, torch.Tensor):
            return x.matmul(A.to(x.dtype).t()).matmul(B.to(x.dtype).t())
        N = idx.shape[0]
        x3 = x.reshape(N, -1, x.shape[-1])
        h = torch.bmm(x3, A.to(x.dtype).transpose(1, 2))
        d = torch.bmm(h, B.to(x.dtype).transpose(1, 2))
        return d.reshape(*x.shape[:-1], d.shape[-1])

    def _rows_index(self, rows):
        """Adapter index for an input with `rows` rows (= batch size, or batch size * points per sample)."""
        idx = self.adapter_index
        if isinstance(idx, torch.Tensor):
            if idx.ndim != 1 or idx.shape[0] == 0 or rows % idx.shape[0] != 0:
                raise ValueError(f'adapters.select() was given {tuple(idx.shape)} indices, which does not divide '
                                 f'the {rows} input rows of {type(self).__name__}')
            return idx
        return int(idx)

    def _bias_and_delta(self, idx):
        """Base bias (+ shared bias delta) and the per-sample bias delta [N, out] (or None)."""
        bias = self.base_layer.bias
        if bias is None or 'bias_delta' not in self._parameters:
            return bias, None
        if isinstance(idx, torch.Tensor):
            return bias, self.bias_delta[idx]
        return bias + self.bias_delta[idx], None

    def _extra_repr_adapter(self):
        return (f'rank={self.rank}, num_adapters={self.num_adapters}, scaling={self.scaling:g}, '
                f'adalora={self.adalora}')

#----------------------------------------------------------------------------

@persistence.persistent_class
class LoraFullyConnectedLayer(AdapterLayer):
    """Adapters on a FullyConnectedLayer (mapping FCs, style affines, tri-plane decoder FCs)."""

    def __init__(self, in_features, out_features, rank, num_adapters=1, scaling=1.0, dropout=0.0,
                 adalora=False, rank_unit=1, bias_delta=False):
        super().__init__()
        self._init_adapter(in_features, out_features, rank, num_adapters, scaling, dropout, adalora, rank_unit,
                           bias_features=out_features if bias_delta else 0)

    def forward(self, x):
        base = self.base_layer
        idx = self._rows_index(x.shape[0])
        w = base.weight.to(x.dtype) * base.weight_gain
        b, b_sample = self._bias_and_delta(idx)
        if b is not None:
            b = b.to(x.dtype)
            if base.bias_gain != 1:
                b = b * base.bias_gain
        d = self._linear_delta(x, idx, base.weight_gain) if self.rank > 0 else None
        if b_sample is not None:
            bd = (b_sample.to(x.dtype) * base.bias_gain).repeat_interleave(x.shape[0] // idx.shape[0], dim=0)
            d = bd if d is None else d + bd
        if base.activation == 'linear' and b is not None:
            y = torch.addmm(b.unsqueeze(0), x, w.t())
            return y if d is None else y + d
        y = x.matmul(w.t())
        if d is not None:
            y = y + d
        return bias_act.bias_act(y, b, act=base.activation)

    def extra_repr(self):
        return f'in_features={self.fan_in}, out_features={self.fan_out}, ' + self._extra_repr_adapter()

#----------------------------------------------------------------------------

@persistence.persistent_class
class LoraConv2dLayer(AdapterLayer):
    """Adapters on a plain Conv2dLayer: conv(x, W*g) + conv1x1(conv(x, A), B*g*scaling)."""

    def __init__(self, in_channels, out_channels, kernel_size, rank, num_adapters=1, scaling=1.0, dropout=0.0,
                 adalora=False, rank_unit=1, bias_delta=False):
        super().__init__()
        self.kernel_size = int(kernel_size)
        self._init_adapter(in_channels * kernel_size * kernel_size, out_channels, rank, num_adapters, scaling,
                           dropout, adalora, rank_unit, bias_features=out_channels if bias_delta else 0)

    def forward(self, x, gain=1):
        base = self.base_layer
        idx = self._batch_index(x.shape[0])
        w = base.weight * base.weight_gain
        b, b_sample = self._bias_and_delta(idx)
        b = b.to(x.dtype) if b is not None else None
        flip_weight = (base.up == 1)
        A, B = self.factors(idx, base.weight_gain)
        y = _adapted_conv(x, w, A, B, dropout=self._dropout_fn(), f=base.resample_filter, up=base.up, down=base.down,
                          padding=base.padding, flip_weight=flip_weight)
        if b_sample is not None:
            y = y + b_sample.to(y.dtype).reshape(y.shape[0], -1, 1, 1)
        act_gain = base.act_gain * gain
        act_clamp = base.conv_clamp * gain if base.conv_clamp is not None else None
        return bias_act.bias_act(y, b, act=base.activation, gain=act_gain, clamp=act_clamp)

    def extra_repr(self):
        return f'kernel_size={self.kernel_size}, fan_in={self.fan_in}, out_channels={self.fan_out}, ' + self._extra_repr_adapter()

#----------------------------------------------------------------------------

def _modulated_layer_conv(layer, x, styles, idx, noise, demodulate, fused_modconv, up=1, padding=0,
                          resample_filter=None, flip_weight=True, **bias_act_kwargs):
    """Shared body of the SynthesisLayer / ToRGBLayer wrappers: modulated convolution, noise, bias,
    activation. The bias is the base's plus adapter idx's bias delta ([O], or [N, O] per sample)."""
    weight = layer.base_layer.weight
    kh, kw = weight.shape[2], weight.shape[3]
    A, B = layer.factors(idx)  # rank 0 (fully pruned AdaLoRA layer) gives empty factors and a zero delta
    drop = layer._dropout_fn()  # pylint: disable=protected-access
    if drop is not None:
        fused_modconv = False  # dropout acts on the adapter branch input, which the fused path does not have
    b, b_sample = layer._bias_and_delta(idx)  # pylint: disable=protected-access
    bias = b if b_sample is None else b.unsqueeze(0) + b_sample
    return modulated_conv2d_lora(x=x, weight=weight, styles=styles, A=A, B=B, noise=noise, up=up,
        padding=padding, resample_filter=resample_filter, demodulate=demodulate, flip_weight=flip_weight,
        fused_modconv=fused_modconv, dropout=drop, bias=bias, **bias_act_kwargs)


@persistence.persistent_class
class LoraSynthesisLayer(AdapterLayer):
    """Adapters on a SynthesisLayer: the delta goes into the weight before (de)modulation.

    The style affine is adapted separately (its own LoraFullyConnectedLayer inside the base layer).
    """

    def __init__(self, in_channels, out_channels, kernel_size, rank, num_adapters=1, scaling=1.0, dropout=0.0,
                 adalora=False, rank_unit=1, bias_delta=False, noise_delta=False, const_shape=None):
        super().__init__()
        self.kernel_size = int(kernel_size)
        self._init_adapter(in_channels * kernel_size * kernel_size, out_channels, rank, num_adapters, scaling,
                           dropout, adalora, rank_unit, bias_features=out_channels if bias_delta else 0,
                           noise_delta=noise_delta, const_shape=const_shape)

    def forward(self, x, w, noise_mode='random', fused_modconv=True, gain=1):
        base = self.base_layer
        assert noise_mode in ['random', 'const', 'none']
        in_resolution = base.resolution // base.up
        misc.assert_shape(x, [None, base.in_channels, in_resolution, in_resolution])
        idx = self._batch_index(x.shape[0])
        if 'const_delta' in self._parameters:
            x = x + self.const_delta[idx].to(x.dtype)
        styles = base.affine(w)

        noise = None
        if base.use_noise and noise_mode != 'none':
            strength = base.noise_strength
            if 'noise_strength_delta' in self._parameters:
                strength = strength + self.noise_strength_delta[idx]
                if isinstance(idx, torch.Tensor):
                    strength = strength.reshape(-1, 1, 1, 1)
            if noise_mode == 'random':
                noise = torch.randn([x.shape[0], 1, base.resolution, base.resolution], device=x.device) * strength
            else:
                noise = base.noise_const * strength

        flip_weight = (base.up == 1)
        act_clamp = base.conv_clamp * gain if base.conv_clamp is not None else None
        return _modulated_layer_conv(self, x, styles, idx, noise, demodulate=True, fused_modconv=fused_modconv,
            up=base.up, padding=base.padding, resample_filter=base.resample_filter, flip_weight=flip_weight,
            activation=base.activation, act_gain=base.act_gain * gain, act_clamp=act_clamp)

    def extra_repr(self):
        return f'kernel_size={self.kernel_size}, fan_in={self.fan_in}, out_channels={self.fan_out}, ' + self._extra_repr_adapter()

#----------------------------------------------------------------------------

@persistence.persistent_class
class LoraToRGBLayer(AdapterLayer):
    """Adapters on a ToRGBLayer (modulated 1x1 conv without demodulation)."""

    def __init__(self, in_channels, out_channels, kernel_size, rank, num_adapters=1, scaling=1.0, dropout=0.0,
                 adalora=False, rank_unit=1, bias_delta=False):
        super().__init__()
        self.kernel_size = int(kernel_size)
        self._init_adapter(in_channels * kernel_size * kernel_size, out_channels, rank, num_adapters, scaling,
                           dropout, adalora, rank_unit, bias_features=out_channels if bias_delta else 0)

    def forward(self, x, w, fused_modconv=True):
        base = self.base_layer
        idx = self._batch_index(x.shape[0])
        styles = base.affine(w) * base.weight_gain
        return _modulated_layer_conv(self, x, styles, idx, None, demodulate=False, fused_modconv=fused_modconv,
                                     act_clamp=base.conv_clamp)

    def extra_repr(self):
        return f'kernel_size={self.kernel_size}, fan_in={self.fan_in}, out_channels={self.fan_out}, ' + self._extra_repr_adapter()

#----------------------------------------------------------------------------

ADAPTER_CLASSES = (LoraFullyConnectedLayer, LoraConv2dLayer, LoraSynthesisLayer, LoraToRGBLayer)
