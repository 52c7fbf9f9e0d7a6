"""What a run writes: snapshots, adapter files, training states, image grids, and the best files.

At every snapshot (rank 0 writes; all processes call, for the consistency check):

    network-snapshot-<tag>.pkl      G (base + adapters), loadable by official EG3D code
    adapter-<tag>.safetensors       (K identities: adapters/<name>-<tag>.safetensors)
    training-state-<tag>.pt         counters, optimizer, EMA, allocator, best-so-far: a continued run reads it
    grid-<tag>.png

At every validation, the keys (the run, each identity) whose held-out score improved get their best
files rewritten (network-snapshot-best.pkl, adapter(s)-best) and best.json.
"""

import copy
import os
from typing import List, Optional, Tuple

import numpy as np
import PIL.Image
import torch

import dnnlib
import legacy
from torch_utils import misc
from training import adapters
from training import recipe as recipes
from training import validation
from training.loss import PersonalizationLoss
from training.options import TrainingOptions
from training.run_data import RunData
from training.run_log import RunLog
from training.starting_point import StartingPoint
from training.trainables import Trainables


def kimg_tag(cur_nimg: int) -> str:
    """File-name tag of a point in training: '000500' at whole kimg, '000000.120' at 120 images."""
    return f'{cur_nimg // 1000:06d}' if cur_nimg % 1000 == 0 else f'{cur_nimg // 1000:06d}.{cur_nimg % 1000:03d}'


def training_state_path(snapshot_pkl: str, cur_nimg: int) -> str:
    """The training state written beside a snapshot."""
    return os.path.join(os.path.dirname(os.path.abspath(snapshot_pkl)), f'training-state-{kimg_tag(cur_nimg)}.pt')


def grid_indices(identity: np.ndarray, count: int) -> np.ndarray:
    """`count` dataset indices for the image grids: the first image of every identity, then the second, ..."""
    rank = np.zeros(len(identity), dtype=np.int64)  # position of each image within its identity
    for k in np.unique(identity):
        members = np.flatnonzero(identity == k)
        rank[members] = np.arange(len(members))
    return np.lexsort((identity, rank))[:count]


