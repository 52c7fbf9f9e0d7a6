"""AdaLoRA: orthogonal regularisation of the singular vectors and the rank allocator.

Same semantics as PEFT's AdaLoRA (`peft.tuners.adalora`): every adapter is a set of triplets
(P row, Lambda value, Q column) = (lora_A[i], lora_E[i], lora_B[:, i]). After each optimizer step
the allocator smooths the sensitivity |p * grad| of every adapter entry (EMA beta1) and its
uncertainty (EMA beta2), scores each triplet as score(Lambda_i) + mean score(P_i) + mean score(Q_i)
(score = smoothed sensitivity * uncertainty), and zeroes the Lambda of the lowest-scoring triplets
across all adapted layers so that `budget` triplets survive. The budget follows a cubic schedule
from the initial total rank to target_r per layer. With K adapters per layer (multi-identity) every
adapter index has its own scores, threshold and rank pattern.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union

import torch

from training.adapters.config import AdapterConfig
from training.adapters.inject import adapter_layers, base_name, get_config
from training.adapters.layers import AdapterLayer

_FACTORS = ('lora_A', 'lora_E', 'lora_B')


def orthogonal_regularization(G: torch.nn.Module) -> torch.Tensor:
    """Mean over AdaLoRA adapters of ||P P^T - I||_F and ||Q^T Q - I||_F (unweighted; PEFT's definition).

    P = lora_A [R, fan_in] and Q = lora_B [fan_out, R] of every layer and adapter index. The caller
    multiplies the result by `config.orth_reg_weight`.
    """
    total = None
    count = 0
    for _, layer in adapter_layers(G):
        if not layer.adalora or layer.rank == 0:
            continue
        A, B = layer.lora_A, layer.lora_B
        eye = torch.eye(layer.rank, device=A.device, dtype=A.dtype)
        reg = torch.linalg.matrix_norm(A @ A.transpose(1, 2) - eye, ord='fro').sum() \
            + torch.linalg.matrix_norm(B.transpose(1, 2) @ B - eye, ord='fro').sum()
        total = reg if total is None else total + reg
        count += 2 * layer.num_adapters
    if total is None:
        device = next(G.parameters()).device
        return torch.zeros([], device=device)
    return total / count


class RankAllocator:
    """AdaLoRA budget schedule and triplet masking; call `update_and_mask(G, step)` after each optimizer step."""

    def __init__(self, G: torch.nn.Module, config: Optional[AdapterConfig] = None):
        cfg = config if config is not None else get_config(G)
        if not cfg.adalora:
            raise ValueError('RankAllocator needs an AdaLoRA config (AdapterConfig(adalora=True, ...))')
        if cfg.total_step is None or cfg.total_step <= 0:
            raise ValueError('AdaLoRA needs AdapterConfig.total_step (the number of training steps) for its budget schedule')
        if cfg.tinit >= cfg.total_step - cfg.tfinal:
            raise ValueError(f'AdaLoRA schedule leaves no pruning phase: tinit ({cfg.tinit}) must be < '
                             f'total_step - tfinal ({cfg.total_step} - {cfg.tfinal})')
        self.config = cfg
        layers = self._layers(G)
        if not layers:
            raise ValueError('RankAllocator: the generator has no AdaLoRA adapters (inject with adalora=True first)')
        self.num_adapters = layers[0][1].num_adapters
        self.init_bgt = sum(layer.rank for _, layer in layers)
        # target_r per layer, counted in rank units (a 'my3dgen' k x k conv starts with init_r * k triplets).
        self.target_bgt = cfg.target_r * sum(layer.rank_unit for _, layer in layers)
        self.reset_ipt()

    @staticmethod
    def _layers(G: torch.nn.Module) -> List[Tuple[str, AdapterLayer]]:
        return [(base_name(name), layer) for name, layer in adapter_layers(G) if layer.adalora]

    def reset_ipt(self) -> None:
        self.ipt: Dict[str, torch.Tensor] = {}
        self.exp_avg_ipt: Dict[str, torch.Tensor] = {}
        self.exp_avg_unc: Dict[str, torch.Tensor] = {}

    def budget_schedule(self, step: int) -> Tuple[int, bool]:
        """(budget, whether to mask at this step): init budget until tinit, cubic decrease, target after."""
        cfg = self.config
        if step <= cfg.tinit:
            return self.init_bgt, False
        if step > cfg.total_step - cfg.tfinal:
            return self.target_bgt, True
        progress = 1 - (step - cfg.tinit) / (cfg.total_step - cfg.tfinal - cfg.tinit)
        budget = int((self.init_bgt - self.target_bgt) * (progress ** 3) + self.target_bgt)
        return budget, step % cfg.delta_t == 0

    @torch.no_grad()
    def update_ipt(self, G: torch.nn.Module) -> None:
        """Update the smoothed sensitivity and uncertainty of every adapter entry from the current grads."""
        b1, b2 = self.config.beta1, self.config.beta2
        for name, layer in self._layers(G):
            for factor in _FACTORS:
                p = layer._parameters[factor]
                key = f'{name}.{factor}'
                if key not in self.ipt:
                    self.ipt[key] = torch.zeros_like(p)
                    self.exp_avg_ipt[key] = torch.zeros_like(p)
                    self.exp_avg_unc[key] = torch.zeros_like(p)
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                self.ipt[key] = (p * grad).abs().detach()
                self.exp_avg_ipt[key] = b1 * self.exp_avg_ipt[key] + (1 - b1) * self.ipt[key]
                self.exp_avg_unc[key] = b2 * self.exp_avg_unc[key] + (1 - b2) * (self.ipt[key] - self.exp_avg_ipt[key]).abs()

    def _score(self, key: str) -> torch.Tensor:
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    def _triplet_scores(self, G: torch.nn.Module) -> List[Tuple[AdapterLayer, torch.Tensor]]:
        """Per layer: scores [K, R] of its triplets (zeros before the first update_ipt)."""
        out = []
        for name, layer in self._layers(G):
            if f'{name}.lora_A' not in self.exp_avg_ipt:
                out.append((layer, torch.zeros(layer.lora_E.shape[:2], device=layer.lora_E.device)))
                continue
            score_a = torch.mean(self._score(f'{name}.lora_A'), dim=2)           # [K, R]
            score_b = torch.mean(self._score(f'{name}.lora_B'), dim=1)           # [K, R]
            score_e = self._score(f'{name}.lora_E').reshape(score_a.shape)       # [K, R]
            out.append((layer, score_e + torch.stack([score_a, score_b], dim=2).sum(dim=2)))
        return out

    @torch.no_grad()
    def mask_to_budget(self, G: torch.nn.Module, budget: int) -> List[float]:
        """Zero the Lambda of all but the `budget` best triplets of each adapter index; return the thresholds."""
        scores = self._triplet_scores(G)
        thresholds = []
        for k in range(self.num_adapters):
            n_pruned = self.init_bgt - budget
            if n_pruned > 0:
                all_scores = torch.cat([s[k].reshape(-1) for _, s in scores])
                threshold = torch.kthvalue(all_scores, k=n_pruned)[0].item()
            else:
                threshold = float('-inf')
            for layer, s in scores:
                pruned = s[k] <= threshold
                layer.lora_E[k].masked_fill_(pruned.unsqueeze(-1), 0.0)
                layer.rank_mask[k].copy_((~pruned).to(layer.rank_mask.dtype))
            thresholds.append(threshold)
        return thresholds

    @torch.no_grad()
    def mask_using_rank_pattern(self, G: torch.nn.Module) -> None:
        """Re-apply the stored rank pattern (final phase: pruned triplets stay at zero)."""
        for _, layer in self._layers(G):
            layer.lora_E.masked_fill_((layer.rank_mask <= 0).unsqueeze(-1), 0.0)

    def update_and_mask(self, G: torch.nn.Module, global_step: int) -> Tuple[int, Union[float, List[float], None]]:
        """Call after each optimizer.step() (grads still present). Returns (budget, mask threshold).

        The threshold is None at steps that do not re-allocate; with several adapters per layer it is
        a list (one per adapter index). Phases as PEFT's AdaLoraModel.update_and_allocate: before
        total_step - tfinal update the scores and mask every delta_t steps; at total_step - tfinal fix
        the final pattern (budget = target) and drop the scores; after it keep re-applying the pattern.
        """
        cfg = self.config
        final_step = cfg.total_step - cfg.tfinal
        thresholds = None
        if global_step < final_step:
            self.update_ipt(G)
            budget, mask_now = self.budget_schedule(global_step)
            if mask_now:
                thresholds = self.mask_to_budget(G, budget)
        elif global_step == final_step:
            budget, _ = self.budget_schedule(global_step)
            thresholds = self.mask_to_budget(G, budget)
            self.reset_ipt()
        else:
            budget = self.target_bgt
            self.mask_using_rank_pattern(G)
        if thresholds is not None and self.num_adapters == 1:
            return budget, thresholds[0]
        return budget, thresholds

    def rank_pattern(self, G: torch.nn.Module, index: int = 0) -> Dict[str, List[bool]]:
        """{`<module>.lora_E`: kept flags} of adapter `index` (PEFT's rank_pattern layout)."""
        return {f'{name}.lora_E': [bool(v > 0) for v in layer.rank_mask[index].tolist()]
                for name, layer in self._layers(G)}

    def state_dict(self) -> dict:
        """Scores, for resuming training."""
        return {'ipt': dict(self.ipt), 'exp_avg_ipt': dict(self.exp_avg_ipt), 'exp_avg_unc': dict(self.exp_avg_unc)}

    def load_state_dict(self, state: dict) -> None:
        self.ipt = dict(state['ipt'])
        self.exp_avg_ipt = dict(state['exp_avg_ipt'])
        self.exp_avg_unc = dict(state['exp_avg_unc'])
