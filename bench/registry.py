"""Serving many identities: AdapterRegistry swaps with a thousand adapter files on one FFHQ 512 base.

    python bench/registry.py                           # FFHQ 512 on CPU, 1,000 files, 16 slots
    python bench/registry.py --files 200 --renders 0   # quicker

Writes `--files` adapter files (default config: rank 1 on synthesis and superresolution, random
factors, one file per identity) to a temporary folder, then loads all of them, in turn, into an
`AdapterRegistry` of `--capacity` slots: once the slots are full every load evicts the least
recently used identity, i.e. is a swap (`--rounds` > 1 goes through the files again). Reports the
time to write a file, the time of a swap (evict + load; wall clock, and the process's CPU time,
which on a shared machine leaves out the time spent waiting for a core), the time of an evict
alone, the process's resident memory at every tenth of the swaps, the number of passes over the
base's weights (sha256) during all of it, and the time of `--renders` renders of a mixed batch of
`--render-batch` loaded identities. Weights are random (no download); timings do not depend on
them. Prints markdown.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from typing import List

import psutil
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'eg3d'))

from training import adapters, configs  # noqa: E402  (needs the path above)
from training import synthetic_identity as si  # noqa: E402
from training.adapters import AdapterConfig, AdapterRegistry  # noqa: E402
from training.adapters import files  # noqa: E402
from training.adapters.inject import adapter_layers  # noqa: E402
from training.triplane import TriPlaneGenerator  # noqa: E402


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def count_base_hashes() -> List[int]:
    """Wrap `files._weights_sha256` to count the passes over the base's weights."""
    calls: List[int] = []
    real = files._weights_sha256  # pylint: disable=protected-access
    files._weights_sha256 = lambda params: calls.append(1) or real(params)  # pylint: disable=protected-access
    return calls


def write_files(G: torch.nn.Module, folder: str, count: int) -> List[float]:
    """`count` adapter files of random adapters; returns the seconds each save took."""
    writer = copy.deepcopy(G)
    adapters.inject(writer, AdapterConfig(), num_adapters=1)
    gen = torch.Generator().manual_seed(0)
    seconds = []
    for k in range(count):
        with torch.no_grad():
            for _, layer in adapter_layers(writer):
                for param in layer.adapter_parameters():
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.01)
        t0 = time.perf_counter()
        adapters.save(writer, os.path.join(folder, f'id{k:05d}.safetensors'))
        seconds.append(time.perf_counter() - t0)
    return seconds


def quantiles(values: List[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    pick = lambda q: ms[min(int(q * len(ms)), len(ms) - 1)]
    return f'{statistics.median(ms):.2f} | {pick(0.9):.2f} | {pick(0.99):.2f} | {ms[-1]:.2f}'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--files', type=int, default=1000)
    parser.add_argument('--capacity', type=int, default=16)
    parser.add_argument('--rounds', type=int, default=1, help='times every file is loaded (in turn)')
    parser.add_argument('--renders', type=int, default=2, help='mixed-batch renders timed at the end')
    parser.add_argument('--render-batch', type=int, default=2)
    parser.add_argument('--folder', default=None,
                        help='where to write the files (default: a temporary folder, removed)')
    args = parser.parse_args()

    load_before = ' '.join(f'{v:.1f}' for v in os.getloadavg())
    torch.manual_seed(0)
    G = TriPlaneGenerator(**configs.generator_kwargs('ffhq', 512)).eval().requires_grad_(False)
    base_mib = sum(p.numel() * p.element_size() for p in G.parameters()) / 2**20
    hashes = count_base_hashes()
    folder = args.folder or tempfile.mkdtemp(prefix='registry-bench-')
    os.makedirs(folder, exist_ok=True)
    try:
        save_s = write_files(G, folder, args.files)
        paths = sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.endswith('.safetensors'))
        file_mib = statistics.mean(os.path.getsize(p) for p in paths) / 2**20

        registry = AdapterRegistry(G, capacity=args.capacity)
        load_s, swap_s, swap_cpu_s, rss = [], [], [], []
        gc.collect()
        for k in range(len(paths) * args.rounds):
            t0, c0 = time.perf_counter(), time.process_time()
            registry.load(f'id{k % len(paths)}', paths[k % len(paths)])
            (swap_s if k >= args.capacity else load_s).append(time.perf_counter() - t0)
            if k >= args.capacity:
                swap_cpu_s.append(time.process_time() - c0)
            if (k + 1) % max(len(paths) * args.rounds // 10, 1) == 0:
                rss.append((k + 1, rss_mib()))
        evict_s = []
        for name in registry.names[:args.capacity // 2]:
            t0 = time.perf_counter()
            registry.evict(name)
            evict_s.append(time.perf_counter() - t0)

        render_s = []
        names = registry.names[:args.render_batch]
        ws = G.backbone.mapping.w_avg.reshape(1, 1, -1).repeat(len(names), G.backbone.num_ws, 1)
        c = torch.from_numpy(si.camera_labels(len(names), seed=0))
        with torch.no_grad():
            for _ in range(args.renders):
                registry.select(names)
                t0 = time.perf_counter()
                G.synthesis(ws, c, noise_mode='const')
                render_s.append(time.perf_counter() - t0)
    finally:
        if args.folder is None:
            shutil.rmtree(folder)

    print(f'Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch '
          f'{torch.__version__}, {torch.get_num_threads()} threads; load average before: {load_before}, after: '
          f'{" ".join(f"{v:.1f}" for v in os.getloadavg())}')
    print(f'FFHQ 512 base: {base_mib:.0f} MiB of parameters; {len(paths)} adapter files of {file_mib:.2f} MiB '
          f'(AdapterConfig() defaults); registry capacity {args.capacity}.\n')
    print('| operation | count | median (ms) | p90 (ms) | p99 (ms) | max (ms) |')
    print('|---|---:|---:|---:|---:|---:|')
    print(f'| save a file | {len(save_s)} | {quantiles(save_s)} |')
    print(f'| load into a free slot | {len(load_s)} | {quantiles(load_s)} |')
    print(f'| swap (evict LRU + load) | {len(swap_s)} | {quantiles(swap_s)} |')
    print(f'| swap, process CPU time | {len(swap_cpu_s)} | {quantiles(swap_cpu_s)} |')
    print(f'| evict | {len(evict_s)} | {quantiles(evict_s)} |')
    if render_s:
        what = f'render a mixed batch of {len(names)} (512 px, neural rendering {G.neural_rendering_resolution})'
        print(f'| {what} | {len(render_s)} | {quantiles(render_s)} |')
    print(f'\nPasses over the base\'s weights (sha256) in all of it: {len(hashes)}.')
    print('Resident memory (MiB) after N loads: ' + ', '.join(f'{n}: {m:.0f}' for n, m in rss))
    print(f'Change from the first to the last reading: {rss[-1][1] - rss[0][1]:+.1f} MiB.')


if __name__ == '__main__':
    main()