@torch.no_grad()
def save_image_grid(G: torch.nn.Module, images: torch.Tensor, cameras: torch.Tensor, latents: torch.Tensor,
                    neural_rendering_resolution: int, path: str, seed: int, identity: Optional[np.ndarray] = None) -> None:
    """PNG grid, one row per sample: real | render | raw (upsampled) | depth (normalised per image).

    `identity`: the adapter of each row, for a generator with adapters (default: adapter 0).
    """
    was_training = G.training
    G.eval()
    rows = []
    with torch.random.fork_rng(devices=[images.device] if images.device.type == 'cuda' else []):
        torch.manual_seed(seed)
        for i in range(images.shape[0]):
            if adapters.is_injected(G):
                adapters.select(G, int(identity[i]) if identity is not None else 0)
            out = G.synthesis(latents[i:i + 1], cameras[i:i + 1], neural_rendering_resolution=neural_rendering_resolution,
                              noise_mode='const')
            res = images.shape[-1]
            up = lambda x: torch.nn.functional.interpolate(x, size=(res, res), mode='nearest')
            depth = up(out['image_depth'])
            depth = (depth - depth.min()) / (depth.max() - depth.min()).clamp(min=1e-8) * 2 - 1
            real = images[i:i + 1].to(torch.float32) / 127.5 - 1
            row = torch.cat([real, out['image'], up(out['image_raw']), depth.repeat(1, 3, 1, 1)], dim=3)
            rows.append(row)
    grid = torch.cat(rows, dim=2)[0]
    grid = (grid * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    with dnnlib.util.atomic_write_path(path) as tmp:
        PIL.Image.fromarray(grid, 'RGB').save(tmp, format='PNG')
    G.train(was_training)



def read_training_state(resume_pkl: str, start: StartingPoint, device: torch.device) -> Optional[dict]:
    """The training state written beside the snapshot a continued run starts from (None if it is missing)."""
    state_path = training_state_path(resume_pkl, int(start.progress['cur_nimg']))
    if not os.path.isfile(state_path):
        return None
    return torch.load(state_path, map_location=device, weights_only=True)


def continued_recipe(requested: recipes.Recipe, state: Optional[dict], log: RunLog) -> recipes.Recipe:
    """A continued run keeps the recipe its training state recorded: its schedule and EMA are part of the run,
    and the default recipe may have changed since it was written."""
    if state is None or state.get('recipe') is None:
        return requested
    recorded = recipes.Recipe.from_dict(state['recipe'])
    if recorded != requested:
        log(f'Continuing with the run\'s recipe {recorded.to_dict()}, not the requested {requested.to_dict()}.')
    return recorded


class Snapshots:
    """The run's files, at the point (`cur_nimg` images, `step` steps) the loop has reached."""

    def __init__(self, G: torch.nn.Module, start: StartingPoint, data: RunData, trainables: Trainables,
                 loss_fn: PersonalizationLoss, recipe: recipes.Recipe, options: TrainingOptions,
                 neural_rendering_resolution: int, rank: int, device: torch.device, log: RunLog,
                 step_batch: int):
        self.G, self.start, self.data, self.trainables, self.loss_fn = G, start, data, trainables, loss_fn
        self.step_batch = step_batch  # images per optimizer step (recipe.step_batch)
        self.recipe, self.options, self.rank, self.device, self.log = recipe, options, rank, device, log
        self.neural_rendering_resolution = neural_rendering_resolution
        self.run_dir = options.run_dir
        # Best-so-far validation state (per identity, and the run's mean).
        self.best_files = validation.best_file_names(data.identity_names, data.training_set.multi,
                                                     trainables.config is not None)
        self.keeper = validation.BestKeeper(list(self.best_files)) if data.val_set is not None else None
        grid_idx = torch.from_numpy(grid_indices(data.training_set.identity,
                                                 min(options.grid_rows, len(data.training_set))))
        self.grid_count = len(grid_idx)
        self.grid_args = (data.images[grid_idx].to(device), data.cameras[grid_idx].to(device),
                          data.latents[grid_idx].to(device))
        self.grid_kwargs = dict(seed=start.random_seed, identity=data.training_set.identity[grid_idx.numpy()])

    def restore_training_state(self, state: Optional[dict]) -> Tuple[int, int]:
        """Optimizer, EMA, rank allocator and best-so-far state (and its files) of the run we continue, from its
        training state (`read_training_state`; None: it was missing); returns its counters (cur_nimg, step)."""
        progress = self.start.progress
        cur_nimg, step = int(progress['cur_nimg']), int(progress['step'])
        state_path = training_state_path(self.options.resume_pkl, cur_nimg)
        if state is None:
            self.log(f'Warning: {state_path} not found; the optimizer starts afresh (the run will not match an '
                     f'uninterrupted one).')
            return cur_nimg, step
        try:
            self.trainables.optimizer.load_state_dict(state['optimizer'])
        except ValueError as err:  # LoRA+ recipes have two parameter groups, the others one
            raise ValueError(f'{state_path}: the run used the recipe {state.get("recipe", {}).get("name", "my3dgen")!r}, '
                             f'whose optimizer state does not fit --recipe={self.recipe.name} ({err}); resume with the '
                             f'run\'s --recipe') from err
        if self.trainables.allocator is not None and state.get('allocator') is not None:
            self.trainables.allocator.load_state_dict(state['allocator'])
        if self.trainables.ema is not None and state.get('ema') is not None:
            self.trainables.ema.load_state_dict(state['ema'])
        self.log(f'Restored optimizer state from {state_path}')
        if self.keeper is not None and state.get('validation') is not None:
            self.keeper.load_state_dict(state['validation'])
            if self.rank == 0:
                copied = validation.copy_best_files(os.path.dirname(os.path.abspath(self.options.resume_pkl)),
                                                    self.run_dir, self.keeper, self.best_files)
                best = self.keeper.best[validation.RUN]
                self.log(f'Restored the best-so-far validation state ({best["loss"]:.6g} at {best["kimg"]:g} kimg) '
                         f'and its files: {", ".join(copied) or "none"}')
        return cur_nimg, step

    def save_start_grid(self, cur_nimg: int) -> None:
        if self.rank == 0 and self.grid_count > 0:
            self._save_grid(f'grid-{kimg_tag(cur_nimg)}-start.png')

    def validate(self, cur_nimg: int, step: int) -> Optional[dict]:
        """Score the held-out views (rank 0; every process gets the scores) and keep the best files."""
        if self.data.val_set is None:
            return None
        o = self.options
        with self.trainables.averaged():
            scores = [validation.score_views(self.G, self.data.val_set, self.loss_fn,
                                             self.neural_rendering_resolution, self.start.random_seed, self.device,
                                             batch=o.batch_gpu)
                      if self.rank == 0 else None]
            if o.num_gpus > 1:
                torch.distributed.broadcast_object_list(scores, src=0)
            self._save_best(self.keeper.update(scores[0], cur_nimg, step), cur_nimg, step)
        return scores[0]

    def save_snapshot(self, cur_nimg: int, step: int) -> None:
        tag = kimg_tag(cur_nimg)
        num_gpus = self.options.num_gpus
        if num_gpus > 1:
            misc.check_ddp_consistency(self.G, ignore_regex=r'.*\.[^.]+_(avg|ema)')
        if self.rank != 0:
            return
        with self.trainables.averaged():
            self._save_network(tag, cur_nimg, step)
            self._save_adapters(tag, self.data.identity_names)
        allocator, ema = self.trainables.allocator, self.trainables.ema
        state = dict(cur_nimg=cur_nimg, step=step, random_seed=self.start.random_seed,
                     optimizer=self.trainables.optimizer.state_dict(), recipe=self.recipe.to_dict(),
                     ema=ema.state_dict() if ema is not None else None,
                     allocator=allocator.state_dict() if allocator is not None else None,
                     validation=self.keeper.state_dict() if self.keeper is not None else None)
        with dnnlib.util.atomic_write_path(os.path.join(self.run_dir, f'training-state-{tag}.pt')) as tmp:
            torch.save(state, tmp)
        if self.grid_count > 0:
            self._save_grid(f'grid-{tag}.png')
        self.log(f'Saved network-snapshot-{tag}.pkl' +
                 (f' (weights identical on all {num_gpus} processes)' if num_gpus > 1 else ''))

    def _save_grid(self, name: str) -> None:
        save_image_grid(self.G, *self.grid_args, self.neural_rendering_resolution, os.path.join(self.run_dir, name),
                        **self.grid_kwargs)

    def _save_network(self, tag: str, cur_nimg: int, step: int) -> None:
        snapshot_G = copy.deepcopy(self.G).eval().requires_grad_(False).cpu()
        config = self.trainables.config
        snapshot = dict(G=snapshot_G, G_ema=snapshot_G, D=self.start.D, training_set_kwargs=dict(self.data.record),
                        adapter_config=config.to_dict() if config is not None else None,
                        personalization=dict(cur_nimg=cur_nimg, step=step, random_seed=self.start.random_seed,
                                             batch_size=self.options.batch_size, step_batch=self.step_batch,
                                             freeze_render=self.start.freeze_render,
                                             identities=list(self.data.identity_names)))
        legacy.save_network_pkl(snapshot, os.path.join(self.run_dir, f'network-snapshot-{tag}.pkl'))

    def _save_adapters(self, tag: str, names: List[str]) -> None:
        """adapter-<tag>.safetensors, or adapters/<name>-<tag>.safetensors for the identities `names`."""
        if self.trainables.config is None:
            return
        if not self.data.training_set.multi:
            adapters.save(self.G, os.path.join(self.run_dir, f'adapter-{tag}.safetensors'))
            return
        os.makedirs(os.path.join(self.run_dir, 'adapters'), exist_ok=True)
        for k, name in enumerate(self.data.identity_names):
            if name in names:
                adapters.save(self.G, os.path.join(self.run_dir, 'adapters', f'{name}-{tag}.safetensors'), index=k)

    def _save_best(self, improved: List[str], cur_nimg: int, step: int) -> None:
        """Rewrite the best files of the keys whose validation score improved (rank 0), and best.json."""
        if self.rank != 0:
            return
        if validation.RUN in improved:
            self._save_network('best', cur_nimg, step)
            if not self.data.training_set.multi:
                self._save_adapters('best', self.data.identity_names)
        if self.data.training_set.multi:
            self._save_adapters('best', [name for name in improved if name != validation.RUN])
        validation.write_best_record(self.run_dir, self.keeper, self.best_files)
