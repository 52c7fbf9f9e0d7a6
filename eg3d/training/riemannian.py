"""Riemannian-preconditioned LoRA (Zhang & Pilanci 2024, "Riemannian Preconditioned LoRA for Fine-Tuning
Foundation Models"): Adam on preconditioned gradients of each adapter's factors.

For an adapter delta proportional to B A (A [R, fan_in], B [fan_out, R]), before every Adam step

    grad_A <- (B^T B + reg I)^-1 grad_A         grad_B <- grad_B (A A^T + reg I)^-1

(R x R matrices; scalars at rank 1), the scaled gradient that makes a step on the factors move B A
the same whichever of its many factorisations (B c, A / c) the factors hold. `reg` damps the inverse
while a factor is near zero (B starts at zero).
"""

from typing import Iterable, List, Tuple

import torch

FactorPair = Tuple[torch.nn.Parameter, torch.nn.Parameter]


def _damped_inverse(gram: torch.Tensor, reg: float) -> torch.Tensor:
    """(gram + reg I)^-1 for a stack of R x R matrices."""
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return torch.linalg.inv(gram + reg * eye)


@torch.no_grad()
def precondition_gradients(pairs: List[FactorPair], reg: float) -> None:
    """Replace each pair's gradients, in place, by the preconditioned ones (from the factors before the step).

    A pair is (lora_A [K, R, fan_in], lora_B [K, fan_out, R]) of one layer's K adapters.
    """
    for A, B in pairs:
        a, b = A.detach().float(), B.detach().float()
        if A.grad is not None:
            A.grad.copy_(_damped_inverse(b.transpose(1, 2) @ b, reg) @ A.grad.float())
        if B.grad is not None:
            B.grad.copy_(B.grad.float() @ _damped_inverse(a @ a.transpose(1, 2), reg))


class RiemannianAdam(torch.optim.Adam):
    """torch.optim.Adam whose step first preconditions the gradients of the adapter factors (its state
    dict is Adam's, so a resumed run continues exactly)."""

    def __init__(self, params: Iterable, pairs: List[FactorPair], reg: float, **adam_kwargs) -> None:
        super().__init__(params, **adam_kwargs)
        self.pairs, self.reg = pairs, reg

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        if closure is not None:
            raise ValueError('RiemannianAdam.step takes no closure')
        precondition_gradients(self.pairs, self.reg)
        super().step()
