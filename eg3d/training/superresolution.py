"""Superresolution modules of EG3D ("Efficient Geometry-aware 3D Generative Adversarial Networks").

Each module upsamples the low-resolution neural rendering (`rgb`, first 3 channels of the feature
image, plus the full feature image `x`) to the final image with two StyleGAN2 synthesis blocks.

Quirks kept from the official code (needed for weight and pickle compatibility):
- `channel_base`, `channel_max`, `num_fp16_res` and `conv_clamp` are accepted and ignored; the
  block widths are hard-coded (2X/4X: 128 then 64 channels, 8X: 128 then 64, 8XDC: 256 then 128)
  and `w_dim` is always 512.
- float16 is switched on for both blocks whenever `sr_num_fp16_res > 0` (then conv_clamp = 256).
- Only the last w is used: `ws[:, -1:]` repeated 3 times (conv0, conv1, torgb of each block).
"""

import numpy as np
import torch

from torch_utils import misc
from torch_utils import persistence
from torch_utils.ops import upfirdn2d
from training.networks_stylegan2 import Conv2dLayer, SynthesisBlock, SynthesisLayer, ToRGBLayer

_SR_W_DIM = 512  # the superresolution blocks always take 512-d ws


def _add_sr_blocks(module, first_block_cls, channels, widths, resolutions, sr_num_fp16_res, block_kwargs):
    """Create `module.block0` (of `first_block_cls`) and `module.block1` (an upsampling SynthesisBlock)."""
    half = sr_num_fp16_res > 0
    common = dict(w_dim=_SR_W_DIM, img_channels=3, use_fp16=half, conv_clamp=256 if half else None)
    module.block0 = first_block_cls(channels, widths[0], resolution=resolutions[0], is_last=False,
                                    **common, **block_kwargs)
    module.block1 = SynthesisBlock(widths[0], widths[1], resolution=resolutions[1], is_last=True,
                                   **common, **block_kwargs)


def _resize_inputs(rgb, x, size, antialias):
    """Bilinearly resize both inputs to size x size (align_corners=False)."""
    def resize(t):
        return torch.nn.functional.interpolate(t, size=(size, size), mode='bilinear', align_corners=False,
                                               antialias=antialias)
    resized_x = resize(x)
    return resize(rgb), resized_x


def _sr_blocks_forward(module, rgb, x, ws, block_kwargs):
    # Every layer of both blocks is driven by the last w only.
    last_w = ws[:, -1:, :].repeat(1, 3, 1)
    h, img = module.block0(x, rgb, last_w, **block_kwargs)
    _, img = module.block1(h, img, last_w, **block_kwargs)
    return img


@persistence.persistent_class
class SuperresolutionHybrid8X(torch.nn.Module):
    """128 -> 512 (for 512x512 generation): two upsampling blocks, 128 and 64 channels."""

    def __init__(self, channels, img_resolution, sr_num_fp16_res, sr_antialias,
                 num_fp16_res=4, conv_clamp=None, channel_base=None, channel_max=None,  # ignored
                 **block_kwargs):
        super().__init__()
        assert img_resolution == 512, f'{type(self).__name__} produces 512x512 images only'
        self.input_resolution = 128
        self.sr_antialias = sr_antialias
        _add_sr_blocks(self, SynthesisBlock, channels, (128, 64), (256, 512), sr_num_fp16_res, block_kwargs)
        self.register_buffer('resample_filter', upfirdn2d.setup_filter([1, 3, 3, 1]))

    def forward(self, rgb, x, ws, **block_kwargs):
        if x.shape[-1] != self.input_resolution:
            rgb, x = _resize_inputs(rgb, x, self.input_resolution, self.sr_antialias)
        return _sr_blocks_forward(self, rgb, x, ws, block_kwargs)


@persistence.persistent_class
class SuperresolutionHybrid4X(torch.nn.Module):
    """128 -> 256 (for 256x256 generation): a same-resolution block (128 ch), then an upsampling block (64 ch)."""

    def __init__(self, channels, img_resolution, sr_num_fp16_res, sr_antialias,
                 num_fp16_res=4, conv_clamp=None, channel_base=None, channel_max=None,  # ignored
                 **block_kwargs):
        super().__init__()
        assert img_resolution == 256, f'{type(self).__name__} produces 256x256 images only'
        self.sr_antialias = sr_antialias
        self.input_resolution = 128
        _add_sr_blocks(self, SynthesisBlockNoUp, channels, (128, 64), (128, 256), sr_num_fp16_res, block_kwargs)
        self.register_buffer('resample_filter', upfirdn2d.setup_filter([1, 3, 3, 1]))

    def forward(self, rgb, x, ws, **block_kwargs):
        # Only smaller inputs are resized here (the others use "!=").
        if x.shape[-1] < self.input_resolution:
            rgb, x = _resize_inputs(rgb, x, self.input_resolution, self.sr_antialias)
        return _sr_blocks_forward(self, rgb, x, ws, block_kwargs)


