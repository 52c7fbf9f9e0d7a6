"""Personalize a pretrained EG3D to one identity: train low-rank adapters (or the whole generator).

Command-line interface only: checks the inputs, builds the run's `TrainingOptions` and hands them to
`training.training_loop.run` in one process, in `--gpus` spawned processes, or in each
process that `torchrun` started. See docs/training.md.
"""

import faulthandler
import json
import math
import os
import re
import tempfile
from typing import Union

import click
import torch

import dnnlib
import legacy
from training import training_loop
from training import validation
from training.dataset import DatasetError, IdentitySet, identity_folders
from training.options import TrainingOptions
from training.recipe import DEFAULT_RECIPE, RECIPES, step_batch

#----------------------------------------------------------------------------


def _torchrun_env() -> dict:
    """RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE when launched by torchrun, else {}."""
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:
        return dict(rank=int(os.environ['RANK']), world_size=int(os.environ['WORLD_SIZE']),
                    local_rank=int(os.environ.get('LOCAL_RANK', 0)),
                    local_world_size=int(os.environ.get('LOCAL_WORLD_SIZE', os.environ['WORLD_SIZE'])))
    return {}


def _init_process(c: TrainingOptions, rank: int, local_rank: int, local_world_size: int) -> None:
    if c.device == 'cpu':
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size))
    else:
        torch.cuda.set_device(local_rank)


def subprocess_fn(rank: int, c: TrainingOptions, temp_dir: str) -> None:
    """One process of a `--gpus=N` run started by torch.multiprocessing.spawn."""
    _init_process(c, rank, rank, c.num_gpus)
    if c.num_gpus > 1:
        faulthandler.enable()  # a rank killed by a signal (a C++ abort, a segfault) prints its threads' Python stacks
        init_method = f'file://{os.path.abspath(os.path.join(temp_dir, ".torch_distributed_init"))}'
        torch.distributed.init_process_group(backend='nccl' if c.device == 'cuda' else 'gloo',
                                             init_method=init_method, rank=rank, world_size=c.num_gpus)
    try:
        training_loop.run(c, rank=rank, local_rank=rank)
        if c.num_gpus > 1:
            torch.distributed.barrier()  # all ranks done (rank 0 writes the last files) before any disconnects
    finally:
        if c.num_gpus > 1:
            torch.distributed.destroy_process_group()


def make_run_dir(outdir: str, desc: str) -> str:
    """<outdir>/<NNNNN>-<desc>, one above the highest run number there."""
    prev = [x for x in os.listdir(outdir) if os.path.isdir(os.path.join(outdir, x))] if os.path.isdir(outdir) else []
    ids = [int(m.group()) for m in (re.match(r'^\d+', x) for x in prev) if m is not None]
    run_dir = os.path.join(outdir, f'{max(ids, default=-1) + 1:05d}-{desc}')
    os.makedirs(run_dir)
    return run_dir


def launch_training(c: TrainingOptions, desc: str, outdir: str, dry_run: bool) -> None:
    env = _torchrun_env()
    if env:  # torchrun: this process is one rank; rank 0 picks the run directory.
        _init_process(c, env['rank'], env['local_rank'], env['local_world_size'])
        faulthandler.enable()  # as a spawned rank: a crash prints its threads' Python stacks
        torch.distributed.init_process_group(backend='nccl' if c.device == 'cuda' else 'gloo', init_method='env://')
        holder = [None]
        if env['rank'] == 0:
            print_options(c)
            holder[0] = None if dry_run else make_run_dir(outdir, desc)
            if holder[0] is not None:
                write_options(c, holder[0])
        torch.distributed.broadcast_object_list(holder, src=0)
        try:
            if holder[0] is not None:
                c.run_dir = holder[0]
                training_loop.run(c, rank=env['rank'], local_rank=env['local_rank'])
            torch.distributed.barrier()  # all ranks done (rank 0 writes the last files) before any disconnects
        finally:
            torch.distributed.destroy_process_group()
        return

    print_options(c)
    if dry_run:
        print('Dry run; exiting.')
        return
    c.run_dir = make_run_dir(outdir, desc)
    write_options(c, c.run_dir)
    run_processes(subprocess_fn, c)


