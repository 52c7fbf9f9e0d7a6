"""Pivotal Tuning Inversion (PTI, Roich et al. 2022) on a (personalized) EG3D generator.

    python invert_pti.py --network=base.pkl --adapter=me.safetensors --target=selfies/image_0.png --outdir=out
    python invert_pti.py --network=base.pkl --target=photo.png --c=photo_camera.npy --outdir=out --full

1. Pivot: project the image into W (projector.py; or reuse a latent with --latent); with --encoder the
   projection starts from the encoder's estimate (train_encoder.py) and runs L-BFGS (projector.resolve_settings),
   and --num-steps=0 keeps that estimate.
2. Tune the generator around the fixed pivot on that one image (LPIPS + MSE, Adam, lr 3e-4): only the
   adapters (default), or every generator weight with --full (adapters are merged in first).

Writes `<stem>_latent.npy` (the pivot), the tuned model (`<stem>_pti_adapter.safetensors`, or
`<stem>_pti.pkl` with --full), `<stem>_pti.png` (target | pivot before tuning | after, then the tuned
model's views) and `<stem>_pti.json` (losses and metrics before/after).
"""

import copy
import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import click
import torch
from tqdm import tqdm

import projector
from training import inference as inf


def adapter_parameters(G: torch.nn.Module) -> List[torch.nn.Parameter]:
    """Every adapter tensor of G (factors and extras), trainable or not (a pickled snapshot loads them frozen)."""
    from training.adapters.inject import adapter_layers
    return [p for _, layer in adapter_layers(G) for p in layer.adapter_parameters()]


def tunable_parameters(G: torch.nn.Module, full: bool) -> List[torch.nn.Parameter]:
    """Freeze G, then unfreeze what PTI tunes: the adapters, or (full) every parameter."""
    G.requires_grad_(False)
    params = list(G.parameters()) if full else adapter_parameters(G)
    for p in params:
        p.requires_grad_(True)
    return params


def pivotal_tuning(G: torch.nn.Module, params: List[torch.nn.Parameter], ws: torch.Tensor, target: torch.Tensor,
                   c: torch.Tensor, *, num_steps: int = 350, learning_rate: float = 3e-4,
                   lpips_model: Optional[torch.nn.Module] = None, mse_weight: float = 1.0,
                   neural_rendering_resolution: Optional[int] = None, seed: int = 0,
                   progress: bool = True) -> List[float]:
    """Adam on `params` so that G renders `target` from the fixed pivot `ws` at camera `c`; returns the losses."""
    optimizer = torch.optim.Adam(params, lr=learning_rate)
    ws = ws.detach()
    losses = []
    bar = tqdm(range(num_steps), desc='pivotal tuning', disable=not progress, leave=False)
    for step in bar:
        image = inf.render(G, ws, c, neural_rendering_resolution, seed=seed + 1 + step)
        loss = projector.reconstruction_loss(image, target, lpips_model, mse_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f'{losses[-1]:.4f}')
    return losses


