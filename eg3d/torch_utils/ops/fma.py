"""Fused multiply-add `a * b + c` whose gradients are summed back to each input's shape."""

import torch


def fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Return `a * b + c` (broadcasting); one `addcmul` forward, cheap backward."""
    return _FusedMultiplyAdd.apply(a, b, c)


class _FusedMultiplyAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, c):
        ctx.save_for_backward(a, b)
        ctx.c_shape = c.shape
        return torch.addcmul(c, a, b)

    @staticmethod
    def backward(ctx, dout):
        a, b = ctx.saved_tensors
        da = (dout * b).sum_to_size(a.shape) if ctx.needs_input_grad[0] else None
        db = (dout * a).sum_to_size(b.shape) if ctx.needs_input_grad[1] else None
        dc = dout.sum_to_size(ctx.c_shape) if ctx.needs_input_grad[2] else None
        return da, db, dc
