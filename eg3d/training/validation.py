"""Held-out validation of a personalization run: which views, how they are scored, which state is best.

  train_set, views = split_heldout(training_set, val_views)   # or read_validation_folder(--val-data)
  scores = score_views(G, views, loss_fn, ...)                # every tick: per identity and for the run
  improved = keeper.update(scores, cur_nimg, step)            # which best files to rewrite
  keeper.should_stop(patience)                                # --early-stop

Held-out views are chosen per identity, deterministically from the cameras alone: the views whose
yaw sits at the quantiles (j + 0.5) / N of the identity's yaw distribution, so they spread over the
poses without taking the most extreme ones. With --mirror their x-flipped copies leave training too.

The selection score is the reconstruction objective on the held-out views (`mse` + `mse_raw`, plus
`lpips` + `lpips_raw` when LPIPS is on); a run's score is the mean of its identities' scores.
"""

import copy
import dataclasses
import json
import math
import os
import shutil
from typing import Dict, List, Optional

import numpy as np
import torch

import dnnlib
from training import adapters
from training.dataset import DatasetError, IdentitySet, identity_folders
from training.dual_discriminator import filtered_resizing
from training.loss import PersonalizationLoss, identity_embedding, lpips_distance

MAX_DEFAULT_VIEWS = 8
RUN = 'run'  # key of the whole run's score (the mean over identities) in scores and best states


