"""Fast autograd kernels of the adapter layers (the fast path of `layers.py`).

`layers.py` defines the semantics with plain PyTorch operations (its reference path) and calls these
kernels instead when this module can be imported (`layers.fast_kernels`). They compute the same values
and gradients, with fewer full-size temporaries: the frozen base weight gets no weight gradient, style
and demodulation gradients are dot products and weight-space matmuls, the low-rank branch is a matmul
over the input channels, and on CPU what follows the convolution runs in place on one tensor.

Device dispatch: every kernel runs on CPU and CUDA alike, except what follows the convolution
(`demodulate_bias_act`): on CPU one in-place autograd function does demodulation, noise, bias,
activation, gain and clamp (each fresh full-size tensor costs a CPU more in page faults than the
arithmetic); on CUDA it does demodulation and noise only, and `bias_act`'s fused CUDA kernel the rest.

This module is not embedded in snapshot pickles (it holds no persistent class): official EG3D code that
loads our snapshots runs `layers.py` without it, on the reference path.
"""

import torch

from torch_utils.ops import bias_act
from torch_utils.ops import conv2d_resample
from training.adapters.layers import HALF, apply_bias_act, batched, merged_weight, wide

#----------------------------------------------------------------------------
# Public entry points, called by layers.py on its fast path.

def modulate(x: torch.Tensor, styles: torch.Tensor) -> torch.Tensor:
    """x * styles per input channel; styles [N, I]."""
    return _Modulate.apply(x, styles)


def demodulation_coefficients(styles: torch.Tensor, weight: torch.Tensor, A: torch.Tensor,
                              B: torch.Tensor) -> torch.Tensor:
    """[N, O] = (sum over i, taps of ((W + B @ A) * s)^2 + 1e-8)^(-1/2) for a frozen W."""
    return _DemodCoefficients.apply(styles, weight, A, B)


def stride_one_adapted_conv(x: torch.Tensor, styles, A: torch.Tensor, B: torch.Tensor, weight: torch.Tensor,
                            padding: int, flip_weight: bool) -> torch.Tensor:
    """conv2d_resample(x * styles, W + B @ A), stride 1, for a frozen W (`_StrideOneAdaptedConv`)."""
    return _StrideOneAdaptedConv.apply(x, styles, A, B, weight, padding, flip_weight)


def low_rank_branch(x: torch.Tensor, A: torch.Tensor, kh: int, kw: int, **geometry) -> torch.Tensor:
    """conv2d_resample(x, A as a [R, I, kh, kw] kernel) as [N, R, H'*W'] (`_thin_branch`)."""
    return _thin_branch(x, A, kh, kw, **geometry)[1]


def demodulate_bias_act(y: torch.Tensor, dcoefs, noise, bias, activation: str, gain: float, clamp) -> torch.Tensor:
    """bias_act(y * dcoefs + noise, bias, activation, gain, clamp), the base's arithmetic; dcoefs [N, O, 1, 1],
    noise [N or 1, 1, H, W] and bias [O] or per-sample [N, O] may each be None.

    The CPU/CUDA dispatch of this module: off CUDA (linear or lrelu, gain > 0) one autograd function does
    it all in place; on CUDA it does demodulation and noise, and `bias_act`'s fused CUDA kernel the rest."""
    if y.device.type != 'cuda' and activation in ('linear', 'lrelu') and gain > 0:
        alpha = bias_act.activation_funcs['lrelu'].def_alpha if activation == 'lrelu' else None
        bias = None if bias is None else bias.to(y.dtype).reshape(-1 if bias.ndim == 2 else 1, y.shape[1], 1, 1)
        return _DemodulateBiasAct.apply(y, dcoefs, noise, bias, alpha, gain, clamp)
    if dcoefs is not None or noise is not None:
        y = _DemodulateBiasAct.apply(y, dcoefs, noise, None, None, 1, None)
    return apply_bias_act(y, bias, activation, gain, clamp)

#----------------------------------------------------------------------------

def _spatial_dot(a, b):
    """sum over H, W of a * b for [N, C, H, W] tensors -> [N, C], as dot products (no temporary a * b)."""
    N, C = a.shape[0], a.shape[1]
    return torch.einsum('ncp,ncp->nc', a.reshape(N, C, -1), b.reshape(N, C, -1))


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
        w = merged_weight(weight, A, B).reshape(-1, O, I, kh, kw)  # [1 or N, O, I, kh, kw]
        d = (w * styles.reshape(N, 1, -1, 1, 1)).square_().sum(dim=[2, 3, 4]).add_(1e-8).rsqrt_()
        ctx.save_for_backward(styles, weight, A, B, d)
        return d

    @staticmethod
    def backward(ctx, grad):  # pylint: disable=arguments-differ
        styles, weight, A, B, d = ctx.saved_tensors
        O, I = weight.shape[0], weight.shape[1]
        w = merged_weight(weight, A, B).reshape(-1, O, I, weight.shape[2] * weight.shape[3])  # [1 or N, O, I, taps]
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
                grad_A = torch.bmm(batched(B).transpose(1, 2), grad_w).reshape(A.shape)
            if ctx.needs_input_grad[3]:
                grad_B = torch.bmm(grad_w, batched(A).transpose(1, 2)).reshape(B.shape)
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
            grad_B = torch.bmm(wide(g3), wide(h).transpose(1, 2))
            grad_B = (grad_B.sum(0) if shared else grad_B).to(factor_dtype)
        grad_h = grad_h.reshape(N, R, *grad.shape[2:])
        w = weight.to(x.dtype)
        w = w if flip_weight else w.flip([2, 3])
        needs_xs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        if shared and R * kh * kw >= I:  # narrow layer (see _thin_branch): gradients of the thin convolution
            xs = x if s is None else x * s.unsqueeze(-1)  # narrow: recomputing xs is cheap
            thin = taps.reshape(R, kh * kw, I).transpose(1, 2).reshape(R, I, kh, kw)
            thin = thin if flip_weight else thin.flip([2, 3])
            half = x.dtype in HALF  # then the weight gradient is taken apart, in float32 (`wide`)
            grad_xs_thin, grad_thin, _ = torch.ops.aten.convolution_backward(
                grad_h, xs, thin, None, [1, 1], [padding, padding], [1, 1], False, [0, 0], 1,
                [needs_xs_grad, ctx.needs_input_grad[2] and not half, False])
            if ctx.needs_input_grad[2] and half:
                grad_thin = torch.ops.aten.convolution_backward(
                    wide(grad_h), wide(xs), wide(thin), None, [1, 1], [padding, padding], [1, 1], False, [0, 0], 1,
                    [False, True, False])[1]
            if ctx.needs_input_grad[2]:
                grad_A = (grad_thin if flip_weight else grad_thin.flip([2, 3])).reshape(R, -1).to(factor_dtype)
            if needs_xs_grad:
                grad_xs = _conv_input_grad(grad, x, w, padding).add_(grad_xs_thin)
        else:
            grad_z = _shifted_taps(grad_h, H, W, kh, kw, padding, flip_weight)
            if ctx.needs_input_grad[2]:
                # dL/dtaps = dL/dz @ xs^T = (dL/dz @ x^T) * s per sample
                grad_taps = torch.bmm(wide(grad_z), wide(x).reshape(N, I, H * W).transpose(1, 2))  # [N, R*kh*kw, I]
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
