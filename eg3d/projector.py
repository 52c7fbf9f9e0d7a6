"""Project aligned selfies (with their cameras) into the W or W+ space of a (personalized) EG3D generator.

    python projector.py --network=base.pkl --target=selfies/image_0.png --outdir=out --num-steps=500
    python projector.py --network=base.pkl --dataset=selfies        # every image without a latent
    python projector.py --network=base.pkl --target=selfies/image_0.png --outdir=out --encoder=encoder.safetensors \
        --num-steps=50 --latent-space=w_plus                         # start from the encoder's estimate

Writes `<stem>_latent.npy` ([1, num_ws, w_dim], the identity dataset format) and `<stem>_projection.png`
(target | projection). The optimization follows the EG3D/StyleGAN2 projector: start at w_avg (mean of
`--w-avg-samples` mapped z), Adam with a cosine learning-rate ramp-up/ramp-down from 0.01, Gaussian
noise on w scaled by w_std and decaying to zero in the first 75% of the steps, loss = LPIPS + MSE.
With noise_mode='const' there are no per-layer noise maps to optimize, so no noise regularization.
With `--encoder` (train_encoder.py), the start is the encoder's ReStyle estimate instead of w_avg, and the
default optimizer is L-BFGS (torch's, strong-Wolfe line search; `--optimizer`): without the w noise (which is there
to explore away from w_avg, and from a good estimate throws the estimate away) the objective is deterministic on one
render seed, and L-BFGS fits it in far fewer generator passes than Adam's schedule (measured in docs/encoder.md).
`--num-steps` then counts L-BFGS's evaluations (one forward and backward pass each, as an Adam step), so the same
number costs the same. That start needs no w statistics, so none are sampled. `--num-steps=0` keeps the encoder's
estimate as it is.
"""

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import List, Optional, Tuple

import click
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from training import inference as inf
from training import encoder as encoders


OPTIMIZERS = ('adam', 'lbfgs')
# Adam's (initial learning rate, initial w noise factor) by start. From w_avg: the EG3D/StyleGAN2 projector's values.
W_AVG_START = (0.01, 0.05)
ENCODER_START = (0.02, 0.0)
# L-BFGS: the first trial step of every line search (the search scales it), and how many past steps it remembers.
LBFGS_LEARNING_RATE = 1.0
LBFGS_HISTORY = 100


@dataclasses.dataclass
class ProjectionResult:
    ws: torch.Tensor            # [1, num_ws, w_dim], detached
    losses: List[float]         # per step (with the w noise of that step)
    initial_loss: float         # noise-free loss at the start (w_avg, or the given initial latent)
    final_loss: float           # noise-free loss at the result


def reconstruction_loss(image: torch.Tensor, target: torch.Tensor, lpips_model: Optional[torch.nn.Module],
                        mse_weight: float) -> torch.Tensor:
    """LPIPS (at most 256 px) + mse_weight * MSE, on images in [-1, 1]; mean over the batch."""
    loss = mse_weight * F.mse_loss(image, target)
    if lpips_model is not None:
        loss = loss + inf.lpips_distance(lpips_model, image, target).mean()
    return loss


@torch.no_grad()
def w_statistics(G: torch.nn.Module, c: torch.Tensor, num_samples: int, seed: int = 123,
                 batch_size: int = 1000) -> Tuple[torch.Tensor, float]:
    """(w_avg [1, 1, w_dim], w_std) over `num_samples` z ~ N(0, I) mapped with camera c (as the EG3D projector)."""
    device = c.device
    rng = np.random.RandomState(seed)
    ws = []
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        z = torch.from_numpy(rng.randn(n, G.z_dim)).float().to(device)
        ws.append(G.mapping(z, c.expand(n, -1), truncation_psi=1)[:, :1, :].cpu())
    ws = torch.cat(ws)                                             # [N, 1, w_dim]
    w_avg = ws.mean(0, keepdim=True)
    w_std = float((ws - w_avg).square().sum() / num_samples) ** 0.5
    return w_avg.to(device), w_std


def learning_rate(step: int, num_steps: int, initial_learning_rate: float, rampup: float, rampdown: float) -> float:
    """Cosine ramp-down over the last `rampdown` fraction, linear ramp-up over the first `rampup` fraction."""
    t = step / num_steps
    lr_ramp = min(1.0, (1.0 - t) / rampdown)
    lr_ramp = 0.5 - 0.5 * math.cos(lr_ramp * math.pi)
    lr_ramp = lr_ramp * min(1.0, t / rampup)
    return initial_learning_rate * lr_ramp


