"""Discriminators of EG3D ("Efficient Geometry-aware 3D Generative Adversarial Networks").

The dual discriminator sees the final image and the raw neural rendering together: `image_raw`
is resized to the final resolution (`filtered_resizing`) and concatenated with `image` into
2 * img_channels channels, then a StyleGAN2 resnet discriminator conditioned on the camera
(projection onto the mapped label) scores the pair.
"""

import numpy as np
import torch

from torch_utils import persistence
from torch_utils.ops import upfirdn2d
from training.networks_stylegan2 import DiscriminatorBlock, DiscriminatorEpilogue, MappingNetwork


def _build_trunk(module, c_dim, img_resolution, img_channels, architecture, channel_base, channel_max,
                 num_fp16_res, conv_clamp, cmap_dim, block_kwargs, mapping_kwargs, epilogue_kwargs):
    """Set c_dim / img_resolution / img_resolution_log2 / img_channels / block_resolutions on `module`
    and create its blocks b{res} (res = img_resolution .. 8), `mapping` (if c_dim > 0) and the
    epilogue `b4`, in that order (the order of the random initial draws depends on it)."""
    log2 = int(np.log2(img_resolution))
    module.c_dim = c_dim
    module.img_resolution = img_resolution
    module.img_resolution_log2 = log2
    module.img_channels = img_channels
    module.block_resolutions = [2 ** k for k in range(log2, 2, -1)]
    lowest_fp16_res = max(2 ** (log2 + 1 - num_fp16_res), 8)

    def width(res):
        return min(channel_base // res, channel_max)

    if c_dim == 0:
        cmap_dim = 0
    elif cmap_dim is None:
        cmap_dim = width(4)

    shared = dict(img_channels=img_channels, architecture=architecture, conv_clamp=conv_clamp)
    layer_count = 0
    for res in module.block_resolutions:
        block = DiscriminatorBlock(width(res) if res < img_resolution else 0, width(res), width(res // 2),
                                   resolution=res, first_layer_idx=layer_count, use_fp16=(res >= lowest_fp16_res),
                                   **block_kwargs, **shared)
        layer_count += block.num_layers
        setattr(module, f'b{res}', block)
    if c_dim > 0:
        module.mapping = MappingNetwork(z_dim=0, c_dim=c_dim, w_dim=cmap_dim, num_ws=None, w_avg_beta=None,
                                        **mapping_kwargs)
    module.b4 = DiscriminatorEpilogue(width(4), cmap_dim=cmap_dim, resolution=4, **epilogue_kwargs, **shared)


def _run_trunk(module, img, c, block_kwargs):
    """Blocks from high to low resolution, then the label-projected epilogue."""
    x = None
    for res in module.block_resolutions:
        x, img = getattr(module, f'b{res}')(x, img, **block_kwargs)
    cmap = module.mapping(None, c) if module.c_dim > 0 else None
    return module.b4(x, img, cmap)


@persistence.persistent_class
class SingleDiscriminator(torch.nn.Module):
    """StyleGAN2 discriminator on `img['image']` only (the raw rendering is ignored)."""

    def __init__(self,
        c_dim,                          # Conditioning label size.
        img_resolution,                 # Resolution of the images scored.
        img_channels,                   # Input channels.
        architecture        = 'resnet', # 'orig', 'skip' or 'resnet'.
        channel_base        = 32768,    # Channels at resolution r: min(channel_base // r, channel_max).
        channel_max         = 512,      # Upper bound on channels.
        num_fp16_res        = 4,        # Run the N highest resolutions in float16 (CUDA only).
        conv_clamp          = 256,      # Clamp conv outputs to +-conv_clamp; None disables.
        cmap_dim            = None,     # Mapped label size, None = channels at 4x4.
        sr_upsample_factor  = 1,        # Ignored.
        block_kwargs        = {},       # Passed on to DiscriminatorBlock.
        mapping_kwargs      = {},       # Passed on to MappingNetwork.
        epilogue_kwargs     = {},       # Passed on to DiscriminatorEpilogue.
    ):
        super().__init__()
        _build_trunk(self, c_dim, img_resolution, img_channels, architecture, channel_base, channel_max,
            num_fp16_res, conv_clamp, cmap_dim, block_kwargs, mapping_kwargs, epilogue_kwargs)

    def forward(self, img, c, update_emas=False, **block_kwargs):
        _ = update_emas  # accepted for interface compatibility
        return _run_trunk(self, img['image'], c, block_kwargs)

    def extra_repr(self):
        return f'c_dim={self.c_dim:d}, img_resolution={self.img_resolution:d}, img_channels={self.img_channels:d}'


def filtered_resizing(image_orig_tensor, size, f, filter_mode='antialiased'):
    """Resize [N, C, H, W] images to size x size.

    filter_mode: 'antialiased' (bilinear with antialiasing), 'none' (plain bilinear), 'classic'
    (2x upsample with filter `f`, bilinear to 2*size+2, then filtered 2x downsample), or a float
    a in (0, 1): the blend (1 - a) * plain + a * antialiased.
    """
    def bilinear(images, side, antialias):
        return torch.nn.functional.interpolate(images, size=(side, side), mode='bilinear', align_corners=False,
                                               antialias=antialias)

    if isinstance(filter_mode, str) and filter_mode in ('antialiased', 'none'):
        return bilinear(image_orig_tensor, size, antialias=(filter_mode == 'antialiased'))
    if filter_mode == 'classic':
        doubled = upfirdn2d.upsample2d(image_orig_tensor, f, up=2)
        doubled = bilinear(doubled, 2 * size + 2, antialias=False)
        return upfirdn2d.downsample2d(doubled, f, down=2, flip_filter=True, padding=-1)
    if type(filter_mode) == float:
        assert 0 < filter_mode < 1, f'a blending filter_mode must lie in (0, 1), got {filter_mode}'
        smooth = bilinear(image_orig_tensor, size, antialias=True)
        sharp = bilinear(image_orig_tensor, size, antialias=False)
        return (1 - filter_mode) * sharp + filter_mode * smooth
    raise ValueError(f"filtered_resizing: unknown filter_mode {filter_mode!r}; use 'antialiased', 'classic', "
                     f"'none' or a float in (0, 1)")


@persistence.persistent_class
class DualDiscriminator(torch.nn.Module):
    """EG3D dual discriminator: scores concat(image, resized image_raw), conditioned on the camera."""

    def __init__(self,
        c_dim,                          # Conditioning label (camera) size.
        img_resolution,                 # Resolution of the images scored.
        img_channels,                   # Channels of ONE image (the network sees twice as many).
        architecture        = 'resnet', # 'orig', 'skip' or 'resnet'.
        channel_base        = 32768,    # Channels at resolution r: min(channel_base // r, channel_max).
        channel_max         = 512,      # Upper bound on channels.
        num_fp16_res        = 4,        # Run the N highest resolutions in float16 (CUDA only).
        conv_clamp          = 256,      # Clamp conv outputs to +-conv_clamp; None disables.
        cmap_dim            = None,     # Mapped label size, None = channels at 4x4.
        disc_c_noise        = 0,        # Add noise with this many per-column label stddevs to c before mapping.
        block_kwargs        = {},       # Passed on to DiscriminatorBlock.
        mapping_kwargs      = {},       # Passed on to MappingNetwork.
        epilogue_kwargs     = {},       # Passed on to DiscriminatorEpilogue.
    ):
        super().__init__()
        img_channels *= 2
        _build_trunk(self, c_dim, img_resolution, img_channels, architecture, channel_base, channel_max,
            num_fp16_res, conv_clamp, cmap_dim, block_kwargs, mapping_kwargs, epilogue_kwargs)
        self.register_buffer('resample_filter', upfirdn2d.setup_filter([1, 3, 3, 1]))
        self.disc_c_noise = disc_c_noise

    def forward(self, img, c, update_emas=False, **block_kwargs):
        _ = update_emas  # accepted for interface compatibility
        raw = filtered_resizing(img['image_raw'], size=img['image'].shape[-1], f=self.resample_filter)
        x = torch.cat([img['image'], raw], 1)
        if self.c_dim > 0 and self.disc_c_noise > 0:
            # In place on the caller's tensor, as in the official code.
            c += torch.randn_like(c) * c.std(0) * self.disc_c_noise
        return _run_trunk(self, x, c, block_kwargs)

    def extra_repr(self):
        return f'c_dim={self.c_dim:d}, img_resolution={self.img_resolution:d}, img_channels={self.img_channels:d}'


@persistence.persistent_class
class DummyDualDiscriminator(torch.nn.Module):
    """Dual discriminator whose raw-image input fades out linearly over the first 500k images
    (decremented by 32/500000 on every forward call)."""

    def __init__(self,
        c_dim,                          # Conditioning label size.
        img_resolution,                 # Resolution of the images scored.
        img_channels,                   # Channels of ONE image (the network sees twice as many).
        architecture        = 'resnet', # 'orig', 'skip' or 'resnet'.
        channel_base        = 32768,    # Channels at resolution r: min(channel_base // r, channel_max).
        channel_max         = 512,      # Upper bound on channels.
        num_fp16_res        = 4,        # Run the N highest resolutions in float16 (CUDA only).
        conv_clamp          = 256,      # Clamp conv outputs to +-conv_clamp; None disables.
        cmap_dim            = None,     # Mapped label size, None = channels at 4x4.
        block_kwargs        = {},       # Passed on to DiscriminatorBlock.
        mapping_kwargs      = {},       # Passed on to MappingNetwork.
        epilogue_kwargs     = {},       # Passed on to DiscriminatorEpilogue.
    ):
        super().__init__()
        img_channels *= 2
        _build_trunk(self, c_dim, img_resolution, img_channels, architecture, channel_base, channel_max,
            num_fp16_res, conv_clamp, cmap_dim, block_kwargs, mapping_kwargs, epilogue_kwargs)
        self.register_buffer('resample_filter', upfirdn2d.setup_filter([1, 3, 3, 1]))
        self.raw_fade = 1

    def forward(self, img, c, update_emas=False, **block_kwargs):
        _ = update_emas  # accepted for interface compatibility
        self.raw_fade = max(0, self.raw_fade - 32 / 500000)  # one step per 32-image batch
        raw = filtered_resizing(img['image_raw'], size=img['image'].shape[-1], f=self.resample_filter)
        raw = raw * self.raw_fade
        x = torch.cat([img['image'], raw], 1)
        return _run_trunk(self, x, c, block_kwargs)

    def extra_repr(self):
        return f'c_dim={self.c_dim:d}, img_resolution={self.img_resolution:d}, img_channels={self.img_channels:d}'