def run_processes(fn, c: Union[TrainingOptions, dnnlib.EasyDict]) -> None:
    """fn(rank, c, temp_dir) in this process for one GPU, else in one spawned process per GPU (the temporary
    folder holds their rendezvous file)."""
    if c.num_gpus == 1:
        fn(0, c, '')
    else:
        torch.multiprocessing.set_start_method('spawn', force=True)
        with tempfile.TemporaryDirectory() as temp_dir:
            torch.multiprocessing.spawn(fn=fn, args=(c, temp_dir), nprocs=c.num_gpus)


def print_options(c: TrainingOptions) -> None:
    print()
    print('Training options:')
    print(json.dumps(c.to_dict(), indent=2))
    print()
    print(f'Processes:           {c.num_gpus} ({c.device})')
    print(f'Batch size:          {c.batch_size} images ({c.batch_gpu} per pass)')
    recipe = c.make_recipe()
    if recipe.images_per_step is not None:
        step, per_pass = step_batch(recipe, c.batch_size, c.batch_gpu, len(c.training_set_kwargs.identities),
                                    c.num_gpus)
        print(f'Optimizer step:      {step} images ({per_pass} per pass): recipe {recipe.name} takes '
              f'{recipe.images_per_step} image(s) of each identity per step')
    print(f'Training duration:   {c.total_kimg:g} kimg')
    print(f'Dataset:             {c.training_set_kwargs.path} ({c.training_set_kwargs.max_size} images, '
          f'{c.training_set_kwargs.resolution}px, x-flips {c.training_set_kwargs.xflip})')
    if len(c.training_set_kwargs.identities) > 1:
        print(f'Identities:          {len(c.training_set_kwargs.identities)} (one adapter each)')
    print(f'Trainable:           {c.mode}')
    optimizer = 'schedule-free Adam' if c.recipe.get('optimizer') == 'schedulefree' else 'Adam'
    print(f'Recipe:              {c.recipe["name"]} ({optimizer} lr {c.recipe["lr"]:g}, betas {c.recipe["betas"]}, '
          f'{c.recipe["decay"]} rate' + (f', EMA half-life {c.recipe["ema_half_life"]:g} of the run'
                                          if c.recipe.get('ema_half_life') else '') +
          (f', step search up to {c.recipe["step_search"]:g}x' if c.recipe.get('step_search') else '') + ')')
    print()


def write_options(c: TrainingOptions, run_dir: str) -> None:
    with dnnlib.util.atomic_write_path(os.path.join(run_dir, 'training_options.json')) as tmp:
        with open(tmp, 'wt') as f:
            json.dump(dict(c.to_dict(), run_dir=run_dir), f, indent=2)

#----------------------------------------------------------------------------


def parse_comma_separated_list(s):
    if isinstance(s, (list, tuple)):
        return list(s)
    if s is None or s.lower() == 'none' or s == '':
        return []
    return [x.strip() for x in s.split(',') if x.strip()]


def parse_floats(s):
    if isinstance(s, (list, tuple)):
        return [float(x) for x in s]
    try:
        return [float(x) for x in s.split(',')]
    except ValueError as err:
        raise click.BadParameter(f'expected comma-separated numbers, got {s!r}') from err


POSITIVE = click.FloatRange(min=0, min_open=True)

#----------------------------------------------------------------------------


