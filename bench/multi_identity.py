"""Many identities on one frozen base: training throughput and mixed-batch rendering throughput.

    python bench/multi_identity.py                                   # tiny config on CPU, K = 1, 4, 16
    python bench/multi_identity.py --config ffhq512 --device cuda    # FFHQ 512 on a GPU

Training: every identity gets the same work, `--steps` steps of `--per-identity-batch` images.
"One run" is one call of the real training loop on a folder of K identities (batch K * b); "K
sequential runs" is K single-identity runs of that loop (batch b). Both are timed end to end in
this process (loading the pickle, reading the data, building the loss, training, writing the
final snapshot and adapter files), which leaves out the interpreter start-up a real sequential
job would also pay K times. Identities per hour = K / wall time. The sequential time is measured
on `--sequential-repeats` single runs (all identities cost the same) and multiplied by K.
`--pass-size` splits each step into passes of that many samples (train.py's --batch-gpu); on a CPU,
where a large pass costs more per sample than a small one, passes of the per-identity batch are
the fair setting.

Rendering: one generator holding K adapters renders a batch that mixes all K identities, against
K merged single-identity generators (`adapters.merge`) each rendering its share; images per
second in eval mode, and the parameter memory each approach holds.

Data are synthetic (random images, FFHQ-like cameras, latents near w_avg): throughput does not
depend on what the images show. Weights are random; no download is needed. Prints markdown tables.
"""

import argparse
import contextlib
import copy
import io
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'eg3d'))

from training import adapters, configs  # noqa: E402  (needs the path above)
from training import synthetic_identity as si  # noqa: E402
from training.training_loop import training_loop  # noqa: E402


def build_base(config: str) -> torch.nn.Module:
    if config == 'tiny':
        return si.build_tiny_generator(0)
    from training.triplane import TriPlaneGenerator
    torch.manual_seed(0)
    return TriPlaneGenerator(**configs.generator_kwargs('ffhq', 512)).eval().requires_grad_(False)


def write_people(G: torch.nn.Module, root: str, count: int, views: int) -> str:
    """<root>/people/person_<k>: `views` random images with cameras and latents each."""
    rnd = np.random.RandomState(0)
    res = G.img_resolution
    w_avg = G.backbone.mapping.w_avg.numpy()
    people = os.path.join(root, 'people')
    for k in range(count):
        images = rnd.randint(0, 256, size=(views, 3, res, res), dtype=np.uint8)
        latents = w_avg + 0.3 * rnd.randn(views, G.backbone.num_ws, G.w_dim).astype(np.float32)
        si.write_dataset(os.path.join(people, f'person_{k}'), images, si.camera_labels(views, seed=k), latents)
    return people


def timed_run(data: str, base_pkl: str, run_dir: str, batch: int, args) -> float:
    batch_gpu = min(args.pass_size, batch) if args.pass_size else batch
    os.makedirs(run_dir)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the loop's log (also in run_dir/log.txt)
        training_loop(run_dir=run_dir, training_set_kwargs=dict(path=data), resume_pkl=base_pkl, cfg='resume',
                      adapter_config=dict(r=1, alpha=1.0), neural_rendering_resolution=args.nrr, batch_size=batch,
                      batch_gpu=batch_gpu, total_kimg=args.steps * batch / 1000, kimg_per_tick=args.steps * batch / 1000,
                      network_snapshot_ticks=1, device=args.device, grid_rows=0, progress_bar=False,
                      loss_kwargs=dict(lpips_net=args.lpips), G_opt_kwargs=dict(lr=0.0025, betas=[0, 0.99]))
    if args.device == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def training_rows(G, args, root: str) -> list:
    people = write_people(G, root, max(args.k), args.views)
    base_pkl = os.path.join(root, 'base.pkl')
    si.save_generator_pkl(G, base_pkl)
    single = os.path.join(people, 'person_0')
    timed_run(single, base_pkl, os.path.join(root, 'warmup'), args.per_identity_batch, args)
    seq = statistics.median(timed_run(single, base_pkl, os.path.join(root, f'single-{i}'), args.per_identity_batch, args)
                            for i in range(args.sequential_repeats))
    rows = []
    for K in args.k:
        subset = os.path.join(root, f'people-{K}')
        os.makedirs(subset)
        for k in range(K):
            os.symlink(os.path.join(people, f'person_{k}'), os.path.join(subset, f'person_{k}'))
        data = single if K == 1 else subset
        one = timed_run(data, base_pkl, os.path.join(root, f'multi-{K}'), K * args.per_identity_batch, args)
        rows.append(dict(K=K, one_run=one, sequential=seq * K))
        print(f'  K={K}: one run {one:.1f} s, sequential {seq * K:.1f} s', file=sys.stderr)
    return rows


