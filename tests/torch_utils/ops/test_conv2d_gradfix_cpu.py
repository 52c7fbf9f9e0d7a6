"""conv2d_gradfix on CPU: grouped float32 convolutions sum their weight gradient in float64."""
import pytest
import torch

from torch_utils.ops import conv2d_gradfix

F = torch.nn.functional
TRANSPOSE_IDS = ['conv2d', 'conv_transpose2d']


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _case(transpose):
    """(gradfix op, torch op, inputs) of a strided, padded convolution in 4 groups of 3 channels, with bias."""
    x, w, b = _randn(2, 12, 9, 9, seed=1), _randn(12, 3, 3, 3, seed=2) * 8, _randn(12, seed=3)
    if transpose:
        kwargs = dict(stride=2, padding=1, output_padding=1, groups=4)
        return (lambda *a: conv2d_gradfix.conv_transpose2d(*a, **kwargs),
                lambda *a: F.conv_transpose2d(*a, **kwargs), (x, w, b))
    kwargs = dict(stride=2, padding=1, groups=4)
    return lambda *a: conv2d_gradfix.conv2d(*a, **kwargs), lambda *a: F.conv2d(*a, **kwargs), (x, w, b)


def _grads(op, inputs, cotangent, dtype=torch.float32):
    inputs = [t.to(dtype).requires_grad_(True) for t in inputs]
    out = op(*inputs)
    return out, torch.autograd.grad((out * cotangent.to(dtype)).sum(), inputs)


@pytest.mark.parametrize('transpose', [False, True], ids=TRANSPOSE_IDS)
def test_grouped_weight_gradient_is_the_float64_gradient_rounded_once(transpose):
    op, torch_op, inputs = _case(transpose)
    cotangent = _randn(*torch_op(*inputs).shape, seed=4)
    out, (gx, gw, gb) = _grads(op, inputs, cotangent)
    torch_out, (torch_gx, torch_gw, torch_gb) = _grads(torch_op, inputs, cotangent)
    _, (_, exact_gw, _) = _grads(torch_op, inputs, cotangent, dtype=torch.float64)

    assert torch.equal(out, torch_out) and torch.equal(gx, torch_gx)  # torch's own float32 output and input gradient
    assert gw.dtype == torch.float32 and torch.equal(gw, exact_gw.float())
    torch.testing.assert_close(gb, torch_gb)
    torch.testing.assert_close(gw, torch_gw, rtol=1e-5, atol=1e-4)  # the same gradient, up to float32 rounding


@pytest.mark.parametrize('transpose', [False, True], ids=TRANSPOSE_IDS)
def test_grouped_weight_gradient_differentiates_again(transpose):
    # An R1-style penalty: the gradient of ||dL/dw||^2 with respect to the input needs the weight gradient's own
    # gradient.
    op, torch_op, inputs = _case(transpose)

    def penalty_grad(conv):
        x, w, b = [t.clone().requires_grad_(True) for t in inputs]
        gw, = torch.autograd.grad(conv(x, w, b).square().sum(), [w], create_graph=True)
        return torch.autograd.grad(gw.square().sum(), [x])[0]

    ours, reference = penalty_grad(op), penalty_grad(torch_op)
    assert ours.abs().max() > 0
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-3 * reference.abs().max().item())


def test_only_grouped_float32_convolutions_with_a_weight_gradient_take_the_float64_path():
    x, w = _randn(2, 4, 6, 6, seed=5), _randn(4, 2, 3, 3, seed=6)

    def takes_float64_path(out):
        return getattr(out.grad_fn, '_forward_cls', None) is conv2d_gradfix._CpuGroupedConv

    assert takes_float64_path(conv2d_gradfix.conv2d(x, w.requires_grad_(True), groups=2))
    assert not takes_float64_path(conv2d_gradfix.conv2d(x.requires_grad_(True), w.detach(), groups=2))
    assert not takes_float64_path(conv2d_gradfix.conv2d(x, _randn(4, 4, 3, 3, seed=7).requires_grad_(True)))
    assert not takes_float64_path(conv2d_gradfix.conv2d(x.double(), w.double().requires_grad_(True), groups=2))
    with torch.no_grad():
        assert conv2d_gradfix.conv2d(x, w.requires_grad_(True), groups=2).grad_fn is None
