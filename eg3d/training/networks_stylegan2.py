"""StyleGAN2 generator and discriminator building blocks as used by EG3D.

Reimplementation of the official EG3D `training/networks_stylegan2.py` (itself the StyleGAN2
configs E-F of Karras et al.). Class names, constructor signatures, attribute names and
parameter/buffer names are kept identical so that official state dicts and pickles load
unchanged; the arithmetic follows the official order of operations so results agree to
float32 rounding, and constructors draw their random initial values in the official order.

Conventions shared by all layers:
- weights are stored un-scaled (N(0,1) at init) and scaled at run time by `weight_gain`
  (equalized learning rate);
- parents reach their children only through attributes (`self.conv0`, `getattr(self, 'b64')`),
  so a child may be swapped for a wrapper (adapters) by `setattr` on the parent;
- on non-CUDA devices every block runs in float32 whatever `use_fp16` says.
"""

from typing import Optional

import numpy as np
import torch

from torch_utils import misc
from torch_utils import persistence
from torch_utils.ops import bias_act
from torch_utils.ops import conv2d_resample
from torch_utils.ops import fma
from torch_utils.ops import upfirdn2d


@misc.profiled_function
def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """Scale `x` so that its mean square along `dim` is one."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


@misc.profiled_function
def modulated_conv2d(
    x: torch.Tensor,                # [N, I, H, W] activations.
    weight: torch.Tensor,           # [O, I, kh, kw] shared convolution weight.
    styles: torch.Tensor,           # [N, I] per-sample input-channel scales.
    noise: Optional[torch.Tensor] = None,   # Added to the output (broadcastable to it).
    up: int = 1,                    # Upsampling factor (integer).
    down: int = 1,                  # Downsampling factor (integer).
    padding: int = 0,               # Padding relative to the upsampled image.
    resample_filter: Optional[torch.Tensor] = None,  # From upfirdn2d.setup_filter(); used when resampling.
    demodulate: bool = True,        # Normalise each output channel's per-sample weight to unit L2 norm?
    flip_weight: bool = True,       # True = correlation (as F.conv2d), False = true convolution.
    fused_modconv: bool = True,     # One grouped convolution with per-sample weights (True),
                                    # or scale activations around one shared convolution (False)?
) -> torch.Tensor:
    """StyleGAN2 modulated convolution.

    Per sample n the effective weight is W'[o,i] = W[o,i] * s[n,i], optionally divided by
    ||W'[o,:]||_2 (demodulation). The fused path builds W' explicitly ([N*O, I, kh, kw]) and runs
    a grouped convolution; the non-fused path scales x by s before and by the demodulation
    coefficients after a convolution with the shared W (cheaper in training, same result).
    """
    n = x.shape[0]
    c_out, c_in, kh, kw = weight.shape
    misc.assert_shape(weight, [c_out, c_in, kh, kw])
    misc.assert_shape(x, [n, c_in, None, None])
    misc.assert_shape(styles, [n, c_in])
    geometry = dict(f=resample_filter, up=up, down=down, padding=padding, flip_weight=flip_weight)

    if demodulate and x.dtype == torch.float16:
        # float16 products could overflow: bring weight and styles to max-abs ~1 first. The
        # demodulation below divides these per-channel constants out again.
        weight = weight * (1 / np.sqrt(c_in * kh * kw) / weight.norm(float('inf'), dim=[1, 2, 3], keepdim=True))
        styles = styles / styles.norm(float('inf'), dim=1, keepdim=True)

    # Per-sample weights [N, O, I, kh, kw] are needed to fuse, or to get the demodulation
    # coefficients [N, O] (reciprocal L2 norm of each output channel's weights).
    per_sample = None
    demod = None
    if fused_modconv or demodulate:
        per_sample = weight.unsqueeze(0) * styles.reshape(n, 1, -1, 1, 1)
    if demodulate:
        demod = (per_sample.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()

    if not fused_modconv:
        scaled_in = x * styles.to(x.dtype).reshape(n, -1, 1, 1)
        out = conv2d_resample.conv2d_resample(x=scaled_in, w=weight.to(x.dtype), **geometry)
        if not demodulate:
            return out if noise is None else out.add_(noise.to(out.dtype))
        out_scale = demod.to(out.dtype).reshape(n, -1, 1, 1)
        return out * out_scale if noise is None else fma.fma(out, out_scale, noise.to(out.dtype))

    if demodulate:
        per_sample = per_sample * demod.reshape(n, -1, 1, 1, 1)
    # Fold the batch into the channel axis: one convolution group per sample.
    with misc.suppress_tracer_warnings():  # a traced batch size becomes a constant here
        n = int(n)
    misc.assert_shape(x, [n, c_in, None, None])
    grouped_w = per_sample.reshape(-1, c_in, kh, kw).to(x.dtype)
    out = conv2d_resample.conv2d_resample(x=x.reshape(1, -1, *x.shape[2:]), w=grouped_w, groups=n, **geometry)
    out = out.reshape(n, -1, *out.shape[2:])
    return out if noise is None else out.add_(noise)


def _activate(x: torch.Tensor, b: Optional[torch.Tensor], act: str, act_gain: float,
              conv_clamp: Optional[float], gain: float) -> torch.Tensor:
    """bias_act with the layer's default gain and clamp both multiplied by the caller's `gain`."""
    clamp = None if conv_clamp is None else conv_clamp * gain
    return bias_act.bias_act(x, b, act=act, gain=act_gain * gain, clamp=clamp)


def _block_precision(block: torch.nn.Module, device: torch.device, force_fp32: bool):
    """(dtype, memory_format) for a block: float16 / channels_last only on CUDA and when not forced off."""
    fp32 = force_fp32 or device.type != 'cuda'
    dtype = torch.float16 if (block.use_fp16 and not fp32) else torch.float32
    layout = torch.channels_last if (block.channels_last and not fp32) else torch.contiguous_format
    return dtype, layout


def _memory_format(channels_last: bool):
    return torch.channels_last if channels_last else torch.contiguous_format


@persistence.persistent_class
class FullyConnectedLayer(torch.nn.Module):
    """Dense layer with equalized learning rate and a fused bias + activation."""

    def __init__(self,
        in_features,                # Input features.
        out_features,               # Output features.
        bias            = True,     # Add a learned bias before the activation?
        activation      = 'linear', # Activation name from bias_act.activation_funcs.
        lr_multiplier   = 1,        # Learning-rate multiplier (scales both weight and bias).
        bias_init       = 0,        # Initial bias value.
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        # Stored divided by lr_multiplier and rescaled at run time, so the optimiser's steps
        # shrink by lr_multiplier relative to the effective weight.
        self.weight = torch.nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        initial_bias = torch.full([out_features], np.float32(bias_init))
        self.bias = torch.nn.Parameter(initial_bias) if bias else None
        self.weight_gain = lr_multiplier / np.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x):
        weight = self.weight.to(x.dtype) * self.weight_gain
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if bias is not None and self.bias_gain != 1:
            bias = bias * self.bias_gain
        if bias is not None and self.activation == 'linear':
            return torch.addmm(bias.unsqueeze(0), x, weight.t())  # bias + x @ W^T in one kernel
        return bias_act.bias_act(x.matmul(weight.t()), bias, act=self.activation)

    def extra_repr(self):
        return f'in_features={self.in_features:d}, out_features={self.out_features:d}, activation={self.activation:s}'


@persistence.persistent_class
class Conv2dLayer(torch.nn.Module):
    """Plain (non-modulated) convolution with optional up/down-sampling, bias, activation, clamp."""

    def __init__(self,
        in_channels,                    # Input channels.
        out_channels,                   # Output channels.
        kernel_size,                    # Square kernel size.
        bias            = True,         # Add a learned bias before the activation?
        activation      = 'linear',     # Activation name from bias_act.activation_funcs.
        up              = 1,            # Upsampling factor (integer).
        down            = 1,            # Downsampling factor (integer).
        resample_filter = [1,3,3,1],    # Low-pass filter used when resampling.
        conv_clamp      = None,         # Clamp outputs to +-conv_clamp; None disables.
        channels_last   = False,        # Store the weight in channels_last memory format?
        trainable       = True,         # False: weight and bias become buffers (Freeze-D).
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.activation = activation
        self.up = up
        self.down = down
        self.conv_clamp = conv_clamp
        self.padding = kernel_size // 2  # 'same' output size for odd kernels
        self.act_gain = bias_act.activation_funcs[activation].def_gain
        self.weight_gain = 1 / np.sqrt(in_channels * (kernel_size ** 2))  # 1 / sqrt(fan_in)
        self.register_buffer('resample_filter', upfirdn2d.setup_filter(resample_filter))

        shape = [out_channels, in_channels, kernel_size, kernel_size]
        init_weight = torch.randn(shape).to(memory_format=_memory_format(channels_last))
        init_bias = torch.zeros([out_channels]) if bias else None
        if not trainable:
            # Frozen (Freeze-D): the tensors stay in the state dict but get no gradients.
            self.register_buffer('weight', init_weight)
            if init_bias is None:
                self.bias = None
            else:
                self.register_buffer('bias', init_bias)
        else:
            self.weight = torch.nn.Parameter(init_weight)
            self.bias = None if init_bias is None else torch.nn.Parameter(init_bias)

    def forward(self, x, gain=1):
        scaled_w = (self.weight * self.weight_gain).to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        # Correlation is slightly faster; transposed convolutions (up > 1) need the flipped kernel.
        y = conv2d_resample.conv2d_resample(x=x, w=scaled_w, f=self.resample_filter, up=self.up, down=self.down,
                                            padding=self.padding, flip_weight=(self.up == 1))
        return _activate(y, b, self.activation, self.act_gain, self.conv_clamp, gain)

    def extra_repr(self):
        return (f'in_channels={self.in_channels:d}, out_channels={self.out_channels:d}, '
                f'activation={self.activation:s}, up={self.up}, down={self.down}')


@persistence.persistent_class
class MappingNetwork(torch.nn.Module):
    """Maps (z, c) to w, broadcast to `num_ws` copies; tracks the moving average `w_avg`."""

    def __init__(self,
        z_dim,                      # Latent (z) size, 0 = no latent.
        c_dim,                      # Conditioning label (c) size, 0 = no label.
        w_dim,                      # Output (w) size.
        num_ws,                     # Number of w copies to output, None = return [N, w_dim].
        num_layers      = 8,        # Number of dense layers.
        embed_features  = None,     # Label embedding size, None = w_dim.
        layer_features  = None,     # Hidden layer size, None = w_dim.
        activation      = 'lrelu',  # Activation of the dense layers.
        lr_multiplier   = 0.01,     # Learning-rate multiplier of the dense layers.
        w_avg_beta      = 0.998,    # EMA decay of w_avg, None = no tracking (and no truncation).
    ):
        super().__init__()
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.num_ws = num_ws
        self.num_layers = num_layers
        self.w_avg_beta = w_avg_beta

        if c_dim == 0:
            embed_features = 0
        elif embed_features is None:
            embed_features = w_dim
        hidden = w_dim if layer_features is None else layer_features
        widths = [z_dim + embed_features] + [hidden] * (num_layers - 1) + [w_dim]

        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, embed_features)
        for idx, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
            layer = FullyConnectedLayer(fan_in, fan_out, activation=activation, lr_multiplier=lr_multiplier)
            setattr(self, f'fc{idx}', layer)

        if num_ws is not None and w_avg_beta is not None:
            self.register_buffer('w_avg', torch.zeros([w_dim]))

    def forward(self, z, c, truncation_psi=1, truncation_cutoff=None, update_emas=False):
        # z and the embedded label are normalised separately, then concatenated.
        inputs = []
        if self.z_dim > 0:
            misc.assert_shape(z, [None, self.z_dim])
            inputs.append(normalize_2nd_moment(z.to(torch.float32)))
        if self.c_dim > 0:
            misc.assert_shape(c, [None, self.c_dim])
            inputs.append(normalize_2nd_moment(self.embed(c.to(torch.float32))))
        w = inputs[0] if len(inputs) == 1 else torch.cat(inputs, dim=1)

        for idx in range(self.num_layers):
            w = getattr(self, f'fc{idx}')(w)

        if update_emas and self.w_avg_beta is not None:
            # w_avg <- beta * w_avg + (1 - beta) * batch mean
            batch_mean = w.detach().mean(dim=0)
            self.w_avg.copy_(batch_mean.lerp(self.w_avg, self.w_avg_beta))

        if self.num_ws is not None:
            w = w.unsqueeze(1).repeat([1, self.num_ws, 1])

        # Truncation trick: w <- w_avg + psi * (w - w_avg), optionally only for the first ws.
        if truncation_psi != 1:
            assert self.w_avg_beta is not None, 'truncation needs w_avg tracking (w_avg_beta is None)'
            if self.num_ws is not None and truncation_cutoff is not None:
                head = w[:, :truncation_cutoff]
                w[:, :truncation_cutoff] = self.w_avg.lerp(head, truncation_psi)
            else:
                w = self.w_avg.lerp(w, truncation_psi)
        return w

    def extra_repr(self):
        return f'z_dim={self.z_dim:d}, c_dim={self.c_dim:d}, w_dim={self.w_dim:d}, num_ws={self.num_ws:d}'


@persistence.persistent_class
class SynthesisLayer(torch.nn.Module):
    """Modulated 3x3 convolution (optionally 2x upsampling) + per-pixel noise + bias + activation."""

    def __init__(self,
        in_channels,                    # Input channels.
        out_channels,                   # Output channels.
        w_dim,                          # w size (input of the affine style layer).
        resolution,                     # Output resolution of this layer.
        kernel_size     = 3,            # Square kernel size.
        up              = 1,            # Upsampling factor (integer).
        use_noise       = True,         # Add per-pixel noise?
        activation      = 'lrelu',      # Activation name from bias_act.activation_funcs.
        resample_filter = [1,3,3,1],    # Low-pass filter used when resampling.
        conv_clamp      = None,         # Clamp outputs to +-conv_clamp; None disables.
        channels_last   = False,        # Store the weight in channels_last memory format?
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.w_dim = w_dim
        self.resolution = resolution
        self.up = up
        self.use_noise = use_noise
        self.activation = activation
        self.conv_clamp = conv_clamp
        self.padding = kernel_size // 2
        self.act_gain = bias_act.activation_funcs[activation].def_gain
        self.register_buffer('resample_filter', upfirdn2d.setup_filter(resample_filter))

        # Creation order fixes the order of the random draws: affine, weight, noise_const.
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        shape = [out_channels, in_channels, kernel_size, kernel_size]
        self.weight = torch.nn.Parameter(torch.randn(shape).to(memory_format=_memory_format(channels_last)))
        if use_noise:
            self.register_buffer('noise_const', torch.randn([resolution, resolution]))
            self.noise_strength = torch.nn.Parameter(torch.zeros([]))
        self.bias = torch.nn.Parameter(torch.zeros([out_channels]))

    def forward(self, x, w, noise_mode='random', fused_modconv=True, gain=1):
        assert noise_mode in ('random', 'const', 'none'), f'unsupported noise_mode {noise_mode!r}'
        side_in = self.resolution // self.up
        misc.assert_shape(x, [None, self.in_channels, side_in, side_in])
        styles = self.affine(w)

        noise = None
        if self.use_noise and noise_mode == 'const':
            noise = self.noise_const * self.noise_strength
        elif self.use_noise and noise_mode == 'random':
            fresh = torch.randn([x.shape[0], 1, self.resolution, self.resolution], device=x.device)
            noise = fresh * self.noise_strength

        y = modulated_conv2d(x=x, weight=self.weight, styles=styles, noise=noise, up=self.up, padding=self.padding,
                             resample_filter=self.resample_filter, flip_weight=(self.up == 1),
                             fused_modconv=fused_modconv)
        return _activate(y, self.bias.to(y.dtype), self.activation, self.act_gain, self.conv_clamp, gain)

    def extra_repr(self):
        return (f'in_channels={self.in_channels:d}, out_channels={self.out_channels:d}, w_dim={self.w_dim:d}, '
                f'resolution={self.resolution:d}, up={self.up}, activation={self.activation:s}')


@persistence.persistent_class
class ToRGBLayer(torch.nn.Module):
    """Modulated 1x1 convolution without demodulation, to image channels (+ bias, clamp)."""

    def __init__(self, in_channels, out_channels, w_dim, kernel_size=1, conv_clamp=None, channels_last=False):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.w_dim = w_dim
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        shape = [out_channels, in_channels, kernel_size, kernel_size]
        self.weight = torch.nn.Parameter(torch.randn(shape).to(memory_format=_memory_format(channels_last)))
        self.bias = torch.nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / np.sqrt(in_channels * (kernel_size ** 2))

    def forward(self, x, w, fused_modconv=True):
        # Without demodulation the equalized-lr gain is folded into the styles.
        styles = self.affine(w) * self.weight_gain
        y = modulated_conv2d(x=x, weight=self.weight, styles=styles, demodulate=False, fused_modconv=fused_modconv)
        return bias_act.bias_act(y, self.bias.to(y.dtype), clamp=self.conv_clamp)

    def extra_repr(self):
        return f'in_channels={self.in_channels:d}, out_channels={self.out_channels:d}, w_dim={self.w_dim:d}'


@persistence.persistent_class
class SynthesisBlock(torch.nn.Module):
    """One resolution of the synthesis network: [2x up conv0] -> conv1 -> [toRGB added to the skip image]."""

    def __init__(self,
        in_channels,                            # Input channels, 0 = first block (learned constant input).
        out_channels,                           # Output channels.
        w_dim,                                  # w size.
        resolution,                             # Output resolution of this block.
        img_channels,                           # Image channels produced by toRGB.
        is_last,                                # Last block of the network?
        architecture            = 'skip',       # 'orig', 'skip' or 'resnet'.
        resample_filter         = [1,3,3,1],    # Low-pass filter used when resampling.
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
        has_rgb = is_last or architecture == 'skip'
        self.num_conv = 1 if in_channels == 0 else 2
        self.num_torgb = 1 if has_rgb else 0

        shared = dict(w_dim=w_dim, resolution=resolution, conv_clamp=conv_clamp, channels_last=self.channels_last)
        if in_channels == 0:
            self.const = torch.nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, up=2, resample_filter=resample_filter,
                                        **shared, **layer_kwargs)
        self.conv1 = SynthesisLayer(out_channels, out_channels, **shared, **layer_kwargs)
        if has_rgb:
            self.torgb = ToRGBLayer(out_channels, img_channels, w_dim=w_dim, conv_clamp=conv_clamp,
                                    channels_last=self.channels_last)
        if in_channels != 0 and architecture == 'resnet':
            self.skip = Conv2dLayer(in_channels, out_channels, kernel_size=1, bias=False, up=2,
                                    resample_filter=resample_filter, channels_last=self.channels_last)

    def forward(self, x, img, ws, force_fp32=False, fused_modconv=None, update_emas=False, **layer_kwargs):
        del update_emas  # part of the common block interface; nothing to update here
        misc.assert_shape(ws, [None, self.num_conv + self.num_torgb, self.w_dim])
        dtype, layout = _block_precision(self, ws.device, force_fp32)
        if fused_modconv is None:
            fused_modconv = self.fused_modconv_default
        if fused_modconv == 'inference_only':
            fused_modconv = not self.training  # fused for inference, separate ops for training
        conv_kwargs = dict(fused_modconv=fused_modconv, **layer_kwargs)
        next_w = iter(ws.unbind(dim=1)).__next__  # conv0, conv1, torgb consume the ws in order

        if self.in_channels == 0:
            h = self.const.to(dtype=dtype, memory_format=layout).unsqueeze(0).repeat([ws.shape[0], 1, 1, 1])
            h = self.conv1(h, next_w(), **conv_kwargs)
        else:
            misc.assert_shape(x, [None, self.in_channels, self.resolution // 2, self.resolution // 2])
            h = x.to(dtype=dtype, memory_format=layout)
            if self.architecture == 'resnet':
                shortcut = self.skip(h, gain=np.sqrt(0.5))
                h = self.conv0(h, next_w(), **conv_kwargs)
                h = shortcut.add_(self.conv1(h, next_w(), gain=np.sqrt(0.5), **conv_kwargs))
            else:
                h = self.conv0(h, next_w(), **conv_kwargs)
                h = self.conv1(h, next_w(), **conv_kwargs)

        # Skip image: upsample the previous image, add this block's toRGB output (always float32).
        if img is not None:
            misc.assert_shape(img, [None, self.img_channels, self.resolution // 2, self.resolution // 2])
            img = upfirdn2d.upsample2d(img, self.resample_filter)
        if self.is_last or self.architecture == 'skip':
            rgb = self.torgb(h, next_w(), fused_modconv=fused_modconv)
            rgb = rgb.to(dtype=torch.float32, memory_format=torch.contiguous_format)
            img = rgb if img is None else img.add_(rgb)

        assert h.dtype == dtype and (img is None or img.dtype == torch.float32)
        return h, img

    def extra_repr(self):
        return f'resolution={self.resolution:d}, architecture={self.architecture:s}'


@persistence.persistent_class
class SynthesisNetwork(torch.nn.Module):
    """Stack of SynthesisBlocks from 4x4 up to `img_resolution` (blocks named b4, b8, ...)."""

    def __init__(self,
        w_dim,                      # w size.
        img_resolution,             # Output resolution (power of two >= 4).
        img_channels,               # Output channels.
        channel_base    = 32768,    # Channels at resolution r: min(channel_base // r, channel_max).
        channel_max     = 512,      # Upper bound on channels.
        num_fp16_res    = 4,        # Run the N highest resolutions in float16 (CUDA only).
        **block_kwargs,             # Passed on to SynthesisBlock.
    ):
        assert img_resolution >= 4 and (img_resolution & (img_resolution - 1)) == 0, \
            f'img_resolution must be a power of two >= 4, got {img_resolution}'
        super().__init__()
        log2 = int(np.log2(img_resolution))
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_resolution_log2 = log2
        self.img_channels = img_channels
        self.num_fp16_res = num_fp16_res
        self.block_resolutions = [2 ** k for k in range(2, log2 + 1)]
        lowest_fp16_res = max(2 ** (log2 + 1 - num_fp16_res), 8)

        def width(res):
            return min(channel_base // res, channel_max)

        self.num_ws = 0
        for res in self.block_resolutions:
            last = res == img_resolution
            block = SynthesisBlock(0 if res == 4 else width(res // 2), width(res), w_dim=w_dim, resolution=res,
                                   img_channels=img_channels, is_last=last, use_fp16=(res >= lowest_fp16_res),
                                   **block_kwargs)
            # Consecutive blocks share one w: a block's toRGB w is the next block's conv0 w.
            self.num_ws += block.num_conv + (block.num_torgb if last else 0)
            setattr(self, f'b{res}', block)

    def forward(self, ws, **block_kwargs):
        misc.assert_shape(ws, [None, self.num_ws, self.w_dim])
        ws = ws.to(torch.float32)
        x = img = None
        first = 0
        for res in self.block_resolutions:
            block = getattr(self, f'b{res}')
            block_ws = ws.narrow(1, first, block.num_conv + block.num_torgb)
            first += block.num_conv
            x, img = block(x, img, block_ws, **block_kwargs)
        return img

    def extra_repr(self):
        return (f'w_dim={self.w_dim:d}, num_ws={self.num_ws:d}, img_resolution={self.img_resolution:d}, '
                f'img_channels={self.img_channels:d}, num_fp16_res={self.num_fp16_res:d}')


@persistence.persistent_class
class Generator(torch.nn.Module):
    """StyleGAN2 generator: MappingNetwork followed by SynthesisNetwork."""

    def __init__(self,
        z_dim,                      # Latent (z) size.
        c_dim,                      # Conditioning label (c) size.
        w_dim,                      # w size.
        img_resolution,             # Resolution of the generated image.
        img_channels,               # Output channels.
        mapping_kwargs      = {},   # Passed on to MappingNetwork.
        **synthesis_kwargs,         # Passed on to SynthesisNetwork.
    ):
        super().__init__()
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        # The synthesis network is built first: it decides num_ws (and draws its init first).
        self.synthesis = SynthesisNetwork(w_dim=w_dim, img_resolution=img_resolution, img_channels=img_channels,
                                          **synthesis_kwargs)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, num_ws=self.num_ws, **mapping_kwargs)

    def forward(self, z, c, truncation_psi=1, truncation_cutoff=None, update_emas=False, **synthesis_kwargs):
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff,
                          update_emas=update_emas)
        return self.synthesis(ws, update_emas=update_emas, **synthesis_kwargs)


@persistence.persistent_class
class DiscriminatorBlock(torch.nn.Module):
    """One resolution of the discriminator: [fromRGB] -> conv0 -> conv1 (2x down) [+ resnet skip]."""

    def __init__(self,
        in_channels,                        # Input channels, 0 = first block (reads the image).
        tmp_channels,                       # Channels inside the block.
        out_channels,                       # Output channels.
        resolution,                         # Input resolution of this block.
        img_channels,                       # Image channels.
        first_layer_idx,                    # Global index of this block's first layer (for Freeze-D).
        architecture        = 'resnet',     # 'orig', 'skip' or 'resnet'.
        activation          = 'lrelu',      # Activation name from bias_act.activation_funcs.
        resample_filter     = [1,3,3,1],    # Low-pass filter used when resampling.
        conv_clamp          = None,         # Clamp conv outputs to +-conv_clamp; None disables.
        use_fp16            = False,        # Run this block in float16 (CUDA only)?
        fp16_channels_last  = False,        # With float16, use channels_last memory format?
        freeze_layers       = 0,            # Freeze-D: layers with global index < this are buffers.
    ):
        assert in_channels in (0, tmp_channels), 'a discriminator block either reads the image or keeps its width'
        assert architecture in ('orig', 'skip', 'resnet'), f'unsupported architecture {architecture!r}'
        super().__init__()
        self.in_channels = in_channels
        self.resolution = resolution
        self.img_channels = img_channels
        self.first_layer_idx = first_layer_idx
        self.architecture = architecture
        self.use_fp16 = use_fp16
        self.channels_last = (use_fp16 and fp16_channels_last)
        self.register_buffer('resample_filter', upfirdn2d.setup_filter(resample_filter))

        # Each created layer takes the next global index; it is trainable unless frozen.
        self.num_layers = 0
        def next_trainable():
            trainable = (self.first_layer_idx + self.num_layers >= freeze_layers)
            self.num_layers += 1
            return trainable

        conv_args = dict(activation=activation, conv_clamp=conv_clamp, channels_last=self.channels_last)
        if in_channels == 0 or architecture == 'skip':
            self.fromrgb = Conv2dLayer(img_channels, tmp_channels, kernel_size=1, trainable=next_trainable(),
                                       **conv_args)
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, kernel_size=3, trainable=next_trainable(), **conv_args)
        self.conv1 = Conv2dLayer(tmp_channels, out_channels, kernel_size=3, down=2, trainable=next_trainable(),
                                 resample_filter=resample_filter, **conv_args)
        if architecture == 'resnet':
            self.skip = Conv2dLayer(tmp_channels, out_channels, kernel_size=1, bias=False, down=2,
                                    trainable=next_trainable(), resample_filter=resample_filter,
                                    channels_last=self.channels_last)

    def forward(self, x, img, force_fp32=False):
        dtype, layout = _block_precision(self, (img if x is None else x).device, force_fp32)

        h = None
        if x is not None:
            misc.assert_shape(x, [None, self.in_channels, self.resolution, self.resolution])
            h = x.to(dtype=dtype, memory_format=layout)

        if self.in_channels == 0 or self.architecture == 'skip':
            misc.assert_shape(img, [None, self.img_channels, self.resolution, self.resolution])
            img = img.to(dtype=dtype, memory_format=layout)
            from_img = self.fromrgb(img)
            h = from_img if h is None else h + from_img
            # Only the 'skip' architecture feeds the (downsampled) image to the next block.
            img = upfirdn2d.downsample2d(img, self.resample_filter) if self.architecture == 'skip' else None

        if self.architecture != 'resnet':
            h = self.conv1(self.conv0(h))
        else:
            shortcut = self.skip(h, gain=np.sqrt(0.5))
            h = self.conv0(h)
            h = shortcut.add_(self.conv1(h, gain=np.sqrt(0.5)))

        assert h.dtype == dtype
        return h, img

    def extra_repr(self):
        return f'resolution={self.resolution:d}, architecture={self.architecture:s}'


@persistence.persistent_class
class MinibatchStdLayer(torch.nn.Module):
    """Appends the mean (over channels and pixels) stddev across groups of samples as extra channels."""

    def __init__(self, group_size, num_channels=1):
        super().__init__()
        self.group_size = group_size
        self.num_channels = num_channels

    def forward(self, x):
        batch, channels, height, width = x.shape
        with misc.suppress_tracer_warnings():  # as_tensor values are trace-time constants
            if self.group_size is None:
                group = batch
            else:
                group = torch.min(torch.as_tensor(self.group_size), torch.as_tensor(batch))
        feats = self.num_channels

        # View as [group, n, feats, channels // feats, H, W]: sample i is member i // n of group
        # i % n. The statistic is the stddev over the group, averaged over channels and pixels.
        stats = x.reshape(group, -1, feats, channels // feats, height, width)
        stats = stats - stats.mean(dim=0)
        stats = (stats.square().mean(dim=0) + 1e-8).sqrt()
        stats = stats.mean(dim=[2, 3, 4]).reshape(-1, feats, 1, 1)
        return torch.cat([x, stats.repeat(group, 1, height, width)], dim=1)

    def extra_repr(self):
        return f'group_size={self.group_size}, num_channels={self.num_channels:d}'


@persistence.persistent_class
class DiscriminatorEpilogue(torch.nn.Module):
    """Final 4x4 stage: [fromRGB] -> minibatch std -> conv -> fc -> out, projected onto the label map."""

    def __init__(self,
        in_channels,                    # Input channels.
        cmap_dim,                       # Size of the mapped label, 0 = unconditional.
        resolution,                     # Resolution (4).
        img_channels,                   # Image channels.
        architecture        = 'resnet', # 'orig', 'skip' or 'resnet'.
        mbstd_group_size    = 4,        # Minibatch-std group size, None = whole minibatch.
        mbstd_num_channels  = 1,        # Minibatch-std features, 0 = disable.
        activation          = 'lrelu',  # Activation name from bias_act.activation_funcs.
        conv_clamp          = None,     # Clamp conv outputs to +-conv_clamp; None disables.
    ):
        assert architecture in ('orig', 'skip', 'resnet'), f'unsupported architecture {architecture!r}'
        super().__init__()
        self.in_channels = in_channels
        self.cmap_dim = cmap_dim
        self.resolution = resolution
        self.img_channels = img_channels
        self.architecture = architecture

        if architecture == 'skip':
            self.fromrgb = Conv2dLayer(img_channels, in_channels, kernel_size=1, activation=activation)
        self.mbstd = None
        if mbstd_num_channels > 0:
            self.mbstd = MinibatchStdLayer(group_size=mbstd_group_size, num_channels=mbstd_num_channels)
        self.conv = Conv2dLayer(in_channels + mbstd_num_channels, in_channels, kernel_size=3, activation=activation,
                                conv_clamp=conv_clamp)
        self.fc = FullyConnectedLayer(in_channels * resolution * resolution, in_channels, activation=activation)
        self.out = FullyConnectedLayer(in_channels, cmap_dim if cmap_dim > 0 else 1)

    def forward(self, x, img, cmap, force_fp32=False):
        del force_fp32  # the epilogue always runs in float32
        misc.assert_shape(x, [None, self.in_channels, self.resolution, self.resolution])
        h = x.to(dtype=torch.float32, memory_format=torch.contiguous_format)
        if self.architecture == 'skip':
            misc.assert_shape(img, [None, self.img_channels, self.resolution, self.resolution])
            h = h + self.fromrgb(img.to(dtype=torch.float32, memory_format=torch.contiguous_format))

        if self.mbstd is not None:
            h = self.mbstd(h)
        h = self.out(self.fc(self.conv(h).flatten(1)))

        # Projection discriminator: logit = <out, cmap> / sqrt(cmap_dim).
        if self.cmap_dim > 0:
            misc.assert_shape(cmap, [None, self.cmap_dim])
            h = (h * cmap).sum(dim=1, keepdim=True) * (1 / np.sqrt(self.cmap_dim))

        assert h.dtype == torch.float32
        return h

    def extra_repr(self):
        return f'resolution={self.resolution:d}, architecture={self.architecture:s}'


def _build_discriminator_trunk(module, c_dim, img_resolution, img_channels, architecture, channel_base,
                               channel_max, num_fp16_res, conv_clamp, cmap_dim, block_kwargs, mapping_kwargs,
                               epilogue_kwargs):
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


def _run_discriminator_trunk(module, img, c, block_kwargs):
    """Blocks from high to low resolution, then the label-projected epilogue."""
    x = None
    for res in module.block_resolutions:
        x, img = getattr(module, f'b{res}')(x, img, **block_kwargs)
    cmap = module.mapping(None, c) if module.c_dim > 0 else None
    return module.b4(x, img, cmap)


@persistence.persistent_class
class Discriminator(torch.nn.Module):
    """StyleGAN2 (projection-conditioned) discriminator."""

    def __init__(self,
        c_dim,                          # Conditioning label size.
        img_resolution,                 # Resolution of the input image.
        img_channels,                   # Input channels.
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
        _build_discriminator_trunk(self, c_dim, img_resolution, img_channels, architecture, channel_base,
            channel_max, num_fp16_res, conv_clamp, cmap_dim, block_kwargs, mapping_kwargs, epilogue_kwargs)

    def forward(self, img, c, update_emas=False, **block_kwargs):
        del update_emas  # part of the common discriminator interface
        return _run_discriminator_trunk(self, img, c, block_kwargs)

    def extra_repr(self):
        return f'c_dim={self.c_dim:d}, img_resolution={self.img_resolution:d}, img_channels={self.img_channels:d}'