def resolve_settings(optimizer: Optional[str], from_encoder: bool, initial_learning_rate: Optional[float],
                     initial_noise_factor: Optional[float]) -> Tuple[str, float, float]:
    """(optimizer, initial learning rate, initial w noise factor) with the defaults of the start filled in.

    Adam from w_avg is the EG3D projector (W_AVG_START); from the encoder's estimate the default is L-BFGS, and Adam
    there takes ENCODER_START. L-BFGS needs a deterministic objective, so it refuses w noise (ValueError)."""
    optimizer = optimizer or ('lbfgs' if from_encoder else 'adam')
    if optimizer not in OPTIMIZERS:
        raise ValueError(f'optimizer must be one of {", ".join(OPTIMIZERS)}, got {optimizer!r}')
    if optimizer == 'lbfgs':
        if initial_noise_factor:
            raise ValueError(f'L-BFGS fits a deterministic objective: the w noise must be 0, got {initial_noise_factor}'
                             ' (use the adam optimizer for the noise ramp)')
        lr = LBFGS_LEARNING_RATE if initial_learning_rate is None else initial_learning_rate
        return optimizer, lr, 0.0
    default_lr, default_noise = ENCODER_START if from_encoder else W_AVG_START
    return (optimizer, default_lr if initial_learning_rate is None else initial_learning_rate,
            default_noise if initial_noise_factor is None else initial_noise_factor)


def project(G: torch.nn.Module, target: torch.Tensor, c: torch.Tensor, *,
            num_steps: int = 500,
            latent_space: str = 'w',
            lpips_model: Optional[torch.nn.Module] = None,
            mse_weight: float = 1.0,
            optimizer: Optional[str] = None,
            initial_learning_rate: Optional[float] = None,
            initial_noise_factor: Optional[float] = None,
            lr_rampup_length: float = 0.05,
            lr_rampdown_length: float = 0.25,
            noise_ramp_length: float = 0.75,
            w_avg_samples: int = 10000,
            w_init: Optional[torch.Tensor] = None,
            neural_rendering_resolution: Optional[int] = None,
            seed: int = 0,
            progress: bool = True,
            desc: str = 'project') -> ProjectionResult:
    """Optimize a latent so that G renders `target` [1, 3, R, R] (in [-1, 1]) from camera `c` [1, 25].

    `latent_space`: 'w' optimizes one w_dim vector shared by all layers, 'w_plus' one per layer.
    `w_init` ([1, num_ws, w_dim]) replaces the w_avg start (its layer mean is used for 'w').
    `optimizer`, `initial_learning_rate`, `initial_noise_factor`: None takes the start's defaults
    (resolve_settings). `num_steps` counts generator forward and backward passes with either optimizer.
    """
    if latent_space not in ('w', 'w_plus'):
        raise ValueError(f'latent_space must be w or w_plus, got {latent_space!r}')
    optimizer, initial_learning_rate, initial_noise_factor = resolve_settings(
        optimizer, w_init is not None, initial_learning_rate, initial_noise_factor)
    device = c.device
    n_ws = inf.num_ws(G)
    target = target.to(device)
    # The w_avg start needs the mean; the noise ramp needs the spread; an encoder start without noise needs neither.
    needs_statistics = w_init is None or initial_noise_factor > 0
    w_avg, w_std = w_statistics(G, c, w_avg_samples) if needs_statistics else (None, 0.0)
    if w_init is not None:
        start = w_init.to(device).mean(1, keepdim=True) if latent_space == 'w' else w_init.to(device)
    else:
        start = w_avg if latent_space == 'w' else w_avg.repeat(1, n_ws, 1)
    w_opt = start.detach().clone().requires_grad_(True)    # [1, 1 or num_ws, w_dim]

    def loss_at(w: torch.Tensor, render_seed: int) -> torch.Tensor:
        ws = w.expand(1, n_ws, -1) if w.shape[1] == 1 else w
        image = inf.render(G, ws, c, neural_rendering_resolution, seed=render_seed)
        return reconstruction_loss(image, target, lpips_model, mse_weight)

    with torch.no_grad():
        initial_loss = float(loss_at(w_opt, seed))
    bar = tqdm(total=num_steps, desc=desc, disable=not progress or num_steps == 0, leave=False)
    if optimizer == 'adam':
        torch.manual_seed(seed)
        schedule = functools.partial(learning_rate, num_steps=num_steps, initial_learning_rate=initial_learning_rate,
                                     rampup=lr_rampup_length, rampdown=lr_rampdown_length)
        noise = functools.partial(noise_scale, num_steps=num_steps, initial_scale=w_std * initial_noise_factor,
                                  ramp=noise_ramp_length)
        losses = adam_steps(w_opt, loss_at, num_steps, schedule, noise, seed + 1, bar)
    else:
        losses = lbfgs_steps(w_opt, loss_at, num_steps, initial_learning_rate, seed + 1, bar)
    bar.close()

    with torch.no_grad():
        final_loss = float(loss_at(w_opt, seed))
    ws = w_opt.detach().expand(1, n_ws, -1).clone() if latent_space == 'w' else w_opt.detach().clone()
    return ProjectionResult(ws=ws, losses=losses, initial_loss=initial_loss, final_loss=final_loss)


