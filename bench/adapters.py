"""Benchmark: one training step (forward + backward) of an adapted EG3D generator.

Compares, on the same generator and batch:
  full     full fine-tuning (every generator parameter trainable);
  naive    My3DGen-style LoRA: W + scaling * B @ A materialised at every step and used as the
           layer weight (torch parametrization), so convolutions still compute full weight grads;
  adapted  training.adapters (frozen base, low-rank branch; no weight gradients for the base);
  frozen   the base with nothing trainable, gradients flowing only to the latents: the floor of any
           adapter method (every input gradient, no weight or style gradient).

Steps are interleaved (one step of each method per round, rotating the order), so that a change in
machine load during the run hits every method alike. The table gives medians over rounds of the
wall-clock time and of the process CPU time (user + system, all threads; on a shared CPU machine
the latter does not count time spent waiting for a core), and the load average before and after.
Prints a markdown table. CPU at a reduced config by default; `--config ffhq512 --device cuda` on a GPU.

    python bench/adapters.py                       # reduced config, CPU
    python bench/adapters.py --config ffhq512 --device cuda --batch 4
    python bench/adapters.py --param-table          # per-component adapter counts (docs/adapters.md)
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'eg3d'))

from training import adapters, configs, synthetic_identity  # noqa: E402  (needs the path above)
from training.adapters import AdapterConfig  # noqa: E402
from training.adapters.inject import adapter_layers, base_name  # noqa: E402
from training.triplane import TriPlaneGenerator  # noqa: E402


def generator_kwargs(name: str) -> dict:
    """'ffhq512': the official FFHQ 512 config. 'reduced': the same backbone widths (channel_base 32768,
    channel_max 512) with 128 px output (SuperresolutionHybrid2X, fp32) and 12 + 12 samples per ray,
    so that a CPU step takes seconds while the convolutions keep realistic widths. 'tiny': the golden
    tiny128 generator (8- to 32-channel layers), for a quick run of the script itself."""
    if name == 'ffhq512':
        return configs.generator_kwargs('ffhq', 512)
    if name == 'tiny':
        return synthetic_identity.tiny_generator_kwargs()
    return synthetic_identity.reduced_ffhq_generator_kwargs()


class _AddLowRank(torch.nn.Module):
    """Parametrization W -> W + scaling * (B @ A).reshape(W.shape): the merged weight, rebuilt every access."""

    def __init__(self, A: torch.nn.Parameter, B: torch.nn.Parameter, scaling: float):
        super().__init__()
        self.A, self.B, self.scaling = A, B, scaling

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return W + (self.B @ self.A).reshape(W.shape) * self.scaling


def naive_merged(G: torch.nn.Module, cfg: AdapterConfig) -> List[torch.nn.Parameter]:
    """Give G's targeted layers My3DGen-style merged-weight LoRA (same factor shapes as `inject`)."""
    probe = copy.deepcopy(G)
    adapters.inject(probe, cfg)
    params = []
    G.requires_grad_(False)
    for name, layer in adapter_layers(probe):
        base = G.get_submodule(base_name(name))
        A = torch.nn.Parameter(layer.lora_A[0].detach().clone())
        B = torch.nn.Parameter(torch.randn_like(layer.lora_B[0]) * 1e-3)
        torch.nn.utils.parametrize.register_parametrization(base, 'weight', _AddLowRank(A, B, layer.scaling),
                                                            unsafe=True)
        params += [A, B]
    return params


def make_step(G: torch.nn.Module, batch: int, device: torch.device, res: int) -> Callable[[], None]:
    torch.manual_seed(0)
    z = torch.randn(batch, G.z_dim, device=device)
    c = torch.zeros(batch, 25, device=device)
    c[:, :16] = torch.tensor([1, 0, 0, 0, 0, -1, 0, 0, 0, 0, -1, 2.7, 0, 0, 0, 1.0], device=device)
    c[:, 16:] = torch.tensor([4.26, 0, 0.5, 0, 4.26, 0.5, 0, 0, 1.0], device=device)
    with torch.no_grad():
        ws = G.mapping(z, c)
    if not any(p.requires_grad for p in G.parameters()):
        ws.requires_grad_(True)  # the frozen floor: backward still runs through every layer

    def step():
        ws.grad = None
        for p in G.parameters():
            p.grad = None
        out = G.synthesis(ws, c, neural_rendering_resolution=res, noise_mode='const')
        (out['image'].square().mean() + out['image_raw'].square().mean()).backward()
    return step


