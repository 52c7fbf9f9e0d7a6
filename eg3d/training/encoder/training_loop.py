"""Training loop of the camera-aware encoder (3DpSp with ReStyle): the frozen generator renders, the encoder learns.

    batch (generator samples, or folder photos) -> ReStyle iterations from w_avg -> loss terms of every
    iteration (image, LPIPS, identity, latent, mirrored) -> encoder gradients -> all-reduce -> Adam step
    -> log / encoder-<kimg>.safetensors + training-state-<kimg>.pt

`training_loop(**options)` runs in every process of a run; `train_encoder.py` builds the options.
Randomness is a pure function of (random_seed, step, chunk), as in the personalization loop, so a run
resumed from an encoder file continues exactly as the uninterrupted run would, on any number of processes.
"""

import json
import math
import os
import time
from typing import List, Optional, Sequence, Tuple

import psutil
import torch
import tqdm

import dnnlib
from torch_utils import misc
from training import inference as inf
from training.dataset import batch_indices
from training.encoder import files, restyle
from training.encoder.data import FolderSet, generator_batch, sample_cameras
from training.encoder.loss import EncoderLoss, LossWeights
from training.encoder.networks import EncoderConfig, W3DEncoder
from training.encoder.replay import MEMORIZING_DRAWS, ReplayBuffer, draws_per_example
from training.snapshots import kimg_tag
from training.train_step import all_reduce_gradients, chunk_seed

W_AVG_SAMPLES = 10000


