"""Train the demo's base generator: a tiny EG3D that renders the procedural head family.

    python eg3d/make_demo_base.py --out=networks/demo-heads.pkl --steps=2000

The generator is the demo's tiny TriPlaneGenerator (synthetic_identity.tiny_generator_kwargs: 128 px
images, 32 px neural rendering). Each step draws fresh latents z, ties each to a head of the family
(procedural_heads.params_from_latent(z)), draws FFHQ-like cameras, renders the ground truth with the
exact renderer and regresses the generator G(z, camera) onto it:

    loss = MSE(image, 64 px) + MSE(image_raw, 32 px) + depth_weight * L1(depth on the head, 32 px)

(the 128 px image is compared at 64 px, where the ground truth is rendered, to keep the renderer's share
of a step small). No GAN loss, no LPIPS: the offline machines have no pretrained LPIPS weights.

Training is resumable: the state (weights, Adam, step) is checkpointed atomically to --state every
--checkpoint_every steps and when the run stops (--minutes reached, Ctrl-C); running the same command
again continues from it. --init=PKL starts a run whose --state does not exist yet from a base pickle's
weights instead (fresh Adam; the step count and training time go on from the pickle's record), e.g. to
go on from the committed base with other settings. Every run ends by writing the pickle (project
format, loads with legacy.load_network_pkl) and, with --eval_heads > 0, measuring the base against the
renderer on heads and views it never trained on (PSNR at 128 px, depth error on the head at 32 px), kept
in the pickle's `demo_base` entry (with the last run's options) and drawn into --preview.

--face_weight adds weight to the face pixels (FACE_BOX: eyes, brows, nose, mouth) in the image losses:
at 32 px of neural rendering those features are 1-3 pixels wide and weigh little in a plain MSE.

Time on the 2-core development machine (2026-12-05, shared with other jobs, one torch thread): 3-9 s
per step of 4 images at load 5-14 (generator forward + backward most of it, ground truth ~0.5-1 s).
The committed networks/demo-heads.pkl is 1,851 steps (7,404 heads) in 130 min: 714 steps at lr 0.004
(61 min), then 1,137 steps from --init=<those weights> with --lr=0.002 --face_weight=4 (69 min, load
5-14). On 40 views of 8 unseen heads it reaches PSNR 21.0 dB and a depth error of 0.0119 (world units;
the head is ~0.35 wide), from 18.6 dB and 0.0135 at 714 steps. That is a head and neck with the head's
own skin and hair colours and a hair cap, not yet eyes, nose or glasses: the loss was still falling, and
faces need many more steps (an estimated several thousand, i.e. hours here). An idle machine is several
times faster per step.
"""

import hashlib
import os
import time
from typing import Dict, Optional, Tuple

import click
import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
import tqdm

import dnnlib
import legacy
from camera_utils import label_from_yaw_pitch
from torch_utils import misc
from training import procedural_heads as ph
from training import synthetic_identity as si

NEURAL_RENDERING_RESOLUTION = 32
GROUND_TRUTH_RESOLUTION = 64
EVAL_SEED = 1_000_000  # latents of the evaluation heads: seeds EVAL_SEED + k, never drawn in training
EVAL_YAWS = (-0.6, -0.3, 0.0, 0.3, 0.6)
# World-space box around the eyes, brows, nose and mouth of every head of the family (x, y, z ranges).
FACE_BOX = ((-0.1, 0.1), (-0.14, 0.1), (0.05, 0.5))


def ffhq_like_labels(batch: int, gen: torch.Generator) -> torch.Tensor:
    """Labels [B, 25]: yaw ~ N(0, 0.3) clipped to +-0.8, pitch ~ N(0, 0.12) clipped to +-0.35 (as the demo's selfies)."""
    yaws = (torch.randn(batch, generator=gen) * 0.3).clamp(-0.8, 0.8)
    pitches = (torch.randn(batch, generator=gen) * 0.12).clamp(-0.35, 0.35)
    return torch.from_numpy(np.stack([label_from_yaw_pitch(float(y), float(p)) for y, p in zip(yaws, pitches)])).float()


