"""Persistent low-rank adapter layers wrapping the EG3D / StyleGAN2 layers.

Each wrapper holds K = `num_adapters` adapters (leading K dim on every adapter tensor) around a
frozen base layer, attached after construction as the child `base_layer`. The delta is added to
the base's raw (un-scaled) weight, so merging is `weight += delta`:

    LoRA:    delta_k = scaling * B_k @ A_k                A_k [R, fan_in], B_k [O, R]
    AdaLoRA: delta_k = scaling * B_k @ (A_k * E_k)        E_k [R, 1] (P = A, Lambda = E, Q = B)

with fan_in = I*kh*kw for convolutions (delta reshaped to [O, I, kh, kw]). The sample i of a
batch uses adapter `adapter_index` (an int for the whole batch, or a LongTensor [N]); the index is
transient (not in state_dict, not pickled).

Two paths, as the ops of StyleGAN3: the plain PyTorch operations here are the reference path, which
defines the semantics; `training/adapters/kernels.py` holds fast autograd kernels (with their CPU/CUDA
dispatch) that compute the same values and gradients. The layers call the kernels wherever that module
can be imported (`fast_kernels`), unless EG3D_ADAPTER_KERNELS=reference.

NOTE: this module's source is embedded into snapshot pickles and executed by the official EG3D
code when it loads them, so it may import only torch, numpy, the standard library and official
EG3D names (torch_utils.*, training.networks_stylegan2). The kernels module, which the official
code lacks, is looked up on first use, and its absence means the reference path.
"""

import importlib
import math
import os

import numpy as np
import torch

from torch_utils import misc
from torch_utils import persistence
from torch_utils.ops import bias_act
from torch_utils.ops import conv2d_resample
from torch_utils.ops import fma

#----------------------------------------------------------------------------
# Helpers of both paths (the kernels import them from here).

def batched(t):
    """A factor as [1 or N, rows, cols]: shared factors get a batch dim of one."""
    return t if t.ndim == 3 else t[None]


def merged_weight(weight, A, B):
    """W + B @ A as [1 or N, O, I*kh*kw] (one merged weight, or one per sample for per-sample factors)."""
    return torch.baddbmm(weight.reshape(1, weight.shape[0], -1), batched(B), batched(A))


HALF = (torch.float16, torch.bfloat16)


def wide(t):
    """t in float32 if it is float16 / bfloat16. Factor gradients are sums over every pixel of the batch:
    in fp16 blocks (no loss scaling) a half-precision result overflows or flushes to zero, so they are
    accumulated and returned in float32, the precision of the factors themselves."""
    return t.float() if t.dtype in HALF else t


def apply_bias_act(x, bias, activation, gain, clamp):
    """bias_act.bias_act for a bias [O] or per-sample [N, O] (added first; x + (b + 0) == x + b)."""
    if bias is not None and bias.ndim == 2:
        x = x + bias.to(x.dtype).reshape(*bias.shape, 1, 1)
        bias = None
    if bias is None and activation == 'linear' and gain == 1 and clamp is None:
        return x
    return bias_act.bias_act(x, None if bias is None else bias.to(x.dtype), act=activation, gain=gain, clamp=clamp)

#----------------------------------------------------------------------------
# Which path: the fast kernels or the reference; the merged weight or the low-rank branch.

KERNELS_MODULE = 'training.adapters.kernels'

# Environment variable choosing the implementation: 'fast' (default: the kernels module wherever it can
# be imported, else the reference) or 'reference' (the plain PyTorch operations of this module, as
# official EG3D code runs our snapshots). Read at every call, so spawned processes follow it too.
KERNELS_VARIABLE = 'EG3D_ADAPTER_KERNELS'

_kernels_module = None  # cache of `fast_kernels`: the module, or False where it is absent


def fast_kernels():
    """The kernels module, or None where it does not exist (official EG3D code running this source from a
    snapshot). Imported on first use rather than with this module, because it imports this module's helpers."""
    global _kernels_module  # pylint: disable=global-statement
    if _kernels_module is None:
        try:
            _kernels_module = importlib.import_module(KERNELS_MODULE)
        except ModuleNotFoundError as e:
            if not (KERNELS_MODULE + '.').startswith(f'{e.name}.'):  # a module the kernels need is missing
                raise
            _kernels_module = False
    return _kernels_module or None


def _kernels():
    """The kernels this call uses: `fast_kernels()`, or None (the reference path) if EG3D_ADAPTER_KERNELS=reference."""
    choice = os.environ.get(KERNELS_VARIABLE, 'fast')
    if choice not in ('fast', 'reference'):
        raise ValueError(f'{KERNELS_VARIABLE}={choice!r}: use fast or reference')
    return fast_kernels() if choice == 'fast' else None


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

#----------------------------------------------------------------------------
# The adapted convolutions.

def _low_rank_conv(x, A, kh, kw, **geometry):
    """conv2d_resample(x, A as a [R, I, kh, kw] kernel) as [N, R, H'*W'] (the reference low-rank branch);
    per-sample A [N, R, I*kh*kw] as one convolution with a group per sample."""
    N, I = x.shape[0], x.shape[1]
    R = A.shape[-2]
    if A.ndim == 2:
        h = conv2d_resample.conv2d_resample(x=x, w=A.to(x.dtype).reshape(R, I, kh, kw), **geometry)
    else:
        h = conv2d_resample.conv2d_resample(x=x.reshape(1, N * I, *x.shape[2:]),
                                            w=A.to(x.dtype).reshape(N * R, I, kh, kw), groups=N, **geometry)
    return h.reshape(N, R, -1)


