"""Upsample, pad, FIR-filter and downsample batches of 2-D images (`upfirdn2d`), plus helpers.

`impl='ref'` is plain PyTorch (defines the semantics, any device, gradients of any order).
`impl='cuda'` (default) uses the compiled kernel for CUDA tensors when it is available and falls
back to the reference otherwise (see docs/cuda_ops.md).
"""

import os
from typing import Optional, Sequence, Tuple, Union

import torch

from .. import custom_ops

_Scaling = Union[int, Sequence[int]]
_Padding = Union[int, Sequence[int]]


def _parse_scaling(scaling: _Scaling) -> Tuple[int, int]:
    """int or [x, y] -> (sx, sy)."""
    if isinstance(scaling, int):
        scaling = [scaling, scaling]
    assert isinstance(scaling, (list, tuple)) and len(scaling) == 2
    assert all(isinstance(s, int) and s >= 1 for s in scaling)
    return scaling[0], scaling[1]


def _parse_padding(padding: _Padding) -> Tuple[int, int, int, int]:
    """int, [x, y] or [x0, x1, y0, y1] -> (x0, x1, y0, y1)."""
    if isinstance(padding, int):
        padding = [padding, padding]
    assert isinstance(padding, (list, tuple)) and all(isinstance(p, int) for p in padding)
    if len(padding) == 2:
        padding = [padding[0], padding[0], padding[1], padding[1]]
    assert len(padding) == 4
    return padding[0], padding[1], padding[2], padding[3]


def _get_filter_size(f: Optional[torch.Tensor]) -> Tuple[int, int]:
    """(width, height) of a 2-D filter, a separable filter (taps, taps) or None (1, 1)."""
    if f is None:
        return 1, 1
    assert isinstance(f, torch.Tensor) and f.ndim in (1, 2)
    fw, fh = int(f.shape[-1]), int(f.shape[0])
    assert fw >= 1 and fh >= 1
    return fw, fh


def setup_filter(f, device: torch.device = torch.device('cpu'), normalize: bool = True, flip_filter: bool = False,
                 gain: float = 1, separable: Optional[bool] = None) -> torch.Tensor:
    r"""Prepare a float32 FIR filter for `upfirdn2d()`.

    Args:
        f:           Tensor, numpy array or list of shape `[fh, fw]` (non-separable), `[taps]`
                     (separable), `[]` (impulse), or `None` (identity).
        device:      Result device.
        normalize:   Scale so that a constant (DC) signal keeps its magnitude.
        flip_filter: Flip the filter.
        gain:        Overall signal gain (applied as `gain ** (ndim / 2)` per filter).
        separable:   Return a 1-D (separable) filter; default: 1-D input with at least 8 taps.

    Returns:
        Float32 tensor `[fh, fw]` or `[taps]`.
    """
    taps = torch.as_tensor(1 if f is None else f, dtype=torch.float32)
    assert taps.ndim <= 2 and taps.numel() > 0, 'a filter is a scalar, a 1-D or a 2-D array'
    if taps.ndim == 0:
        taps = taps.reshape(1)
    if separable is None:
        separable = taps.ndim == 1 and taps.numel() >= 8  # long 1-D filters are cheaper as two passes
    if taps.ndim == 1 and not separable:
        taps = torch.outer(taps, taps)
    assert taps.ndim == (1 if separable else 2)
    if normalize:
        taps = taps / taps.sum()
    if flip_filter:
        taps = taps.flip(list(range(taps.ndim)))
    return (taps * (gain ** (taps.ndim / 2))).to(device=device)


def upfirdn2d(x: torch.Tensor, f: Optional[torch.Tensor], up: _Scaling = 1, down: _Scaling = 1, padding: _Padding = 0,
              flip_filter: bool = False, gain: float = 1, impl: str = 'cuda') -> torch.Tensor:
    r"""Pad, upsample, filter and downsample a batch of 2-D images, channel by channel.

    1. Upsample by inserting `up - 1` zeros after each pixel.
    2. Pad with zeros (`padding`, w.r.t. the upsampled image; negative values crop).
    3. Convolve with the FIR filter `f` (valid part only; `flip_filter=True` means correlation).
    4. Downsample by keeping every `down`-th pixel.

    Args:
        x:           `[N, C, H, W]` float16/float32/float64 tensor.
        f:           float32 filter `[fh, fw]`, separable `[taps]`, or None (identity).
        up, down:    int or `[x, y]` integer factors.
        padding:     int, `[x, y]` or `[x0, x1, y0, y1]`.
        flip_filter: False = convolution, True = correlation.
        gain:        Overall scaling of the signal.
        impl:        'cuda' (compiled kernel where available, else reference) or 'ref'.

    Returns:
        `[N, C, out_h, out_w]` tensor of the dtype of `x`.
    """
    assert isinstance(x, torch.Tensor)
    assert impl in ('ref', 'cuda')
    if impl == 'cuda' and x.device.type == 'cuda' and _cuda_available():
        return _upfirdn2d_cuda(x, f, up=up, down=down, padding=padding, flip_filter=flip_filter, gain=gain)
    return _upfirdn2d_ref(x, f, up=up, down=down, padding=padding, flip_filter=flip_filter, gain=gain)


