"""Gradient-aligned adapter initialisation (the idea of LoRA-GA, with B kept at zero and the base frozen).

PEFT's LoRA starts from a random A and B = 0. B's first gradient is then s * G @ A^T (G = dL/dW, the frozen
weight's gradient on the batch), which sees only the part of A's rows along G's dominant input directions,
about 1/sqrt(fan_in) of them: A has to rotate before the adapter can learn fast. Here A's rows start as the
top right singular vectors of G on the run's first batch, at the row norms the random draw gave them, and B
stays 0, so the generator's output at step 0 is the base's.

G is never formed. With delta = s * B @ A, a pass with one factor at zero leaves the output unchanged, so
its gradient is taken at W itself:

    A = V, B = 0  ->  dL/dB = s * G @ V^T        (the next U: G's response to V)
    A = 0, B = U  ->  dL/dA = s * U^T @ G        (the next V: G^T's response to U)

Alternating passes are a block power iteration on every adapted layer (and every identity's adapter) at
once, through whichever path, reference or fast kernels, the layers take. After k passes direction i of G
is weighted by sigma_i^k: the chain starts from the random A when k is even, from a random B when k is odd,
so that it always ends on a pass that gives A.
"""

from typing import Callable, List

import torch

from training.adapters.inject import adapter_layers
from training.adapters.layers import AdapterLayer


def check_supported(G: torch.nn.Module) -> None:
    """The initialisation needs LoRA adapters that have not been trained yet (every B is zero)."""
    layers = [layer for _, layer in adapter_layers(G)]
    if not layers:
        raise ValueError("recipe init='gradient' initialises adapters, but this run trains the whole generator; "
                         "use --lora=R, or a recipe with init='random'")
    if any(layer.adalora for layer in layers):
        raise ValueError("recipe init='gradient' initialises LoRA factors; AdaLoRA's SVD-form adapters (P, Lambda, Q) "
                         "are not supported: use --adalora=False, or a recipe with init='random' (--recipe=my3dgen)")
    trained = [name for name, layer in adapter_layers(G) if bool(layer.lora_B.detach().ne(0).any())]
    if trained:
        raise ValueError(f"recipe init='gradient' starts adapters from B = 0, but {len(trained)} adapted layers "
                         f"(e.g. {trained[0]}) already hold a trained delta; continue that run with its training "
                         f"state, or use a recipe with init='random'")


def _orthonormal_columns(M: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of M's columns ([K, rows, R] -> [K, rows, R], ordered by singular value);
    adapters whose M is zero (no gradient reached them) keep `fallback`."""
    U, _, _ = torch.linalg.svd(M.double(), full_matrices=False)
    reached = M.flatten(1).norm(dim=1).gt(0).reshape(-1, 1, 1)
    return torch.where(reached, U.to(M.dtype), fallback)


def _unit_rows(A: torch.Tensor) -> torch.Tensor:
    return A / A.norm(dim=-1, keepdim=True).clamp(min=1e-30)


@torch.no_grad()
def align_adapters(G: torch.nn.Module, loss_gradients: Callable[[], None], passes: int,
                   generator: torch.Generator) -> None:
    """Set every LoRA A to the top right singular vectors of its weight's loss gradient (B stays 0).

    `loss_gradients()` runs the forward/backward of the same batch (fixed noise) and leaves the gradients in the
    adapter tensors' .grad, summed over processes; it is called `passes` times. `generator` draws the starting B
    when `passes` is odd (every adapter of a layer the same draw, as the random A).
    """
    check_supported(G)
    layers: List[AdapterLayer] = [layer for _, layer in adapter_layers(G)]
    row_norms = [layer.lora_A.norm(dim=-1, keepdim=True) for layer in layers]
    directions = [_unit_rows(layer.lora_A.clone()) for layer in layers]  # V: rows of unit length
    gives_a = passes % 2 == 1  # which factor the next pass's gradient gives
    for layer in layers:
        if gives_a:  # probe with B = U (random), A = 0
            K, O, R = layer.lora_B.shape
            U = torch.randn([1, O, R], generator=generator).to(layer.lora_B)
            layer.lora_B.copy_(_orthonormal_columns(U, U).repeat(K, 1, 1))
            layer.lora_A.zero_()
    for _ in range(passes):
        with torch.enable_grad():
            loss_gradients()
        for i, layer in enumerate(layers):
            if gives_a:  # dL/dA = s * U^T G -> V = its orthonormalised rows
                grad = layer.lora_A.grad.detach()
                V = _orthonormal_columns(grad.transpose(1, 2), directions[i].transpose(1, 2)).transpose(1, 2)
                directions[i] = V
                layer.lora_B.zero_()
                layer.lora_A.copy_(V)
            else:  # dL/dB = s * G V^T -> U = its orthonormalised columns
                grad = layer.lora_B.grad.detach()
                U = _orthonormal_columns(grad, torch.zeros_like(grad))
                layer.lora_A.zero_()
                layer.lora_B.copy_(U)
        gives_a = not gives_a
    for layer, V, norms in zip(layers, directions, row_norms):
        layer.lora_A.copy_(V * norms)
        layer.lora_B.zero_()
    for layer in layers:
        for param in layer.adapter_parameters():
            param.grad = None
