"""Drop-in `conv2d` / `conv_transpose2d` whose weight gradients can be switched off.

With `enabled = True` and a CUDA input, the convolutions run through a custom autograd op that
supports gradients of any order and skips the weight gradient entirely inside
`no_weight_gradients()` (used by R1 / path-length regularisation, and so that frozen weights
cost nothing).

On CPU, a grouped float32 convolution (the fused modulated convolution: one group per sample) sums
its weight gradient in float64 and rounds once. oneDNN's grouped kernels sum in an order that
depends on the CPU's vector width: an AVX2 CPU put that gradient 3 ulps from an AVX-512 CPU's, and
from the official code's golden values. Rounded once from float64, it is the float32 rounding of
the exact sum on any CPU (up to float64's own rounding). Everything else is a plain `torch.nn.functional` call.
"""

import contextlib
from typing import Iterator, Optional, Sequence, Union

import torch

enabled = False                    # Use the custom op (CUDA inputs only). Off: no second-order gradients here.
weight_gradients_disabled = False  # Read by the custom op's backward; set via no_weight_gradients().

_IntOrPair = Union[int, Sequence[int]]


@contextlib.contextmanager
def no_weight_gradients(disable: bool = True) -> Iterator[None]:
    """Within this context the custom op returns no gradient for conv weights (if `disable`)."""
    global weight_gradients_disabled
    previous = weight_gradients_disabled
    weight_gradients_disabled = previous or bool(disable)
    try:
        yield
    finally:
        weight_gradients_disabled = previous


def conv2d(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           stride: _IntOrPair = 1, padding: _IntOrPair = 0, dilation: _IntOrPair = 1, groups: int = 1) -> torch.Tensor:
    if _should_use_custom_op(input):
        op = _conv_op(transpose=False, weight_shape=weight.shape, stride=stride, padding=padding,
                      output_padding=0, dilation=dilation, groups=groups)
        return op.apply(input, weight, bias)
    if _sums_weight_gradient_in_float64(input, weight, groups):
        return _CpuGroupedConv.apply(input, weight, bias, False, stride, padding, 0, dilation, groups)
    return torch.nn.functional.conv2d(input=input, weight=weight, bias=bias, stride=stride,
                                      padding=padding, dilation=dilation, groups=groups)


def conv_transpose2d(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     stride: _IntOrPair = 1, padding: _IntOrPair = 0, output_padding: _IntOrPair = 0,
                     groups: int = 1, dilation: _IntOrPair = 1) -> torch.Tensor:
    if _should_use_custom_op(input):
        op = _conv_op(transpose=True, weight_shape=weight.shape, stride=stride, padding=padding,
                      output_padding=output_padding, dilation=dilation, groups=groups)
        return op.apply(input, weight, bias)
    if _sums_weight_gradient_in_float64(input, weight, groups):
        return _CpuGroupedConv.apply(input, weight, bias, True, stride, padding, output_padding, dilation, groups)
    return torch.nn.functional.conv_transpose2d(input=input, weight=weight, bias=bias, stride=stride, padding=padding,
                                                output_padding=output_padding, groups=groups, dilation=dilation)


def _should_use_custom_op(input: torch.Tensor) -> bool:
    return enabled and torch.backends.cudnn.enabled and input.device.type == 'cuda'


def _sums_weight_gradient_in_float64(input: torch.Tensor, weight: torch.Tensor, groups: int) -> bool:
    return (groups > 1 and input.device.type == 'cpu' and weight.dtype == torch.float32 and weight.requires_grad
            and torch.is_grad_enabled())