@persistence.persistent_class
class SuperresolutionHybrid2X(torch.nn.Module):
    """64 -> 128 (for 128x128 generation): a same-resolution block (128 ch), then an upsampling block (64 ch)."""

    def __init__(self, channels, img_resolution, sr_num_fp16_res, sr_antialias,
                 num_fp16_res=4, conv_clamp=None, channel_base=None, channel_max=None,  # ignored
                 **block_kwargs):
        super().__init__()
        assert img_resolution == 128, f'{type(self).__name__} produces 128x128 images only'
        self.input_resolution = 64
        self.sr_antialias = sr_antialias
        _add_sr_blocks(self, SynthesisBlockNoUp, channels, (128, 64), (64, 128), sr_num_fp16_res, block_kwargs)
        self.register_buffer('resample_filter', upfirdn2d.setup_filter([1, 3, 3, 1]))

    def forward(self, rgb, x, ws, **block_kwargs):
        if x.shape[-1] != self.input_resolution:
            rgb, x = _resize_inputs(rgb, x, self.input_resolution, self.sr_antialias)
        return _sr_blocks_forward(self, rgb, x, ws, block_kwargs)


@persistence.persistent_class
class SuperresolutionHybridDeepfp32(torch.nn.Module):
    """Legacy 128 -> 256 module kept so that old 256x256 snapshots load (no antialias option)."""

    def __init__(self, channels, img_resolution, sr_num_fp16_res,
                 num_fp16_res=4, conv_clamp=None, channel_base=None, channel_max=None,  # ignored
                 **block_kwargs):
        super().__init__()
        assert img_resolution == 256, f'{type(self).__name__} produces 256x256 images only'
        self.input_resolution = 128
        _add_sr_blocks(self, SynthesisBlockNoUp, channels, (128, 64), (128, 256), sr_num_fp16_res, block_kwargs)
        self.register_buffer('resample_filter', upfirdn2d.setup_filter([1, 3, 3, 1]))

    def forward(self, rgb, x, ws, **block_kwargs):
        if x.shape[-1] < self.input_resolution:
            rgb, x = _resize_inputs(rgb, x, self.input_resolution, False)
        return _sr_blocks_forward(self, rgb, x, ws, block_kwargs)


