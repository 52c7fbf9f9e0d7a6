"""Time the EG3D ops with the reference (PyTorch) and the CUDA-plugin implementations; print markdown tables.

    python bench/ops.py                      # GPU: FFHQ-512 op shapes, full generator at batch 4
    python bench/ops.py --batch 2 --iters 5

Op rows time forward + backward (gradient w.r.t. the input). The generator row times one
`G.synthesis` forward + backward of a scalar loss into every parameter, training mode. The
implementation is selected process-wide with EG3D_OPS_IMPL: 'ref' for the reference column,
unset (plugins) for the CUDA column. Without a GPU there is no CUDA column: the script then runs
a reduced configuration (smaller shapes, a small 128-px generator) and says so.
"""

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'eg3d'))

from torch_utils import custom_ops
from torch_utils.ops import bias_act, conv2d_resample, upfirdn2d


@contextlib.contextmanager
def ops_impl(impl: str) -> Iterator[None]:
    """Select the reference ('ref') or plugin ('cuda') implementations for the whole process."""
    old = os.environ.get(custom_ops.IMPL_ENV)
    os.environ.pop(custom_ops.IMPL_ENV, None)
    if impl == 'ref':
        os.environ[custom_ops.IMPL_ENV] = 'ref'
    try:
        yield
    finally:
        os.environ.pop(custom_ops.IMPL_ENV, None)
        if old is not None:
            os.environ[custom_ops.IMPL_ENV] = old


def time_ms(fn: Callable[[], None], device: torch.device, iters: int, warmup: int = 2) -> float:
    """Median wall time of fn() in milliseconds (synchronised on GPU)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return sorted(samples)[len(samples) // 2]


def op_benchmarks(device: torch.device, batch: int, reduced: bool) -> List[tuple]:
    """(label, step) pairs; shapes follow the FFHQ-512 generator (divided by 8 when reduced)."""
    s = 8 if reduced else 1
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, device=device, generator=gen).to(dtype)

    f = upfirdn2d.setup_filter([1, 3, 3, 1], device=device)
    w = randn(128, 256, 3, 3) / 48
    cases = [
        ('bias_act lrelu+bias+clamp, fp32', randn(batch, 256, 256 // s, 256 // s),
         lambda x, b=randn(256): bias_act.bias_act(x, b, act='lrelu', clamp=256)),
        ('bias_act lrelu+bias+clamp, fp16', randn(batch, 128, 512 // s, 512 // s, dtype=torch.float16),
         lambda x, b=randn(128, dtype=torch.float16): bias_act.bias_act(x, b, act='lrelu', clamp=256)),
        ('upsample2d 4x4 (ToRGB skip), fp32', randn(batch, 3, 256 // s, 256 // s),
         lambda x: upfirdn2d.upsample2d(x, f)),
        ('downsample2d 4x4, fp32', randn(batch, 256, 128 // s, 128 // s),
         lambda x: upfirdn2d.downsample2d(x, f)),
        ('filter2d 4x4, fp16', randn(batch, 128, 256 // s, 256 // s, dtype=torch.float16),
         lambda x: upfirdn2d.filter2d(x, f)),
        ('conv2d_resample 3x3 up=2, fp32', randn(batch, 256, 128 // s, 128 // s),
         lambda x: conv2d_resample.conv2d_resample(x, w, f=f, up=2, padding=1, flip_weight=False)),
    ]
    benchmarks = []
    for label, x, op in cases:
        def step(x=x, op=op):
            leaf = x.detach().requires_grad_(True)
            y = op(leaf)
            torch.autograd.grad(y, leaf, torch.ones_like(y))
        benchmarks.append((f'{label} {list(x.shape)}', step))
    return benchmarks


def generator_benchmark(device: torch.device, batch: int, reduced: bool) -> tuple:
    """(label, step) for G.synthesis forward + backward."""
    from camera_utils import FOV_to_intrinsics, LookAtPoseSampler
    from training import configs
    from training.triplane import TriPlaneGenerator

    resolution = 128 if reduced else 512
    kwargs = configs.generator_kwargs('ffhq', resolution, **(dict(cbase=2048, cmax=32) if reduced else {}))
    if reduced:
        kwargs['rendering_kwargs'].update(depth_resolution=12, depth_resolution_importance=12)
    torch.manual_seed(0)
    G = TriPlaneGenerator(**kwargs).to(device).train()
    rendering_resolution = 32 if reduced else 64
    cam2world = LookAtPoseSampler.sample(3.14159 / 2, 3.14159 / 2, torch.tensor([0, 0, 0.2], device=device),
                                         radius=2.7, batch_size=batch, device=device)
    intrinsics = FOV_to_intrinsics(18.837, device=device).reshape(1, 9).repeat(batch, 1)
    c = torch.cat([cam2world.reshape(batch, 16), intrinsics], dim=1)
    ws = G.mapping(torch.randn(batch, G.z_dim, device=device), c).detach()

    def step():
        G.zero_grad(set_to_none=True)
        out = G.synthesis(ws, c, neural_rendering_resolution=rendering_resolution)
        (out['image'].square().mean() + out['image_raw'].square().mean()).backward()

    label = (f'TriPlaneGenerator {"reduced 128 px (cbase 2048, cmax 32)" if reduced else "FFHQ-512"} '
             f'synthesis fwd+bwd, batch {batch}')
    return label, step


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
    parser.add_argument('--batch', type=int, default=None, help='batch size (default: 4 on GPU, 1 on CPU)')
    parser.add_argument('--iters', type=int, default=None, help='timed repetitions (default: 20 on GPU, 3 on CPU)')
    parser.add_argument('--skip-generator', action='store_true', help='only the op benchmarks')
    args = parser.parse_args(argv)

    on_gpu = torch.cuda.is_available()
    device = torch.device('cuda' if on_gpu else 'cpu')
    batch = args.batch or (4 if on_gpu else 1)
    iters = args.iters or (20 if on_gpu else 3)
    impls = ['ref', 'cuda'] if on_gpu else ['ref']
    if on_gpu:
        print(f'Device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, batch {batch}, '
              f'median of {iters} runs.\n')
        with ops_impl('cuda'):  # build the plugins outside the timed region
            if bias_act._plugin() is None or upfirdn2d._plugin() is None:
                print('CUDA plugins unavailable (see the warning above): the cuda column runs the reference.\n')
    else:
        print(f'No GPU: reduced configuration (op shapes / 8, small 128-px generator), reference path only; '
              f'torch {torch.__version__}, batch {batch}, median of {iters} runs.\n')

    benchmarks = op_benchmarks(device, batch, reduced=not on_gpu)
    if not args.skip_generator:
        benchmarks.append(generator_benchmark(device, batch, reduced=not on_gpu))

    header = '| benchmark | ' + ' | '.join(f'{impl} (ms)' for impl in impls) + (' | speed-up |' if on_gpu else ' |')
    print(header)
    print('|' + '---|' * (header.count('|') - 1))
    for label, step in benchmarks:
        times = []
        for impl in impls:
            with ops_impl(impl):
                times.append(time_ms(step, device, iters))
        row = f'| {label} | ' + ' | '.join(f'{t:.2f}' for t in times)
        print(row + (f' | {times[0] / times[1]:.2f}x |' if on_gpu else ' |'), flush=True)


if __name__ == '__main__':
    main()