class _CpuGroupedConv(torch.autograd.Function):
    """A CPU convolution whose weight gradient is summed in float64; its output and input gradient are
    torch's own float32 ones. Both gradients come from `convolution_backward`, which is differentiable
    again."""

    @staticmethod
    def forward(ctx, input, weight, bias, transpose, stride, padding, output_padding, dilation, groups):
        stride, padding, output_padding, dilation = map(_pair, (stride, padding, output_padding, dilation))
        ctx.save_for_backward(input, weight)
        ctx.geometry = (stride, padding, dilation, transpose, output_padding, groups)
        if transpose:
            return torch.nn.functional.conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups,
                                                        dilation)
        return torch.nn.functional.conv2d(input, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = torch.ops.aten.convolution_backward(grad_output, input, weight, None, *ctx.geometry,
                                                             [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_weight = torch.ops.aten.convolution_backward(grad_output.double(), input.double(), weight.double(),
                                                              None, *ctx.geometry, [False, True, False])[1]
            grad_weight = grad_weight.to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_output.sum([0, 2, 3])
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


def _pair(v: _IntOrPair) -> tuple:
    v = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    assert len(v) == 2 and all(isinstance(i, int) for i in v)
    return v


_op_cache: dict = {}


def _conv_op(transpose, weight_shape, stride, padding, output_padding, dilation, groups):
    """Autograd function for one convolution configuration (cached per configuration).

    The input gradient of a convolution is the transposed convolution with the same weight (and
    vice versa), so both directions are expressed through this same factory, which makes every
    derivative order available. The weight gradient is a separate function whose own derivatives
    are again convolutions.
    """
    weight_shape = tuple(weight_shape)
    stride, padding, output_padding, dilation = map(_pair, (stride, padding, output_padding, dilation))
    key = (transpose, weight_shape, stride, padding, output_padding, dilation, groups)
    if key in _op_cache:
        return _op_cache[key]
    assert len(weight_shape) == 4 and groups >= 1
    assert all(s >= 1 for s in stride) and all(p >= 0 for p in padding) and all(d >= 1 for d in dilation)
    if transpose:
        assert all(0 <= op < max(s, d) for op, s, d in zip(output_padding, stride, dilation))
    else:
        assert output_padding == (0, 0)
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)

    def adjoint(input_shape, output_shape):
        """The op mapping output-shaped tensors back to `input_shape` (the input gradient op)."""
        if transpose:
            return _conv_op(transpose=False, weight_shape=weight_shape, output_padding=0, **geometry)
        # conv_transpose2d needs output_padding to resolve the size ambiguity of strided conv.
        extra = [input_shape[i + 2] - ((output_shape[i + 2] - 1) * stride[i] - 2 * padding[i]
                                       + dilation[i] * (weight_shape[i + 2] - 1) + 1) for i in range(2)]
        return _conv_op(transpose=True, weight_shape=weight_shape, output_padding=extra, **geometry)

    class Conv(torch.autograd.Function):
        @staticmethod
        def forward(ctx, input, weight, bias):
            assert tuple(weight.shape) == weight_shape
            # Keep only what the backward pass can use (frozen weights need no saved input).
            ctx.save_for_backward(input if weight.requires_grad else None, weight if input.requires_grad else None)
            ctx.input_shape = input.shape
            if transpose:
                return torch.nn.functional.conv_transpose2d(input, weight, bias, output_padding=output_padding,
                                                            **geometry)
            return torch.nn.functional.conv2d(input, weight, bias, **geometry)

        @staticmethod
        def backward(ctx, grad_output):
            input, weight = ctx.saved_tensors
            grad_input = grad_weight = grad_bias = None
            if ctx.needs_input_grad[0]:
                grad_input = adjoint(ctx.input_shape, grad_output.shape).apply(grad_output, weight, None)
                assert grad_input.shape == ctx.input_shape
            if ctx.needs_input_grad[1] and not weight_gradients_disabled:
                grad_weight = ConvGradWeight.apply(grad_output, input)
            if ctx.needs_input_grad[2]:
                grad_bias = grad_output.sum([0, 2, 3])
            return grad_input, grad_weight, grad_bias

    class ConvGradWeight(torch.autograd.Function):
        @staticmethod
        def forward(ctx, grad_output, input):
            ctx.save_for_backward(grad_output, input)
            weight = input.new_empty(weight_shape)  # convolution_backward reads only its shape here
            return torch.ops.aten.convolution_backward(
                grad_output, input, weight, None, stride, padding, dilation, transpose, output_padding, groups,
                [False, True, False])[1]

        @staticmethod
        def backward(ctx, grad2_weight):
            # grad_weight is bilinear: <g, GW(go, x)> = <go, conv(x, g)>.
            grad_output, input = ctx.saved_tensors
            grad2_grad_output = grad2_input = None
            if ctx.needs_input_grad[0]:
                grad2_grad_output = Conv.apply(input, grad2_weight, None)
            if ctx.needs_input_grad[1]:
                grad2_input = adjoint(input.shape, grad_output.shape).apply(grad_output, grad2_weight, None)
            return grad2_grad_output, grad2_input

    _op_cache[key] = Conv
    return Conv
