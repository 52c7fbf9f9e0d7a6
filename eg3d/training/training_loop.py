"""Personalization training loop: fine-tune adapters (or the whole generator) on one or more identities.

    dataset -> batch (image, camera, latent, identity) -> G.synthesis -> loss terms -> adapter gradients
            -> all-reduce -> (clip) -> Adam step at the recipe's rate (-> AdaLoRA rank allocation)
            -> every tick: log, score the held-out views, keep the best files (-> early stop) / snapshot

The optimizer and its schedule come from a recipe (`training/recipe.py`); the held-out views, their
scores and the best-so-far state from `training/validation.py`.

With K identities (a folder of identity folders) the frozen base holds K adapters and each sample
is rendered with its identity's adapter; batches give every identity the same share of samples,
and one Adam optimizes all adapters. An adapter only gets gradients from its own identity's
samples, and the batch loss is multiplied by K, so each adapter receives exactly the gradient of a
single-identity run with batch B / K (the scale matters: Adam's eps is not scale-free).

`training_loop(**options)` runs in every process of a run; `train.py` builds the options.
Randomness is a pure function of (random_seed, step, chunk): every chunk of a global batch is
rendered right after `torch.manual_seed(chunk_seed(...))`, so the result does not depend on how
chunks are spread over processes, and a run resumed from a snapshot continues exactly as the
uninterrupted run would.
"""

import copy
import json
import math
import os
import time
from typing import Optional, Sequence

import numpy as np
import PIL.Image
import psutil
import torch
import tqdm

import dnnlib
import legacy
from torch_utils import custom_ops
from torch_utils import misc
from training import adapter_ema
from training import adapters
from training import configs
from training import recipe as recipes
from training import validation
from training.adapters.inject import adapter_layers
from training.dataset import IdentitySet
from training.loss import PersonalizationLoss

#----------------------------------------------------------------------------
# Setup helpers.


def kimg_tag(cur_nimg: int) -> str:
    """File-name tag of a point in training: '000500' at whole kimg, '000000.120' at 120 images."""
    return f'{cur_nimg // 1000:06d}' if cur_nimg % 1000 == 0 else f'{cur_nimg // 1000:06d}.{cur_nimg % 1000:03d}'


def chunk_seed(random_seed: int, step: int, chunk: int) -> int:
    """Seed of the global RNG for chunk `chunk` of training step `step`."""
    return int(np.random.SeedSequence([random_seed, step, chunk]).generate_state(1, dtype=np.uint64)[0] >> 1)


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


def all_reduce_gradients(params: list, num_gpus: int) -> torch.Tensor:
    """Sum gradients over processes (the loss is already scaled to a global-batch mean).

    Returns how many gradient entries were NaN or +-inf (a 0-dim tensor, the same on every process;
    no device sync here). Those entries are then replaced as EG3D does (NaN by 0, +-inf by +-1e5), so
    one bad sample does not destroy the adapters; the training loop reports the count per tick.
    """
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    if num_gpus > 1:
        torch.distributed.all_reduce(flat)
    nonfinite = flat.numel() - torch.isfinite(flat).sum()
    misc.nan_to_num(flat, nan=0, posinf=1e5, neginf=-1e5, out=flat)
    for param, piece in zip(params, flat.split([p.numel() for p in params])):
        param.grad = piece.reshape(param.shape)
    return nonfinite


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
    tmp = path + '.tmp.png'
    PIL.Image.fromarray(grid, 'RGB').save(tmp)
    os.replace(tmp, path)
    G.train(was_training)


def _atomic_torch_save(obj, path: str) -> None:
    tmp = path + '.tmp'
    torch.save(obj, tmp)
    os.replace(tmp, path)

#----------------------------------------------------------------------------