def noise_scale(step: int, num_steps: int, initial_scale: float, ramp: float) -> float:
    """The w noise's standard deviation: initial_scale, decaying quadratically to 0 over the first `ramp` fraction."""
    return initial_scale * max(0.0, 1.0 - step / num_steps / ramp) ** 2


def adam_steps(w_opt: torch.Tensor, loss_at, num_steps: int, schedule, noise, first_seed: int, bar) -> List[float]:
    """The EG3D projector's loop: Adam at `schedule(step)`, on w plus Gaussian noise of std `noise(step)`, a new render
    seed every step. Returns the loss of every step."""
    optimizer = torch.optim.Adam([w_opt], betas=(0.9, 0.999))   # every step sets its rate
    losses = []
    for step in range(num_steps):
        for group in optimizer.param_groups:
            group['lr'] = schedule(step)
        w_noisy = w_opt + torch.randn_like(w_opt) * noise(step)
        loss = loss_at(w_noisy, first_seed + step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f'{losses[-1]:.4f}')
    return losses


class _BudgetSpent(Exception):
    """Ends L-BFGS when its evaluations are spent: torch caps them only between iterations, not in a line search."""


def lbfgs_steps(w_opt: torch.Tensor, loss_at, num_steps: int, lr: float, render_seed: int, bar) -> List[float]:
    """At most `num_steps` evaluations (forward and backward) of L-BFGS with a strong-Wolfe line search, every one on
    the same render seed; w_opt ends at the best point evaluated. Returns the loss of every evaluation."""
    optimizer = torch.optim.LBFGS([w_opt], lr=lr, max_iter=num_steps, max_eval=2 * num_steps + 1,
                                  history_size=min(LBFGS_HISTORY, max(num_steps, 1)), tolerance_grad=0.0,
                                  tolerance_change=0.0, line_search_fn='strong_wolfe')
    best_w, best_loss = w_opt.detach().clone(), [math.inf]
    losses = []

    def closure() -> torch.Tensor:
        if len(losses) == num_steps:
            raise _BudgetSpent
        optimizer.zero_grad(set_to_none=True)
        loss = loss_at(w_opt, render_seed)
        loss.backward()
        losses.append(float(loss.detach()))
        if losses[-1] < best_loss[0]:       # a NaN never counts as best
            best_loss[0] = losses[-1]
            best_w.copy_(w_opt.detach())
        bar.update(1)
        bar.set_postfix(loss=f'{losses[-1]:.4f}')
        return loss

    if num_steps > 0:
        try:
            optimizer.step(closure)
        except _BudgetSpent:
            pass
    with torch.no_grad():
        w_opt.copy_(best_w)
    return losses


# ----------------------------------------------------------------------------------------------
# Command line.

@dataclasses.dataclass
class Job:
    image: Path
    camera: np.ndarray
    latent_out: Path
    render_out: Optional[Path]


