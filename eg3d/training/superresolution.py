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

#----------------------------------------------------------------------------

def _resize_inputs(rgb, x, size, antialias):
    """Bilinearly resize both inputs to size x size (align_corners=False)."""
    x = torch.nn.functional.interpolate(x, size=(size, size), mode='bilinear', align_corners=False, antialias=antialias)
    rgb = torch.nn.functional.interpolate(rgb, size=(size, size), mode='bilinear', align_corners=False, antialias=antialias)
    return rgb, x


def _sr_blocks_forward(module, rgb, x, ws, block_kwargs):
    ws = ws[:, -1:, :].repeat(1, 3, 1)
    x, rgb = module.block0(x, rgb, ws, **block_kwargs)
    x, rgb = module.block1(x, rgb, ws, **block_kwargs)
    return rgb

#----------------------------------------------------------------------------

@persistence.persistent_class
class SuperresolutionHybrid8X(torch.nn.Module):
    """128 -> 512 (for 512x512 generation): two upsampling blocks, 128 and 64 channels."""

    def __init__(self, channels, img_resolution, sr_num_fp16_res, sr_antialias,
                 num_fp16_res=4, conv_clamp=None, channel_base=None, channel_max=None,  # ignored
                 **block_kwargs):
        super().__init__()
        assert img_resolution == 512
        use_fp16 = sr_num_fp16_res > 0
        self.input_resolution = 128
        self.sr_antialias = sr_antialias
        self.block0 = SynthesisBlock(channels, 128, w_dim=512, resolution=256,
            img_channels=3, is_last=False, use_fp16=use_fp16, conv_clamp=(256 if use_fp16 else None), **block_kwargs)
        self.block1 = SynthesisBlock(128, 64, w_dim=512, resolution=512,
            img_channels=3, is_last=True, use_fp16=use_fp16, conv_clamp=(256 if use_fp16 else None), **block_kwargs)
        self.register_buffer('resample_filter', upfirdn2d.setup_filter([1,3,3,1]))

    def forward(self, rgb, x, ws, **block_kwargs):
        if x.shape[-1] != self.input_resolution:
            rgb, x = _resize_inputs(rgb, x, self.input_resolution, self.sr_antialias)
        return _sr_blocks_forward(self, rgb, x, ws, block_kwargs)

#----------------------------------------------------------------------------

@persistence.persistent_class
class SuperresolutionHybrid4X(torch.nn.Module):
    """128 -> 256 (for 256x256 generation): a same-resolution block (128 ch), then an upsampling block (64 ch)."""

    def __init__(self, channels, img_resolution, sr_num_fp16_res, sr_antialias,
                 num_fp16_res=4, conv_clamp=None, channel_base=None, channel_max=None,  # ignored
                 **block_kwargs):
        super().__init__()
        assert img_resolution == 256
        use_fp16 = sr_num_fp16_res > 0
        self.sr_antialias = sr_antialias
        self.input_resolution = 128
        self.block0 = SynthesisBlockNoUp(channels, 128, w_dim=512, resolution=128,
            img_channels=3, is_last=False, use_fp16=use_fp16, conv_clamp=(256 if use_fp16 else None), **block_kwargs)
        self.block1 = SynthesisBlock(128, 64, w_dim=512, resolution=256,
            img_channels=3, is_last=True, use_fp16=use_fp16, conv_clamp=(256 if use_fp16 else None), **block_kwargs)
        self.register_buffer('resample_filter', upfirdn2d.setup_filter([1,3,3,1]))

    def forward(self, rgb, x, ws, **block_kwargs):
        # Only smaller inputs are resized here (the others use "!=").
        if x.shape[-1] < self.input_resolution:
            rgb, x = _resize_inputs(rgb, x, self.input_resolution, self.sr_antialias)
        return _sr_blocks_forward(self, rgb, x, ws, block_kwargs)

#----------------------------------------------------------------------------

@persistence.persistent_class
class SuperresolutionHybrid2X(torch.nn.Module):
    """64 -> 128 (for 128x128 generation): a same-resolution block (128 ch), then an upsampling block (64 ch)."""

    def __init__(self, channels, img_resolution, sr_num_fp16_res, sr_antialias,
                 num_fp16_res=4, conv_clamp=None, channel_base=None, channel_max=None,  # ignored
                 **block_kwargs):
        super().__init__()
        assert img_resolution == 128
        use_fp16 = sr_num_fp16_res > 0
        self.input_resolution = 64
        self.sr_antialias = sr_antialias
        self.block0 = SynthesisBlockNoUp(channels, 128, w_dim=512, resolution=64,
            img_channels=3, is_last=False, use_fp16=use_fp16, conv_clamp=(256 if use_fp16 else None), **block_kwargs)
        self.block1 = SynthesisBlock(128, 64, w_dim=512, resolution=128,
            img_channels=3, is_last=True, use_fp16=use_fp16, conv_clamp=(256 if use_fp16 else None), **block_kwargs)
        self.register_buffer('resample_filter', upfirdn2d.setup_filter([1,3,3,1]))

    def forward(self, rgb, x, ws, **block_kwargs):
        if x.shape[-1] != self.input_resolution:
            rgb, x = _resize_inputs(rgb, x, self.input_resolution, self.sr_antialias)
        return _sr_blocks_forward(self, rgb, x, ws, block_kwargs)

#----------------------------------------------------------------------------

