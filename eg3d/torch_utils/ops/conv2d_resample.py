"""2-D convolution combined with FIR up/downsampling, choosing the cheapest equivalent order of ops."""

from typing import Optional

import torch

from . import conv2d_gradfix
from . import upfirdn2d
from .upfirdn2d import _Padding, _get_filter_size, _parse_padding


def _conv(x: torch.Tensor, w: torch.Tensor, stride: int = 1, padding=0, groups: int = 1, transpose: bool = False,
          flip_weight: bool = True) -> torch.Tensor:
    """conv2d / conv_transpose2d through conv2d_gradfix. conv2d correlates: flip_weight=False means convolution."""
    kh, kw = w.shape[2], w.shape[3]
    if not flip_weight and (kw > 1 or kh > 1):
        w = w.flip([2, 3])
    op = conv2d_gradfix.conv_transpose2d if transpose else conv2d_gradfix.conv2d
    return op(x, w, stride=stride, padding=padding, groups=groups)


def _centring_pad(taps: int, up: int, down: int):
    """(before, after) padding along one axis that keeps a `taps`-long filter centred on the
    zero-stuffed (up) or decimated (down) grid."""
    before = after = 0
    if up > 1:
        before += (taps + up - 1) // 2
        after += (taps - up) // 2
    if down > 1:
        before += (taps - down + 1) // 2
        after += (taps - down) // 2
    return before, after


def conv2d_resample(x: torch.Tensor, w: torch.Tensor, f: Optional[torch.Tensor] = None, up: int = 1, down: int = 1,
                    padding: _Padding = 0, groups: int = 1, flip_weight: bool = True,
                    flip_filter: bool = False) -> torch.Tensor:
    r"""2-D convolution with optional up/downsampling; padding is applied once, at the start.

    Args:
        x:           `[N, in_channels, H, W]`.
        w:           `[out_channels, in_channels // groups, kh, kw]`, dtype of `x`.
        f:           Low-pass filter from `upfirdn2d.setup_filter()` (float32), or None.
        up, down:    Integer up/downsampling factors.
        padding:     int, `[x, y]` or `[x0, x1, y0, y1]`, w.r.t. the upsampled image.
        groups:      Number of channel groups.
        flip_weight: True = correlation (like conv2d), False = convolution.
        flip_filter: True = correlation with `f`, False = convolution.

    Returns:
        `[N, out_channels, out_h, out_w]`.
    """
    assert isinstance(x, torch.Tensor) and x.ndim == 4
    assert isinstance(w, torch.Tensor) and w.ndim == 4 and w.dtype == x.dtype
    assert f is None or (isinstance(f, torch.Tensor) and f.ndim in (1, 2) and f.dtype == torch.float32)
    assert isinstance(up, int) and up >= 1
    assert isinstance(down, int) and down >= 1
    assert isinstance(groups, int) and groups >= 1
    out_channels, in_channels_per_group, kh, kw = (int(s) for s in w.shape)
    fw, fh = _get_filter_size(f)
    px0, px1, py0, py1 = _parse_padding(padding)

    # Pad so that the filter is centred (the same amounts as upsample2d / downsample2d).
    extra_x, extra_y = _centring_pad(fw, up, down), _centring_pad(fh, up, down)
    px0, px1 = px0 + extra_x[0], px1 + extra_x[1]
    py0, py1 = py0 + extra_y[0], py1 + extra_y[1]
    pad = [px0, px1, py0, py1]

    # 1x1 kernel: resample on the smaller side (downsample before, upsample after the conv).
    if kw == 1 and kh == 1 and down > 1 and up == 1:
        x = upfirdn2d.upfirdn2d(x, f, down=down, padding=pad, flip_filter=flip_filter)
        return _conv(x, w, groups=groups, flip_weight=flip_weight)
    if kw == 1 and kh == 1 and up > 1 and down == 1:
        x = _conv(x, w, groups=groups, flip_weight=flip_weight)
        return upfirdn2d.upfirdn2d(x, f, up=up, padding=pad, gain=up ** 2, flip_filter=flip_filter)

    # Downsampling only: filter, then a strided convolution does the decimation.
    if down > 1 and up == 1:
        x = upfirdn2d.upfirdn2d(x, f, padding=pad, flip_filter=flip_filter)
        return _conv(x, w, stride=down, groups=groups, flip_weight=flip_weight)

    # Upsampling (maybe followed by downsampling): a strided transposed convolution inserts the
    # zeros and convolves in one go; the FIR filter then smooths the result.
    if up > 1:
        # conv_transpose2d wants [in, out // groups, kh, kw]: swap the channel axes within each group.
        w = w.reshape(groups, out_channels // groups, in_channels_per_group, kh, kw).transpose(1, 2)
        w = w.reshape(groups * in_channels_per_group, out_channels // groups, kh, kw)
        # The transposed conv already produced a (k - 1, k - up) border; what remains goes to the
        # filter step, except a non-negative common part that the transposed conv can crop itself.
        px0 -= kw - 1
        px1 -= kw - up
        py0 -= kh - 1
        py1 -= kh - up
        crop_x = max(min(-px0, -px1), 0)
        crop_y = max(min(-py0, -py1), 0)
        x = _conv(x, w, stride=up, padding=[crop_y, crop_x], groups=groups, transpose=True,
                  flip_weight=not flip_weight)
        x = upfirdn2d.upfirdn2d(x, f, padding=[px0 + crop_x, px1 + crop_x, py0 + crop_y, py1 + crop_y],
                                gain=up ** 2, flip_filter=flip_filter)
        if down > 1:
            x = upfirdn2d.upfirdn2d(x, f, down=down, flip_filter=flip_filter)
        return x

    # No resampling: plain convolution when its symmetric padding suffices.
    if px0 == px1 and py0 == py1 and px0 >= 0 and py0 >= 0:
        return _conv(x, w, padding=[py0, px0], groups=groups, flip_weight=flip_weight)

    # General case: pad (and crop) explicitly, then convolve.
    x = upfirdn2d.upfirdn2d(x, None, padding=pad)
    return _conv(x, w, groups=groups, flip_weight=flip_weight)
