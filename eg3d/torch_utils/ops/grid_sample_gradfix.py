"""`grid_sample` (2-D, bilinear, zero padding, align_corners=False) with double backward w.r.t. `input`.

PyTorch's own grid_sample backward is not differentiable. With `enabled = True` the op below
makes the input gradient differentiable again (needed when a regulariser differentiates through
image gradients); the grid gradient stays first-order only.
"""

import torch

enabled = False  # Use the custom op. Off: the personalization loop takes no second-order gradients.

_BILINEAR, _ZEROS, _ALIGN_CORNERS = 0, 0, False


def grid_sample(input: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    if enabled:
        return _GridSample2dForward.apply(input, grid)
    return torch.nn.functional.grid_sample(input=input, grid=grid, mode='bilinear', padding_mode='zeros',
                                           align_corners=False)


class _GridSample2dForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, grid):
        assert input.ndim == 4 and grid.ndim == 4
        ctx.save_for_backward(input, grid)
        return torch.nn.functional.grid_sample(input=input, grid=grid, mode='bilinear', padding_mode='zeros',
                                               align_corners=False)

    @staticmethod
    def backward(ctx, grad_output):
        input, grid = ctx.saved_tensors
        return _GridSample2dBackward.apply(grad_output, input, grid, ctx.needs_input_grad[0], ctx.needs_input_grad[1])


class _GridSample2dBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad_output, input, grid, need_input, need_grid):
        ctx.save_for_backward(grid)
        grad_input, grad_grid = torch.ops.aten.grid_sampler_2d_backward(
            grad_output, input, grid, _BILINEAR, _ZEROS, _ALIGN_CORNERS, [need_input, need_grid])
        return grad_input, grad_grid

    @staticmethod
    def backward(ctx, grad2_grad_input, grad2_grad_grid):
        # grad_input is linear in grad_output: its derivative is the forward sampling with the same grid.
        grid, = ctx.saved_tensors
        grad2_grad_output = None
        if ctx.needs_input_grad[0] and grad2_grad_input is not None:
            grad2_grad_output = _GridSample2dForward.apply(grad2_grad_input, grid)
        assert not ctx.needs_input_grad[2], 'grid_sample_gradfix: second derivatives w.r.t. grid are not supported'
        return grad2_grad_output, None, None, None, None
