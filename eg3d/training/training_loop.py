"""Personalization training loop: fine-tune adapters (or the whole generator) on one or more identities.

    load or resume (starting_point) -> data (run_data) -> trainables: adapters, optimizer, allocator
    -> (a fresh run of a recipe with init='gradient': align the adapters with the first batch, gradient_init)
    -> per step (train_step): batch (or a recipe's images per step) -> G.synthesis -> loss -> adapter gradients
       -> all-reduce -> Adam
    -> every tick (tick_stats): report; score the held-out views and keep the best files (snapshots,
       validation) -> early stop / snapshot

The optimizer and its schedule come from a recipe (`training/recipe.py`); the options from
`training/options.py` (train.py builds them).

With K identities (a folder of identity folders) the frozen base holds K adapters and each sample
is rendered with its identity's adapter; batches give every identity the same share of samples,
and one Adam optimizes all adapters.

`run(options)` runs in every process of a run. Randomness is a pure function of (random_seed, step,
chunk), so the result does not depend on how chunks are spread over processes, and a run resumed
from a snapshot continues exactly as the uninterrupted run would.
"""

import math
import time

import psutil
import torch
import tqdm

import dnnlib
from training import gradient_init
from training import validation
from training.options import TrainingOptions
from training.recipe import Recipe
from training.run_data import load_run_data
from training.run_log import RunLog
from training.snapshots import Snapshots, continued_recipe, kimg_tag, read_training_state
from training.starting_point import load_starting_point, rebuild_generator
from training.tick_stats import StatsWriter, TickStats
from training.train_step import TrainingStep, chunk_seed, make_loss
from training.trainables import Trainables, build_trainables

# The loop's helpers, where tools and tests have always found them.
__all__ = ['training_loop', 'run', 'kimg_tag', 'chunk_seed', 'rebuild_generator']


def training_loop(rank: int = 0, local_rank: int = 0, **options) -> dict:
    """`run` with the options as keywords (TrainingOptions' fields; an unknown one is a TypeError)."""
    return run(TrainingOptions(**options), rank=rank, local_rank=local_rank)


def _set_up_device(options: TrainingOptions, local_rank: int) -> torch.device:
    device = torch.device('cuda', local_rank) if options.device == 'cuda' else torch.device('cpu')
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = options.cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = options.allow_tf32
    torch.backends.cudnn.allow_tf32 = options.allow_tf32
    return device


def _align_adapters(G: torch.nn.Module, train_step: TrainingStep, trainables: Trainables, recipe: Recipe,
                    random_seed: int, device: torch.device, log: RunLog) -> None:
    """The recipe's gradient-aligned start: `init_passes` forward/backward passes on the first batch (step 0's
    images and noise, no new images); the global RNG is left as it was, so the run's draws do not move."""
    start_time = time.time()
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        gradient_init.align_adapters(G, lambda: train_step.loss_gradients(0), recipe.init_passes,
                                     torch.Generator().manual_seed(random_seed))
    if trainables.ema is not None:
        trainables.ema.restart()
    log(f'Adapters aligned with the first batch\'s weight gradients: {recipe.init_passes} forward/backward passes '
        f'on step 0\'s batch ({time.time() - start_time:.1f} s).')


