"""Mixed precision with adapters: the FFHQ-512 generator in fp16 (num_fp16_res=4, sr_num_fp16_res=4,
conv_clamp=256) on a GPU, adapted with LoRA rank 1 on synthesis + superresolution.

    python bench/fp16_check.py --config ffhq512 --device cuda     # the GPU check (about 30 s on an H100)
    python bench/fp16_check.py --config tiny --device cpu --steps 2   # the same checks at a tiny size

Checks (each with the tolerance it is judged by; chosen before any GPU run, see docs/benchmarks.md):
  finite_outputs       image, image_raw and image_depth of the adapted generator in mixed precision are finite;
  fp16_vs_fp32         the same generator with `force_fp32=True`: relative RMS error of image and image_raw
                       <= FP16_IMAGE_RTOL (float16 keeps 11 significant bits; the error grows through the layers);
  grads_vs_merged_fp32 adapter gradients against the merged-weight reference (each targeted weight
                       parametrised as W + B @ A, so autograd differentiates the merged weight), float32
                       with TF32 off: max |g - g_ref| <= GRAD_RTOL_FP32 * max |g_ref| per tensor;
  grads_vs_merged_fp16 the same in mixed precision, finite, within GRAD_RTOL_FP16;
  training_steps       `--steps` steps of the personalization loss (MSE + LPIPS, density regularisation every
                       4th step) with Adam on the adapters in mixed precision: every loss and parameter finite.
On CPU every block runs in float32 whatever use_fp16 says, so there the fp16 figures are float32 ones.
Prints one line `RESULT {json}`; the exit status is 1 when a check fails.
"""

import argparse
import copy
import json
import math
import os
import sys
import time
from typing import Dict, List

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'eg3d'))

from training import adapters, configs, synthetic_identity  # noqa: E402  (needs the path above)
from training.adapters.inject import adapter_layers, base_name  # noqa: E402
from training.loss import PersonalizationLoss  # noqa: E402
from training.triplane import TriPlaneGenerator  # noqa: E402

FP16_IMAGE_RTOL = 2e-2
GRAD_RTOL_FP32 = 1e-2
GRAD_RTOL_FP16 = 1e-1
RENDER_SEED = 3


def build_generator(config: str) -> torch.nn.Module:
    """A random generator with the mixed-precision settings of the issue (fp16 in 4 backbone and 4 SR resolutions)."""
    if config == 'ffhq512':
        kwargs = configs.generator_kwargs('ffhq', 512, g_num_fp16_res=4, sr_num_fp16_res=4)
    else:
        kwargs = synthetic_identity.tiny_generator_kwargs(num_fp16_res=4, sr_num_fp16_res=4, conv_clamp=256)
    assert kwargs['conv_clamp'] == 256
    torch.manual_seed(0)
    return TriPlaneGenerator(**kwargs).eval().requires_grad_(False)


def randomize_factors(G: torch.nn.Module, seed: int = 0) -> None:
    """B ~ N(0, 1) (A keeps its init): deltas of about 1-2 % of the base weights, so every branch matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(G):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen))


class _MergedWeight(torch.nn.Module):
    """Parametrization W -> W + scaling * (B @ A).reshape(W.shape): the merged weight of adapter 0."""

    def __init__(self, A: torch.nn.Parameter, B: torch.nn.Parameter, scaling: float):
        super().__init__()
        self.A, self.B, self.scaling = A, B, scaling

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return W + (self.B[0] @ self.A[0]).reshape(W.shape) * self.scaling


def merged_reference(base: torch.nn.Module, adapted: torch.nn.Module) -> Dict[str, torch.nn.Parameter]:
    """Parametrise a copy of `base` with adapted's factors as merged weights, in place; {factor name: its copy}."""
    factors = {}
    for name, layer in adapter_layers(adapted):
        A = torch.nn.Parameter(layer.lora_A.detach().clone())
        B = torch.nn.Parameter(layer.lora_B.detach().clone())
        torch.nn.utils.parametrize.register_parametrization(base.get_submodule(base_name(name)), 'weight',
                                                            _MergedWeight(A, B, layer.scaling), unsafe=True)
        factors[f'{name}.lora_A'], factors[f'{name}.lora_B'] = A, B
    return factors


def relative_rms(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).square().mean().sqrt() / ref.float().square().mean().sqrt()).item()


