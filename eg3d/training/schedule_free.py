"""Schedule-free Adam (Defazio et al. 2024, "The Road Less Scheduled", Algorithm 1, without weight decay).

Three sequences per tensor: z, Adam's fast iterate; x, a weighted average of the z's (the result);
and y = (1 - beta1) z + beta1 x, where the gradient is taken. The parameter holds y during training:

    g_t = grad f(y_t)
    v_t = beta2 v_{t-1} + (1 - beta2) g_t^2
    gamma_t = lr_t sqrt(1 - beta2^t)                  # lr_t: the group's rate (a warm-up sets it)
    z_{t+1} = z_t - gamma_t g_t / (sqrt(v_t) + eps)
    c_{t+1} = gamma_t^2 / sum_{i<=t} gamma_i^2        # the average weighs each z by its rate squared
    x_{t+1} = (1 - c_{t+1}) x_t + c_{t+1} z_{t+1}
    y_{t+1} = (1 - beta1) z_{t+1} + beta1 x_{t+1}

There is no decay schedule: x is meant to be good at any step. Validation and files read x
(`averaged()`); the state dict holds z, x and v, and loading it puts y back into the parameters,
so a resumed run continues exactly.
"""

import contextlib
from typing import Iterable, Iterator, Tuple

import torch


class ScheduleFreeAdam(torch.optim.Optimizer):
    """Schedule-free Adam over `params`; the parameters hold y (where gradients are taken) between steps."""

    def __init__(self, params: Iterable, lr: float, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_sum=0.0))

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        """One step of every group from the gradients at y (the parameters), which then hold the next y."""
        if closure is not None:
            raise ValueError('ScheduleFreeAdam.step takes no closure')
        for group in self.param_groups:
            beta1, beta2 = group['betas']
            params = [p for p in group['params'] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if not self.state[p]:  # z and x start at the parameter
                    self.state[p].update(step=0, z=p.detach().clone(), x=p.detach().clone(),
                                         exp_avg_sq=torch.zeros_like(p))
            t = self.state[params[0]]['step'] + 1
            gamma = group['lr'] * (1 - beta2 ** t) ** 0.5
            group['weight_sum'] += gamma ** 2
            c = gamma ** 2 / group['weight_sum'] if group['weight_sum'] > 0 else 0.0
            for p in params:
                state = self.state[p]
                state['step'] = t
                v, z, x = state['exp_avg_sq'], state['z'], state['x']
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                z.addcdiv_(p.grad, v.sqrt().add_(group['eps']), value=-gamma)
                x.lerp_(z, c)
                p.copy_(torch.lerp(z, x, beta1))

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore z, x and v, and put y back into the parameters (a snapshot's weights hold x)."""
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for group in self.param_groups:
                for p in group['params']:
                    state = self.state[p]
                    if state:
                        p.copy_(torch.lerp(state['z'], state['x'], group['betas'][0]))

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """Inside, the parameters hold the average x (what validation scores and files keep); y comes back on
        exit, also on errors. Before the first step x is the starting point, which the parameters hold."""
        saved = []
        with torch.no_grad():
            for group in self.param_groups:
                for p in group['params']:
                    if self.state[p]:
                        saved.append((p, p.detach().clone()))
                        p.copy_(self.state[p]['x'])
        try:
            yield
        finally:
            with torch.no_grad():
                for p, y in saved:
                    p.copy_(y)
