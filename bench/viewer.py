"""Benchmark: seconds per view of the browser viewer (eg3d/viewer.py) at the demo config.

The demo config: the tiny demo base (training.synthetic_identity.build_tiny_generator(0)), its rank-1
ground-truth adapter (as `make demo` writes it), neural rendering 32x32 superresolved to 128x128. The viewer
runs in this process on 127.0.0.1 and every request goes through HTTP as the page sends it (JSON view in,
two PNG data URLs out), so a figure is what one slider step costs the page:

  pose     yaw changes only: the tri-plane planes are reused, only rays and superresolution run;
  latent   a new seed every request: mapping, backbone, rays and superresolution;
  alpha    a new alpha-space sample every request (dataset latents combined), as the page's button.

Requests are interleaved (one of each kind per round). Medians over rounds of the wall-clock time and of the
server process's CPU time (all threads), and the load average before and after. Target: <= 0.5 s per view on CPU.

    python bench/viewer.py                    # CPU, torch's default thread count
    python bench/viewer.py --threads 1 --rounds 21
    python bench/viewer.py --device cuda
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'eg3d'))

import demo  # noqa: E402  (needs the path above)
import viewer  # noqa: E402
from training import adapters  # noqa: E402
from training import synthetic_identity as si  # noqa: E402
from viewer_backend import ViewerBackend  # noqa: E402

TARGET_S = 0.5


def demo_files(folder: Path) -> dict:
    """The demo base pickle, its ground-truth adapter and a few identity latents, written to `folder`."""
    G = si.build_tiny_generator(0)
    si.save_generator_pkl(G, str(folder / 'base.pkl'))
    person = si.apply_low_rank_change(G, seed=1, rank=1, strength=1.0)
    adapters.save(demo.groundtruth_adapter(G, person, rank=1), str(folder / 'demo.safetensors'))
    latents = si.identity_latents(G, 8, seed=3)
    (folder / 'latents').mkdir()
    for i, ws in enumerate(latents):
        np.save(folder / 'latents' / f'image_{i}_latent.npy', ws[np.newaxis])
    return dict(base=folder / 'base.pkl', adapter=folder / 'demo.safetensors', dataset=folder / 'latents')


def post(url: str, view: dict) -> None:
    request = urllib.request.Request(url + 'api/render', data=json.dumps(view).encode(),
                                     headers={'Content-Type': 'application/json'})
    with urllib.request.urlopen(request) as response:
        assert json.loads(response.read())['personalized'].startswith('data:image/png')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rounds', type=int, default=15)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s choice)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--nrr', type=int, default=demo.NEURAL_RENDERING_RESOLUTION)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        files = demo_files(Path(tmp))
        backend = ViewerBackend(str(files['base']), [str(files['adapter'])], str(files['dataset']), device=args.device,
                                neural_rendering_resolution=args.nrr)
        server = viewer.ViewerServer(('127.0.0.1', 0), backend, None, allow_remote=False)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        kinds = {
            'pose': lambda i: dict(identity='demo', seed=0, yaw=0.3 * np.sin(i)),
            'latent': lambda i: dict(identity='demo', seed=i + 1, yaw=0.2),
            'alpha': lambda i: dict(identity='demo', source='alpha', alpha_seed=i + 1, yaw=0.2),
        }
        wall = {k: [] for k in kinds}
        cpu = {k: [] for k in kinds}
        load_before = os.getloadavg()
        for i in range(args.warmup + args.rounds):
            order = list(kinds)[i % len(kinds):] + list(kinds)[:i % len(kinds)]
            for kind in order:
                if kind == 'pose':
                    post(server.url, kinds['pose'](i + 0.5))  # the planes of this latent are cached before timing
                t0, c0 = time.perf_counter(), time.process_time()
                post(server.url, kinds[kind](i))
                if i >= args.warmup:
                    wall[kind].append(time.perf_counter() - t0)
                    cpu[kind].append(time.process_time() - c0)
        load_after = os.getloadavg()
        server.shutdown()

    print(f'machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, '
          f'device {args.device}, {torch.get_num_threads()} torch threads; load average {load_before[0]:.1f} before, '
          f'{load_after[0]:.1f} after; {args.rounds} rounds')
    print('| request | s / view (wall, median) | CPU s / view (median) | within 0.5 s |')
    print('|---|---:|---:|---|')
    for kind in kinds:
        w, c = statistics.median(wall[kind]), statistics.median(cpu[kind])
        print(f'| {kind} | {w:.3f} | {c:.3f} | {"yes" if w <= TARGET_S else "no"} |')


if __name__ == '__main__':
    main()