def training_loop(
    run_dir: str = '.',                       # Output directory.
    training_set_kwargs: dict = None,         # path, xflip.
    resume_pkl: str = None,                   # Network pickle to start from (official or ours).
    trust_pickle: bool = False,               # Allow unsafe (code-executing) pickle loading.
    cfg: str = 'ffhq',                        # Rendering options: 'ffhq', 'afhq', 'shapenet' or 'resume'.
    g_num_fp16_res: Optional[int] = None,     # None = as in the resume pickle.
    sr_num_fp16_res: Optional[int] = None,
    adapter_config: Optional[dict] = None,    # AdapterConfig.to_dict(); None = full fine-tuning.
    freeze_render: bool = False,              # Decoder (and renderer) get no gradients.
    G_opt_kwargs: dict = None,                # lr, betas, eps of Adam (a constant rate when no recipe is given).
    recipe: Optional[dict] = None,            # recipes.Recipe.to_dict(): optimizer, schedule, clipping.
    val_views: Optional[int] = None,          # Views of each identity held out for validation; None = default.
    val_data: Optional[str] = None,           # Folder of validation views instead (nothing is held out).
    early_stop: Optional[int] = None,         # Stop after this many validations without improvement.
    loss_kwargs: dict = None,                 # lpips_net, id_model, id_weight, sym_weight, density_reg(_p_dist).
    neural_rendering_resolution: Optional[int] = None,  # None = the superresolution module's input size.
    density_reg_every: int = 4,               # Lazy regularisation interval (density, symmetric identity).
    total_kimg: float = 500,                  # Training length in thousands of images.
    kimg_per_tick: float = 4,                 # Progress report interval.
    network_snapshot_ticks: int = 50,         # Snapshot interval in ticks.
    batch_size: int = 4,                      # Global batch.
    batch_gpu: int = 4,                       # Samples per forward pass per process.
    random_seed: int = 0,
    num_gpus: int = 1,                        # Number of processes.
    rank: int = 0,
    device: str = 'cuda',                     # 'cuda' (process uses cuda:local_rank) or 'cpu'.
    local_rank: int = 0,
    workers: int = 0,                         # Accepted for EG3D compatibility; data is in memory.
    cudnn_benchmark: bool = True,
    allow_tf32: bool = False,                 # TF32 matmuls/convolutions on Ampere+ (faster; off = official numerics).
    progress_bar: bool = True,                # tqdm bar on rank 0.
    grid_rows: int = 8,                       # Samples in the image grids; 0 = no grids.
    mode: str = '',                           # Recorded by train.py ('lora1', 'full', ...): names the run only.
    metrics: Sequence[str] = (),              # EG3D's option: no metric is computed during personalization.
) -> dict:
    if metrics:
        raise ValueError(f'metrics={list(metrics)}: personalization computes no quality metrics during training '
                         '(run evaluate.py on the snapshots)')
    training_set_kwargs = dict(training_set_kwargs or {})
    G_opt_kwargs = dict(G_opt_kwargs or dict(lr=0.0025, betas=[0, 0.99], eps=1e-8))
    recipe = (recipes.Recipe.from_dict(recipe) if recipe is not None else
              recipes.Recipe('constant', lr=G_opt_kwargs['lr'], betas=G_opt_kwargs['betas'],
                             eps=G_opt_kwargs.get('eps', 1e-8)))
    loss_kwargs = dict(loss_kwargs or {})
    start_time = time.time()
    device = torch.device('cuda', local_rank) if device == 'cuda' else torch.device('cpu')
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    torch.manual_seed(random_seed)

    def log(msg: str) -> None:
        if rank == 0:
            tqdm.tqdm.write(msg)
            with open(os.path.join(run_dir, 'log.txt'), 'a') as f:
                f.write(msg + '\n')

    logged_fallbacks = set()

    def log_op_fallbacks() -> None:
        """Each CUDA plugin the ops fell back from, with the reason, once in log.txt (not only as a warning)."""
        for name, reason in custom_ops.unavailable_plugins().items():
            if name not in logged_fallbacks:
                logged_fallbacks.add(name)
                log(f'Warning: CUDA plugin "{name}" is unavailable, its ops run the slower reference implementation '
                    f'(set {custom_ops.IMPL_ENV}=cuda to make this an error). Reason: {reason}')

    # Generator: continue our own run, or start from a pretrained (official or ours) generator.
    log(f'Loading "{resume_pkl}"...')
    resume_data = legacy.load_network_pkl(resume_pkl, allow_unsafe=trust_pickle)
    progress = resume_data.get('personalization')
    continuing = isinstance(progress, dict)
    if continuing:
        G = resume_data['G']
        adapter_config = resume_data.get('adapter_config')
        freeze_render = bool(progress.get('freeze_render', freeze_render))
        if progress.get('random_seed', random_seed) != random_seed:
            log(f'Using the run\'s seed {progress["random_seed"]} (not --seed={random_seed}) to continue its batches.')
            random_seed = int(progress['random_seed'])
        if progress.get('batch_size', batch_size) != batch_size:
            log(f'Warning: the run used batch {progress["batch_size"]}, this one {batch_size}: the batches will differ '
                f'from the uninterrupted run.')
        log(f'Continuing a personalization run at {progress["cur_nimg"] / 1000:g} kimg; the snapshot\'s '
            f'generator and adapter settings are kept.')
    else:
        # Rebuilt only when an option changes its constructor arguments: the adapter files record the
        # base's fingerprint (init kwargs + weights), and should load onto the unchanged pickle.
        G = resume_data['G_ema'] if resume_data.get('G_ema') is not None else resume_data['G']
        overrides = {k: v for k, v in (configs.DATASET_RENDERING[cfg] if cfg != 'resume' else {}).items()
                     if _plain(G.rendering_kwargs.get(k)) != _plain(v)}
        fp16 = dict(num_fp16_res=g_num_fp16_res, sr_num_fp16_res=sr_num_fp16_res)
        if overrides or any(v is not None and G.init_kwargs.get(k) != v for k, v in fp16.items()):
            log(f'Rebuilding the generator with {dict(overrides, **{k: v for k, v in fp16.items() if v is not None})}')
            G = rebuild_generator(G, overrides, g_num_fp16_res, sr_num_fp16_res)
        G = G.eval().requires_grad_(False)
    D = resume_data.get('D')
    del resume_data

    # Data: every selfie with its camera and latent (of each identity), checked against the generator.
    training_set = IdentitySet(training_set_kwargs['path'], resolution=G.img_resolution,
                               num_ws=G.backbone.num_ws, w_dim=G.w_dim, xflip=training_set_kwargs.get('xflip', False))
    identity_names = training_set.identity_names
    K = training_set.num_identities
    training_set, val_set = validation.make_views(training_set, val_views, val_data, G.img_resolution,
                                                  G.backbone.num_ws, G.w_dim)
    training_set_kwargs.update(class_name='training.dataset.IdentitySet', resolution=training_set.resolution,
                               max_size=len(training_set), use_labels=True, identities=list(identity_names))
    images = torch.from_numpy(training_set.images)
    cameras = torch.from_numpy(training_set.cameras)
    latents = torch.from_numpy(training_set.latents)
    log(f'Dataset: {len(training_set)} images ({training_set.path}), {training_set.resolution}px, '
        f'latents {list(latents.shape[1:])}{", with x-flips" if training_set.xflip else ""}')
    if val_set is not None:
        log(f'Validation: {len(val_set)} views from {val_set.source}, never trained on: {", ".join(val_set.names)}')
    else:
        log('Validation: none (--val-views=0, or under 8 images per identity for the default): no best files, '
            'the last snapshot is the result.')
    if training_set.multi:
        log(f'{K} identities: ' + ', '.join(f'{n} ({s})' for n, s in zip(identity_names, training_set.sizes)))
        if adapter_config is None:
            raise ValueError(f'{training_set.path} holds {K} identities: a multi-identity run trains one adapter per '
                             'identity, so it needs adapters (--lora=R); full fine-tuning trains one shared generator')
        if batch_size % K != 0:
            log(f'Note: batch {batch_size} is not a multiple of the {K} identities; each identity still gets the same '
                f'number of samples over every {K} consecutive samples.')
    if continuing:
        recorded = progress.get('identities')
        if recorded is not None and list(recorded) != list(identity_names) and (K > 1 or len(recorded) > 1):
            raise ValueError(f'{resume_pkl} was trained on the identities {list(recorded)}, but '
                             f'{training_set.path} holds {list(identity_names)}; pass the same --data to continue')

    # Trainable parameters: adapters only, or the whole generator (the paper's baseline).
    if adapter_config is not None:
        cfg_obj = adapters.AdapterConfig.from_dict(adapter_config)
        if not adapters.is_injected(G):
            adapters.inject(G, cfg_obj, num_adapters=K)
        else:  # A reloaded snapshot: freeze the base again, train the adapters again.
            if adapters.num_adapters(G) != K:
                raise ValueError(f'{resume_pkl} holds {adapters.num_adapters(G)} adapter(s), but {training_set.path} '
                                 f'holds {K} identities')
            G.requires_grad_(False)
            for _, layer in adapter_layers(G):
                for param in layer.adapter_parameters():
                    param.requires_grad_(True)
        trainable = adapters.trainable_parameters(G)
        if rank == 0:
            log(adapters.format_parameter_table(G))
    else:
        cfg_obj = None
        trainable = set_full_finetuning(G, freeze_render)
        log(f'Full fine-tuning: {sum(p.numel() for p in trainable):,} trainable parameters.')
    G = G.to(device).train()
    if neural_rendering_resolution is None:
        neural_rendering_resolution = int(getattr(G.superresolution, 'input_resolution', 64))

    # Every process holds the same generator and trains the same parameters.
    if num_gpus > 1:
        for tensor in misc.params_and_buffers(G):
            torch.distributed.broadcast(tensor.data, src=0)
        names = [name for name, p in G.named_parameters() if p.requires_grad]
        gathered = [None] * num_gpus
        torch.distributed.all_gather_object(gathered, names)
        if any(g != names for g in gathered):
            raise RuntimeError('processes disagree on which parameters are trainable')

    optimizer = recipes.make_optimizer(G, trainable, recipe)
    ema = adapter_ema.make_ema(trainable, recipe)  # with an EMA, validation and every file see the average
    log(f'Recipe {recipe.name}: {recipe.to_dict()}')
    allocator = adapters.RankAllocator(G, cfg_obj) if (cfg_obj is not None and cfg_obj.adalora) else None

    # Loss: reconstruction (MSE + LPIPS, two resolutions) + optional identity terms + density reg.
    arcface = None
    if loss_kwargs.get('id_model'):
        from training.arcface import IRSE50
        arcface = IRSE50.load(loss_kwargs['id_model'], device)
    loss_fn = PersonalizationLoss(device, lpips_net=loss_kwargs.get('lpips_net', 'alex'), arcface=arcface,
                                  id_weight=loss_kwargs.get('id_weight', 0.0), sym_weight=loss_kwargs.get('sym_weight', 0.0),
                                  density_reg=loss_kwargs.get('density_reg'),
                                  density_reg_p_dist=loss_kwargs.get('density_reg_p_dist'))
    lazy_reg = loss_fn.has_lazy_terms(G) and density_reg_every > 0

    # Best-so-far validation state (per identity, and the run's mean).
    best_files = validation.best_file_names(list(identity_names), training_set.multi, cfg_obj is not None)
    keeper = validation.BestKeeper(list(best_files)) if val_set is not None else None

    # Resume the counters, optimizer, rank allocator and best-so-far state of a run we continue.
    cur_nimg, step = 0, 0
    if continuing:
        cur_nimg, step = int(progress['cur_nimg']), int(progress['step'])
        state_path = os.path.join(os.path.dirname(os.path.abspath(resume_pkl)), f'training-state-{kimg_tag(cur_nimg)}.pt')
        if os.path.isfile(state_path):
            state = torch.load(state_path, map_location=device, weights_only=True)
            try:
                optimizer.load_state_dict(state['optimizer'])
            except ValueError as err:  # LoRA+ recipes have two parameter groups, the others one
                raise ValueError(f'{state_path}: the run used the recipe {state.get("recipe", {}).get("name", "my3dgen")!r}, '
                                 f'whose optimizer state does not fit --recipe={recipe.name} ({err}); resume with the '
                                 f'run\'s --recipe') from err
            if allocator is not None and state.get('allocator') is not None:
                allocator.load_state_dict(state['allocator'])
            if ema is not None and state.get('ema') is not None:
                ema.load_state_dict(state['ema'])
            log(f'Restored optimizer state from {state_path}')
            if keeper is not None and state.get('validation') is not None:
                keeper.load_state_dict(state['validation'])
                if rank == 0:
                    copied = validation.copy_best_files(os.path.dirname(os.path.abspath(resume_pkl)), run_dir, keeper,
                                                        best_files)
                    log(f'Restored the best-so-far validation state ({keeper.best[validation.RUN]["loss"]:.6g} at '
                        f'{keeper.best[validation.RUN]["kimg"]:g} kimg) and its files: {", ".join(copied) or "none"}')
        else:
            log(f'Warning: {state_path} not found; the optimizer starts afresh (the run will not match an '
                f'uninterrupted one).')

    # Snapshot helpers (all processes call save_snapshot; rank 0 writes).
    grid_idx = torch.from_numpy(grid_indices(training_set.identity, min(grid_rows, len(training_set))))
    grid_count = len(grid_idx)
    grid_args = (images[grid_idx].to(device), cameras[grid_idx].to(device), latents[grid_idx].to(device))
    grid_kwargs = dict(seed=random_seed, identity=training_set.identity[grid_idx.numpy()])

    def save_network(tag: str) -> None:
        snapshot_G = copy.deepcopy(G).eval().requires_grad_(False).cpu()
        snapshot = dict(G=snapshot_G, G_ema=snapshot_G, D=D, training_set_kwargs=dict(training_set_kwargs),
                        adapter_config=cfg_obj.to_dict() if cfg_obj is not None else None,
                        personalization=dict(cur_nimg=cur_nimg, step=step, random_seed=random_seed,
                                             batch_size=batch_size, freeze_render=freeze_render,
                                             identities=list(identity_names)))
        legacy.save_network_pkl(snapshot, os.path.join(run_dir, f'network-snapshot-{tag}.pkl'))

    def save_adapters(tag: str, names: list) -> None:
        """adapter-<tag>.safetensors, or adapters/<name>-<tag>.safetensors for the identities `names`."""
        if cfg_obj is not None and not training_set.multi:
            adapters.save(G, os.path.join(run_dir, f'adapter-{tag}.safetensors'))
        elif cfg_obj is not None:
            os.makedirs(os.path.join(run_dir, 'adapters'), exist_ok=True)
            for k, name in enumerate(identity_names):
                if name in names:
                    adapters.save(G, os.path.join(run_dir, 'adapters', f'{name}-{tag}.safetensors'), index=k)

    def save_best(improved: list) -> None:
        """Rewrite the best files of the keys whose validation score improved (rank 0), and best.json."""
        if rank != 0:
            return
        if validation.RUN in improved:
            save_network('best')
            if not training_set.multi:
                save_adapters('best', list(identity_names))
        if training_set.multi:
            save_adapters('best', [name for name in improved if name != validation.RUN])
        validation.write_best_record(run_dir, keeper, best_files)

    def validate() -> Optional[dict]:
        """Score the held-out views (rank 0; every process gets the scores) and keep the best files."""
        if val_set is None:
            return None
        with adapter_ema.applied(ema):
            scores = [validation.score_views(G, val_set, loss_fn, neural_rendering_resolution, random_seed, device,
                                             batch=batch_gpu) if rank == 0 else None]
            if num_gpus > 1:
                torch.distributed.broadcast_object_list(scores, src=0)
            save_best(keeper.update(scores[0], cur_nimg, step))
        return scores[0]

    def save_snapshot() -> None:
        tag = kimg_tag(cur_nimg)
        if num_gpus > 1:
            misc.check_ddp_consistency(G, ignore_regex=r'.*\.[^.]+_(avg|ema)')
        if rank != 0:
            return
        with adapter_ema.applied(ema):
            save_network(tag)
            save_adapters(tag, list(identity_names))
        state = dict(cur_nimg=cur_nimg, step=step, random_seed=random_seed, optimizer=optimizer.state_dict(),
                     recipe=recipe.to_dict(), ema=ema.state_dict() if ema is not None else None,
                     allocator=allocator.state_dict() if allocator is not None else None,
                     validation=keeper.state_dict() if keeper is not None else None)
        _atomic_torch_save(state, os.path.join(run_dir, f'training-state-{tag}.pt'))
        if grid_count > 0:
            save_image_grid(G, *grid_args, neural_rendering_resolution, os.path.join(run_dir, f'grid-{tag}.png'),
                            **grid_kwargs)
        log(f'Saved network-snapshot-{tag}.pkl' +
            (f' (weights identical on all {num_gpus} processes)' if num_gpus > 1 else ''))

    if rank == 0 and grid_count > 0:
        save_image_grid(G, *grid_args, neural_rendering_resolution,
                        os.path.join(run_dir, f'grid-{kimg_tag(cur_nimg)}-start.png'), **grid_kwargs)
    tb_writer = None
    if rank == 0:
        try:
            from torch.utils.tensorboard import SummaryWriter
            tb_writer = SummaryWriter(run_dir)
        except ImportError:
            pass  # TensorBoard is optional.
    if not continuing and val_set is not None:  # the starting point is scored, and is the first best
        start_scores = validate()
        if rank == 0:
            start_stats = validation.stats_entries(start_scores, keeper)
            with open(os.path.join(run_dir, 'stats.jsonl'), 'a') as f:
                f.write(json.dumps(dict(tick=0, kimg=0.0, step=0, timestamp=time.time(), **start_stats)) + '\n')
            if tb_writer is not None:
                for key, value in start_stats.items():
                    tb_writer.add_scalar(key, value, global_step=0)
        log(f'Validation at the start: {validation.format_scores(start_scores)}')

    # Main loop.
    total_nimg = int(round(total_kimg * 1000))
    tick_nimg = max(int(round(kimg_per_tick * 1000)), 1)
    num_chunks = batch_size // batch_gpu
    log(f'Training for {total_kimg:g} kimg ({math.ceil(max(total_nimg - cur_nimg, 0) / batch_size)} steps of '
        f'{batch_size} images on {num_gpus} process(es), {batch_gpu} per pass); neural rendering at '
        f'{neural_rendering_resolution}px.')
    bar = tqdm.tqdm(total=total_nimg, initial=min(cur_nimg, total_nimg), unit='img', dynamic_ncols=True,
                    disable=(rank != 0 or not progress_bar), desc='train')
    tick_start_time, tick_start_nimg, tick_start_step = time.time(), cur_nimg, step
    sums: dict = {}
    identity_sums = np.zeros([2, K])  # per identity: sum of per-sample losses, number of samples
    nonfinite = torch.zeros([2], dtype=torch.int64, device=device)  # in this tick: entries, steps with any
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    done = cur_nimg >= total_nimg
    while not done:
        # Batch: this process's chunks of the global batch (image, camera, latent).
        indices = torch.from_numpy(training_set.batch_indices(batch_size, step, random_seed))
        regularize = lazy_reg and step % density_reg_every == 0
        optimizer.zero_grad(set_to_none=True)
        lr = recipes.set_learning_rate(optimizer, recipe, cur_nimg, total_nimg)
        step_terms: dict = {}
        for chunk in range(rank, num_chunks, num_gpus):
            idx = indices[chunk * batch_gpu:(chunk + 1) * batch_gpu]
            real_img = images[idx].to(device).to(torch.float32) / 127.5 - 1
            c, ws = cameras[idx].to(device), latents[idx].to(device)
            identity = training_set.identity[idx.numpy()]
            if cfg_obj is not None:
                adapters.select(G, torch.from_numpy(identity))
            torch.manual_seed(chunk_seed(random_seed, step, chunk))
            total, terms, per_sample = loss_fn(G, real_img, c, ws, neural_rendering_resolution,
                                               regularize=regularize, reg_gain=density_reg_every)
            share = batch_gpu / batch_size
            (total * (share * K)).backward()
            for name, value in [('total', total)] + list(terms.items()):
                step_terms[name] = step_terms.get(name, 0.0) + float(value.detach()) * share
            np.add.at(identity_sums[0], identity, per_sample.detach().cpu().double().numpy())
            np.add.at(identity_sums[1], identity, 1)
        if allocator is not None:  # AdaLoRA: orthogonality of P and Q, once per step over all processes.
            orth = adapters.orthogonal_regularization(G) * cfg_obj.orth_reg_weight  # a mean over the K adapters
            (orth * (K / num_gpus)).backward()
            step_terms['orth'] = float(orth.detach()) / num_gpus
            step_terms['total'] += float(orth.detach()) / num_gpus

        # Adapter gradients, summed over processes; Adam step; AdaLoRA budget and masks.
        bad = all_reduce_gradients(trainable, num_gpus)
        nonfinite += torch.stack([bad, (bad > 0).long()])
        recipes.clip_gradients(trainable, recipe)
        optimizer.step()
        log_op_fallbacks()
        if allocator is not None:
            allocator.update_and_mask(G, step)
        step += 1
        cur_nimg += batch_size
        if ema is not None:
            ema.update(cur_nimg, batch_size, total_nimg)
        bar.update(min(cur_nimg, total_nimg) - bar.n)
        for name, value in step_terms.items():
            acc = sums.setdefault(name, [0.0, 0])
            acc[0] += value
            acc[1] += 1

        # Tick: report, and every `network_snapshot_ticks` ticks a snapshot.
        done = cur_nimg >= total_nimg
        crossed = cur_nimg // tick_nimg > (cur_nimg - batch_size) // tick_nimg
        if not (done or crossed):
            continue
        names = sorted(sums)
        packed = torch.tensor([sums[n][0] for n in names] + [sums[n][1] for n in names] + identity_sums.ravel().tolist(),
                              dtype=torch.float64, device=device)
        if num_gpus > 1:
            torch.distributed.all_reduce(packed)
        values = {n: packed[i].item() / max(packed[len(names) + i].item() / num_gpus, 1) for i, n in enumerate(names)}
        per_identity = packed[2 * len(names):].reshape(2, K).cpu().numpy()
        tick_time = time.time() - tick_start_time
        tick_kimg = (cur_nimg - tick_start_nimg) / 1000
        stats = {'tick': cur_nimg // tick_nimg, 'kimg': cur_nimg / 1000, 'step': step, 'timestamp': time.time(),
                 'sec_per_tick': tick_time, 'sec_per_kimg': tick_time / max(tick_kimg, 1e-9),
                 'sec_per_step': tick_time / max(step - tick_start_step, 1), 'lr': lr}
        stats.update({f'loss/{n}': v for n, v in values.items()})
        stats['grad/nonfinite_entries'], stats['grad/nonfinite_steps'] = (int(v) for v in nonfinite.tolist())
        scores = validate()
        if scores is not None:
            stats.update(validation.stats_entries(scores, keeper))
        if training_set.multi:  # mean total loss of each identity's samples in this tick
            stats.update({f'identity/{name}/loss': float(per_identity[0, k] / max(per_identity[1, k], 1))
                          for k, name in enumerate(identity_names)})
        stats['mem/cpu_rss_gb'] = psutil.Process().memory_info().rss / 2**30
        if device.type == 'cuda':
            stats['mem/gpu_peak_gb'] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        if rank == 0:
            with open(os.path.join(run_dir, 'stats.jsonl'), 'a') as f:
                f.write(json.dumps(stats) + '\n')
            if tb_writer is not None:
                for key, value in stats.items():
                    if key not in ('tick', 'kimg', 'step', 'timestamp'):
                        tb_writer.add_scalar(key, value, global_step=cur_nimg)
                tb_writer.flush()
            if stats['grad/nonfinite_steps'] > 0:
                log(f'Warning: {stats["grad/nonfinite_steps"]} step(s) of this tick had NaN/inf gradients '
                    f'({stats["grad/nonfinite_entries"]} entries, replaced: NaN by 0, inf by +-1e5)')
            loss_parts = ' '.join(f'{n} {v:.4f}' for n, v in values.items() if n != 'total')
            log(f'tick {stats["tick"]:<4d} kimg {cur_nimg / 1000:<8.3f} step {step:<6d} '
                f'time {dnnlib.util.format_time(time.time() - start_time):<10s} sec/kimg {stats["sec_per_kimg"]:<8.2f} '
                f'loss {values.get("total", float("nan")):.4f} ({loss_parts})')
            if scores is not None:
                log(f'    validation: {validation.format_scores(scores)}')
        postfix = dict(kimg=f'{cur_nimg / 1000:.3f}', loss=f'{values.get("total", float("nan")):.4f}')
        if scores is not None:
            postfix.update(val=f'{scores[validation.RUN]["loss"]:.4f}', best=f'{keeper.best[validation.RUN]["loss"]:.4f}')
        bar.set_postfix(**postfix)
        if keeper is not None and keeper.should_stop(early_stop):
            log(f'Early stop: no validation improvement in {early_stop} ticks; the best is at '
                f'{keeper.best[validation.RUN]["kimg"]:g} kimg.')
            done = True
        if done or (cur_nimg // tick_nimg) % network_snapshot_ticks == 0:
            save_snapshot()
        sums = {}
        identity_sums[:] = 0
        nonfinite.zero_()
        tick_start_time, tick_start_nimg, tick_start_step = time.time(), cur_nimg, step

    bar.close()
    if tb_writer is not None:
        tb_writer.close()
    log(f'Done: {cur_nimg / 1000:g} kimg, {step} steps.')
    return dict(cur_nimg=cur_nimg, step=step, G=G, best=keeper.best if keeper is not None else None)