@torch.no_grad()
def rendering_rows(G, args) -> list:
    rows = []
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == 'cuda' else (lambda: None)
    for K in args.k:
        adapted = adapters.inject(copy.deepcopy(G), adapters.AdapterConfig(r=1), num_adapters=K)
        gen = torch.Generator().manual_seed(0)
        for p in adapters.trainable_parameters(adapted):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        merged = [adapters.merge(adapted, k).to(device).eval() for k in range(K)]
        adapted = adapted.to(device).eval()
        N = max(args.render_batch, K)
        N -= N % K
        ws = G.backbone.mapping.w_avg.to(device) + 0.3 * torch.randn([N, G.backbone.num_ws, G.w_dim], generator=gen).to(device)
        c = torch.from_numpy(si.camera_labels(N, seed=1)).to(device)
        identity = torch.arange(N) % K

        def mixed():
            adapters.select(adapted, identity)
            adapted.synthesis(ws, c, neural_rendering_resolution=args.nrr, noise_mode='const')

        def separate():
            for k in range(K):
                sel = (identity == k).to(device)
                merged[k].synthesis(ws[sel], c[sel], neural_rendering_resolution=args.nrr, noise_mode='const')

        times = {}
        for name, fn in (('mixed', mixed), ('merged', separate)):
            fn()
            sync()
            samples = []
            for _ in range(args.render_iters):
                t0 = time.perf_counter()
                fn()
                sync()
                samples.append(time.perf_counter() - t0)
            times[name] = statistics.median(samples)
        param_bytes = lambda m: sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
        rows.append(dict(K=K, N=N, mixed=N / times['mixed'], merged=N / times['merged'],
                         mixed_mb=param_bytes(adapted) / 2**20, merged_mb=sum(param_bytes(m) for m in merged) / 2**20))
        print(f'  K={K}: mixed {N / times["mixed"]:.2f} img/s, merged {N / times["merged"]:.2f} img/s', file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--config', choices=['tiny', 'ffhq512'], default='tiny')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--k', default='1,4,16', help='identities per run (comma-separated)')
    parser.add_argument('--steps', type=int, default=4, help='training steps (every identity gets this many)')
    parser.add_argument('--per-identity-batch', type=int, default=2)
    parser.add_argument('--views', type=int, default=8, help='selfies per synthetic identity')
    parser.add_argument('--pass-size', type=int, default=None,
                        help='samples per forward pass (--batch-gpu; default: the whole batch in one pass)')
    parser.add_argument('--sequential-repeats', type=int, default=2)
    parser.add_argument('--nrr', type=int, default=None, help='neural rendering resolution (default: 32 tiny, 128 ffhq512)')
    parser.add_argument('--lpips', default='alex-random', help="LPIPS in the loss ('alex-random': random backbone, no download)")
    parser.add_argument('--render-batch', type=int, default=16, help='mixed batch size (rounded down to a multiple of K)')
    parser.add_argument('--render-iters', type=int, default=3)
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    parser.add_argument('--skip-training', action='store_true')
    args = parser.parse_args()
    args.k = [int(x) for x in args.k.split(',')]
    args.nrr = args.nrr or (32 if args.config == 'tiny' else 128)
    if args.threads:
        torch.set_num_threads(args.threads)

    G = build_base(args.config)
    machine = (torch.cuda.get_device_name() if args.device == 'cuda' else
               f'{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads')
    print(f'Config {args.config}, neural rendering {args.nrr}px, {args.device} ({machine}), torch {torch.__version__}.\n')
    if not args.skip_training:
        with tempfile.TemporaryDirectory() as root:
            rows = training_rows(G, args, root)
        passes = f'passes of {args.pass_size}' if args.pass_size else 'one pass per step'
        print(f'Training: {args.steps} steps of {args.per_identity_batch} images per identity ({passes}), LoRA rank 1, '
              f'LPIPS {args.lpips}; wall time including setup and the final snapshot.\n')
        print('| K | one run (s) | K sequential runs (s) | identities / hour, one run | identities / hour, sequential | speed-up |')
        print('|---:|---:|---:|---:|---:|---:|')
        for r in rows:
            print(f'| {r["K"]} | {r["one_run"]:.1f} | {r["sequential"]:.1f} | {3600 * r["K"] / r["one_run"]:.0f} | '
                  f'{3600 * r["K"] / r["sequential"]:.0f} | {r["sequential"] / r["one_run"]:.2f}x |')
        print()
    rows = rendering_rows(G, args)
    print('Rendering (eval, no grad): one generator with K adapters and a mixed batch vs K merged generators.\n')
    print('| K | batch | mixed batch (img/s) | K merged models (img/s) | ratio | weights held: adapters (MiB) | merged (MiB) |')
    print('|---:|---:|---:|---:|---:|---:|---:|')
    for r in rows:
        print(f'| {r["K"]} | {r["N"]} | {r["mixed"]:.2f} | {r["merged"]:.2f} | {r["mixed"] / r["merged"]:.2f}x | '
              f'{r["mixed_mb"]:.1f} | {r["merged_mb"]:.1f} |')


if __name__ == '__main__':
    main()
