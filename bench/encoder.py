"""Benchmark of the camera-aware encoder (docs/encoder.md) on the demo base, on CPU.

    .venv/bin/python bench/encoder.py --project 2 --threads 2          # the documented run (120 steps, replay 8)
    .venv/bin/python bench/encoder.py --encoder RUN/encoder-000000.480.safetensors --project 1   # evaluate only
    .venv/bin/python bench/encoder.py --resume RUN/encoder-000000.480.safetensors --kimg 0.96     # train on
    .venv/bin/python bench/encoder.py --kimg 4 --replay 0 --project 4 --batch-gpu 4 --device cuda   # on a GPU

1. Train an encoder for the demo base (networks/demo-heads.pkl, the tiny EG3D that renders the procedural
   head family; --base) with the training loop of train_encoder.py on the generator's own samples, for the
   stated budget (kimg, replay updates; the wall and CPU time are printed; an encoder file every --snap
   ticks), or load a trained one (--encoder).
2. Evaluate on held-out samples of the base (seeds never used in training) and on the held-out views of
   the demo's person (a head outside the family, drawn by the family's exact renderer as eg3d/demo.py
   writes datasets/demo-heldout/; inverted with the base):
   - image MSE of w_avg vs the encoder after each ReStyle iteration 1..iters, raw (ReStyle's plain iterations)
     and guarded (the default of `encode`: no iteration may raise the image error), with the time per image;
   - for the first `--project` images of each set: encoder + 50 projector passes with L-BFGS (the encoder
     start's default) and with Adam (projector.ENCODER_START), 50 passes of L-BFGS from w_avg (the control: what
     the encoder's start adds), vs 200 steps of EG3D's projector from w_avg (Adam with its noise ramp; W+, no
     LPIPS, `--w-avg-samples` mapped z as projector.py): final MSE and wall time; and how many of the L-BFGS
     passes the encoder start needs to reach the 200 steps' fit, with the time ratio at that fit.
3. Inference speed (images/s, batch 1): the encoder network at the demo preset and at the FFHQ 512 preset,
   and a whole `iters`-iteration inversion (with its renders) at the demo config.
Prints markdown tables for docs/benchmarks.md.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'eg3d'))

import demo  # noqa: E402  (the demo base and person)
import projector  # noqa: E402
from train_encoder import LATENT_ONLY  # noqa: E402
from training import encoder as encoders  # noqa: E402
from training.encoder import EncoderConfig, W3DEncoder, encode  # noqa: E402
from training.encoder.data import generator_batch  # noqa: E402
from training.encoder.training_loop import training_loop  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoder_speed import seconds_per_call  # noqa: E402  (the timer of the inference rows)

NRR = demo.NEURAL_RENDERING_RESOLUTION
HELDOUT_SEED = 10**9  # generator samples of the evaluation: a seed the training batches never use
# The demo base learnt G(z, camera) at psi 1 by regression (make_demo_base.py): its mapping's w_avg buffer was
# never tracked (it lies ~4x the latents' spread away from their mean), so truncating towards it would leave
# the latents the base knows. Training and held-out samples are drawn at psi 1, as the base was trained.
PSI_RANGE = (1.0, 1.0)
DEFAULT_BASE = Path(__file__).resolve().parent.parent / 'networks' / 'demo-heads.pkl'


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def demo_identity_heldout(G_base: torch.nn.Module, heldout: int = 8):
    """(images [H, 3, R, R] in [-1, 1], cameras [H, 25]) of the demo person's held-out views: the exact renderer's
    images, quantized to 8 bits as demo.py writes them to datasets/demo-heldout/."""
    labels = torch.from_numpy(demo.camera_labels(G_base, demo.heldout_poses(heldout)))
    images = demo.render_person(demo.person_params(), labels, G_base.img_resolution)['image']
    pixels = (images * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return pixels.float() / 127.5 - 1, labels


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).square().mean(dim=[1, 2, 3])


def evaluate_iterations(G, encoder, w_avg, images, cameras, iters, guard: bool):
    """([iters + 1, N] MSE: row 0 = w_avg, row i = after iteration i; seconds per image)."""
    rows = []
    t0 = time.time()
    for i in range(len(images)):
        states = encode(G, encoder, w_avg, images[i:i + 1], cameras[i:i + 1], iters, NRR, guard=guard)
        rows.append(torch.stack([mse(s.image, images[i:i + 1])[0] for s in states]))
    return torch.stack(rows, dim=1), (time.time() - t0) / len(images)


def compare_projection(G, encoder, w_avg, image, camera, iters, w_avg_samples):
    """{run: (MSE, seconds)}: the guarded encoder's estimate alone; + 50 passes of L-BFGS (the encoder start's
    default) and of Adam (ENCODER_START), each timed with the estimate; the control, 50 passes of L-BFGS from w_avg;
    and the baseline, 200 steps of EG3D's projector from w_avg (W+, MSE only; every run as projector.py runs it)."""
    kwargs = dict(latent_space='w_plus', lpips_model=None, w_avg_samples=w_avg_samples,
                  neural_rendering_resolution=NRR, progress=False)
    t0 = time.time()
    w_init = encode(G, encoder, w_avg, image, camera, iters, NRR)[-1].ws
    t_encoder = time.time() - t0
    runs, losses = {}, {}
    for optimizer in projector.OPTIMIZERS:
        t0 = time.time()
        result = projector.project(G, image, camera, num_steps=50, w_init=w_init, optimizer=optimizer, **kwargs)
        runs[f'encoder + {optimizer}'] = (result.final_loss, t_encoder + time.time() - t0)
        losses[optimizer] = result.losses
    runs['encoder only'] = (result.initial_loss, t_encoder)
    for name, num_steps, optimizer in (('w_avg + lbfgs', 50, 'lbfgs'), ('w_avg', 200, None)):
        t0 = time.time()
        result = projector.project(G, image, camera, num_steps=num_steps, optimizer=optimizer, **kwargs)
        runs[name] = (result.final_loss, time.time() - t0)
    return runs, passes_to_reach(losses['lbfgs'], runs['w_avg'][0])