@click.command()
# Required.
@click.option('--outdir',       help='Where to save the results', metavar='DIR', required=True)
@click.option('--data',         help='Identity folder or zip (image_N.png, image_N_latent.npy, dataset.json), or a folder of them (one adapter each)', metavar='[ZIP|DIR]', required=True)
@click.option('--resume',       help='Pretrained generator pickle (official EG3D or ours); our snapshot continues its run', metavar='PKL', required=True)
@click.option('--cfg',          help="Rendering options: official ffhq/afhq/shapenet, or 'resume' to keep the pickle's", type=click.Choice(['ffhq', 'afhq', 'shapenet', 'resume']), required=True)
# Scale and schedule.
@click.option('--gpus',         help='Number of processes (GPUs, or CPU processes with --device=cpu)', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--batch',        help="Total batch size (a recipe with images per step, the default's, takes it in steps of one image of each identity)", metavar='INT', type=click.IntRange(min=1), default=4, show_default=True)
@click.option('--batch-gpu',    help='Samples per forward pass per process  [default: batch/gpus]', metavar='INT', type=click.IntRange(min=1))
@click.option('--kimg',         help='Training length in thousands of images (fractions allowed)', metavar='KIMG', type=POSITIVE, default=500, show_default=True)
@click.option('--tick',         help='Progress report interval in kimg (fractions allowed)', metavar='KIMG', type=POSITIVE, default=4, show_default=True)
@click.option('--snap',         help='Snapshot interval in ticks', metavar='TICKS', type=click.IntRange(min=1), default=50, show_default=True)
@click.option('--seed',         help='Random seed', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--recipe',       help='Optimizer, schedule and step: adapter-per-image (measured default: adapter-search on one image of each identity per step), adapter (Adam with LoRA+, warm-up, cosine and EMA, a step per batch), adapter-search (adapter with a step search: one more forward pass per step), adapter-sf (schedule-free Adam; LoRA only) or my3dgen (the paper\'s)', type=click.Choice(list(RECIPES)), default=DEFAULT_RECIPE, show_default=True)
@click.option('--glr',          help="Peak learning rate of Adam  [default: the recipe's]", metavar='FLOAT', type=POSITIVE)
@click.option('--betas',        help="Adam betas  [default: the recipe's]", metavar='B1,B2', type=parse_floats)
# Validation.
@click.option('--val-views',    'val_views', help='Views of each identity held out for validation (spread over the poses)  [default: 1 in 8, at most 8; 0 = none]', metavar='INT', type=click.IntRange(min=0))
@click.option('--val-data',     'val_data', help='Validation views in a folder (an identity folder, or one per training identity) instead of held-out views', metavar='DIR')
@click.option('--early-stop',   'early_stop', help='Stop after this many ticks without a better validation score  [default: never]', metavar='TICKS', type=click.IntRange(min=1))
# Adapters.
@click.option('--lora',         help='LoRA rank; 0 = full fine-tuning of the generator', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--lora_alpha',   help='LoRA alpha (delta scaled by alpha/r)', metavar='FLOAT', type=click.FloatRange(min=0), default=1.0, show_default=True)
@click.option('--lora_dropout', help='Dropout on the adapter input', metavar='FLOAT', type=click.FloatRange(min=0, max=1, max_open=True), default=0.0, show_default=True)
@click.option('--lora_targets', help='Components with adapters: mapping,synthesis,superresolution,decoder', metavar='LIST', type=parse_comma_separated_list, default='synthesis,superresolution', show_default=True)
@click.option('--lora_extras',  help="'my3dgen': also train biases, noise strengths, const input of adapted layers", type=click.Choice(['none', 'my3dgen']), default='none', show_default=True)
@click.option('--conv_factorization', help='Conv adapter factors: my3dgen A(r*k, in*k*k) B(out, r*k), or standard', type=click.Choice(['my3dgen', 'standard']), default='my3dgen', show_default=True)
@click.option('--adalora',      help='AdaLoRA (SVD adapters with rank pruning) instead of LoRA', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--adalora_target_rank', help='AdaLoRA average final rank  [default: --lora]', metavar='INT', type=click.IntRange(min=0))
@click.option('--adalora_init_rank',   help='AdaLoRA initial rank  [default: 2 x target]', metavar='INT', type=click.IntRange(min=1))
@click.option('--adalora_tinit',   help='AdaLoRA warm-up steps before pruning', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--adalora_tfinal',  help='AdaLoRA final steps with a fixed rank pattern', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--adalora_delta_t', help='AdaLoRA steps between rank re-allocations', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--adalora_orth_reg', help='AdaLoRA orthogonal regularisation weight', metavar='FLOAT', type=click.FloatRange(min=0), default=0.5, show_default=True)
@click.option('--freeze_render', help='Decoder and renderer get no adapters and no gradients', metavar='BOOL', type=bool, default=False, show_default=True)
# Objective.
@click.option('--lpips',        help="LPIPS network: alex, vgg, none ('alex-random'/'vgg-random': random backbone, testing only)", type=click.Choice(['alex', 'vgg', 'none', 'alex-random', 'vgg-random']), default='alex', show_default=True)
@click.option('--id_regularization', help='Identity loss: 1 - ArcFace cosine(render, photo); needs --id_model', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--id_weight',    help='Weight of the identity loss', metavar='FLOAT', type=click.FloatRange(min=0), default=1.0, show_default=True)
@click.option('--sym_regularization', help='Symmetric-view identity loss (lazy, every --density_reg_every steps); needs --id_model', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--sym_weight',   help='Weight of the symmetric-view identity loss', metavar='FLOAT', type=click.FloatRange(min=0), default=1.0, show_default=True)
@click.option('--id_model',     help='ArcFace IR-SE50 weights (model_ir_se50.pth)', metavar='PTH', type=str)
@click.option('--density_reg',  help='Density regularisation strength', metavar='FLOAT', type=click.FloatRange(min=0), default=0.25, show_default=True)
@click.option('--density_reg_p_dist', help='Offset of the perturbed density samples', metavar='FLOAT', type=click.FloatRange(min=0), default=0.004, show_default=True)
@click.option('--density_reg_every', help='Lazy regularisation interval in steps', metavar='INT', type=click.IntRange(min=1), default=4, show_default=True)
@click.option('--neural_rendering_resolution_initial', help="Neural rendering resolution  [default: the superresolution module's input, 128 for FFHQ 512]", metavar='INT', type=click.IntRange(min=8))
@click.option('--mirror',       help='Add x-flipped copies with mirrored cameras', metavar='BOOL', type=bool, default=False, show_default=True)
# Performance and misc.
@click.option('--sr_num_fp16_res', help="fp16 resolutions in superresolution  [default: the pickle's]", metavar='INT', type=click.IntRange(min=0))
@click.option('--g_num_fp16_res',  help="fp16 resolutions in the backbone  [default: the pickle's]", metavar='INT', type=click.IntRange(min=0))
@click.option('--device',       help='cuda or cpu  [default: cuda if available]', type=click.Choice(['cuda', 'cpu']))
@click.option('--allow-tf32', 'allow_tf32', help='TF32 matmuls and convolutions on Ampere and newer GPUs (faster, less precise)', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--nobench',      help='Disable cuDNN benchmarking', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--workers',      help='Accepted for EG3D compatibility; the identity is held in memory', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--metrics',      help="Quality metrics: only 'none' (no FID/KID here)", metavar='[NAME|A,B,C|none]', type=parse_comma_separated_list, default='none', show_default=True)
@click.option('--trust-pickle', 'trust_pickle', help='Load --resume with plain (code-executing) unpickling; only for files you trust', is_flag=True)
@click.option('--grid',         help='Samples (rows) in the image grids; 0 = none', metavar='INT', type=click.IntRange(min=0), default=8, show_default=True)
@click.option('--progress',     help='Show a progress bar', metavar='BOOL', type=bool, default=True, show_default=True)
@click.option('--desc',         help='String to include in result dir name', metavar='STR', type=str)
@click.option('-n', '--dry-run', help='Check the inputs, print training options and exit', is_flag=True)
def main(**kwargs):
    """Personalize a pretrained EG3D generator to one identity (My3DGen), or to many at once.

    \b
    # LoRA rank 1 on 4 GPUs, as in My3DGen:
    python train.py --outdir=training-runs --data=datasets/Barack --resume=networks/ffhqrebalanced512-128.pkl \\
        --cfg=ffhq --batch=4 --gpus=4 --snap=5 --kimg=500 --lora=1 --lora_alpha=1 --adalora=False --freeze_render=False

    \b
    # One adapter per identity, all in one run (--data holds one folder per person):
    python train.py --outdir=training-runs --data=datasets/people --resume=networks/ffhqrebalanced512-128.pkl \\
        --cfg=ffhq --batch=16 --gpus=4 --snap=5 --kimg=2000 --lora=1

    \b
    # Continue an interrupted run from its last snapshot:
    python train.py --outdir=training-runs --data=datasets/Barack --cfg=ffhq --batch=4 --gpus=4 --snap=5 --kimg=500 \\
        --resume=training-runs/00000-ffhq-Barack-gpus4-batch4-lora1/network-snapshot-000100.pkl
    """
    opts = dnnlib.EasyDict(kwargs)

    def fail(msg: str):
        raise click.ClickException(msg)

    # Processes and batch.
    env = _torchrun_env()
    num_gpus = env['world_size'] if env else opts.gpus
    if env and opts.gpus not in (1, num_gpus):
        fail(f'--gpus={opts.gpus} but torchrun started {num_gpus} processes; leave --gpus out under torchrun')
    device = opts.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if device == 'cuda' and not torch.cuda.is_available():
        fail('--device=cuda but no CUDA device is available; pass --device=cpu')
    if device == 'cuda' and not env and num_gpus > torch.cuda.device_count():
        fail(f'--gpus={num_gpus} but only {torch.cuda.device_count()} CUDA device(s) are visible')
    batch_gpu = opts.batch_gpu or opts.batch // num_gpus
    if opts.batch % num_gpus != 0:
        fail('--batch must be a multiple of --gpus')
    if batch_gpu < 1 or opts.batch % (num_gpus * batch_gpu) != 0:
        fail('--batch must be a multiple of --gpus times --batch-gpu')
    if opts.metrics:
        fail(f'--metrics={",".join(opts.metrics)}: quality metrics (FID, KID, ...) are not available in personalization '
             'training: this project has no metric implementations nor their Inception weights offline. '
             'Pass --metrics=none (the default).')
    if opts.betas is not None and len(opts.betas) != 2:
        fail('--betas takes two numbers, e.g. --betas=0,0.99')
    try:
        recipe = RECIPES[opts.recipe].with_overrides(lr=opts.glr, betas=opts.betas)
    except ValueError as err:
        fail(f'--glr / --betas: {err}')
    if opts.val_data is not None and opts.val_views is not None:
        fail('--val-data names the validation views; --val-views holds views out of --data instead: pass one of them')
    if opts.early_stop is not None and opts.val_views == 0:
        fail('--early-stop needs validation; it cannot work with --val-views=0')

    # Objective.
    if (opts.id_regularization or opts.sym_regularization) and not opts.id_model:
        fail('--id_regularization / --sym_regularization need --id_model=<path to model_ir_se50.pth> '
             '(ArcFace IR-SE50 weights, as used by pSp / MyStyle / My3DGen)')
    if opts.id_model and (opts.id_regularization or opts.sym_regularization):
        from training.arcface import IRSE50
        try:
            IRSE50.load(opts.id_model)
        except (OSError, ValueError) as err:
            fail(str(err))
    from training.loss import LPIPSUnavailable, make_lpips
    try:
        make_lpips(opts.lpips, torch.device('cpu'))
    except LPIPSUnavailable as err:
        fail(str(err))

    # Adapters.
    from training.adapters import AdapterConfig
    targets = tuple(opts.lora_targets)
    if opts.freeze_render and 'decoder' in targets:
        fail('--freeze_render=True freezes the decoder, but --lora_targets includes decoder; drop one of them')
    if opts.adalora and opts.lora < 1:
        fail('--adalora=True needs --lora=<target rank> >= 1 (or --adalora_target_rank)')
    if opts.adalora and recipe.optimizer == 'schedulefree':
        fail(f'--recipe={opts.recipe} (schedule-free Adam) cannot train AdaLoRA: its rank masks would change the '
             'point the gradients are taken at, not the average it keeps; use --recipe=adapter')
    try:  # AdaLoRA's schedule counts optimizer steps, and a recipe may take the batch in several
        num_identities = len(identity_folders(opts.data) or [None])
    except DatasetError as err:
        fail(str(err))
    total_steps = math.ceil(opts.kimg * 1000 / step_batch(recipe, opts.batch, batch_gpu, num_identities, num_gpus)[0])
    adapter_config = None
    if opts.lora > 0:
        target_r = opts.adalora_target_rank if opts.adalora_target_rank is not None else opts.lora
        try:
            adapter_config = AdapterConfig(
                r=opts.lora, alpha=opts.lora_alpha, dropout=opts.lora_dropout, targets=targets, extras=opts.lora_extras,
                conv_factorization=opts.conv_factorization, adalora=opts.adalora,
                init_r=opts.adalora_init_rank or max(2 * target_r, 1), target_r=target_r, tinit=opts.adalora_tinit,
                tfinal=opts.adalora_tfinal, delta_t=opts.adalora_delta_t, orth_reg_weight=opts.adalora_orth_reg,
                total_step=total_steps if opts.adalora else None).to_dict()
        except ValueError as err:
            fail(f'adapter options: {err}')
        if opts.adalora and opts.adalora_tinit + opts.adalora_tfinal >= total_steps:
            fail(f'--adalora_tinit + --adalora_tfinal must be below the run\'s {total_steps} steps')
    if 'mapping' in targets and opts.lora > 0:
        print('Note: mapping adapters get no gradient: training feeds the latents (w) straight to G.synthesis.')
    mode = ('full' if adapter_config is None else
            f'adalora{adapter_config["target_r"]}' if opts.adalora else f'lora{opts.lora}')

    # Generator and data: load the pickle once here to check the data against it before training.
    if not os.path.isfile(opts.resume):
        fail(f'--resume: {opts.resume!r} does not exist')
    try:
        resume_data = legacy.load_network_pkl(opts.resume, allow_unsafe=opts.trust_pickle)
    except Exception as err:
        fail(f'--resume: cannot load {opts.resume!r}: {err}')
    G = resume_data['G_ema'] if resume_data.get('G_ema') is not None else resume_data['G']
    resolution, num_ws, w_dim = G.img_resolution, G.backbone.num_ws, G.w_dim
    continuing = isinstance(resume_data.get('personalization'), dict)
    if continuing:
        print('--resume is a personalization snapshot: continuing its run (its adapters and settings are kept).')
        snapshot_cfg = resume_data.get('adapter_config')
        mode = 'full' if snapshot_cfg is None else (f'adalora{snapshot_cfg["target_r"]}' if snapshot_cfg['adalora']
                                                    else f'lora{snapshot_cfg["r"]}')
    recorded = resume_data.get('personalization', {}).get('identities') if continuing else None
    del resume_data, G
    try:
        training_set = IdentitySet(opts.data, resolution=resolution, num_ws=num_ws, w_dim=w_dim, xflip=opts.mirror)
    except DatasetError as err:
        fail(str(err))
    try:
        train_part, val_set = validation.make_views(training_set, opts.val_views, opts.val_data, resolution, num_ws, w_dim)
    except DatasetError as err:
        fail(str(err))
    if opts.early_stop is not None and val_set is None:
        fail(f'--early-stop needs validation views, and --data={opts.data} has too few images for the default '
             '--val-views (1 in 8): pass --val-views=N or --val-data=DIR')
    identities = training_set.identity_names
    if training_set.multi:
        if mode == 'full':
            fail(f'--data={opts.data} holds {len(identities)} identities ({", ".join(identities[:4])}'
                 f'{", ..." if len(identities) > 4 else ""}): a multi-identity run trains one adapter per identity, '
                 'so it needs --lora=R; full fine-tuning would train one generator shared by all of them')
        mode = f'{mode}-ids{len(identities)}'
    if continuing and recorded is not None and len(recorded) + len(identities) > 2 and list(recorded) != identities:
        fail(f'--resume={opts.resume} was trained on the identities {list(recorded)}, but --data={opts.data} '
             f'holds {identities}; pass the same --data to continue the run')
    dataset_name = training_set.name

    c = TrainingOptions(
        training_set_kwargs=dict(path=opts.data, xflip=opts.mirror, resolution=resolution, max_size=len(train_part),
                                 identities=identities),
        resume_pkl=opts.resume, trust_pickle=opts.trust_pickle, cfg=opts.cfg,
        g_num_fp16_res=opts.g_num_fp16_res, sr_num_fp16_res=opts.sr_num_fp16_res,
        adapter_config=adapter_config, freeze_render=opts.freeze_render, mode=mode,
        G_opt_kwargs=dict(class_name=recipe.optimizer_class, lr=recipe.lr, betas=list(recipe.betas),
                          eps=recipe.eps),
        recipe=recipe.to_dict(),
        val_views=opts.val_views, val_data=opts.val_data, early_stop=opts.early_stop,
        loss_kwargs=dict(lpips_net=opts.lpips,
                         id_model=opts.id_model if (opts.id_regularization or opts.sym_regularization) else None,
                         id_weight=opts.id_weight if opts.id_regularization else 0.0,
                         sym_weight=opts.sym_weight if opts.sym_regularization else 0.0,
                         density_reg=opts.density_reg, density_reg_p_dist=opts.density_reg_p_dist),
        neural_rendering_resolution=opts.neural_rendering_resolution_initial,
        density_reg_every=opts.density_reg_every,
        total_kimg=opts.kimg, kimg_per_tick=opts.tick, network_snapshot_ticks=opts.snap,
        batch_size=opts.batch, batch_gpu=batch_gpu, random_seed=opts.seed, num_gpus=num_gpus,
        device=device, workers=opts.workers, cudnn_benchmark=not opts.nobench, progress_bar=opts.progress, grid_rows=opts.grid,
        allow_tf32=opts.allow_tf32, metrics=[],
    )
    desc = f'{opts.cfg}-{dataset_name}-gpus{num_gpus}-batch{opts.batch}-{mode}'
    if opts.desc:
        desc += f'-{opts.desc}'
    launch_training(c=c, desc=desc, outdir=opts.outdir, dry_run=opts.dry_run)

#----------------------------------------------------------------------------


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
