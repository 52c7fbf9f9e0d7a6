"""Sample new images of the identity from its alpha-space (MyStyle, Nitzan et al. 2022), rendered multi-view.

    python sample_alpha.py --network=snapshot.pkl --dataset=selfies --num-samples=8 --outdir=out

MyStyle treats the identity's anchor latents w_1..w_K (the projected selfies) as spanning a personal
subspace: alpha-space, {sum_i alpha_i w_i : sum_i alpha_i = 1, alpha_i >= -beta}, the convex hull of the
anchors dilated by a small margin beta. New latents are drawn from it:

  1. pick `--anchors-per-sample` anchors at random (MyStyle's generate.py combines 3; 0 = all K),
  2. draw d ~ Dirichlet(concentration) over them (concentration 1 = uniform on the simplex; MyStyle's
     normalised uniform draws are close to this),
  3. dilate: alpha = (1 + k beta) d - beta. This affine map sends the standard simplex exactly onto
     {sum alpha = 1, alpha >= -beta} over the k chosen anchors, so the weights still sum to 1 and beta = 0
     (the default, MyStyle's sampling space P_0) gives plain convex combinations.

The same weights combine every W+ layer. Writes `alpha_NNNN_latent.npy` ([1, num_ws, w_dim]),
`alpha_NNNN.png` (views), `grid.png`, `alpha_weights.npy` ([num_samples, K]) and `alpha_samples.json`.
"""

import json
from pathlib import Path

import click
import numpy as np
import torch
from tqdm import tqdm

from training import inference as inf


def sample_alpha_weights(num_anchors: int, num_samples: int, anchors_per_sample: int = 3, beta: float = 0.0,
                         concentration: float = 1.0, seed: int = 0) -> np.ndarray:
    """Weights [num_samples, num_anchors]: each row sums to 1, is >= -beta on its chosen anchors and 0 elsewhere."""
    if num_anchors < 1:
        raise inf.InputError('alpha-space needs at least one anchor latent')
    if beta < 0:
        raise inf.InputError(f'--beta must be >= 0, got {beta}')
    if concentration <= 0:
        raise inf.InputError(f'--concentration must be > 0, got {concentration}')
    k = num_anchors if anchors_per_sample <= 0 else min(anchors_per_sample, num_anchors)
    rng = np.random.RandomState(seed)
    weights = np.zeros((num_samples, num_anchors), dtype=np.float64)
    for row in weights:
        chosen = rng.choice(num_anchors, size=k, replace=False)
        d = rng.dirichlet(np.full(k, concentration))
        row[chosen] = (1 + k * beta) * d - beta
    return weights


def combine(anchors: torch.Tensor, weights: np.ndarray) -> torch.Tensor:
    """anchors [K, num_ws, w_dim], weights [S, K] -> latents [S, num_ws, w_dim] (same weights on every layer)."""
    w = torch.from_numpy(weights).to(anchors)
    return torch.einsum('sk,klc->slc', w, anchors)


@click.command()
@inf.network_options
@click.option('--adapter-index', type=int, default=0, show_default=True, help='Which loaded adapter renders')
@click.option('--dataset', type=str, help='Identity folder: its *_latent.npy files are the anchors')
@click.option('--latents', type=str, help='Comma-separated anchor latent files (.npy)')
@click.option('--outdir', required=True, type=str)
@click.option('--num-samples', type=int, default=8, show_default=True)
@click.option('--anchors-per-sample', type=int, default=3, show_default=True,
              help='Anchors combined per sample (MyStyle: 3); 0 = all')
@click.option('--beta', type=float, default=0.0, show_default=True,
              help='Dilation margin: weights may go down to -beta (0 = convex hull)')
@click.option('--concentration', type=float, default=1.0, show_default=True, help='Dirichlet concentration')
@click.option('--seed', type=int, default=0, show_default=True, help='Seed of the weight draws')
@inf.view_options
@inf.user_errors
def main(network_pkl, adapter_paths, device, adapter_index, dataset, latents, outdir, num_samples,
         anchors_per_sample, beta, concentration, seed, num_views, yaw_range, pitch, fov_deg,
         neural_rendering_resolution, render_seed):
    """Draw latents from the identity's alpha-space (dilated convex hull of its anchors) and render them."""
    device = inf.resolve_device(device)
    anchor_paths = inf.collect_latent_paths(latents, dataset)
    if not anchor_paths:
        raise inf.InputError('no anchors: pass --dataset=<identity folder> or --latents=a.npy,b.npy,...')
    weights = sample_alpha_weights(len(anchor_paths), num_samples, anchors_per_sample, beta, concentration, seed)
    G = inf.load_generator(network_pkl, adapter_paths, device)
    inf.select_adapter(G, adapter_index)
    anchors = torch.cat([inf.load_latent(p, G) for p in anchor_paths]).to(device)
    samples = combine(anchors, weights)
    cameras = inf.orbit_labels(G, inf.yaw_sweep(num_views, yaw_range), pitch, fov_deg, device)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)

    rows, records = [], []
    for i, ws in enumerate(tqdm(samples, desc='alpha samples')):
        name = f'alpha_{i:04d}'
        ws = ws.unsqueeze(0)
        inf.save_latent(outdir / f'{name}_latent.npy', ws, overwrite=True)
        views = inf.render_views(G, ws, cameras, neural_rendering_resolution, seed=render_seed)
        inf.save_image(inf.image_grid([views]), outdir / f'{name}.png')
        rows.append(views)
        records.append({'name': name, 'weights': weights[i].tolist()})
    inf.save_image(inf.image_grid(rows), outdir / 'grid.png')
    inf.save_npy(outdir / 'alpha_weights.npy', weights)
    meta = {'anchors': [str(p) for p in anchor_paths], 'beta': beta, 'concentration': concentration,
            'anchors_per_sample': anchors_per_sample, 'seed': seed, 'samples': records}
    (outdir / 'alpha_samples.json').write_text(json.dumps(meta, indent=2))
    click.echo(f'wrote {num_samples} alpha-space sample(s) of {len(anchor_paths)} anchors to {outdir}')


if __name__ == '__main__':
    main()