def default_val_views(num_images: int) -> int:
    """One view in eight of an identity, at most 8: 24 selfies -> 3, 50 -> 6, fewer than 8 -> 0 (none)."""
    return min(MAX_DEFAULT_VIEWS, num_images // 8)


def camera_yaw(cameras: np.ndarray) -> np.ndarray:
    """Horizontal angle of each camera's position around the vertical axis (radians, 0 = frontal)."""
    position = np.asarray(cameras, dtype=np.float64)[:, :16].reshape(-1, 4, 4)[:, :3, 3]
    return np.arctan2(position[:, 0], position[:, 2])


def heldout_indices(cameras: np.ndarray, count: int) -> np.ndarray:
    """Indices (sorted) of `count` views spread over the yaw range: the yaw quantiles (j + 0.5) / count."""
    if count <= 0:
        return np.zeros([0], dtype=np.int64)
    order = np.lexsort((np.arange(len(cameras)), camera_yaw(cameras)))  # by yaw, ties by index
    positions = np.floor((np.arange(count) + 0.5) * len(cameras) / count).astype(np.int64)
    return np.sort(order[positions])


@dataclasses.dataclass
class ValidationViews:
    """Held-out views: images uint8 [N, 3, R, R], cameras [N, 25], latents [N, num_ws, w_dim], identity [N]."""

    images: np.ndarray
    cameras: np.ndarray
    latents: np.ndarray
    identity: np.ndarray
    identity_names: List[str]
    names: List[str]
    source: str

    def __len__(self) -> int:
        return len(self.images)


def split_heldout(training_set: IdentitySet, val_views: int):
    """(training part, ValidationViews): `val_views` views of every identity leave the training set.

    The training part is a copy of `training_set` without those views (nor their mirrored copies);
    `training_set` itself is unchanged.
    """
    keep, held = [], []
    for k, (offset, size) in enumerate(zip(training_set.offsets, training_set.sizes)):
        originals = size // 2 if training_set.xflip else size
        if val_views >= originals:
            raise DatasetError(training_set.path, [(training_set.identity_names[k],
                               f'has {originals} images; --val-views={val_views} would leave none for training '
                               '(pass a smaller --val-views, 0, or --val-data=DIR)')])
        chosen = heldout_indices(training_set.cameras[offset:offset + originals], val_views)
        held.extend(offset + chosen)
        local_keep = np.setdiff1d(np.arange(size), np.concatenate([chosen, chosen + originals]) if training_set.xflip
                                  else chosen)
        keep.append(offset + local_keep)
    held = np.asarray(held, dtype=np.int64)
    views = ValidationViews(images=training_set.images[held], cameras=training_set.cameras[held],
                            latents=training_set.latents[held], identity=training_set.identity[held],
                            identity_names=list(training_set.identity_names),
                            names=[training_set.names[i] for i in held], source=f'{training_set.path} (held out)')
    return _subset(training_set, keep), views


def _subset(training_set: IdentitySet, keep_per_identity: List[np.ndarray]) -> IdentitySet:
    keep = np.concatenate(keep_per_identity).astype(np.int64)
    part = copy.copy(training_set)
    part.sizes = [len(k) for k in keep_per_identity]
    part.offsets = np.cumsum([0] + part.sizes[:-1]).astype(np.int64)
    part.names = [training_set.names[i] for i in keep]
    part.images, part.cameras = training_set.images[keep], training_set.cameras[keep]
    part.latents, part.identity = training_set.latents[keep], training_set.identity[keep]
    return part


def read_validation_folder(path: str, identity_names: List[str], resolution: int, num_ws: int,
                           w_dim: int) -> ValidationViews:
    """--val-data: one identity folder, or a folder of identity folders named as the training identities."""
    views = IdentitySet(path, resolution=resolution, num_ws=num_ws, w_dim=w_dim)
    multi = identity_folders(path) is not None
    if (multi or len(identity_names) > 1) and list(views.identity_names) != list(identity_names):
        raise DatasetError(path, [('--val-data', f'holds the identities {views.identity_names}; the training data '
                                   f'holds {identity_names}: give one validation folder per training identity')])
    return ValidationViews(images=views.images, cameras=views.cameras, latents=views.latents, identity=views.identity,
                           identity_names=list(identity_names), names=list(views.names), source=path)


def make_views(training_set: IdentitySet, val_views: Optional[int], val_data: Optional[str], resolution: int,
               num_ws: int, w_dim: int):
    """(training part, ValidationViews or None) for --val-views (None = the default) or --val-data."""
    if val_data:
        return training_set, read_validation_folder(val_data, training_set.identity_names, resolution, num_ws, w_dim)
    originals = min(size // 2 if training_set.xflip else size for size in training_set.sizes)
    count = default_val_views(originals) if val_views is None else int(val_views)
    if count == 0:
        return training_set, None
    return split_heldout(training_set, count)

#----------------------------------------------------------------------------


def _psnr(mse: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2) from their per-image MSE."""
    return 10 * torch.log10(4 / mse.clamp_min(1e-10))


@torch.no_grad()
def score_views(G: torch.nn.Module, views: ValidationViews, loss_fn: PersonalizationLoss,
                neural_rendering_resolution: int, seed: int, device: torch.device,
                batch: int = 4) -> Dict[str, Dict[str, float]]:
    """Scores of the held-out views: {identity name: metrics, RUN: mean over identities}.

    Metrics: mse, psnr (dB) and lpips at the final resolution, the same with `_raw` at the neural
    rendering resolution, `id_sim` (ArcFace cosine) when the loss has ArcFace, and `loss`, the
    selection score. Rendered in eval mode with the global RNG forked and seeded, so scoring neither
    depends on nor changes the training randomness.
    """
    was_training = G.training
    G.eval()
    per_view: Dict[str, List[torch.Tensor]] = {}
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        torch.manual_seed(seed)
        for start in range(0, len(views), batch):
            sl = slice(start, start + batch)
            real = torch.from_numpy(views.images[sl]).to(device).to(torch.float32) / 127.5 - 1
            c = torch.from_numpy(views.cameras[sl]).to(device)
            ws = torch.from_numpy(views.latents[sl]).to(device)
            if adapters.is_injected(G):
                adapters.select(G, torch.from_numpy(views.identity[sl]))
            out = G.synthesis(ws, c, neural_rendering_resolution=neural_rendering_resolution, noise_mode='const')
            real_raw = filtered_resizing(real, size=neural_rendering_resolution, f=loss_fn.resample_filter,
                                         filter_mode=loss_fn.filter_mode)
            metrics = {'mse': (out['image'] - real).square().flatten(1).mean(1),
                       'mse_raw': (out['image_raw'] - real_raw).square().flatten(1).mean(1)}
            metrics['psnr'], metrics['psnr_raw'] = _psnr(metrics['mse']), _psnr(metrics['mse_raw'])
            metrics['loss'] = metrics['mse'] + metrics['mse_raw']
            if loss_fn.lpips is not None:
                metrics['lpips'] = lpips_distance(loss_fn.lpips, out['image'], real)
                metrics['lpips_raw'] = lpips_distance(loss_fn.lpips, out['image_raw'], real_raw)
                metrics['loss'] = metrics['loss'] + metrics['lpips'] + metrics['lpips_raw']
            if loss_fn.arcface is not None:
                metrics['id_sim'] = torch.nn.functional.cosine_similarity(
                    identity_embedding(loss_fn.arcface, out['image']), identity_embedding(loss_fn.arcface, real), dim=1)
            for name, value in metrics.items():
                per_view.setdefault(name, []).append(value.double().cpu())
    G.train(was_training)
    values = {name: torch.cat(parts).numpy() for name, parts in per_view.items()}
    scores = {}
    for k, name in enumerate(views.identity_names):
        mask = views.identity == k
        scores[name] = {metric: float(v[mask].mean()) for metric, v in values.items()}
    scores[RUN] = {metric: float(np.mean([scores[n][metric] for n in views.identity_names])) for metric in values}
    return scores

#----------------------------------------------------------------------------


class BestKeeper:
    """The best validation score so far of the run and of each identity, and how long since any improved.

    `update` returns the keys (RUN and/or identity names) whose score improved (strictly lower
    `loss`): their best files are rewritten. `stale` counts the validations since the last
    improvement of any key, for early stopping.
    """

    def __init__(self, keys: List[str]):
        self.best: Dict[str, dict] = {key: dict(loss=math.inf, kimg=None, step=None, scores=None) for key in keys}
        self.stale = 0

    def update(self, scores: Dict[str, Dict[str, float]], cur_nimg: int, step: int) -> List[str]:
        improved = [key for key in self.best if scores[key]['loss'] < self.best[key]['loss']]
        for key in improved:
            self.best[key] = dict(loss=scores[key]['loss'], kimg=cur_nimg / 1000, step=step, scores=dict(scores[key]))
        self.stale = 0 if improved else self.stale + 1
        return improved

    def should_stop(self, patience: Optional[int]) -> bool:
        """True after `patience` validations in a row without improvement (None or 0: never)."""
        return bool(patience) and self.stale >= patience

    def state_dict(self) -> dict:
        return dict(best=copy.deepcopy(self.best), stale=self.stale)

    def load_state_dict(self, state: dict) -> None:
        if set(state['best']) != set(self.best):
            raise ValueError(f'the saved validation state covers {sorted(state["best"])}, this run {sorted(self.best)}')
        self.best = copy.deepcopy(state['best'])
        self.stale = int(state['stale'])


def best_file_names(identity_names: List[str], multi: bool, with_adapters: bool) -> Dict[str, List[str]]:
    """Key (RUN or identity) -> the best files it owns, relative to the run directory."""
    files = {RUN: ['network-snapshot-best.pkl']}
    if with_adapters and not multi:
        files[RUN].append('adapter-best.safetensors')
    if with_adapters and multi:
        files.update({name: [os.path.join('adapters', f'{name}-best.safetensors')] for name in identity_names})
    return files


def write_best_record(run_dir: str, keeper: BestKeeper, files: Dict[str, List[str]]) -> None:
    """best.json: for the run and each identity, its best score, when it was reached and its files."""
    record = {key: dict(keeper.best[key], files=files[key]) for key in files}
    with dnnlib.util.atomic_write_path(os.path.join(run_dir, 'best.json')) as tmp:
        with open(tmp, 'w') as f:
            json.dump(record, f, indent=2)


def copy_best_files(old_run_dir: str, run_dir: str, keeper: BestKeeper, files: Dict[str, List[str]]) -> List[str]:
    """Copy the best files of a run we continue into the new run directory; returns the files copied.

    A key's files are copied only when the old run's best.json records them at the step the restored
    state names: an old run that found a better state after the snapshot we resume from has newer
    files, and the continued run (which repeats the old one exactly) writes those again when it gets there.
    """
    record_path = os.path.join(old_run_dir, 'best.json')
    record = json.load(open(record_path)) if os.path.isfile(record_path) else {}
    copied = []
    for key, names in files.items():
        if record.get(key, {}).get('step') != keeper.best[key]['step']:
            continue
        for name in names:
            source = os.path.join(old_run_dir, name)
            if os.path.isfile(source):
                with dnnlib.util.atomic_write_path(os.path.join(run_dir, name)) as tmp:
                    shutil.copyfile(source, tmp)
                copied.append(name)
    write_best_record(run_dir, keeper, files)
    return copied


def stats_entries(scores: Dict[str, Dict[str, float]], keeper: BestKeeper) -> Dict[str, float]:
    """stats.jsonl entries: val/<metric> of the run, val/<identity>/<metric> with several identities, the best so far."""
    entries = {f'val/{metric}': value for metric, value in scores[RUN].items()}
    identities = [key for key in scores if key != RUN]
    if len(identities) > 1:
        entries.update({f'val/{name}/{metric}': value for name in identities for metric, value in scores[name].items()})
    entries['val/best_loss'] = keeper.best[RUN]['loss']
    entries['val/best_kimg'] = keeper.best[RUN]['kimg']
    return entries


def format_scores(scores: Dict[str, Dict[str, float]]) -> str:
    """One log line: the run's held-out metrics."""
    return ' '.join(f'{metric} {value:.4f}' if 'psnr' not in metric else f'{metric} {value:.2f}'
                    for metric, value in scores[RUN].items())
