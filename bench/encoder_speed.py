"""Inference speed of the camera-aware encoder (issue 16): the network alone, and a whole inversion.

    python bench/encoder_speed.py                                   # the tiny config on the CPU
    python bench/encoder_speed.py --config ffhq512 --device cuda    # FFHQ 512 on a GPU (the GPU suite's encoder_speed)

The encoder is the preset for the generator (`EncoderConfig.for_generator`: 256 px input at FFHQ 512) and both
networks have random weights: a forward pass takes the same time whatever the weights. Rows:
  - the encoder network alone (photo ++ reconstruction, camera -> W+ residual) at batch 1 and --batch;
  - an `--iters`-iteration inversion at batch 1 with its generator renders, as `projector.py --encoder
    --num-steps=0` runs it: raw (ReStyle's plain iterations: one render per iteration) and guarded (the default).
    With random weights the guard rejects most residuals, and every rejected try costs a render (up to 3 per
    iteration), so the guarded row is the slow end of what a trained encoder costs.
Prints a markdown table (images per second and milliseconds per image).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'eg3d'))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import build_generator  # noqa: E402  (needs the paths above)
from training import inference as inf, synthetic_identity  # noqa: E402
from training.encoder import EncoderConfig, W3DEncoder, encode  # noqa: E402


def seconds_per_call(fn, repeats: int, device: torch.device) -> float:
    """Wall seconds of one call of `fn`, after one call that warms caches and kernels up."""
    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', choices=['tiny', 'ffhq512'], default='tiny', help='generator size')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--batch', type=int, default=8, help='the larger batch of the network-only row')
    parser.add_argument('--iters', type=int, default=5, help='ReStyle iterations of the inversion rows')
    parser.add_argument('--repeats', type=int, default=5, help='timed calls per row (after one warm-up call)')
    parser.add_argument('--nrr', type=int, default=None,
                        help="neural rendering resolution of the renders [default: 128 at ffhq512, as the official "
                             "FFHQ snapshot renders; the generator's own for tiny]")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda: no CUDA device is visible')

    G = build_generator(args.config).to(device)
    nrr = args.nrr or (128 if args.config == 'ffhq512' else int(G.neural_rendering_resolution))
    config = EncoderConfig.for_generator(inf.num_ws(G), int(G.w_dim), int(G.img_resolution))
    torch.manual_seed(0)
    encoder = W3DEncoder(config).eval().requires_grad_(False).to(device)
    w_avg = G.backbone.mapping.w_avg[None, None].repeat(1, inf.num_ws(G), 1).to(device)
    r = int(G.img_resolution)
    photos = torch.rand(args.batch, 3, r, r, device=device) * 2 - 1
    cameras = torch.from_numpy(synthetic_identity.camera_labels(args.batch, seed=0)).to(device)

    print(f'{args.config} generator ({r} px, neural rendering {nrr} px), encoder '
          f'{sum(p.numel() for p in encoder.parameters()) / 1e6:.1f}M parameters ({config.input_resolution} px input), '
          f'{args.device}, {torch.get_num_threads()} CPU thread(s)')
    rows = []
    with torch.no_grad():
        for n in sorted({1, args.batch}):
            s = seconds_per_call(lambda: encoder(photos[:n], photos[:n], cameras[:n]), args.repeats, device)
            rows.append((f'encoder network, batch {n}', n / s, 1000 * s / n))
    for name, guard in (('raw', False), ('guarded', True)):
        s = seconds_per_call(lambda: encode(G, encoder, w_avg, photos[:1], cameras[:1], args.iters, nrr, guard=guard),
                             max(1, args.repeats // 2), device)
        rows.append((f'{args.iters}-iteration inversion with its renders, {name}, batch 1', 1 / s, 1000 * s))
    print('\n| measurement | images/s | ms per image |\n|---|---:|---:|')
    for name, per_second, ms in rows:
        print(f'| {name} | {per_second:.2f} | {ms:.1f} |')


if __name__ == '__main__':
    main()
