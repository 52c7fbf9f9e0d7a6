"""Train the camera-aware W+ encoder (3DpSp: pSp with ReStyle refinement) for a frozen EG3D generator.

Command-line interface only: checks the inputs, builds a plain options dict and hands it to
`training.encoder.training_loop.training_loop` in one process, in `--gpus` spawned processes, or in
each process that `torchrun` started (as train.py). See docs/encoder.md.
"""

import faulthandler
import json
import os

import click
import torch

import dnnlib
from train import _torchrun_env, make_run_dir, run_processes
from training import inference as inf
from training.encoder import files
from training.encoder.data import FolderSet
from training.encoder import resnet_backbone
from training.encoder.networks import BACKBONES
from training.encoder.replay import default_updates
from training.encoder.resnet_backbone import BackboneWeightsError
from training.encoder.training_loop import training_loop

LATENT_ONLY = dict(image=0.0, lpips=0.0, id=0.0, latent=1.0, mirror=0.0, converged=1.0)  # loss.LossWeights fields


def _init_process(c: dnnlib.EasyDict, local_rank: int, local_world_size: int) -> None:
    if c.device == 'cpu':
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size))
    else:
        torch.cuda.set_device(local_rank)


def subprocess_fn(rank: int, c: dnnlib.EasyDict, temp_dir: str) -> None:
    """One process of a `--gpus=N` run started by torch.multiprocessing.spawn."""
    _init_process(c, rank, c.num_gpus)
    if c.num_gpus > 1:
        faulthandler.enable()  # a rank killed by a signal (a C++ abort, a segfault) prints its threads' Python stacks
        init_method = f'file://{os.path.abspath(os.path.join(temp_dir, ".torch_distributed_init"))}'
        torch.distributed.init_process_group(backend='nccl' if c.device == 'cuda' else 'gloo',
                                             init_method=init_method, rank=rank, world_size=c.num_gpus)
    try:
        training_loop(rank=rank, local_rank=rank, **c)
        if c.num_gpus > 1:
            torch.distributed.barrier()  # all ranks done (rank 0 writes the last files) before any disconnects
    finally:
        if c.num_gpus > 1:
            torch.distributed.destroy_process_group()


def launch(c: dnnlib.EasyDict, outdir: str, desc: str) -> None:
    env = _torchrun_env()
    if env:  # torchrun: this process is one rank; rank 0 picks the run directory.
        _init_process(c, env['local_rank'], env['local_world_size'])
        faulthandler.enable()  # as a spawned rank: a crash prints its threads' Python stacks
        torch.distributed.init_process_group(backend='nccl' if c.device == 'cuda' else 'gloo', init_method='env://')
        holder = [make_run_dir(outdir, desc) if env['rank'] == 0 else None]
        if env['rank'] == 0:
            write_options(c, holder[0])
        torch.distributed.broadcast_object_list(holder, src=0)
        try:
            training_loop(run_dir=holder[0], rank=env['rank'], local_rank=env['local_rank'], **c)
            torch.distributed.barrier()  # all ranks done (rank 0 writes the last files) before any disconnects
        finally:
            torch.distributed.destroy_process_group()
        return
    run_dir = make_run_dir(outdir, desc)
    write_options(c, run_dir)
    c.run_dir = run_dir
    run_processes(subprocess_fn, c)


def write_options(c: dnnlib.EasyDict, run_dir: str) -> None:
    print(f'Run directory: {run_dir}')
    print(json.dumps(c, indent=2))
    with open(os.path.join(run_dir, 'training_options.json'), 'wt') as f:
        json.dump(dict(c, run_dir=run_dir), f, indent=2)


def parse_folders(value) -> list:
    if not value:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    return [part.strip() for item in items for part in str(item).split(',') if part.strip()]


@click.command()
@click.option('--network', 'network_pkl', required=True, metavar='PKL',
              help='Frozen generator (official EG3D pickle or ours)')
@click.option('--outdir', required=True, metavar='DIR', help='Where the run directory goes')
@click.option('--kimg', type=click.FloatRange(min=0, min_open=True), default=200, show_default=True,
              help='Training length in thousands of images (fractions allowed)')
@click.option('--batch', type=click.IntRange(min=1), default=8, show_default=True, help='Total batch size')
@click.option('--batch-gpu', 'batch_gpu', type=click.IntRange(min=1), default=None,
              help='Images per pass (a chunk of the batch); the batch is the same for any number of processes '
                   'at the same value  [default: batch / gpus]')
@click.option('--gpus', type=click.IntRange(min=1), default=1, show_default=True,
              help='Processes (GPUs, or CPU processes with --device=cpu); leave out under torchrun')
@click.option('--snap', type=click.IntRange(min=1), default=10, show_default=True,
              help='Encoder file every SNAP ticks of 1 kimg (and at the end)')
@click.option('--iters', type=click.IntRange(min=1), default=5, show_default=True, help='ReStyle iterations per image')
@click.option('--lpips', 'lpips_net', type=click.Choice(inf.LPIPS_CHOICES), default='alex', show_default=True,
              help="LPIPS network ('*-random': testing only)")
@click.option('--data', multiple=True, metavar='DIR[,DIR]',
              help='Folders of aligned photos with dataset.json (latents optional); default: the generator\'s samples')
@click.option('--resume', metavar='FILE', help='encoder-<kimg>.safetensors of a run to continue exactly')
@click.option('--backbone', type=click.Choice(BACKBONES), default='ir', show_default=True,
              help='ir: trained here from scratch; resnet34: ImageNet\'s ResNet-34 (needs --backbone-weights)')
