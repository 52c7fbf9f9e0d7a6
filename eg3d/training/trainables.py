"""What a run trains: adapters injected into the frozen base (or the whole generator), their optimizer
from the recipe, its EMA of the trained tensors (when the recipe keeps one), and AdaLoRA's rank
allocator.

Every process builds the same: rank 0's weights are broadcast, and the processes must agree on which
parameters train.
"""

import contextlib
import dataclasses
from typing import List, Optional

import torch

from torch_utils import misc
from training import adapter_ema
from training import adapters
from training import recipe as recipes
from training.adapters.inject import adapter_layers
from training.run_log import RunLog
from training.schedule_free import ScheduleFreeAdam


@dataclasses.dataclass
class Trainables:
    config: Optional[adapters.AdapterConfig]  # None = full fine-tuning
    params: List[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    allocator: Optional[adapters.RankAllocator]  # AdaLoRA only
    ema: Optional[adapter_ema.AdapterEMA]  # with an EMA, validation and every file see the average

    def averaged(self) -> contextlib.AbstractContextManager:
        """Inside, the trained tensors hold what validation scores and files keep: the EMA, or schedule-free
        Adam's average x, or (neither) the weights themselves."""
        if isinstance(self.optimizer, ScheduleFreeAdam):
            return self.optimizer.averaged()
        return adapter_ema.applied(self.ema)


def set_full_finetuning(G: torch.nn.Module, freeze_render: bool) -> list:
    """Full fine-tuning (no adapters): synthesis, superresolution and (unless frozen) decoder train.

    The mapping network never runs (latents are given), so it stays frozen.
    """
    G.requires_grad_(False)
    prefixes = ('backbone.synthesis.', 'superresolution.') + (() if freeze_render else ('decoder.',))
    params = []
    for name, param in G.named_parameters():
        if name.startswith(prefixes):
            param.requires_grad_(True)
            params.append(param)
    return params


def _adapter_parameters(G: torch.nn.Module, config: adapters.AdapterConfig, num_identities: int,
                        resume_pkl: str, data_path: str) -> list:
    """Inject one adapter per identity, or (a reloaded snapshot) freeze the base and train its adapters again."""
    if not adapters.is_injected(G):
        adapters.inject(G, config, num_adapters=num_identities)
    else:
        if adapters.num_adapters(G) != num_identities:
            raise ValueError(f'{resume_pkl} holds {adapters.num_adapters(G)} adapter(s), but {data_path} '
                             f'holds {num_identities} identities')
        G.requires_grad_(False)
        for _, layer in adapter_layers(G):
            for param in layer.adapter_parameters():
                param.requires_grad_(True)
    return adapters.trainable_parameters(G)


def _check_processes_agree(G: torch.nn.Module, num_gpus: int) -> None:
    """Every process holds rank 0's generator and trains the same parameters."""
    for tensor in misc.params_and_buffers(G):
        torch.distributed.broadcast(tensor.data, src=0)
    names = [name for name, p in G.named_parameters() if p.requires_grad]
    gathered = [None] * num_gpus
    torch.distributed.all_gather_object(gathered, names)
    if any(g != names for g in gathered):
        raise RuntimeError('processes disagree on which parameters are trainable')


def build_trainables(G: torch.nn.Module, adapter_config: Optional[dict], freeze_render: bool, num_identities: int,
                     recipe: recipes.Recipe, resume_pkl: str, data_path: str, device: torch.device, num_gpus: int,
                     log: RunLog) -> Trainables:
    """Make G trainable as asked (moved to `device`, in training mode); the optimizer and allocator over it."""
    if adapter_config is not None:
        config = adapters.AdapterConfig.from_dict(adapter_config)
        params = _adapter_parameters(G, config, num_identities, resume_pkl, data_path)
        log(adapters.format_parameter_table(G))
    else:
        config = None
        params = set_full_finetuning(G, freeze_render)
        log(f'Full fine-tuning: {sum(p.numel() for p in params):,} trainable parameters.')
    G.to(device).train()
    if num_gpus > 1:
        _check_processes_agree(G, num_gpus)
    if recipe.optimizer == 'schedulefree' and config is not None and config.adalora:
        raise ValueError(f'recipe {recipe.name!r}: optimizer=schedulefree cannot train AdaLoRA (its masks would '
                         f'change the gradient point, not the average); use an Adam recipe')
    optimizer = recipes.make_optimizer(G, params, recipe)
    log(f'Recipe {recipe.name}: {recipe.to_dict()}')
    allocator = adapters.RankAllocator(G, config) if (config is not None and config.adalora) else None
    ema = adapter_ema.make_ema(params, recipe)
    return Trainables(config=config, params=params, optimizer=optimizer, allocator=allocator, ema=ema)
