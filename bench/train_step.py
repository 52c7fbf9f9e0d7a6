"""Seconds per training step and peak memory: LoRA rank 1, AdaLoRA and full fine-tuning, same config.

    python bench/train_step.py                                  # tiny config (golden tiny128) on CPU, batch 2
    python bench/train_step.py --config ffhq512 --device cuda   # FFHQ 512 at batch 4 on a GPU

Each mode runs in its own process (clean peak-memory numbers); with `--repeats R` the processes run
R times, alternating between the modes, so that changes in machine load hit every mode alike, and the
table gives the median over all timed steps of a mode (memory: the median over its processes).
Each process times the real training step of training/train_step.py: G.synthesis with
noise_mode='const' at the neural rendering resolution, the personalization loss (MSE + LPIPS at both
resolutions; density regularisation on every `--density_reg_every`-th step), backward, Adam on the
trainable parameters (AdaLoRA: plus the orthogonal regularisation and the rank allocator). Weights
are random (no download needed).
Memory: CUDA peak allocated memory, or on CPU the rise of the process's peak RSS over its RSS
just before the first step (optimizer state, activations and gradients; the generator itself excluded).
The CPU figure depends on the allocator (glibc returns large blocks to the system and takes them
back, so it moves by tens of MiB between runs); as deterministic companions the table also gives
the peak tensor memory of one step (the most bytes of tensors created during the step alive at once,
tracked per aten op, plus the optimizer state) and the bytes autograd keeps for its backward pass
(unique storages of the saved tensors, parameters excluded), both measured on an extra step with
density regularisation after the timed ones.
Prints a markdown table.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

EG3D_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'eg3d')
MODES = {
    'lora': dict(r=1, alpha=1.0),
    'adalora': dict(r=1, alpha=1.0, adalora=True, init_r=2, target_r=1, tinit=0, tfinal=0, delta_t=1),
    'full': None,
}


def build_generator(config: str):
    import torch
    from training import configs, synthetic_identity
    if config == 'tiny':
        return synthetic_identity.build_tiny_generator(0)
    from training.triplane import TriPlaneGenerator
    torch.manual_seed(0)
    return TriPlaneGenerator(**configs.generator_kwargs('ffhq', 512)).eval().requires_grad_(False)


def saved_for_backward(step) -> int:
    """Bytes of the distinct storages autograd saves for backward during `step()` (parameters excluded)."""
    import torch
    storages = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(storages.values())


def peak_tensor_bytes(step) -> int:
    """Peak bytes of the tensors created during `step()` that are alive at once (CPU's analogue of
    CUDA's peak allocated memory, free of the allocator's noise): every aten op's outputs are
    registered by storage. Dead storages are dropped only when the count would set a new peak: it
    never counts less than the live bytes, so the peak is the same as with a sweep after every op,
    without a sweep over all live storages for each of the step's thousands of ops."""
    import torch
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class LiveStorages(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live = {}  # StorageImpl address -> (weak reference, bytes)
            self.current = self.peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            # A weak reference keeps its StorageImpl's memory, so no new storage takes a registered address.
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in self.live:
                    storage = t.untyped_storage()
                    self.live[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
            if self.current > self.peak:
                self.drop_dead()
                self.peak = max(self.peak, self.current)
            return out

        def drop_dead(self) -> None:
            for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
                self.current -= self.live.pop(key)[1]

    tracker = LiveStorages()
    with tracker:
        step()
    return tracker.peak


def run_mode(args) -> dict:
    """Child process: time `args.steps` training steps of one mode; returns the measurements."""
    sys.path.insert(0, EG3D_DIR)
    import numpy as np
    import torch
    from training import adapters
    from training import synthetic_identity
    from training.loss import PersonalizationLoss
    from training.train_step import all_reduce_gradients
    from training.trainables import set_full_finetuning

    device = torch.device(args.device)
    torch.manual_seed(0)
    G = build_generator(args.config)
    adapter_cfg = MODES[args.mode]
    if adapter_cfg is not None:
        cfg = adapters.AdapterConfig(**adapter_cfg, total_step=args.steps + args.warmup + args.density_reg_every + 1)
        adapters.inject(G, cfg)
        trainable = adapters.trainable_parameters(G)
    else:
        cfg = None
        trainable = set_full_finetuning(G, freeze_render=False)
    G = G.to(device).train()
    optimizer = torch.optim.Adam(trainable, lr=0.0025, betas=(0.0, 0.99), eps=1e-8)
    allocator = adapters.RankAllocator(G, cfg) if cfg is not None and cfg.adalora else None
    loss_fn = PersonalizationLoss(device, lpips_net=args.lpips)
    nrr = args.nrr or int(getattr(G.superresolution, 'input_resolution', 64))

    res = G.img_resolution
    gen = torch.Generator().manual_seed(1)
    real = (torch.rand([args.batch, 3, res, res], generator=gen) * 2 - 1).to(device)
    c = torch.from_numpy(synthetic_identity.camera_labels(args.batch, seed=2)).to(device)
    w_avg = G.backbone.mapping.w_avg.detach()
    ws = (w_avg + 0.5 * torch.randn([args.batch, G.backbone.num_ws, G.w_dim], generator=gen).to(device)).detach()

    def step(k: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(k)
        total, _, _ = loss_fn(G, real, c, ws, nrr, regularize=(k % args.density_reg_every == 0),
                              reg_gain=args.density_reg_every)
        if allocator is not None:
            total = total + adapters.orthogonal_regularization(G) * cfg.orth_reg_weight
        total.backward()
        all_reduce_gradients(trainable, 1)
        optimizer.step()
        if allocator is not None:
            allocator.update_and_mask(G, k)

    import psutil
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == 'cuda' else (lambda: None)
    rss_before = psutil.Process().memory_info().rss
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    for k in range(args.warmup):
        step(k)
    sync()
    times, cpu_times = [], []
    for k in range(args.warmup, args.warmup + args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step(k)
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    if device.type == 'cuda':
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    # Memory of one step with density regularisation (the costlier kind), measured on an extra step.
    k = -(-(args.warmup + args.steps) // args.density_reg_every) * args.density_reg_every
    optimizer_state = sum(t.numel() * t.element_size() for state in optimizer.state.values()
                          for t in state.values() if torch.is_tensor(t))
    saved = 0
    def measured_step():
        nonlocal saved
        saved = saved_for_backward(lambda: step(k))
    peak_tensors = peak_tensor_bytes(measured_step) + optimizer_state
    return dict(mode=args.mode, trainable=sum(p.numel() for p in trainable), sec_per_step=float(np.median(times)),
                sec_min=float(np.min(times)), times=times, cpu_times=cpu_times, peak_bytes=int(peak),
                saved_bytes=int(saved), peak_tensor_bytes=int(peak_tensors), device=str(device), config=args.config,
                batch=args.batch, nrr=nrr, steps=args.steps)


def summarize(runs: list) -> dict:
    """One mode's processes -> one row: median over all timed steps, median memory over processes."""
    import statistics
    row = dict(runs[0])
    row['sec_per_step'] = statistics.median(t for r in runs for t in r['times'])
    row['cpu_sec_per_step'] = statistics.median(t for r in runs for t in r['cpu_times'])
    row['sec_min'] = min(r['sec_min'] for r in runs)
    row['peak_bytes'] = int(statistics.median(r['peak_bytes'] for r in runs))
    row['saved_bytes'] = int(statistics.median(r['saved_bytes'] for r in runs))
    row['peak_tensor_bytes'] = int(statistics.median(r['peak_tensor_bytes'] for r in runs))
    row['processes'] = len(runs)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--config', choices=['tiny', 'ffhq512'], default='tiny')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--batch', type=int, default=None, help='default: 2 (tiny), 4 (ffhq512)')
    parser.add_argument('--steps', type=int, default=4, help='timed steps (median reported)')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--nrr', type=int, default=None, help='neural rendering resolution (default: 32 tiny, SR input otherwise)')
    parser.add_argument('--lpips', default='alex-random', help="LPIPS in the loss ('alex-random': random backbone, no download)")
    parser.add_argument('--density_reg_every', type=int, default=4)
    parser.add_argument('--modes', default='lora,adalora,full')
    parser.add_argument('--repeats', type=int, default=1, help='processes per mode, run alternately')
    parser.add_argument('--mode', help=argparse.SUPPRESS)  # child process
    parser.add_argument('--json', action='store_true', help='also print the raw measurements as JSON lines')
    args = parser.parse_args()
    if args.batch is None:
        args.batch = 2 if args.config == 'tiny' else 4
    if args.nrr is None and args.config == 'tiny':
        args.nrr = 32

    if args.mode is not None:
        print('RESULT ' + json.dumps(run_mode(args)))
        return

    runs = []
    for mode in args.modes.split(',') * args.repeats:
        cmd = [sys.executable, os.path.abspath(__file__), f'--mode={mode}', f'--config={args.config}',
               f'--device={args.device}', f'--batch={args.batch}', f'--steps={args.steps}', f'--warmup={args.warmup}',
               f'--lpips={args.lpips}', f'--density_reg_every={args.density_reg_every}'] + \
              ([f'--nrr={args.nrr}'] if args.nrr is not None else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        lines = [l for l in out.stdout.splitlines() if l.startswith('RESULT ')]
        if out.returncode != 0 or not lines:
            sys.exit(f'{mode} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}')
        runs.append(json.loads(lines[-1][len('RESULT '):]))
    results = [summarize([r for r in runs if r['mode'] == mode]) for mode in args.modes.split(',')]

    r0 = results[0]
    memory = 'peak CUDA memory' if r0['device'].startswith('cuda') else 'peak RSS rise'
    print(f'Training step, config {r0["config"]}, batch {r0["batch"]}, neural rendering {r0["nrr"]}px, '
          f'{r0["device"]}, median of {r0["steps"]} steps x {args.repeats} process(es) per mode:\n')
    print(f'| mode | trainable parameters | sec / step | CPU sec / step | {memory} (MiB) | '
          f'peak tensor memory (MiB) | saved for backward (MiB) |')
    print('|---|---:|---:|---:|---:|---:|---:|')
    names = {'lora': 'LoRA rank 1', 'adalora': 'AdaLoRA (init 2, target 1)', 'full': 'full fine-tuning'}
    for r in results:
        print(f'| {names[r["mode"]]} | {r["trainable"]:,} | {r["sec_per_step"]:.3f} | {r["cpu_sec_per_step"]:.3f} | '
              f'{r["peak_bytes"] / 2**20:.0f} | {r["peak_tensor_bytes"] / 2**20:.0f} | {r["saved_bytes"] / 2**20:.0f} |')
    if args.json:
        for r in results:
            print(json.dumps(r))


if __name__ == '__main__':
    main()