def time_steps(steps: Dict[str, Callable[[], None]], device: torch.device, iters: int,
               warmup: int) -> Dict[str, Tuple[float, float]]:
    """Median (wall, CPU) seconds per call of each step, the steps interleaved round by round (order rotated)."""
    def timed(step: Callable[[], None]) -> Tuple[float, float]:
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0, time.process_time() - c0

    labels = list(steps)
    times: Dict[str, List[Tuple[float, float]]] = {label: [] for label in labels}
    for i in range(warmup + iters):
        for j in range(len(labels)):
            label = labels[(i + j) % len(labels)]
            t = timed(steps[label])
            if i >= warmup:
                times[label].append(t)
    return {label: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
            for label, ts in times.items()}


def load_average() -> str:
    """The 1/5/15-minute load averages, for the table caption."""
    try:
        return '/'.join(f'{v:.1f}' for v in os.getloadavg())
    except OSError:
        return 'n/a'


def machine_name(device: torch.device) -> str:
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    return f'{cpu} (torch threads: {torch.get_num_threads()})'


def run_benchmark(args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    cfg = AdapterConfig(r=args.rank, targets=('synthesis', 'superresolution'), conv_factorization='my3dgen')
    torch.manual_seed(0)
    base = TriPlaneGenerator(**generator_kwargs(args.config)).to(device).train()
    res = 64 if args.config == 'ffhq512' else 32

    models: Dict[str, torch.nn.Module] = {}
    full = copy.deepcopy(base).requires_grad_(True)
    models['full fine-tuning'] = full
    naive = copy.deepcopy(base)
    naive_merged(naive, cfg)
    models['naive merged-weight LoRA (My3DGen)'] = naive
    adapted = copy.deepcopy(base)
    adapters.inject(adapted, cfg)
    models['adapters (this package)'] = adapted
    models['frozen base (floor)'] = copy.deepcopy(base).requires_grad_(False)

    load_before = load_average()
    timings = time_steps({label: make_step(G, args.batch, device, res) for label, G in models.items()}, device,
                         args.iters, args.warmup)
    load_after = load_average()
    trainable = {label: sum(p.numel() for p in G.parameters() if p.requires_grad) for label, G in models.items()}
    ref = timings['full fine-tuning']
    lines = [
        f'Training step (G.synthesis forward + backward), config `{args.config}`, batch {args.batch}, '
        f'neural rendering {res}x{res}, LoRA r={args.rank} on synthesis + superresolution, '
        f'median of {args.iters} interleaved steps. Machine: {machine_name(device)}; torch {torch.__version__}; '
        f'load average (1/5/15 min) {load_before} before, {load_after} after.',
        '',
        '| method | trainable params | ms / step (wall) | speed-up vs full (wall) | CPU ms / step | '
        'speed-up vs full (CPU) |',
        '|---|---:|---:|---:|---:|---:|',
    ]
    for label, (wall, cpu) in timings.items():
        lines.append(f'| {label} | {trainable[label]:,} | {1000 * wall:.1f} | {ref[0] / wall:.2f}x | '
                     f'{1000 * cpu:.1f} | {ref[1] / cpu:.2f}x |')
    return '\n'.join(lines)


def parameter_tables(ranks=(1, 2, 4, 8)) -> str:
    """Markdown table of adapter parameters per component at the FFHQ 512 config (docs/adapters.md)."""
    torch.manual_seed(0)
    base = TriPlaneGenerator(**configs.generator_kwargs('ffhq', 512))
    base_total = sum(p.numel() for p in base.parameters())
    lines = [f'FFHQ 512 generator ({base_total:,} parameters), targets synthesis + superresolution.', '',
             '| r | conv factorization | extras | synthesis | superresolution | total | % of base |',
             '|---:|---|---|---:|---:|---:|---:|']
    for r in ranks:
        for fact in ('my3dgen', 'standard'):
            for extras in ('none', 'my3dgen'):
                G = copy.deepcopy(base)
                adapters.inject(G, AdapterConfig(r=r, conv_factorization=fact, extras=extras))
                t = adapters.parameter_table(G)
                lines.append(f"| {r} | {fact} | {extras} | {t['synthesis']:,} | {t['superresolution']:,} | "
                             f"{t['adapter_total']:,} | {100 * t['adapter_total'] / base_total:.3f} |")
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', choices=['reduced', 'ffhq512', 'tiny'], default='reduced', help='generator size')
    parser.add_argument('--device', default='cpu', help="'cpu' or 'cuda'")
    parser.add_argument('--batch', type=int, default=1, help='batch size')
    parser.add_argument('--rank', type=int, default=1, help='LoRA rank')
    parser.add_argument('--iters', type=int, default=5, help='timed steps per method')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps per method')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch default)')
    parser.add_argument('--param-table', action='store_true', help='print the FFHQ 512 parameter table and exit')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.param_table:
        print(parameter_tables())
        return
    print(run_benchmark(args))


if __name__ == '__main__':
    main()