def passes_to_reach(losses, target: float):
    """The first pass whose loss is at most `target` (1-based), or None. The passes render on the projector's
    seed + 1 and the final losses on its seed: the depth jitter moves the MSE by well under 1%."""
    return next((i + 1 for i, loss in enumerate(losses) if loss <= target), None)


def train(args: argparse.Namespace, base_pkl: str, outdir: str):
    """(encoder, w_avg) trained for the stated budget with train_encoder.py's training loop."""
    weights = dict(image=1.0, lpips=0.0, id=0.0, latent=1.0, mirror=0.5) if args.image_loss else dict(LATENT_ONLY)
    if args.converged is not None:
        weights['converged'] = args.converged
    print(f'Training: {args.kimg:g} kimg, batch {args.batch} in passes of {args.batch_gpu}, {args.iters} ReStyle '
          f'iterations, replay {args.replay} (buffers of {args.replay_size}), lr {args.lr:g}, weights {weights}, '
          f'{args.threads} thread(s)', flush=True)
    t0, c0 = time.time(), cpu_seconds()
    result = training_loop(run_dir=outdir, network_pkl=base_pkl, total_kimg=args.kimg,
                           kimg_per_tick=2 * args.batch / 1000, snapshot_ticks=args.snap, batch_size=args.batch,
                           batch_gpu=args.batch_gpu, iters=args.iters, lr=args.lr, lpips_net='none',
                           loss_weights=weights, psi_range=PSI_RANGE, neural_rendering_resolution=NRR,
                           replay=args.replay, replay_size=args.replay_size, device=args.device,
                           resume=args.resume, progress_bar=False)
    train_wall, train_cpu = time.time() - t0, cpu_seconds() - c0
    part = ' (this part)' if args.resume else ''
    print(f'Training{part} took {train_wall:.0f} s wall, {train_cpu:.0f} s CPU ({train_cpu / 60:.1f} CPU minutes)',
          flush=True)
    return result['encoder'].eval().requires_grad_(False), result['w_avg']


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--kimg', type=float, default=0.48, help='training length (thousands of images)')
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--batch-gpu', type=int, default=1, help='images per pass (1 renders fastest on a CPU)')
    parser.add_argument('--iters', type=int, default=5)
    parser.add_argument('--replay', type=int, default=8,
                        help='replay updates per step (8 with 5 iterations: each stored example drawn ~1.3 times)')
    parser.add_argument('--replay-size', type=int, default=2048, help='examples the replay buffers keep')
    parser.add_argument('--lr', type=float, default=5e-4)
    parser.add_argument('--image-loss', action='store_true', help='also backpropagate the image loss through G')
    parser.add_argument('--converged', type=float, default=None,
                        help='weight of the converged term (default: the loss default; replay keeps its examples)')
    parser.add_argument('--heldout', type=int, default=8, help='held-out generator samples')
    parser.add_argument('--project', type=int, default=1, help='images per set for the projector comparison')
    parser.add_argument('--w-avg-samples', type=int, default=10000, help='as projector.py\'s default')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--snap', type=int, default=25, help='encoder file every SNAP ticks of 2 steps')
    parser.add_argument('--base', default=str(DEFAULT_BASE), help='the demo base pickle')
    parser.add_argument('--encoder', default=None, help='evaluate this encoder file of the demo base (no training)')
    parser.add_argument('--resume', default=None, help='continue this bench run\'s encoder file (its training state '
                        'beside it) up to --kimg, as the uninterrupted run would, with the same options')
    parser.add_argument('--outdir', default=None, help='keep the run here (default: a temp folder)')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    G, _ = demo.load_base(Path(args.base))
    outdir = args.outdir or tempfile.mkdtemp(prefix='bench-encoder-')
    os.makedirs(outdir, exist_ok=True)

    if args.encoder:
        encoder, w_avg, info = encoders.load(args.encoder, G, device)
        print(f'Evaluating {args.encoder} (trained {info.get("step")} steps of batch {info.get("batch_size")})')
    else:
        encoder, w_avg = train(args, args.base, outdir)

    identity_images, identity_cameras = demo_identity_heldout(G)
    G = G.to(device)
    base = generator_batch(G, args.heldout, HELDOUT_SEED, PSI_RANGE, NRR)
    sets = {'base samples': (base.images, base.cameras),
            'demo identity (held-out views)': (identity_images.to(device), identity_cameras.to(device))}

    print('\n| held-out set | refinement | images | MSE w_avg | ' +
          ' | '.join(f'iter {i}' for i in range(1, args.iters + 1)) + ' | reduction vs w_avg | s per image |')
    print('|---|---|---:|---:|' + '---:|' * args.iters + '---:|---:|')
    for name, (images, cameras) in sets.items():
        for refinement, guard in (('raw', False), ('guarded', True)):
            table, seconds = evaluate_iterations(G, encoder, w_avg, images, cameras, args.iters, guard)
            table = table.mean(dim=1)
            cells = ' | '.join(f'{float(v):.5f}' for v in table[1:])
            print(f'| {name} | {refinement} | {len(images)} | {float(table[0]):.5f} | {cells} | '
                  f'{100 * (1 - float(table[-1]) / float(table[0])):.1f}% | {seconds:.2f} |', flush=True)

    runs_shown = ('encoder only', 'encoder + lbfgs', 'encoder + adam', 'w_avg + lbfgs', 'w_avg')
    print('\n| held-out image | encoder only: MSE | time (s) | + 50 L-BFGS passes: MSE | time (s) | + 50 Adam steps: '
          'MSE | time (s) | control, 50 L-BFGS passes from w_avg: MSE | time (s) | 200 steps from w_avg (EG3D): MSE | '
          'time (s) | time ratio | L-BFGS passes to EG3D\'s fit | time ratio at that fit |')
    print('|---|' + '---:|' * (2 * len(runs_shown) + 3))
    for name, (images, cameras) in sets.items():
        for i in range(min(args.project, len(images))):
            runs, passes = compare_projection(G, encoder, w_avg, images[i:i + 1], cameras[i:i + 1], args.iters,
                                              args.w_avg_samples)
            cells = ' | '.join(f'{runs[k][0]:.5f} | {runs[k][1]:.1f}' for k in runs_shown)
            baseline, encoder_only, full = runs['w_avg'][1], runs['encoder only'][1], runs['encoder + lbfgs'][1]
            at_fit = ('- | -' if passes is None else  # the time of those passes, from the 50 passes' mean
                      f'{passes} | {baseline / (encoder_only + (full - encoder_only) * passes / 50):.2f}x')
            print(f'| {name} #{i} | {cells} | {baseline / full:.2f}x | {at_fit} |', flush=True)

    print(f'\n| inference ({args.device}, batch 1) | images/s |')
    print('|---|---:|')
    image, camera = sets['base samples'][0][:1], sets['base samples'][1][:1]
    print(f'| encoder network, demo preset ({encoder.config.input_resolution} px input) | '
          f'{1 / seconds_per_call(lambda: encoder(image, image, camera), 20, device):.1f} |')
    print(f'| {args.iters}-iteration inversion with its renders, demo config | '
          f'{1 / seconds_per_call(lambda: encode(G, encoder, w_avg, image, camera, args.iters, NRR), 2, device):.2f} |')
    ffhq = W3DEncoder(EncoderConfig.for_generator(14, 512, 512)).eval().requires_grad_(False).to(device)
    photo = torch.zeros(1, 3, 512, 512, device=device)
    with torch.no_grad():
        print(f'| encoder network, FFHQ 512 preset (256 px input, '
              f'{sum(p.numel() for p in ffhq.parameters()) / 1e6:.1f}M parameters) | '
              f'{1 / seconds_per_call(lambda: ffhq(photo, photo, camera), 3, device):.2f} |')
    print(f'\nRun files: {outdir}')


if __name__ == '__main__':
    main()