@click.option('--backbone-weights', 'backbone_weights', metavar='PTH',
              help='torchvision\'s ResNet-34 ImageNet checkpoint (resnet34-b627a593.pth) for --backbone=resnet34')
@click.option('--id_model', '--id-model', 'id_model', metavar='PTH',
              help='ArcFace IR-SE50 weights (model_ir_se50.pth) for the identity loss; without it the loss is skipped')
@click.option('--latent-only', 'latent_only', is_flag=True,
              help='Train on the latent loss alone (and the converged term): no pass back through the generator, '
                   'no last render (CPU budgets)')
@click.option('--replay', type=click.IntRange(min=0), default=None,
              help='Extra latent-loss updates per step on stored ReStyle states, no renders  [default: about 4/3 '
                   'draws per stored example, 8 at 5 iterations; with --resume, the resumed run\'s]')
@click.option('--lr', type=click.FloatRange(min=0, min_open=True), default=5e-4, show_default=True,
              help='Adam learning rate')
@click.option('--nrr', 'neural_rendering_resolution', type=click.IntRange(min=8), default=None,
              help="Neural rendering resolution  [default: the generator's]")
@click.option('--seed', type=click.IntRange(min=0), default=0, show_default=True, help='Random seed')
@click.option('--device', type=click.Choice(['cuda', 'cpu']), default=None, help='[default: cuda if available]')
@click.option('--progress', type=bool, default=True, show_default=True, help='Show a progress bar')
@inf.user_errors
def main(network_pkl, outdir, kimg, batch, batch_gpu, gpus, snap, iters, lpips_net, data, resume, backbone,
         backbone_weights, id_model, latent_only, replay, lr, neural_rendering_resolution, seed, device, progress):
    """Train an encoder that inverts photos (with their cameras) into the W+ of a frozen EG3D generator.

    \b
    # The official FFHQ generator, its own samples as data, 4 GPUs:
    python train_encoder.py --network=../networks/ffhqrebalanced512-128.pkl --outdir=../runs/encoder \\
        --kimg=2000 --batch=16 --gpus=4 --lpips=alex
    # Continue that run from its last file:
    python train_encoder.py ... \\
        --resume=../runs/encoder/00000-encoder-ffhqrebalanced512-128-batch16/encoder-000400.safetensors
    """
    env = _torchrun_env()
    num_gpus = env['world_size'] if env else gpus
    if env and gpus not in (1, num_gpus):
        raise inf.InputError(f'--gpus={gpus} but torchrun started {num_gpus} processes; '
                             'leave --gpus out under torchrun')
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if device == 'cuda' and not torch.cuda.is_available():
        raise inf.InputError('--device=cuda but no CUDA device is available; pass --device=cpu')
    if batch % num_gpus:
        raise inf.InputError(f'--batch={batch} must be a multiple of the {num_gpus} processes')
    batch_gpu = batch_gpu or batch // num_gpus
    if batch % (batch_gpu * num_gpus):
        raise inf.InputError(f'--batch={batch} must be a multiple of --batch-gpu={batch_gpu} times the {num_gpus} '
                             'processes')
    folders = parse_folders(data)
    if resume and (backbone != 'ir' or backbone_weights):
        raise inf.InputError('--resume continues the backbone in its encoder file: leave --backbone and '
                             '--backbone-weights out')
    if (backbone == 'resnet34') != bool(backbone_weights):
        raise inf.InputError('--backbone=resnet34 starts from ImageNet weights: pass --backbone-weights=<torchvision '
                             'resnet34 .pth>' if backbone_weights is None else
                             '--backbone-weights needs --backbone=resnet34 (the ir backbone trains from scratch)')

    # Everything the run reads is checked here, before a process starts.
    G = inf.load_generator(network_pkl)
    if folders:
        folder_set = FolderSet(folders, G.img_resolution, inf.num_ws(G), int(G.w_dim))
        if latent_only and not bool(folder_set.has_ws.any()):
            raise inf.InputError('--latent-only trains on known latents, and no --data photo has one '
                                 '(image_N_latent.npy beside image_N.png)')
    resumed_training = None
    if resume:
        try:
            _, _, resumed_training = files.load(resume, G)
        except files.EncoderFileError as err:
            raise inf.InputError(f'--resume: {err}') from err
    if replay is None:  # a resumed run keeps its replay, so that it continues exactly
        replay = resumed_training.get('replay', 0) if resumed_training else default_updates(iters)
    if backbone_weights:
        try:
            resnet_backbone.load_imagenet(*resnet_backbone.build(), backbone_weights)  # the backbone alone
        except BackboneWeightsError as err:
            raise inf.InputError(f'--backbone-weights: {err}') from err
    if id_model:
        from training.arcface import IRSE50
        try:
            IRSE50.load(id_model)
        except (OSError, ValueError) as err:
            raise inf.InputError(str(err)) from err
    inf.build_lpips(lpips_net)
    del G

    c = dnnlib.EasyDict(network_pkl=network_pkl, data=folders, resume=resume, backbone=backbone,
                        backbone_weights=backbone_weights, total_kimg=kimg,
                        snapshot_ticks=snap, batch_size=batch, batch_gpu=batch_gpu, iters=iters, lr=lr,
                        replay=replay, loss_weights=LATENT_ONLY if latent_only else None,
                        lpips_net=lpips_net, id_model=id_model, neural_rendering_resolution=neural_rendering_resolution,
                        random_seed=seed, num_gpus=num_gpus, device=device, progress_bar=progress)
    name = os.path.splitext(os.path.basename(network_pkl))[0]
    launch(c, outdir, f'encoder-{name}-batch{batch}')


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