@persistence.persistent_class
class SuperresolutionHybridDeepfp32(torch.nn.Module):
    """Legacy 128 -> 256 module kept so that old 256x256 snapshots load (no antialias option)."""

    def __init__(self, channels, img_resolution, sr_num_fp16_res,
                 num_fp16_res=4, conv_clamp=None, channel_base=None, channel_max=None,  # ignored
                 **block_kwargs):
        super().__init__()
        assert img_resolution == 256
        use_fp16 = sr_num_fp16_res > 0
        self.input_resolution = 128
        self.block0 = SynthesisBlockNoUp(channels, 128, w_dim=512, resolution=128,
            img_channels=3, is_last=False, use_fp16=use_fp16, conv_clamp=(256 if use_fp16 else None), **block_kwargs)
        self.block1 = SynthesisBlock(128, 64, w_dim=512, resolution=256,
            img_channels=3, is_last=True, use_fp16=use_fp16, conv_clamp=(256 if use_fp16 else None), **block_kwargs)
        self.register_buffer('resample_filter', upfirdn2d.setup_filter([1,3,3,1]))

    def forward(self, rgb, x, ws, **block_kwargs):
        if x.shape[-1] < self.input_resolution:
            rgb, x = _resize_inputs(rgb, x, self.input_resolution, False)
        return _sr_blocks_forward(self, rgb, x, ws, block_kwargs)

#----------------------------------------------------------------------------

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
        assert architecture in ['orig', 'skip', 'resnet']
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
        self.num_conv = 0
        self.num_torgb = 0

        if in_channels == 0:
            self.const = torch.nn.Parameter(torch.randn([out_channels, resolution, resolution]))

        if in_channels != 0:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim=w_dim, resolution=resolution,
                conv_clamp=conv_clamp, channels_last=self.channels_last, **layer_kwargs)
            self.num_conv += 1

        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim=w_dim, resolution=resolution,
            conv_clamp=conv_clamp, channels_last=self.channels_last, **layer_kwargs)
        self.num_conv += 1

        if is_last or architecture == 'skip':
            self.torgb = ToRGBLayer(out_channels, img_channels, w_dim=w_dim,
                conv_clamp=conv_clamp, channels_last=self.channels_last)
            self.num_torgb += 1

        if in_channels != 0 and architecture == 'resnet':
            # As in the official code this skip layer upsamples (up=2), which does not match the
            # no-upsampling main path; the resnet architecture is never used with this block.
            self.skip = Conv2dLayer(in_channels, out_channels, kernel_size=1, bias=False, up=2,
                resample_filter=resample_filter, channels_last=self.channels_last)

    def forward(self, x, img, ws, force_fp32=False, fused_modconv=None, update_emas=False, **layer_kwargs):
        _ = update_emas  # accepted for interface compatibility
        misc.assert_shape(ws, [None, self.num_conv + self.num_torgb, self.w_dim])
        w_iter = iter(ws.unbind(dim=1))
        if ws.device.type != 'cuda':
            force_fp32 = True  # float16 only on CUDA, as in the official code
        dtype = torch.float16 if self.use_fp16 and not force_fp32 else torch.float32
        memory_format = torch.channels_last if self.channels_last and not force_fp32 else torch.contiguous_format
        if fused_modconv is None:
            fused_modconv = self.fused_modconv_default
        if fused_modconv == 'inference_only':
            fused_modconv = (not self.training)

        if self.in_channels == 0:
            x = self.const.to(dtype=dtype, memory_format=memory_format)
            x = x.unsqueeze(0).repeat([ws.shape[0], 1, 1, 1])
        else:
            misc.assert_shape(x, [None, self.in_channels, self.resolution, self.resolution])
            x = x.to(dtype=dtype, memory_format=memory_format)

        if self.in_channels == 0:
            x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
        elif self.architecture == 'resnet':
            y = self.skip(x, gain=np.sqrt(0.5))
            x = self.conv0(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
            x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, gain=np.sqrt(0.5), **layer_kwargs)
            x = y.add_(x)
        else:
            x = self.conv0(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
            x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)

        # The skip image is at this block's resolution already: add toRGB to it directly.
        if self.is_last or self.architecture == 'skip':
            y = self.torgb(x, next(w_iter), fused_modconv=fused_modconv)
            y = y.to(dtype=torch.float32, memory_format=torch.contiguous_format)
            img = img.add_(y) if img is not None else y

        assert x.dtype == dtype
        assert img is None or img.dtype == torch.float32
        return x, img

    def extra_repr(self):
        return f'resolution={self.resolution:d}, architecture={self.architecture:s}'

#----------------------------------------------------------------------------

@persistence.persistent_class
class SuperresolutionHybrid8XDC(torch.nn.Module):
    """128 -> 512 (for 512x512 generation), wider: two upsampling blocks, 256 and 128 channels.
    Unlike the other modules it registers no `resample_filter` buffer."""

    def __init__(self, channels, img_resolution, sr_num_fp16_res, sr_antialias,
                 num_fp16_res=4, conv_clamp=None, channel_base=None, channel_max=None,  # ignored
                 **block_kwargs):
        super().__init__()
        assert img_resolution == 512
        use_fp16 = sr_num_fp16_res > 0
        self.input_resolution = 128
        self.sr_antialias = sr_antialias
        self.block0 = SynthesisBlock(channels, 256, w_dim=512, resolution=256,
            img_channels=3, is_last=False, use_fp16=use_fp16, conv_clamp=(256 if use_fp16 else None), **block_kwargs)
        self.block1 = SynthesisBlock(256, 128, w_dim=512, resolution=512,
            img_channels=3, is_last=True, use_fp16=use_fp16, conv_clamp=(256 if use_fp16 else None), **block_kwargs)

    def forward(self, rgb, x, ws, **block_kwargs):
        if x.shape[-1] != self.input_resolution:
            rgb, x = _resize_inputs(rgb, x, self.input_resolution, self.sr_antialias)
        return _sr_blocks_forward(self, rgb, x, ws, block_kwargs)

#----------------------------------------------------------------------------