@persistence.persistent_class
class SynthesisBlockNoUp(torch.nn.Module):
    """SynthesisBlock without upsampling: conv0 and conv1 both run at `resolution`, and the incoming
    skip image (already at `resolution`) is added to without being resampled."""

    def __init__(self,
        in_channels,                            # Input channels, 0 = first block (learned constant input).
        out_channels,                           # Output channels.
        w_dim,                                  # w size.
        resolution,                             # Input and output resolution.
        img_channels,                           # Image channels produced by toRGB.
        is_last,                                # Last block of the network?
        architecture            = 'skip',       # 'orig', 'skip' or 'resnet'.
        resample_filter         = [1,3,3,1],    # Low-pass filter (used only by the resnet skip layer).
        conv_clamp              = 256,          # Clamp conv outputs to +-conv_clamp; None disables.
        use_fp16                = False,        # Run this block in float16 (CUDA only)?
        fp16_channels_last      = False,        # With float16, use channels_last memory format?
        fused_modconv_default   = True,         # fused_modconv when the caller passes None; 'inference_only' = not self.training.
        **layer_kwargs,                         # Passed on to SynthesisLayer.
    ):
        assert architecture in ('orig', 'skip', 'resnet'), f'unsupported architecture {architecture!r}'
        super().__init__()
        self.in_channels = in_channels
        self.w_dim = w_dim
        self.resolution = resolution
        self.img_channels = img_channels
        self.is_last = is_last
        self.architecture = architecture
        self.use_fp16 = use_fp16
        self.channels_last = (use_fp16 and fp16_channels_last)
        self.fused_modconv_default = fused_modconv_default
        self.register_buffer('resample_filter', upfirdn2d.setup_filter(resample_filter))
        makes_rgb = is_last or architecture == 'skip'
        self.num_conv = 2 if in_channels != 0 else 1
        self.num_torgb = int(makes_rgb)

        # Both convolutions keep the resolution (no up=2 on conv0, unlike SynthesisBlock).
        layer_args = dict(w_dim=w_dim, resolution=resolution, conv_clamp=conv_clamp, channels_last=self.channels_last)
        if in_channels == 0:
            self.const = torch.nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, **layer_args, **layer_kwargs)
        self.conv1 = SynthesisLayer(out_channels, out_channels, **layer_args, **layer_kwargs)
        if makes_rgb:
            self.torgb = ToRGBLayer(out_channels, img_channels, w_dim=w_dim, conv_clamp=conv_clamp,
                                    channels_last=self.channels_last)
        if in_channels != 0 and architecture == 'resnet':
            # As in the official code this skip layer upsamples (up=2), which does not match the
            # no-upsampling main path; the resnet architecture is never used with this block.
            self.skip = Conv2dLayer(in_channels, out_channels, kernel_size=1, bias=False, up=2,
                                    resample_filter=resample_filter, channels_last=self.channels_last)

    def forward(self, x, img, ws, force_fp32=False, fused_modconv=None, update_emas=False, **layer_kwargs):
        del update_emas  # part of the common block interface; nothing to update here
        misc.assert_shape(ws, [None, self.num_conv + self.num_torgb, self.w_dim])
        fp32 = force_fp32 or ws.device.type != 'cuda'  # float16 only ever runs on CUDA
        dtype = torch.float32 if (fp32 or not self.use_fp16) else torch.float16
        layout = torch.channels_last if (self.channels_last and not fp32) else torch.contiguous_format
        if fused_modconv is None:
            fused_modconv = self.fused_modconv_default
        if fused_modconv == 'inference_only':
            fused_modconv = not self.training
        kwargs = dict(fused_modconv=fused_modconv, **layer_kwargs)
        remaining_ws = list(ws.unbind(dim=1))  # consumed front to back: [conv0,] conv1, torgb

        if self.in_channels == 0:
            h = self.const.to(dtype=dtype, memory_format=layout).unsqueeze(0).repeat([ws.shape[0], 1, 1, 1])
            h = self.conv1(h, remaining_ws.pop(0), **kwargs)
        else:
            misc.assert_shape(x, [None, self.in_channels, self.resolution, self.resolution])
            h = x.to(dtype=dtype, memory_format=layout)
            shortcut = self.skip(h, gain=np.sqrt(0.5)) if self.architecture == 'resnet' else None
            h = self.conv0(h, remaining_ws.pop(0), **kwargs)
            if shortcut is None:
                h = self.conv1(h, remaining_ws.pop(0), **kwargs)
            else:
                h = shortcut.add_(self.conv1(h, remaining_ws.pop(0), gain=np.sqrt(0.5), **kwargs))

        # The skip image is at this block's resolution already: add toRGB to it directly. Out of
        # place (the official code adds in place): the caller's image is a view of the feature image
        # that conv0 saved for backward, so an in-place add breaks training at the SR input resolution.
        if self.is_last or self.architecture == 'skip':
            rgb = self.torgb(h, remaining_ws.pop(0), fused_modconv=fused_modconv)
            rgb = rgb.to(dtype=torch.float32, memory_format=torch.contiguous_format)
            img = rgb if img is None else img + rgb

        assert h.dtype == dtype and (img is None or img.dtype == torch.float32)
        return h, img

    def extra_repr(self):
        return f'resolution={self.resolution:d}, architecture={self.architecture:s}'


@persistence.persistent_class
class SuperresolutionHybrid8XDC(torch.nn.Module):
    """128 -> 512 (for 512x512 generation), wider: two upsampling blocks, 256 and 128 channels.
    Unlike the other modules it registers no `resample_filter` buffer."""

    def __init__(self, channels, img_resolution, sr_num_fp16_res, sr_antialias,
                 num_fp16_res=4, conv_clamp=None, channel_base=None, channel_max=None,  # ignored
                 **block_kwargs):
        super().__init__()
        assert img_resolution == 512, f'{type(self).__name__} produces 512x512 images only'
        self.input_resolution = 128
        self.sr_antialias = sr_antialias
        _add_sr_blocks(self, SynthesisBlock, channels, (256, 128), (256, 512), sr_num_fp16_res, block_kwargs)

    def forward(self, rgb, x, ws, **block_kwargs):
        if x.shape[-1] != self.input_resolution:
            rgb, x = _resize_inputs(rgb, x, self.input_resolution, self.sr_antialias)
        return _sr_blocks_forward(self, rgb, x, ws, block_kwargs)
