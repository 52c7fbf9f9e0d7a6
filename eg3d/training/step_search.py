"""How far to go along the optimizer's step: a quadratic fit of the batch loss along the step.

Adam's step has about the same size in every coordinate, whatever the loss's curvature, so a fixed rate
is too timid where the loss is flat and overshoots where it is steep (the recipe rounds in
docs/benchmarks.md). With the step d the optimizer just took from p, the batch loss along the line is
fitted by a parabola through three facts already at hand or cheap:

    L(p)            the step's loss (from its forward pass)
    g . d           its slope at p (g: the step's gradient)
    L(p + d)        one forward pass on the same batch, with the same noise

and the parameters move to p + t d, t at the parabola's minimum, within [0, max_factor]. The cost is one
forward pass per step, without a backward pass. With K identities in one run each adapter's step gets its
own parabola from its own samples' losses (rescale_step_per_slot), as in its single-identity run.
"""

from typing import Callable, List

import torch


def quadratic_minimum(loss_at_start: float, slope: float, loss_at_step: float, max_factor: float) -> float:
    """The t in [0, max_factor] that minimises the parabola through L(0) = loss_at_start, L'(0) = slope and
    L(1) = loss_at_step."""
    curvature = loss_at_step - loss_at_start - slope  # L(t) = L(0) + slope t + curvature t^2
    if curvature > 0:
        return min(max(-slope / (2 * curvature), 0.0), max_factor)
    # Not convex along the line: the fit has no minimum; go to the end that is lower.
    return max_factor if loss_at_step < loss_at_start and slope < 0 else 0.0


@torch.no_grad()
def rescale_step(params: List[torch.nn.Parameter], before: List[torch.Tensor], grads: List[torch.Tensor],
                 loss_at_start: float, loss_after: Callable[[], float], max_factor: float) -> float:
    """Move `params` (the optimizer has stepped them from `before`, with gradients `grads`) to the
    parabola's minimum along that step; returns the factor applied to the step."""
    steps = [p - b for p, b in zip(params, before)]
    slope = float(sum((g.to(torch.float64) * d).sum() for g, d in zip(grads, steps)))
    factor = quadratic_minimum(loss_at_start, slope, loss_after(), max_factor)
    for p, b, d in zip(params, before, steps):
        p.copy_(b + factor * d)
    return factor


@torch.no_grad()
def rescale_step_per_slot(params: List[torch.nn.Parameter], before: List[torch.Tensor], grads: List[torch.Tensor],
                          losses_at_start: torch.Tensor, losses_after: Callable[[], torch.Tensor],
                          max_factor: float) -> torch.Tensor:
    """`rescale_step` for K independent adapters in one run: every tensor has K slots along its first dimension,
    and slot k's loss depends on slot k only, so each slot's step gets its own parabola (losses_at_start and
    losses_after(): [K], the loss of each slot's samples); returns the K factors."""
    steps = [p - b for p, b in zip(params, before)]
    slopes = sum((g.to(torch.float64) * d).flatten(1).sum(1) for g, d in zip(grads, steps))
    after = losses_after()
    factors = torch.tensor([quadratic_minimum(float(l0), float(s), float(l1), max_factor)
                            for l0, s, l1 in zip(losses_at_start, slopes, after)], dtype=torch.float64)
    for p, b, d in zip(params, before, steps):
        shape = [-1] + [1] * (p.ndim - 1)
        p.copy_(b + factors.to(device=p.device, dtype=p.dtype).reshape(shape) * d)
    return factors