@torch.no_grad()
def fit_metrics(G: torch.nn.Module, ws: torch.Tensor, target: torch.Tensor, c: torch.Tensor,
                lpips_model: Optional[torch.nn.Module], mse_weight: float, neural_rendering_resolution: Optional[int],
                seed: int) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Render of the pivot and its fit to the target: reconstruction loss, PSNR, SSIM."""
    image = inf.render(G, ws, c, neural_rendering_resolution, seed=seed)
    return image, {
        'loss': float(projector.reconstruction_loss(image, target, lpips_model, mse_weight)),
        'psnr': float(inf.psnr(image, target)[0]),
        'ssim': float(inf.ssim(image, target)[0]),
    }


@click.command()
@inf.network_options
@click.option('--adapter-index', type=int, default=0, show_default=True, help='Which loaded adapter to tune')
@click.option('--target', required=True, type=str, help='Aligned image (camera from the dataset.json beside it)')
@click.option('--c', 'c_path', type=str, help='Camera label .npy (25 floats) instead of dataset.json')
@click.option('--outdir', required=True, type=str)
@click.option('--latent', 'latent_path', type=str, help='Use this latent as the pivot instead of projecting')
@click.option('--full', is_flag=True, help='Tune every generator weight instead of the adapters')
@click.option('--num-steps', type=click.IntRange(min=0), default=500, show_default=True,
              help='Projection steps (pivot)')
@click.option('--encoder', 'encoder_path', type=str,
              help='Encoder file (train_encoder.py): the pivot starts from its estimate')
@click.option('--encoder-iters', type=click.IntRange(min=1), default=None,
              help='ReStyle iterations of --encoder  [default: as it was trained]')
@click.option('--encoder-guard/--no-encoder-guard', default=True, show_default=True,
              help='Halve (or drop) an --encoder iteration that would make the render worse')
@click.option('--latent-space', type=click.Choice(['w', 'w_plus']), default='w', show_default=True)
@click.option('--w-avg-samples', type=int, default=10000, show_default=True)
@click.option('--pti-steps', type=int, default=350, show_default=True, help='Tuning steps')
@click.option('--pti-lr', type=float, default=3e-4, show_default=True, help='Tuning learning rate')
@click.option('--lpips', 'lpips_kind', type=click.Choice(inf.LPIPS_CHOICES), default='vgg', show_default=True)
@click.option('--mse-weight', type=float, default=1.0, show_default=True)
@inf.view_options
@click.option('--overwrite', is_flag=True, help='Replace existing outputs')
@inf.user_errors
def main(network_pkl, adapter_paths, device, adapter_index, target, c_path, outdir, latent_path, full, num_steps,
         encoder_path, encoder_iters, encoder_guard, latent_space, w_avg_samples, pti_steps, pti_lr, lpips_kind,
         mse_weight, num_views, yaw_range, pitch, fov_deg, neural_rendering_resolution, render_seed, overwrite):
    """Project an image to a pivot, then tune the adapters (or, --full, the generator) on it."""
    from training import adapters
    import legacy
    device = inf.resolve_device(device)
    image_path = inf.check_file(target, 'Target image')
    camera = inf.label_for_image(image_path, c_path)
    outdir = Path(outdir)
    stem = image_path.stem
    outputs = {'latent': outdir / f'{stem}_latent.npy', 'render': outdir / f'{stem}_pti.png',
               'metrics': outdir / f'{stem}_pti.json',
               'model': outdir / (f'{stem}_pti.pkl' if full else f'{stem}_pti_adapter.safetensors')}
    if latent_path is not None:
        del outputs['latent']
    existing = [str(p) for p in outputs.values() if p.exists()]
    if existing and not overwrite:
        raise inf.InputError(f'{", ".join(existing)} exist(s); pass --overwrite to replace')

    lpips_model = inf.build_lpips(lpips_kind, device)
    G = inf.load_generator(network_pkl, adapter_paths, device)
    start = (projector.EncoderStart.load(encoder_path, G, encoder_iters, device, encoder_guard)  # base check
             if encoder_path else None)
    if full and adapters.is_injected(G):
        inf.select_adapter(G, adapter_index)
        G = adapters.merge(G, index=adapter_index).to(device)  # tune the personalized weights as plain weights
    elif not full:
        if not adapters.is_injected(G):
            raise inf.InputError(f'{network_pkl} carries no adapters: pass --adapter=<file> to tune an adapter, '
                                 'or --full to tune every generator weight')
        inf.select_adapter(G, adapter_index)
    pivot = inf.load_latent(latent_path, G).to(device) if latent_path else None
    target_img = inf.load_image(image_path, G.img_resolution).to(device)
    c = torch.from_numpy(camera).to(device).unsqueeze(0)
    fit_args = (lpips_model, mse_weight, neural_rendering_resolution, render_seed)

    if pivot is None:
        w_init = start.estimate(G, target_img, c, neural_rendering_resolution, render_seed) if start else None
        result = projector.project(G, target_img, c, num_steps=num_steps, latent_space=latent_space,
                                   lpips_model=lpips_model, mse_weight=mse_weight, w_avg_samples=w_avg_samples,
                                   w_init=w_init, neural_rendering_resolution=neural_rendering_resolution,
                                   seed=render_seed, desc='pivot')
        pivot = result.ws
        inf.save_latent(outputs['latent'], pivot, overwrite=overwrite)
    before_img, before = fit_metrics(G, pivot, target_img, c, *fit_args)

    params = tunable_parameters(G, full)
    losses = pivotal_tuning(G, params, pivot, target_img, c, num_steps=pti_steps, learning_rate=pti_lr,
                            lpips_model=lpips_model, mse_weight=mse_weight,
                            neural_rendering_resolution=neural_rendering_resolution, seed=render_seed)
    G.requires_grad_(False)
    after_img, after = fit_metrics(G, pivot, target_img, c, *fit_args)

    if full:
        G_out = copy.deepcopy(G).eval().cpu()
        legacy.save_network_pkl({'G': G_out, 'G_ema': G_out, 'D': None, 'training_set_kwargs': None,
                                 'augment_pipe': None}, outputs['model'])
    else:
        adapters.save(G, outputs['model'], index=adapter_index)
    cameras = inf.orbit_labels(G, inf.yaw_sweep(num_views, yaw_range), pitch, fov_deg, device)
    views = inf.render_views(G, pivot, cameras, neural_rendering_resolution, seed=render_seed)
    top = torch.cat([target_img.cpu(), before_img.cpu(), after_img.cpu()])
    inf.save_image(inf.image_grid([top, views]), outputs['render'])
    report = {'target': str(image_path), 'mode': 'full' if full else 'adapter', 'pti_steps': pti_steps,
              'before': before, 'after': after, 'losses': losses,
              'outputs': {k: str(v) for k, v in outputs.items()}}
    inf.atomic_write(outputs['metrics'], lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
    click.echo(f'{stem}: loss {before["loss"]:.4f} -> {after["loss"]:.4f}, PSNR {before["psnr"]:.2f} -> '
               f'{after["psnr"]:.2f} dB; wrote {outputs["model"]}')


if __name__ == '__main__':
    main()