def _checked_filter(x: torch.Tensor, f: Optional[torch.Tensor]) -> torch.Tensor:
    """Validate `x` ([N, C, H, W]) and the filter; None becomes the 1x1 identity filter."""
    assert isinstance(x, torch.Tensor) and x.ndim == 4, 'upfirdn2d expects [N, C, H, W] images'
    if f is None:
        f = torch.ones([1, 1], dtype=torch.float32, device=x.device)
    assert isinstance(f, torch.Tensor) and f.ndim in (1, 2)
    assert f.dtype == torch.float32 and not f.requires_grad, 'filters are float32 constants (see setup_filter)'
    return f


def _upfirdn2d_ref(x: torch.Tensor, f: Optional[torch.Tensor], up: _Scaling = 1, down: _Scaling = 1,
                   padding: _Padding = 0, flip_filter: bool = False, gain: float = 1) -> torch.Tensor:
    """Reference implementation with standard PyTorch ops."""
    f = _checked_filter(x, f)
    n, c, h, w = x.shape
    (upx, upy), (downx, downy) = _parse_scaling(up), _parse_scaling(down)
    padx0, padx1, pady0, pady1 = _parse_padding(padding)
    fw, fh = _get_filter_size(f)
    assert w * upx + padx0 + padx1 >= fw and h * upy + pady0 + pady1 >= fh, 'padded image smaller than the filter'

    # Zero insertion: every input pixel lands at (iy * upy, ix * upx) of the upsampled grid.
    if upx > 1 or upy > 1:
        upsampled = x.new_zeros([n, c, h * upy, w * upx])
        upsampled[:, :, ::upy, ::upx] = x
        x = upsampled

    # Zero padding; negative amounts crop.
    x = torch.nn.functional.pad(x, [padx0, padx1, pady0, pady1])

    # conv2d correlates, so a true convolution needs the flipped filter. Gain is split over the
    # two passes of a separable filter. Downsampling is the convolution stride.
    f = (f * (gain ** (f.ndim / 2))).to(x.dtype)
    if not flip_filter:
        f = f.flip(list(range(f.ndim)))
    if f.ndim == 2:
        weight = f.expand(c, 1, fh, fw)
        return torch.nn.functional.conv2d(x, weight, stride=(downy, downx), groups=c)
    x = torch.nn.functional.conv2d(x, f.expand(c, 1, 1, fw), stride=(1, downx), groups=c)
    return torch.nn.functional.conv2d(x, f.reshape(fh, 1).expand(c, 1, fh, 1), stride=(downy, 1), groups=c)