def plan_jobs(target: Optional[str], dataset: Optional[str], outdir: Optional[str], c_path: Optional[str],
              overwrite: bool) -> List[Job]:
    """Every (image, camera, output) to project, checked before any work starts."""
    if (target is None) == (dataset is None):
        raise inf.InputError('pass exactly one of --target=<image> or --dataset=<folder>')
    if target is not None:
        image = inf.check_file(target, 'Target image')
        camera = inf.label_for_image(image, c_path)
        out = Path(outdir) if outdir else image.parent
        latent_out = inf.latent_path_for(image, out)
        if latent_out.exists() and not overwrite:
            raise inf.InputError(f'{latent_out} exists; pass --overwrite to project again')
        render_out = Path(outdir) / f'{image.stem}_projection.png' if outdir else None  # never into a dataset folder
        return [Job(image, camera, latent_out, render_out)]
    if c_path is not None:
        raise inf.InputError('--c applies to a single --target; with --dataset the cameras come from dataset.json')
    folder = Path(dataset)
    if not folder.is_dir():
        raise inf.InputError(f'dataset folder not found: {folder}')
    labels = inf.read_labels(folder)
    images = inf.list_images(folder)
    if not images:
        raise inf.InputError(f'no images in {folder}')
    unlabelled = [p.name for p in images if p.name not in labels]
    if unlabelled:
        raise inf.InputError(f'{len(unlabelled)} image(s) in {folder} have no camera label in dataset.json: '
                             f'{", ".join(unlabelled[:5])}')
    jobs = []
    for image in images:
        latent_out = inf.latent_path_for(image)
        if latent_out.exists() and not overwrite:
            continue
        render_out = Path(outdir) / f'{image.stem}_projection.png' if outdir else None
        jobs.append(Job(image, labels[image.name], latent_out, render_out))
    return jobs


@dataclasses.dataclass
class EncoderStart:
    """A trained encoder that gives the projection its start latent."""
    encoder: torch.nn.Module
    w_avg: torch.Tensor             # [num_ws, w_dim]
    iters: int
    neural_rendering_resolution: Optional[int]
    guard: bool = True              # no iteration may raise the image error (training.encoder.refine_guarded)

    @classmethod
    def load(cls, path: str, G: torch.nn.Module, iters: Optional[int], device: torch.device,
             guard: bool = True) -> 'EncoderStart':
        """The encoder in `path` for G (refused with a clear error if it was trained for another generator)."""
        try:
            encoder, w_avg, info = encoders.load(path, G, device)
        except encoders.EncoderFileError as err:
            raise inf.InputError(f'--encoder: {err}') from err
        return cls(encoder, w_avg, iters or int(info.get('iters', 5)), info.get('neural_rendering_resolution'), guard)

    def estimate(self, G: torch.nn.Module, target: torch.Tensor, c: torch.Tensor,
                 neural_rendering_resolution: Optional[int], seed: int) -> torch.Tensor:
        """W+ [1, num_ws, w_dim] of the target after the encoder's ReStyle iterations."""
        return encoders.encode(G, self.encoder, self.w_avg, target, c, self.iters, neural_rendering_resolution,
                               seed=seed, guard=self.guard)[-1].ws


@click.command()
@click.option('--network', 'network_pkl', required=True, help='Base or snapshot pkl')
@click.option('--adapter', 'adapter_paths', multiple=True, help='Adapter file(s) to load onto --network')
@click.option('--adapter-index', type=int, default=0, show_default=True, help='Which loaded adapter renders')
@click.option('--target', type=str, help='Aligned image to project (camera from the dataset.json beside it)')
@click.option('--dataset', type=str, help='Identity folder: project every labelled image that has no latent yet')
@click.option('--outdir', type=str, help='Where latents/renders go (default: beside the image; with --dataset only renders)')
@click.option('--c', 'c_path', type=str, help='Camera label .npy (25 floats) instead of dataset.json')
@click.option('--num-steps', type=click.IntRange(min=0), default=500, show_default=True,
              help='Optimisation steps (0 with --encoder: the encoder\'s estimate only)')
@click.option('--encoder', 'encoder_path', type=str, help='Encoder file (train_encoder.py): start from its estimate')
@click.option('--encoder-iters', type=click.IntRange(min=1), default=None,
              help='ReStyle iterations of --encoder  [default: as it was trained]')
@click.option('--encoder-guard/--no-encoder-guard', default=True, show_default=True,
              help='Halve (or drop) an --encoder iteration that would make the render worse')
@click.option('--latent-space', type=click.Choice(['w', 'w_plus']), default='w', show_default=True)
@click.option('--lpips', 'lpips_kind', type=click.Choice(inf.LPIPS_CHOICES), default='vgg', show_default=True,
              help='LPIPS backbone; *-random only for tests')