def adapted_conv(x, weight, A, B, dropout=None, f=None, up=1, down=1, padding=0, flip_weight=True, styles=None):
    """conv2d_resample(x * styles, W + B @ A); A [R, I*k*k], B [O, R] (shared) or [N, R, I*k*k], [N, O, R];
    styles [N, I] or None (no modulation); `dropout` (or None) acts on the low-rank branch's input only.

    For a frozen W and no dropout, W gets no weight gradient: the base convolution plus the low-rank
    branch B @ conv(x * styles, A), or, for narrow layers with shared factors, the merged weight's
    gradient (`merged_weight_is_cheaper`, or `EG3D_ADAPTER_CONV_PATH`). Both paths take the same
    choice; the fast one runs stride-1 branches as one autograd function (`kernels.stride_one_adapted_conv`)
    and resampling branches as a matmul over the input channels (`kernels.low_rank_branch`).
    With B == 0 the result is the base's bit for bit.
    """
    O, I, kh, kw = weight.shape
    kernels = _kernels()
    geometry = dict(f=f, up=up, down=down, padding=padding, flip_weight=flip_weight)
    frozen = (dropout is None and not weight.requires_grad and A.shape[-2] > 0)
    # Never in half precision: the merged weight's gradient would be a half-precision sum over all pixels.
    merged = (frozen and A.ndim == 2 and x.dtype not in HALF
              and _trains_through_merged_weight(I, O, A.shape[0], kh * kw))
    stride_one = (up == 1 and down == 1 and isinstance(padding, int) and padding >= 0)
    if kernels is not None and frozen and not merged and stride_one:
        return kernels.stride_one_adapted_conv(x, styles, A, B, weight, padding, flip_weight)
    if styles is not None:
        x = kernels.modulate(x, styles) if kernels is not None else x * styles.to(x.dtype).reshape(x.shape[0], -1, 1, 1)
    if A.shape[-2] == 0:  # fully pruned AdaLoRA layer: the base alone
        return conv2d_resample.conv2d_resample(x=x, w=weight.to(x.dtype), **geometry)
    if merged:
        return conv2d_resample.conv2d_resample(x=x, w=merged_weight(weight, A, B).reshape(weight.shape).to(x.dtype),
                                               **geometry)
    y = conv2d_resample.conv2d_resample(x=x, w=weight.to(x.dtype), **geometry)
    N = y.shape[0]
    branch_input = dropout(x) if dropout is not None else x
    low_rank = _low_rank_conv if kernels is None else kernels.low_rank_branch
    out = y.reshape(N, O, -1)
    if x.dtype in HALF:  # the branch in float32, so that autograd sums the factor gradients in float32 (`wide`)
        h = low_rank(wide(branch_input), A, kh, kw, **geometry)
        out.add_(torch.bmm(B.expand(N, -1, -1), h).to(out.dtype))
    else:
        h = low_rank(branch_input, A, kh, kw, **geometry)
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
    pixel (`adapted_conv`), so the frozen W gets no weight gradient; the demodulation coefficients
    come from ||(W + delta) * s||, exactly as the base computes them (the fast path takes their
    gradients in weight space). With delta == 0 every intermediate equals the base's bit for bit.
    In float16 the max-abs pre-normalisation factor is taken from the frozen W (demodulation cancels
    it, so the choice does not change the result mathematically). What follows the non-fused
    convolution is the base's `fma` and `bias_act` on the reference path, `kernels.demodulate_bias_act`
    (in place on CPU) on the fast path.
    """
    batch_size = x.shape[0]
    out_channels, in_channels, kh, kw = weight.shape
    misc.assert_shape(x, [batch_size, in_channels, None, None])
    misc.assert_shape(styles, [batch_size, in_channels])
    per_sample = (A.ndim == 3)
    kernels = _kernels()

    if x.dtype == torch.float16 and demodulate:
        cw = (1 / np.sqrt(in_channels * kh * kw) / weight.norm(float('inf'), dim=[1, 2, 3], keepdim=True))
        weight = weight * cw
        B = B * cw.reshape(out_channels, 1)
        styles = styles / styles.norm(float('inf'), dim=1, keepdim=True)

    w = None
    dcoefs = None
    if demodulate and not fused_modconv and not weight.requires_grad and kernels is not None:  # weight space
        dcoefs = kernels.demodulation_coefficients(styles, weight, A, B)
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
        y = adapted_conv(x, weight, A, B, dropout=dropout, f=resample_filter, up=up, down=down, padding=padding,
                         flip_weight=flip_weight, styles=styles)
        dcoefs = dcoefs.to(x.dtype).reshape(batch_size, -1, 1, 1) if demodulate else None
        noise = None if noise is None else noise.to(x.dtype)
        if kernels is not None:
            return kernels.demodulate_bias_act(y, dcoefs, noise, bias, activation, act_gain, act_clamp)
        if dcoefs is not None:  # the base's arithmetic (`modulated_conv2d`), then bias_act
            y = y * dcoefs if noise is None else fma.fma(y, dcoefs, noise)
        elif noise is not None:
            y = y.add_(noise)
        return apply_bias_act(y, bias, activation, act_gain, act_clamp)

    with misc.suppress_tracer_warnings():
        batch_size = int(batch_size)
    x = x.reshape(1, -1, *x.shape[2:])
    w = w.reshape(-1, in_channels, kh, kw)
    x = conv2d_resample.conv2d_resample(x=x, w=w.to(x.dtype), f=resample_filter,
        up=up, down=down, padding=padding, groups=batch_size, flip_weight=flip_weight)
    x = x.reshape(batch_size, -1, *x.shape[2:])
    if noise is not None:
        x = x.add_(noise)
    return apply_bias_act(x, bias, activation, act_gain, act_clamp)

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
        y = adapted_conv(x, w, A, B, dropout=self._dropout_fn(), f=base.resample_filter, up=base.up, down=base.down,
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