def filter2d(x: torch.Tensor, f: Optional[torch.Tensor], padding: _Padding = 0, flip_filter: bool = False,
             gain: float = 1, impl: str = 'cuda') -> torch.Tensor:
    r"""Filter a batch of 2-D images; by default the output has the input's size.

    `padding` (int, `[x, y]` or `[x0, x1, y0, y1]`) is added on top, negative values crop.
    Other arguments as in `upfirdn2d()`.
    """
    padx0, padx1, pady0, pady1 = _parse_padding(padding)
    fw, fh = _get_filter_size(f)
    p = [padx0 + fw // 2, padx1 + (fw - 1) // 2, pady0 + fh // 2, pady1 + (fh - 1) // 2]
    return upfirdn2d(x, f, padding=p, flip_filter=flip_filter, gain=gain, impl=impl)


def upsample2d(x: torch.Tensor, f: Optional[torch.Tensor], up: _Scaling = 2, padding: _Padding = 0,
               flip_filter: bool = False, gain: float = 1, impl: str = 'cuda') -> torch.Tensor:
    r"""Upsample a batch of 2-D images by `up` (int or `[x, y]`); by default output = input size * up.

    The filter gain is multiplied by `upx * upy` to compensate for the inserted zeros. `padding`
    is w.r.t. the output. Other arguments as in `upfirdn2d()`.
    """
    upx, upy = _parse_scaling(up)
    padx0, padx1, pady0, pady1 = _parse_padding(padding)
    fw, fh = _get_filter_size(f)
    p = [padx0 + (fw + upx - 1) // 2, padx1 + (fw - upx) // 2, pady0 + (fh + upy - 1) // 2, pady1 + (fh - upy) // 2]
    return upfirdn2d(x, f, up=up, padding=p, flip_filter=flip_filter, gain=gain * upx * upy, impl=impl)


def downsample2d(x: torch.Tensor, f: Optional[torch.Tensor], down: _Scaling = 2, padding: _Padding = 0,
                 flip_filter: bool = False, gain: float = 1, impl: str = 'cuda') -> torch.Tensor:
    r"""Downsample a batch of 2-D images by `down` (int or `[x, y]`); by default output = input size / down.

    `padding` is w.r.t. the input. Other arguments as in `upfirdn2d()`.
    """
    downx, downy = _parse_scaling(down)
    padx0, padx1, pady0, pady1 = _parse_padding(padding)
    fw, fh = _get_filter_size(f)
    p = [padx0 + (fw - downx + 1) // 2, padx1 + (fw - downx) // 2,
         pady0 + (fh - downy + 1) // 2, pady1 + (fh - downy) // 2]
    return upfirdn2d(x, f, down=down, padding=p, flip_filter=flip_filter, gain=gain, impl=impl)


# CUDA path: the kernel in upfirdn2d.cu (2-D filters), exposed as a torch.library custom op
# (traceable by torch.compile). A separable filter runs as a horizontal then a vertical pass.

_PLUGIN_SPEC = dict(module_name='upfirdn2d_plugin', sources=['upfirdn2d.cpp', 'upfirdn2d.cu'],
                    headers=['upfirdn2d.h'], source_dir=os.path.dirname(__file__))


def _plugin():
    """The compiled extension, or None (one warning) when it cannot be built."""
    return custom_ops.load_plugin(**_PLUGIN_SPEC)


def _cuda_available() -> bool:
    return not custom_ops.reference_forced() and _plugin() is not None


def _upfirdn2d_cuda(x: torch.Tensor, f: Optional[torch.Tensor], up: _Scaling = 1, down: _Scaling = 1,
                    padding: _Padding = 0, flip_filter: bool = False, gain: float = 1) -> torch.Tensor:
    f = _checked_filter(x, f)
    (upx, upy), (downx, downy) = _parse_scaling(up), _parse_scaling(down)
    padx0, padx1, pady0, pady1 = _parse_padding(padding)
    op = torch.ops.eg3d.upfirdn2d
    if f.ndim == 2:
        return op(x, f, upx, upy, downx, downy, padx0, padx1, pady0, pady1, flip_filter, float(gain))
    x = op(x, f.unsqueeze(0), upx, 1, downx, 1, padx0, padx1, 0, 0, flip_filter, 1.0)
    return op(x, f.unsqueeze(1), 1, upy, 1, downy, 0, 0, pady0, pady1, flip_filter, float(gain))


def _output_size(size: int, up: int, pad0: int, pad1: int, taps: int, down: int) -> int:
    return (size * up + pad0 + pad1 - taps + down) // down


@torch.library.custom_op('eg3d::upfirdn2d', mutates_args=())
def _op_upfirdn2d(x: torch.Tensor, f: torch.Tensor, up_x: int, up_y: int, down_x: int, down_y: int, pad_x0: int,
                  pad_x1: int, pad_y0: int, pad_y1: int, flip_filter: bool, gain: float) -> torch.Tensor:
    """upfirdn2d with a 2-D filter `f` [fh, fw]."""
    return _plugin().upfirdn2d(x, f, up_x, up_y, down_x, down_y, pad_x0, pad_x1, pad_y0, pad_y1, flip_filter, gain)


@_op_upfirdn2d.register_fake
def _(x, f, up_x, up_y, down_x, down_y, pad_x0, pad_x1, pad_y0, pad_y1, flip_filter, gain):
    out_h = _output_size(x.shape[2], up_y, pad_y0, pad_y1, f.shape[0], down_y)
    out_w = _output_size(x.shape[3], up_x, pad_x0, pad_x1, f.shape[1], down_x)
    return x.new_empty([x.shape[0], x.shape[1], out_h, out_w])


def _setup_upfirdn2d(ctx, inputs, output):
    x, f, *params = inputs
    ctx.save_for_backward(f)
    ctx.params = params
    ctx.in_size = (x.shape[2], x.shape[3])


def _backward_upfirdn2d(ctx, dy):
    """The adjoint: upfirdn2d of dy with up and down swapped and the filter mirrored.

    The padding puts every tap that touched input pixel i in the forward pass back onto i,
    and makes the output exactly the input's size.
    """
    f, = ctx.saved_tensors
    upx, upy, downx, downy, padx0, _, pady0, _, flip_filter, gain = ctx.params
    (in_h, in_w), (out_h, out_w) = ctx.in_size, dy.shape[2:]
    fh, fw = f.shape
    padding = [fw - padx0 - 1, in_w * upx - out_w * downx + padx0 - upx + 1,
               fh - pady0 - 1, in_h * upy - out_h * downy + pady0 - upy + 1]
    dx = torch.ops.eg3d.upfirdn2d(dy, f, downx, downy, upx, upy, *padding, not flip_filter, gain)
    return (dx, None) + (None,) * len(ctx.params)


torch.library.register_autograd('eg3d::upfirdn2d', _backward_upfirdn2d, setup_context=_setup_upfirdn2d)