@click.option('--mse-weight', type=float, default=1.0, show_default=True)
@click.option('--optimizer', type=click.Choice(OPTIMIZERS), default=None,
              help='adam: the EG3D projector (lr ramp, w noise); lbfgs: line searches on a fixed render seed, no w '
                   'noise  [default: adam; lbfgs with --encoder]')
@click.option('--lr', 'initial_learning_rate', type=float, default=None,
              help=f'Initial learning rate  [default: adam {W_AVG_START[0]}, {ENCODER_START[0]} with --encoder; '
                   f'lbfgs {LBFGS_LEARNING_RATE} (the trial step of its line searches)]')
@click.option('--noise-factor', 'initial_noise_factor', type=float, default=None,
              help=f'Initial w noise, times w_std  [default: adam {W_AVG_START[1]}, {ENCODER_START[1]} with '
                   '--encoder; lbfgs takes none]')
@click.option('--w-avg-samples', type=int, default=10000, show_default=True, help='z samples for w_avg / w_std')
@click.option('--nrr', 'neural_rendering_resolution', type=int, default=None, help='Neural rendering resolution')
@click.option('--seed', type=int, default=0, show_default=True)
@click.option('--overwrite', is_flag=True, help='Replace existing latents')
@click.option('--device', default='auto', show_default=True)
@inf.user_errors
def main(network_pkl, adapter_paths, adapter_index, target, dataset, outdir, c_path, num_steps, encoder_path,
         encoder_iters, encoder_guard, latent_space,
         lpips_kind, mse_weight, optimizer, initial_learning_rate, initial_noise_factor, w_avg_samples,
         neural_rendering_resolution, seed, overwrite, device):
    """Invert aligned images with known cameras into W / W+ (writes <stem>_latent.npy)."""
    device = inf.resolve_device(device)
    try:
        optimizer_name = resolve_settings(optimizer, encoder_path is not None, initial_learning_rate,
                                          initial_noise_factor)[0]
    except ValueError as err:
        raise inf.InputError(f'--noise-factor={initial_noise_factor} needs --optimizer=adam ({err})') from err
    jobs = plan_jobs(target, dataset, outdir, c_path, overwrite)
    if not jobs:
        click.echo(f'every image in {dataset} already has a latent (pass --overwrite to redo them)')
        return
    lpips_model = inf.build_lpips(lpips_kind, device)
    G = inf.load_generator(network_pkl, adapter_paths, device)
    if adapter_index:
        inf.select_adapter(G, adapter_index)
    start = EncoderStart.load(encoder_path, G, encoder_iters, device, encoder_guard) if encoder_path else None
    if start is not None and neural_rendering_resolution is None:
        neural_rendering_resolution = start.neural_rendering_resolution  # render as the encoder was trained
    for job in tqdm(jobs, desc='images', disable=len(jobs) == 1):
        target_img = inf.load_image(job.image, G.img_resolution).to(device)
        c = torch.from_numpy(job.camera).to(device).unsqueeze(0)
        began = time.time()
        w_init = start.estimate(G, target_img, c, neural_rendering_resolution, seed) if start is not None else None
        result = project(G, target_img, c, num_steps=num_steps, latent_space=latent_space, lpips_model=lpips_model,
                         mse_weight=mse_weight, optimizer=optimizer, initial_learning_rate=initial_learning_rate,
                         initial_noise_factor=initial_noise_factor, w_avg_samples=w_avg_samples, w_init=w_init,
                         neural_rendering_resolution=neural_rendering_resolution, seed=seed, desc=job.image.name)
        inf.save_latent(job.latent_out, result.ws, overwrite=overwrite)
        if job.render_out is not None:
            with torch.no_grad():
                image = inf.render(G, result.ws, c, neural_rendering_resolution, seed=seed)
            inf.save_image(inf.image_grid([torch.cat([target_img.cpu(), image.cpu()])]), job.render_out)
        origin = f'encoder ({start.iters} iterations)' if start is not None else 'w_avg'
        click.echo(f'{job.image.name}: loss {result.initial_loss:.4f} ({origin}) -> {result.final_loss:.4f} after '
                   f'{len(result.losses)} {optimizer_name} steps in {time.time() - began:.1f} s; wrote {job.latent_out}')


if __name__ == '__main__':
    main()