@torch.no_grad()
def mean_latent(G: torch.nn.Module, num_samples: int = W_AVG_SAMPLES, seed: int = 123,
                batch: int = 1000) -> torch.Tensor:
    """w_avg [num_ws, w_dim]: the mean mapped latent over z ~ N(0, I) and FFHQ-like conditioning cameras."""
    device = next(G.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(G.w_dim, dtype=torch.float64, device=device)
    for start in range(0, num_samples, batch):
        n = min(batch, num_samples - start)
        z = torch.randn([n, G.z_dim], generator=gen).to(device)
        c = sample_cameras(G, n, seed + start).to(device)
        total += G.mapping(z, c, truncation_psi=1)[:, 0].double().sum(0)
    w = (total / num_samples).float()
    return w.reshape(1, -1).repeat(int(G.backbone.mapping.num_ws), 1)


def renderer(G: torch.nn.Module, neural_rendering_resolution: Optional[int]) -> restyle.RenderFn:
    """(ws, c) -> G's image; the renderer's depth jitter draws from the global RNG (seeded per chunk)."""
    def render(ws: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return inf.render(G, ws, c, neural_rendering_resolution, seed=None)
    return render


def add_gradients(total: Optional[List[torch.Tensor]], params: List[torch.Tensor]) -> List[torch.Tensor]:
    """total + the gradients of params (zeros where None); the gradients themselves if total is None.

    A chunk's gradient is summed over its iterations' backward passes on its own, then added to the other
    chunks' sums, in chunk order: with one chunk per process, this is the addition the all-reduce makes, so a run
    on 2 processes computes the bits of a run on 1. Accumulating every backward pass into the same .grad added
    the second chunk's iterations one by one instead, and rounding then differed in the last bit; through the
    kinks of the (Leaky/P)ReLUs (a unit that flips sign changes its gradient by a finite step), such a bit can
    move the next step's gradient of a head by percents.
    """
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    return grads if total is None else [t + g for t, g in zip(total, grads)]


def training_loop(
    run_dir: str = '.',
    network_pkl: str = None,                  # The frozen generator (official EG3D pickle or ours).
    data: Sequence[str] = (),                 # Folders with dataset.json; empty = the generator's own samples.
    resume: Optional[str] = None,             # encoder-<kimg>.safetensors to continue.
    total_kimg: float = 100,
    kimg_per_tick: float = 1,
    snapshot_ticks: int = 10,
    batch_size: int = 4,
    batch_gpu: int = 4,
    iters: int = 5,                           # ReStyle iterations per batch.
    lr: float = 5e-4,
    adam_kwargs: Optional[dict] = None,       # Other Adam arguments (betas, eps); default betas (0.9, 0.999).
    lpips_net: str = 'alex',
    id_model: Optional[str] = None,           # ArcFace IR-SE50 weights; None = no identity loss.
    loss_weights: Optional[dict] = None,      # LossWeights fields.
    psi_range: Tuple[float, float] = (0.4, 1.0),
    neural_rendering_resolution: Optional[int] = None,   # None = the generator's.
    encoder_config: Optional[dict] = None,    # EncoderConfig fields; None = the preset for the generator.
    backbone: str = 'ir',                     # The preset's backbone: 'ir' or 'resnet34' (networks.BACKBONES).
    backbone_weights: Optional[str] = None,   # ImageNet ResNet-34 checkpoint for a fresh resnet34 backbone.
    replay: int = 0,                          # Extra latent-loss updates per step from the replay buffers.
    replay_size: int = 1024,                  # Examples (iteration inputs) the replay buffers keep in all.
    random_seed: int = 0,
    num_gpus: int = 1,
    rank: int = 0,
    local_rank: int = 0,
    device: str = 'cuda',
    progress_bar: bool = True,
) -> dict:
    start_time = time.time()
    device = torch.device('cuda', local_rank) if device == 'cuda' else torch.device('cpu')
    weights = LossWeights(**(loss_weights or {}))

    def log(msg: str) -> None:
        if rank == 0:
            tqdm.tqdm.write(msg)
            with open(os.path.join(run_dir, 'log.txt'), 'a') as f:
                f.write(msg + '\n')

    log(f'Loading "{network_pkl}"...')
    G = inf.load_generator(network_pkl, device=device)
    num_ws, w_dim = inf.num_ws(G), int(G.w_dim)
    nrr = neural_rendering_resolution or int(G.neural_rendering_resolution)
    folder_set = FolderSet(data, G.img_resolution, num_ws, w_dim) if data else None

    # Encoder, its start latent and the counters: fresh, or from the file of the run we continue.
    cur_nimg, step, state_path = 0, 0, None
    if resume:
        encoder, w_avg, info = files.load(resume, G, device)
        encoder.requires_grad_(True)
        cur_nimg, step = int(info['cur_nimg']), int(info['step'])
        random_seed = int(info.get('random_seed', random_seed))
        if int(info.get('batch_size', batch_size)) != batch_size:
            log(f'Warning: the run used batch {info["batch_size"]}, this one {batch_size}: batches will differ.')
        state_path = os.path.join(os.path.dirname(os.path.abspath(resume)), f'training-state-{kimg_tag(cur_nimg)}.pt')
        log(f'Continuing {resume} at {cur_nimg / 1000:g} kimg (step {step}).')
    else:
        config = EncoderConfig(**encoder_config) if encoder_config else \
            EncoderConfig.for_generator(num_ws, w_dim, G.img_resolution, backbone=backbone)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(random_seed)
            encoder = W3DEncoder(config)
        if backbone_weights:
            encoder.load_backbone_weights(backbone_weights)
            log(f'Backbone: ImageNet ResNet-34 weights from "{backbone_weights}".')
        encoder = encoder.to(device)
        w_avg = mean_latent(G).to(device)
    encoder.train()
    if num_gpus > 1:
        for tensor in misc.params_and_buffers(encoder):
            torch.distributed.broadcast(tensor.data, src=0)
        torch.distributed.broadcast(w_avg, src=0)
    params = list(encoder.parameters())
    optimizer = torch.optim.Adam(params, lr=lr, **{'betas': (0.9, 0.999), **(adam_kwargs or {})})
    # One replay buffer per chunk of the global batch (this process's chunks), so that replay updates draw the
    # same examples however the chunks are spread over processes.
    num_chunks = batch_size // batch_gpu
    local_chunks = list(range(rank, num_chunks, num_gpus))
    buffers = {chunk: ReplayBuffer(replay_size // num_chunks if replay > 0 else 0, encoder.config.input_resolution)
               for chunk in local_chunks}
    if state_path is not None:
        if os.path.isfile(state_path):
            state = torch.load(state_path, map_location='cpu', weights_only=True)
            optimizer.load_state_dict(state['optimizer'])
            for chunk, buffer in buffers.items():
                buffer.load_state_dict(state.get('replay', {}).get(chunk))
            log(f'Restored optimizer state from {state_path}')
        else:
            log(f'Warning: {state_path} not found; the optimizer starts afresh (the run will not match an '
                'uninterrupted one).')
    log(f'Encoder: {sum(p.numel() for p in params):,} parameters, input {encoder.config.input_resolution}px, '
        f'W+ [{num_ws}, {w_dim}]; generator renders {G.img_resolution}px (neural rendering {nrr}px).')
    draws = draws_per_example(replay, iters)
    if draws > MEMORIZING_DRAWS:
        log(f'Warning: --replay={replay} with {iters} iterations draws each stored example about {draws:.1f} times; '
            f'above {MEMORIZING_DRAWS:g} the encoder learns the buffer by heart instead of the problem '
            f'(docs/encoder.md, "Replay"). Use --replay={int(MEMORIZING_DRAWS * (iters + 1))} or less.')

    arcface = None
    if id_model:
        from training.arcface import IRSE50
        arcface = IRSE50.load(id_model, device)
    else:
        log('No face embedding (--id_model): the identity loss is skipped.')
    lpips_module = inf.build_lpips(lpips_net, device)
    loss_fn = EncoderLoss(weights, lpips_module=lpips_module, arcface=arcface)
    render = renderer(G, nrr)
    training_info = dict(iters=iters, neural_rendering_resolution=nrr, batch_size=batch_size,
                         random_seed=random_seed, psi_range=list(psi_range), lpips=lpips_net, lr=lr,
                         data=list(data) if data else 'generator samples', network=str(network_pkl),
                         loss_weights=dict(vars(weights)), identity_loss=arcface is not None, replay=replay,
                         replay_size=replay_size)

    def save_snapshot() -> None:
        replay_states = {chunk: buffer.state_dict() for chunk, buffer in buffers.items()}
        if num_gpus > 1:
            misc.check_ddp_consistency(encoder)
            gathered = [None] * num_gpus
            torch.distributed.all_gather_object(gathered, replay_states)
            replay_states = {chunk: part[chunk] for part in gathered for chunk in part}
        if rank != 0:
            return
        tag = kimg_tag(cur_nimg)
        state = dict(cur_nimg=cur_nimg, step=step, optimizer=optimizer.state_dict(), replay=replay_states)
        with dnnlib.util.atomic_write_path(os.path.join(run_dir, f'training-state-{tag}.pt')) as tmp:
            torch.save(state, tmp)
        files.save(os.path.join(run_dir, f'encoder-{tag}.safetensors'), encoder, w_avg, G,
                   training=dict(training_info, cur_nimg=cur_nimg, step=step, kimg=cur_nimg / 1000))
        log(f'Saved encoder-{tag}.safetensors')

    total_nimg = int(round(total_kimg * 1000))
    tick_nimg = max(int(round(kimg_per_tick * 1000)), 1)
    log(f'Training for {total_kimg:g} kimg ({math.ceil(max(total_nimg - cur_nimg, 0) / batch_size)} steps of '
        f'{batch_size} images, {iters} ReStyle iterations each) on '
        f'{"the generator samples" if folder_set is None else f"{len(folder_set)} photos"}.')
    bar = tqdm.tqdm(total=total_nimg, initial=min(cur_nimg, total_nimg), unit='img', dynamic_ncols=True,
                    disable=(rank != 0 or not progress_bar), desc='train encoder')
    tick_start_time, tick_start_nimg = time.time(), cur_nimg
    sums: dict = {}
    done = cur_nimg >= total_nimg
    while not done:
        indices = batch_indices(len(folder_set), batch_size, step, random_seed) if folder_set is not None else None
        chunk_sum = None
        for chunk in local_chunks:
            optimizer.zero_grad(set_to_none=True)
            seed = chunk_seed(random_seed, step, chunk)
            if folder_set is None:
                batch = generator_batch(G, batch_gpu, seed, psi_range, nrr)
            else:
                batch = folder_set.batch(indices[chunk * batch_gpu:(chunk + 1) * batch_gpu]).to(device)
            torch.manual_seed(seed)
            w_start = restyle.start_latent(w_avg.unsqueeze(0), batch_gpu)
            terms, states = loss_fn(encoder, render, batch, w_start, iters, backward_scale=batch_gpu / batch_size)
            buffers[chunk].add(batch.images, batch.cameras, states, batch.ws, batch.has_ws)
            for name, value in terms.items():
                acc = sums.setdefault(name, [0.0, 0])
                acc[0] += value
                acc[1] += 1
            chunk_sum = add_gradients(chunk_sum, params)
        for param, grad in zip(params, chunk_sum):
            param.grad = grad
        all_reduce_gradients(params, num_gpus)
        optimizer.step()
        for r in range(replay):  # one backward pass per chunk: its gradient is added to the others' as above
            optimizer.zero_grad(set_to_none=True)
            for chunk in local_chunks:  # each chunk's minibatch, scaled to its share of the global batch
                replay_seed = chunk_seed(random_seed, step, (r + 1) * num_chunks + chunk)
                loss = buffers[chunk].update(encoder, batch_gpu, replay_seed, device)
                (loss * weights.latent * batch_gpu / batch_size).backward()
                acc = sums.setdefault('replay_latent', [0.0, 0])
                acc[0] += float(loss.detach())
                acc[1] += 1
            all_reduce_gradients(params, num_gpus)
            optimizer.step()
        step += 1
        cur_nimg += batch_size
        bar.update(min(cur_nimg, total_nimg) - bar.n)

        done = cur_nimg >= total_nimg
        crossed = cur_nimg // tick_nimg > (cur_nimg - batch_size) // tick_nimg
        if not (done or crossed):
            continue
        names = sorted(sums)
        packed = torch.tensor([sums[n][0] for n in names] + [sums[n][1] for n in names], dtype=torch.float64,
                              device=device)
        if num_gpus > 1:
            torch.distributed.all_reduce(packed)
        values = {n: packed[i].item() / max(packed[len(names) + i].item(), 1) for i, n in enumerate(names)}
        tick_time = time.time() - tick_start_time
        stats = {'kimg': cur_nimg / 1000, 'step': step, 'timestamp': time.time(),
                 'sec_per_kimg': tick_time / max((cur_nimg - tick_start_nimg) / 1000, 1e-9),
                 'mem/cpu_rss_gb': psutil.Process().memory_info().rss / 2**30}
        stats.update({f'loss/{n}': v for n, v in values.items()})
        if device.type == 'cuda':
            stats['mem/gpu_peak_gb'] = torch.cuda.max_memory_allocated(device) / 2**30
        if rank == 0:
            with open(os.path.join(run_dir, 'stats.jsonl'), 'a') as f:
                f.write(json.dumps(stats) + '\n')
            elapsed = dnnlib.util.format_time(time.time() - start_time)
            log(f'kimg {cur_nimg / 1000:<8.3f} step {step:<6d} time {elapsed:<10s} '
                f'sec/kimg {stats["sec_per_kimg"]:<8.1f} ' + ' '.join(f'{n} {v:.4f}' for n, v in values.items()))
        bar.set_postfix({n: f'{v:.4f}' for n, v in values.items() if n in ('image', 'latent')})
        if done or (cur_nimg // tick_nimg) % snapshot_ticks == 0:
            save_snapshot()
        sums = {}
        tick_start_time, tick_start_nimg = time.time(), cur_nimg

    bar.close()
    log(f'Done: {cur_nimg / 1000:g} kimg, {step} steps.')
    return dict(cur_nimg=cur_nimg, step=step, encoder=encoder, w_avg=w_avg)