def scaled_max_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref|: float rounding scales with the tensor's magnitude, not each entry's."""
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def worst(errors: List[float]) -> float:
    """The largest error; infinite when any is not finite (NaN would slip through max())."""
    return max(errors) if all(math.isfinite(e) for e in errors) else math.inf


def render(G, ws, c, nrr: int, force_fp32: bool) -> dict:
    torch.manual_seed(RENDER_SEED)
    return G.synthesis(ws, c, neural_rendering_resolution=nrr, noise_mode='const', force_fp32=force_fp32)


def gradient_errors(adapted, reference, ref_factors, ws, c, nrr: int, force_fp32: bool) -> List[float]:
    """Per factor tensor: scaled max error of adapted's gradient against the merged-weight reference's,
    for the loss sum(image * R1) + sum(image_raw * R2) with fixed random cotangents (NaN where either is not finite)."""
    gen = torch.Generator().manual_seed(5)
    cotangents, grads = None, []
    for G, params in ((adapted, adapters.trainable_parameters(adapted)), (reference, list(ref_factors.values()))):
        out = render(G, ws, c, nrr, force_fp32)
        if cotangents is None:
            cotangents = {k: torch.randn(out[k].shape, generator=gen).to(ws.device) for k in ('image', 'image_raw')}
        loss = sum((out[k].float() * R).sum() for k, R in cotangents.items())
        grads.append(torch.autograd.grad(loss, params))
    assert len(grads[0]) == len(grads[1])
    return [scaled_max_error(g, g_ref) for g, g_ref in zip(*grads)]


def training_losses(G, steps: int, batch: int, nrr: int, lpips: str, device: torch.device) -> List[float]:
    """Loss of each of `steps` Adam steps on the adapters (mixed precision, train mode, as training_loop does)."""
    G.train()
    params = adapters.trainable_parameters(G)
    optimizer = torch.optim.Adam(params, lr=0.0025, betas=(0.0, 0.99), eps=1e-8)
    loss_fn = PersonalizationLoss(device, lpips_net=lpips)
    gen = torch.Generator().manual_seed(1)
    res = G.img_resolution
    real = (torch.rand([batch, 3, res, res], generator=gen) * 2 - 1).to(device)
    c = torch.from_numpy(synthetic_identity.camera_labels(batch, seed=2)).to(device)
    w_avg = G.backbone.mapping.w_avg.detach()
    ws = (w_avg + 0.5 * torch.randn([batch, G.backbone.num_ws, G.w_dim], generator=gen).to(device)).detach()
    losses = []
    for k in range(steps):
        optimizer.zero_grad(set_to_none=True)
        total, _, _ = loss_fn(G, real, c, ws, nrr, regularize=(k % 4 == 0), reg_gain=4)
        total.backward()
        optimizer.step()
        losses.append(total.item())
    if not all(torch.isfinite(p).all() for p in params):
        losses.append(float('nan'))
    return losses


def run_checks(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # as training_loop: float32 means float32
    torch.backends.cudnn.allow_tf32 = False
    base = build_generator(args.config)
    adapted = adapters.inject(copy.deepcopy(base), adapters.AdapterConfig(r=1))
    randomize_factors(adapted)
    reference = copy.deepcopy(base)
    ref_factors = merged_reference(reference, adapted)
    adapted, reference = adapted.to(device), reference.to(device)
    nrr = args.nrr or int(getattr(base.superresolution, 'input_resolution', 32))

    gen = torch.Generator().manual_seed(0)
    c = torch.from_numpy(synthetic_identity.camera_labels(args.batch, seed=1)).to(device)
    with torch.no_grad():
        ws = adapted.mapping(torch.randn([args.batch, base.z_dim], generator=gen).to(device), c, truncation_psi=0.7)
        mixed = render(adapted, ws, c, nrr, force_fp32=False)
        full = render(adapted, ws, c, nrr, force_fp32=True)
    checks = []

    def check(name: str, value: float, tolerance, passed: bool) -> None:
        checks.append(dict(name=name, value=value, tolerance=tolerance, passed=bool(passed)))

    finite = all(torch.isfinite(mixed[k]).all().item() for k in ('image', 'image_raw', 'image_depth'))
    check('finite_outputs', float(finite), 'all finite', finite)
    err = worst([relative_rms(mixed[k], full[k]) for k in ('image', 'image_raw')])
    check('fp16_vs_fp32', err, FP16_IMAGE_RTOL, err <= FP16_IMAGE_RTOL)
    err = worst(gradient_errors(adapted, reference, ref_factors, ws, c, nrr, force_fp32=True))
    check('grads_vs_merged_fp32', err, GRAD_RTOL_FP32, err <= GRAD_RTOL_FP32)
    err = worst(gradient_errors(adapted, reference, ref_factors, ws, c, nrr, force_fp32=False))
    check('grads_vs_merged_fp16', err, GRAD_RTOL_FP16, err <= GRAD_RTOL_FP16)
    del reference, ref_factors
    t0 = time.perf_counter()
    losses = training_losses(adapted, args.steps, args.batch, nrr, args.lpips, device)
    seconds = time.perf_counter() - t0
    finite = all(math.isfinite(loss) for loss in losses)
    check('training_steps', losses[-1], f'{args.steps} steps, every loss finite', finite)
    return dict(config=args.config, device=str(device), batch=args.batch, nrr=nrr, steps=args.steps,
                lpips=args.lpips, first_loss=losses[0], train_seconds=seconds, checks=checks,
                passed=all(c['passed'] for c in checks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--config', choices=['tiny', 'ffhq512'], default='ffhq512')
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--steps', type=int, default=20, help='adapter training steps')
    parser.add_argument('--nrr', type=int, default=None, help='neural rendering resolution (default: the SR input)')
    parser.add_argument('--lpips', default='alex-random', help="LPIPS in the loss ('alex-random': no download; 'none')")
    args = parser.parse_args()
    result = run_checks(args)
    print('RESULT ' + json.dumps(result))
    for c in result['checks']:
        print(f"{'ok  ' if c['passed'] else 'FAIL'} {c['name']}: {c['value']:.3g} (tolerance: {c['tolerance']})")
    sys.exit(0 if result['passed'] else 1)


if __name__ == '__main__':
    main()