def run(options: TrainingOptions, rank: int = 0, local_rank: int = 0) -> dict:
    """Train; returns the final counters, the generator and the best validation scores (None: no validation)."""
    o = options
    start_time = time.time()
    device = _set_up_device(o, local_rank)
    torch.manual_seed(o.random_seed)
    log = RunLog(o.run_dir, rank)
    recipe = o.make_recipe()

    # Load or resume; the data; what trains; the loss. (This order fixes the RNG draws of a run.)
    start = load_starting_point(o, log)
    G = start.G
    state = read_training_state(o.resume_pkl, start, device) if start.continuing else None
    recipe = continued_recipe(recipe, state, log)
    data = load_run_data(o, start, log)
    trainables = build_trainables(G, start.adapter_config, start.freeze_render, data.num_identities, recipe,
                                  o.resume_pkl, data.training_set.path, device, o.num_gpus, log)
    neural_rendering_resolution = (o.neural_rendering_resolution if o.neural_rendering_resolution is not None else
                                   int(getattr(G.superresolution, 'input_resolution', 64)))
    loss_fn = make_loss(o.loss_kwargs, device)
    tick = TickStats(data.num_identities, device)
    train_step = TrainingStep(G, data, trainables, loss_fn, recipe, o, start.random_seed, neural_rendering_resolution,
                              rank, device, tick)
    if recipe.init == 'gradient' and not start.continuing:  # a continued run has its adapters from the snapshot
        _align_adapters(G, train_step, trainables, recipe, start.random_seed, device, log)
    snapshots = Snapshots(G, start, data, trainables, loss_fn, recipe, o, neural_rendering_resolution, rank, device,
                          log, step_batch=train_step.batch_size)
    cur_nimg, step = snapshots.restore_training_state(state) if start.continuing else (0, 0)

    snapshots.save_start_grid(cur_nimg)
    stats_writer = StatsWriter(o.run_dir, rank)
    if not start.continuing and data.val_set is not None:  # the starting point is scored, and is the first best
        start_scores = snapshots.validate(cur_nimg, step)
        stats_writer.write(dict(tick=0, kimg=0.0, step=0, timestamp=time.time(),
                                **validation.stats_entries(start_scores, snapshots.keeper)), global_step=0)
        log(f'Validation at the start: {validation.format_scores(start_scores)}')

    # Main loop.
    total_nimg = int(round(o.total_kimg * 1000))
    tick_nimg = max(int(round(o.kimg_per_tick * 1000)), 1)
    step_nimg = train_step.batch_size
    per_image = (f' (recipe {recipe.name}: {recipe.images_per_step} image(s) of each identity per step, '
                 f'not the batch of {o.batch_size})' if step_nimg != o.batch_size else '')
    log(f'Training for {o.total_kimg:g} kimg ({math.ceil(max(total_nimg - cur_nimg, 0) / step_nimg)} steps of '
        f'{step_nimg} images{per_image} on {o.num_gpus} process(es), {train_step.batch_gpu} per pass); neural '
        f'rendering at {neural_rendering_resolution}px.')
    recorded_step = start.progress.get('step_batch', start.progress.get('batch_size')) if start.continuing else None
    if recorded_step not in (None, step_nimg):  # the image stream is cut into steps of this many images
        log(f'Warning: the run took steps of {recorded_step} images, this one {step_nimg}: the batches will differ '
            f'from the uninterrupted run.')
    bar = tqdm.tqdm(total=total_nimg, initial=min(cur_nimg, total_nimg), unit='img', dynamic_ncols=True,
                    disable=(rank != 0 or not o.progress_bar), desc='train')
    tick_start_time, tick_start_nimg, tick_start_step = time.time(), cur_nimg, step
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    done = cur_nimg >= total_nimg
    while not done:
        lr = train_step(step, cur_nimg)
        log.op_fallbacks()
        step += 1
        cur_nimg += step_nimg
        if trainables.ema is not None:
            trainables.ema.update(cur_nimg, step_nimg, total_nimg)
        bar.update(min(cur_nimg, total_nimg) - bar.n)

        # Tick: report, and every `network_snapshot_ticks` ticks a snapshot.
        done = cur_nimg >= total_nimg
        crossed = cur_nimg // tick_nimg > (cur_nimg - step_nimg) // tick_nimg
        if not (done or crossed):
            continue
        means, per_identity, (nonfinite_entries, nonfinite_steps) = tick.reduce(o.num_gpus)
        tick_time = time.time() - tick_start_time
        stats = {'tick': cur_nimg // tick_nimg, 'kimg': cur_nimg / 1000, 'step': step, 'timestamp': time.time(),
                 'sec_per_tick': tick_time, 'sec_per_kimg': tick_time / max((cur_nimg - tick_start_nimg) / 1000, 1e-9),
                 'sec_per_step': tick_time / max(step - tick_start_step, 1), 'lr': lr}
        stats.update({f'loss/{n}': v for n, v in means.items()})
        stats['grad/nonfinite_entries'], stats['grad/nonfinite_steps'] = nonfinite_entries, nonfinite_steps
        scores = snapshots.validate(cur_nimg, step)
        if scores is not None:
            stats.update(validation.stats_entries(scores, snapshots.keeper))
        if data.training_set.multi:  # mean total loss of each identity's samples in this tick
            stats.update({f'identity/{name}/loss': float(per_identity[0, k] / max(per_identity[1, k], 1))
                          for k, name in enumerate(data.identity_names)})
        stats['mem/cpu_rss_gb'] = psutil.Process().memory_info().rss / 2**30
        if device.type == 'cuda':
            stats['mem/gpu_peak_gb'] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        stats_writer.write(stats, global_step=cur_nimg)
        if nonfinite_steps > 0:
            log(f'Warning: {nonfinite_steps} step(s) of this tick had NaN/inf gradients '
                f'({nonfinite_entries} entries, replaced: NaN by 0, inf by +-1e5)')
        loss_parts = ' '.join(f'{n} {v:.4f}' for n, v in means.items() if n != 'total')
        log(f'tick {stats["tick"]:<4d} kimg {cur_nimg / 1000:<8.3f} step {step:<6d} '
            f'time {dnnlib.util.format_time(time.time() - start_time):<10s} sec/kimg {stats["sec_per_kimg"]:<8.2f} '
            f'loss {means.get("total", float("nan")):.4f} ({loss_parts})')
        if scores is not None:
            log(f'    validation: {validation.format_scores(scores)}')
        postfix = dict(kimg=f'{cur_nimg / 1000:.3f}', loss=f'{means.get("total", float("nan")):.4f}')
        if scores is not None:
            postfix.update(val=f'{scores[validation.RUN]["loss"]:.4f}',
                           best=f'{snapshots.keeper.best[validation.RUN]["loss"]:.4f}')
        bar.set_postfix(**postfix)
        if snapshots.keeper is not None and snapshots.keeper.should_stop(o.early_stop):
            log(f'Early stop: no validation improvement in {o.early_stop} ticks; the best is at '
                f'{snapshots.keeper.best[validation.RUN]["kimg"]:g} kimg.')
            done = True
        if done or (cur_nimg // tick_nimg) % o.network_snapshot_ticks == 0:
            snapshots.save_snapshot(cur_nimg, step)
        tick.reset()
        tick_start_time, tick_start_nimg, tick_start_step = time.time(), cur_nimg, step

    bar.close()
    stats_writer.close()
    log(f'Done: {cur_nimg / 1000:g} kimg, {step} steps.')
    keeper = snapshots.keeper
    return dict(cur_nimg=cur_nimg, step=step, G=G, best=keeper.best if keeper is not None else None)