def face_mask(labels: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """[B, 1, R, R]: 1 where the ray of labels [B, 25] hits the head (depth [B, 1, R, R]) inside FACE_BOX."""
    B, R = depth.shape[0], depth.shape[-1]
    origins, dirs = ph.rays_of_labels(labels, R)
    points = (origins + depth.reshape(B, -1, 1) * dirs).permute(0, 2, 1).reshape(B, 3, R, R)  # as render lays out pixels
    inside = torch.ones_like(depth, dtype=torch.bool)
    for axis, (lo, hi) in enumerate(FACE_BOX):
        inside &= (points[:, axis:axis + 1] > lo) & (points[:, axis:axis + 1] < hi)
    return (inside & (depth < ph.T_FAR)).float()


def regression_loss(out: Dict[str, torch.Tensor], truth: Dict[str, torch.Tensor], depth_weight: float,
                    pixel_weight: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Loss terms of a generator output against the renderer's ground truth (at GROUND_TRUTH_RESOLUTION).

    `pixel_weight` [B, 1, R, R] (at the ground truth's resolution, mean ~1) weights the image errors.
    """
    weight = torch.ones_like(truth['mask']) if pixel_weight is None else pixel_weight
    weight_raw = F.interpolate(weight, size=out['image_raw'].shape[-1], mode='area')
    image = F.interpolate(out['image'], size=truth['image'].shape[-1], mode='area')
    truth_raw = F.interpolate(truth['image'], size=out['image_raw'].shape[-1], mode='area')
    # Depth only where the head covers the whole low-resolution pixel: edges mix head and background.
    mask = (F.interpolate(truth['mask'], size=out['image_depth'].shape[-1], mode='area') > 0.999).float()
    truth_depth = F.interpolate(truth['depth'], size=out['image_depth'].shape[-1], mode='area')
    depth = ((out['image_depth'] - truth_depth).abs() * mask).sum() / mask.sum().clamp_min(1)
    terms = dict(mse=((image - truth['image']).square() * weight).mean(),
                 mse_raw=((out['image_raw'] - truth_raw).square() * weight_raw).mean(), depth=depth)
    terms['loss'] = terms['mse'] + terms['mse_raw'] + depth_weight * terms['depth']
    return terms


def save_state(path: str, G: torch.nn.Module, opt: torch.optim.Optimizer, step: int, options: dict, seconds: float) -> None:
    with dnnlib.util.atomic_write_path(path) as tmp:
        torch.save(dict(G=G.state_dict(), opt=opt.state_dict(), step=step, options=options, seconds=seconds), tmp)


def load_state(path: str, options: dict) -> Optional[dict]:
    """The checkpoint at `path` (None if there is none); refuses one made with other training options."""
    if not os.path.exists(path):
        return None
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:
        raise click.ClickException(f'{path} cannot be read as a make_demo_base checkpoint ({err}); move it away') from err
    if state.get('options') != options:
        raise click.ClickException(f'{path} was made with other options ({state.get("options")}); '
                                   'pass the same options, or another --state to start afresh')
    return state


def describe_file(path: str) -> str:
    """The file's name and content hash: recorded instead of its path, which names the machine it was built on."""
    if not os.path.isfile(path):
        return os.path.basename(path)  # initialise_from reports it missing
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return f'{os.path.basename(path)} sha256:{digest.hexdigest()[:16]}'


def initialise_from(path: str, G: torch.nn.Module) -> Tuple[int, float]:
    """Copy the G_ema weights of the base pickle at `path` into G; returns its (steps, seconds) of training."""
    if not os.path.isfile(path):
        raise click.ClickException(f'--init: {path} does not exist')
    try:
        data = legacy.load_network_pkl(path)  # the safe loader: a pickle never runs code here
        misc.copy_params_and_buffers(data['G_ema'], G, require_all=True)
    except Exception as err:
        raise click.ClickException(f'--init: {path} is not a demo base pickle of this generator ({err})') from err
    info = data.get('demo_base') or {}
    return int(info.get('steps', 0)), 60.0 * float(info.get('train_minutes', 0.0))


@torch.no_grad()
def evaluate(G: torch.nn.Module, num_heads: int) -> Dict[str, object]:
    """PSNR (128 px) and depth error (32 px, on the head) of G against the renderer, on unseen heads and yaws.

    Also returns the images (rows: ground truth, base) for the preview.
    """
    z = torch.cat([ph.latent_from_seed(EVAL_SEED + k, G.z_dim) for k in range(num_heads)])
    labels = torch.from_numpy(np.stack([label_from_yaw_pitch(yaw, 0.05) for yaw in EVAL_YAWS])).float()
    psnrs, depth_errors, truths, renders = [], [], [], []
    for k in range(num_heads):
        scene = ph.HeadScene(ph.params_from_latent(z[k:k + 1]).expand(len(labels), -1))
        truth = ph.render(scene, labels, G.img_resolution)
        out = G(z[k:k + 1].expand(len(labels), -1), labels, neural_rendering_resolution=NEURAL_RENDERING_RESOLUTION,
                noise_mode='const')
        mse = (out['image'].clamp(-1, 1) - truth['image']).square().mean(dim=(1, 2, 3))
        psnrs.append(10 * torch.log10(4 / mse))  # images span [-1, 1]: peak-to-peak 2
        low = out['image_depth'].shape[-1]
        mask = F.interpolate(truth['mask'], size=low, mode='area') > 0.999
        truth_depth = F.interpolate(truth['depth'], size=low, mode='area')
        depth_errors.append((out['image_depth'] - truth_depth).abs()[mask].mean())
        truths.append(truth['image'])
        renders.append(out['image'].clamp(-1, 1))
    return dict(psnr=float(torch.cat(psnrs).mean()), depth_error=float(torch.stack(depth_errors).mean()),
                views=num_heads * len(labels), truths=torch.cat(truths[:4]), renders=torch.cat(renders[:4]))


def write_preview(path: str, truths: torch.Tensor, renders: torch.Tensor) -> None:
    """PNG: rows alternate ground truth / base, one row per evaluation head, columns the evaluation yaws."""
    cols = len(EVAL_YAWS)
    rows = []
    for i in range(0, len(truths), cols):
        rows += [torch.cat(list(truths[i:i + cols]), dim=2), torch.cat(list(renders[i:i + cols]), dim=2)]
    grid = ((torch.cat(rows, dim=1) + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    with dnnlib.util.atomic_write_path(path) as tmp:
        PIL.Image.fromarray(grid).save(tmp, format='PNG')


@click.command()
@click.option('--out', default='networks/demo-heads.pkl', show_default=True, help='the trained base pickle')
@click.option('--state', default='runs/demo-base/state.pt', show_default=True, help='resumable checkpoint')
@click.option('--preview', default='runs/demo-base/preview.png', show_default=True, help='ground truth / base grid')
@click.option('--steps', type=int, default=2000, show_default=True, help='total training steps')
@click.option('--minutes', type=float, default=None, help='stop (resumably) after this much wall-clock time')
@click.option('--batch', type=int, default=4, show_default=True)
@click.option('--lr', type=float, default=0.004, show_default=True, help='Adam learning rate')
@click.option('--depth_weight', type=float, default=1.0, show_default=True)
@click.option('--face_weight', type=float, default=0.0, show_default=True,
              help='extra weight of face pixels (FACE_BOX) in the image losses: features are small at 32 px')
@click.option('--seed', type=int, default=0, show_default=True, help='initial weights, latents and cameras')
@click.option('--init', 'init_pkl', default=None, help='start from this pickle\'s G_ema weights (fresh Adam) '
              'when --state does not exist yet')
@click.option('--checkpoint_every', type=int, default=20, show_default=True)
@click.option('--eval_heads', type=int, default=8, show_default=True, help='unseen heads to evaluate on (0: none)')
def main(out, state, preview, steps, minutes, batch, lr, depth_weight, face_weight, seed, init_pkl, checkpoint_every,
         eval_heads):
    """Train the demo base generator on the procedural head family (resumable)."""
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', '1')))
    options = dict(batch=batch, lr=lr, depth_weight=depth_weight, seed=seed)
    if face_weight:
        options['face_weight'] = face_weight  # only when set: checkpoints made before the option still resume
    if init_pkl:
        options['init'] = describe_file(init_pkl)
    G = si.build_tiny_generator(seed).train().requires_grad_(True)
    opt = torch.optim.Adam(G.parameters(), lr=lr, betas=(0.9, 0.99))
    start, seconds = 0, 0.0
    resumed = load_state(state, options)
    if resumed is not None:
        G.load_state_dict(resumed['G'])
        opt.load_state_dict(resumed['opt'])
        start, seconds = resumed['step'], resumed['seconds']
        print(f'Resuming {state} at step {start} ({seconds / 60:.1f} min trained)')
    elif init_pkl:
        start, seconds = initialise_from(init_pkl, G)
        print(f'Starting from {init_pkl} (step {start}, {seconds / 60:.1f} min trained; fresh Adam)')

    t_start = time.time()
    step = start
    bar = tqdm.tqdm(total=steps, initial=start, desc='training', dynamic_ncols=True)
    try:
        while step < steps and (minutes is None or time.time() - t_start < minutes * 60):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + step)  # step-seeded: resuming draws the same data
            z = torch.randn([batch, G.z_dim], generator=gen)
            labels = ffhq_like_labels(batch, gen)
            truth = ph.render(ph.HeadScene(ph.params_from_latent(z)), labels, GROUND_TRUTH_RESOLUTION)
            weight = 1 + face_weight * face_mask(labels, truth['depth']) if face_weight else None
            terms = regression_loss(G(z, labels, neural_rendering_resolution=NEURAL_RENDERING_RESOLUTION), truth,
                                    depth_weight, weight)
            opt.zero_grad(set_to_none=True)
            terms['loss'].backward()
            opt.step()
            step += 1
            bar.update(1)
            bar.set_postfix({k: f'{v.item():.4f}' for k, v in terms.items()})
            if step % checkpoint_every == 0:
                save_state(state, G, opt, step, options, seconds + time.time() - t_start)
    finally:
        bar.close()
        seconds += time.time() - t_start
        save_state(state, G, opt, step, options, seconds)
        print(f'Checkpoint {state}: step {step}, {seconds / 60:.1f} min of training in all')

    G = G.eval().requires_grad_(False)
    info = dict(builder='eg3d/make_demo_base.py', family='training.procedural_heads', steps=step,
                train_minutes=round(seconds / 60, 1), **options)
    if eval_heads > 0:
        result = evaluate(G, eval_heads)
        info.update(eval_psnr=round(result['psnr'], 2), eval_depth_error=round(result['depth_error'], 4),
                    eval_views=result['views'])
        write_preview(preview, result['truths'], result['renders'])
        print(f'Unseen heads ({result["views"]} views, yaw {EVAL_YAWS[0]:+}..{EVAL_YAWS[-1]:+}): '
              f'PSNR {result["psnr"]:.2f} dB, depth error {result["depth_error"]:.4f} (ground truth | base: {preview})')
    legacy.save_network_pkl(dict(G=G, G_ema=G, D=None, training_set_kwargs=None, demo_base=info), out)
    print(f'Wrote {out} ({os.path.getsize(out) / 2**20:.1f} MiB)')


if __name__ == '__main__':
    main()
