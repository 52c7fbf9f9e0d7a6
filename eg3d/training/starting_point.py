"""Where a run starts: a pretrained generator (official EG3D or ours), or a snapshot of our run to continue.

A pretrained generator is rebuilt only when an option changes its constructor arguments (rendering
options of --cfg, fp16 resolutions). A snapshot of a personalization run keeps its generator, adapter
settings, seed and --freeze_render, so that the continued run is the uninterrupted one.
"""

import copy
import dataclasses
from typing import Optional

import torch

import legacy
from torch_utils import misc
from training import configs
from training.options import TrainingOptions
from training.run_log import RunLog


@dataclasses.dataclass
class StartingPoint:
    G: torch.nn.Module
    D: Optional[torch.nn.Module]              # recorded in our snapshots as the pickle had it
    progress: Optional[dict]                  # the snapshot's 'personalization' record; None = a fresh run
    adapter_config: Optional[dict]            # the snapshot's when continuing, else the options'
    freeze_render: bool
    random_seed: int                          # the snapshot's when continuing: its batches go on

    @property
    def continuing(self) -> bool:
        return self.progress is not None


def _plain(value):
    """Tuples as lists, so that option values compare equal however they were stored."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def rebuild_generator(G_old: torch.nn.Module, rendering_overrides: dict, g_num_fp16_res: Optional[int] = None,
                      sr_num_fp16_res: Optional[int] = None) -> torch.nn.Module:
    """A fresh generator of the same class with updated rendering/fp16 options and G_old's weights.

    As EG3D does when resuming: construct from the recorded init kwargs (changed as asked),
    then copy every parameter and buffer by name.
    """
    kwargs = copy.deepcopy(dict(G_old.init_kwargs))
    kwargs['rendering_kwargs'] = {**kwargs['rendering_kwargs'], **rendering_overrides}
    if g_num_fp16_res is not None:
        kwargs['num_fp16_res'] = g_num_fp16_res
        kwargs['conv_clamp'] = 256 if g_num_fp16_res > 0 else None
    if sr_num_fp16_res is not None:
        kwargs['sr_num_fp16_res'] = sr_num_fp16_res
    G = type(G_old)(*G_old.init_args, **kwargs)
    names = {name for name, _ in misc.named_params_and_buffers(G)}
    for name, buf in G_old.named_buffers(recurse=False):  # registered after construction
        if name not in names:
            G.register_buffer(name, buf.clone())
    misc.copy_params_and_buffers(G_old, G, require_all=True)
    return G.eval().requires_grad_(False)


def _pretrained_generator(resume_data: dict, options: TrainingOptions, log: RunLog) -> torch.nn.Module:
    # Rebuilt only when an option changes its constructor arguments: the adapter files record the
    # base's fingerprint (init kwargs + weights), and should load onto the unchanged pickle.
    G = resume_data['G_ema'] if resume_data.get('G_ema') is not None else resume_data['G']
    cfg = options.cfg
    overrides = {k: v for k, v in (configs.DATASET_RENDERING[cfg] if cfg != 'resume' else {}).items()
                 if _plain(G.rendering_kwargs.get(k)) != _plain(v)}
    fp16 = dict(num_fp16_res=options.g_num_fp16_res, sr_num_fp16_res=options.sr_num_fp16_res)
    if overrides or any(v is not None and G.init_kwargs.get(k) != v for k, v in fp16.items()):
        log(f'Rebuilding the generator with {dict(overrides, **{k: v for k, v in fp16.items() if v is not None})}')
        G = rebuild_generator(G, overrides, options.g_num_fp16_res, options.sr_num_fp16_res)
    return G.eval().requires_grad_(False)


def load_starting_point(options: TrainingOptions, log: RunLog) -> StartingPoint:
    """Load --resume: continue our own run, or start from a pretrained generator."""
    log(f'Loading "{options.resume_pkl}"...')
    resume_data = legacy.load_network_pkl(options.resume_pkl, allow_unsafe=options.trust_pickle)
    progress = resume_data.get('personalization')
    if not isinstance(progress, dict):
        return StartingPoint(G=_pretrained_generator(resume_data, options, log), D=resume_data.get('D'), progress=None,
                             adapter_config=options.adapter_config, freeze_render=options.freeze_render,
                             random_seed=options.random_seed)

    random_seed = options.random_seed
    if progress.get('random_seed', random_seed) != random_seed:
        log(f'Using the run\'s seed {progress["random_seed"]} (not --seed={random_seed}) to continue its batches.')
        random_seed = int(progress['random_seed'])
    log(f'Continuing a personalization run at {progress["cur_nimg"] / 1000:g} kimg; the snapshot\'s '
        f'generator and adapter settings are kept.')
    return StartingPoint(G=resume_data['G'], D=resume_data.get('D'), progress=progress,
                         adapter_config=resume_data.get('adapter_config'),
                         freeze_render=bool(progress.get('freeze_render', options.freeze_render)),
                         random_seed=random_seed)
