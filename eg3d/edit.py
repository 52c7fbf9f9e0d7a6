"""Semantic editing: move latents along a direction in W / W+ and render the result multi-view.

    # fit a direction from two sets of latents (e.g. projected selfies with / without glasses)
    python edit.py --fit-direction --positive=glasses/ --negative=no_glasses/ --method=svm --direction=glasses.npy
    # apply it with several strengths
    python edit.py --network=snapshot.pkl --dataset=selfies --direction=glasses.npy --strength=-2,0,2 --outdir=out

Edit: ws' = ws + strength * direction (on the layers of --layers only; default all), so strength 0 is the
identity. Directions: W ([w_dim] / [1, w_dim], used on every layer) or W+ ([num_ws, w_dim] / [1, num_ws, w_dim]).

Fitting (`--method`):
  mean  the difference of the two class means (InterFaceGAN's simplest baseline);
  svm   the normal of a linear SVM boundary, as InterFaceGAN (squared hinge loss + L2, solved with L-BFGS).
Fitted directions are scaled to unit norm per layer, so strengths are comparable to InterFaceGAN's.
"""

from pathlib import Path
from typing import List, Optional, Tuple

import click
import numpy as np
import scipy.optimize
import torch
from tqdm import tqdm

from training import dataset_files
from training import inference as inf


def read_latent_set(spec: str) -> Tuple[np.ndarray, List[Path]]:
    """A folder (every *_latent.npy) or comma-separated files -> float64 [N, L, w_dim] (L = 1 for W codes)."""
    folder = spec if spec and Path(spec).is_dir() else None
    paths = inf.collect_latent_paths(None if folder else spec, folder)
    if not paths:
        raise inf.InputError(f'no latents in {spec!r}')
    arrays = []
    for p in paths:
        try:
            arrays.append(dataset_files.parse_latent(p.read_bytes(), str(p), num_ws=None, w_dim=None))
        except dataset_files.FileProblem as err:
            raise inf.InputError(str(err)) from None
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise inf.InputError(f'latents in {spec!r} have different shapes {sorted(shapes)}')
    return np.stack(arrays).astype(np.float64), paths


def unit_per_layer(direction: np.ndarray) -> np.ndarray:
    """Scale [L, w_dim] so that its RMS per-layer norm is 1."""
    norm = np.linalg.norm(direction) / np.sqrt(direction.shape[0])
    if norm == 0:
        raise inf.InputError('the two latent sets have identical means: no direction to fit')
    return direction / norm


def fit_linear_svm(x: np.ndarray, y: np.ndarray, C: float = 1.0) -> Tuple[np.ndarray, float]:
    """Linear L2-SVM: min 0.5 |w|^2 + C sum max(0, 1 - y (w.x + b))^2 over (w, b); y in {-1, +1}. Returns (w, b)."""
    n, d = x.shape

    def objective(params):
        w, b = params[:d], params[d]
        margin = np.maximum(0.0, 1.0 - y * (x @ w + b))
        value = 0.5 * w @ w + C * np.sum(margin ** 2)
        coef = -2.0 * C * margin * y
        return value, np.concatenate([w + x.T @ coef, [coef.sum()]])

    result = scipy.optimize.minimize(objective, np.zeros(d + 1), jac=True, method='L-BFGS-B',
                                     options={'maxiter': 1000})
    return result.x[:d], float(result.x[d])


def fit_direction(positive: np.ndarray, negative: np.ndarray, method: str = 'svm',
                  C: float = 1.0) -> Tuple[np.ndarray, float]:
    """Direction [L, w_dim] pointing from `negative` to `positive` ([N, L, w_dim] each) and its training accuracy."""
    if positive.shape[1:] != negative.shape[1:]:
        raise inf.InputError(f'positive latents are {list(positive.shape[1:])}, negative {list(negative.shape[1:])}: '
                             'both sets must be W or both W+ of the same generator')
    shape = positive.shape[1:]
    x = np.concatenate([positive, negative]).reshape(len(positive) + len(negative), -1)
    y = np.concatenate([np.ones(len(positive)), -np.ones(len(negative))])
    if method == 'mean':
        w = positive.reshape(len(positive), -1).mean(0) - negative.reshape(len(negative), -1).mean(0)
        b = -float(w @ (x[y > 0].mean(0) + x[y < 0].mean(0)) / 2)  # threshold halfway between the means
    elif method == 'svm':
        center = x.mean(0)
        w, b = fit_linear_svm(x - center, y, C)
        b -= float(w @ center)
    else:
        raise inf.InputError(f'unknown --method {method!r}; use mean or svm')
    accuracy = float(np.mean(np.sign(x @ w + b) == y))
    return unit_per_layer(w.reshape(shape)), accuracy


def layer_mask(spec: Optional[str], num_ws: int) -> torch.Tensor:
    """[1, num_ws, 1] mask of the layers an edit touches ('0-5' -> the first six; empty -> all)."""
    layers = inf.parse_range(spec) if spec else list(range(num_ws))
    bad = [i for i in layers if not 0 <= i < num_ws]
    if bad:
        raise inf.InputError(f'--layers {spec}: layer {bad[0]} does not exist (the generator has {num_ws})')
    mask = torch.zeros(1, num_ws, 1)
    mask[:, layers] = 1
    return mask


def apply_edit(ws: torch.Tensor, direction: torch.Tensor, strength: float, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ws [N, num_ws, w_dim] + strength * direction [1, num_ws, w_dim] (masked to some layers)."""
    delta = direction if mask is None else direction * mask.to(direction)
    return ws + strength * delta


@click.command()
@click.option('--network', 'network_pkl', metavar='PKL', help='Base or snapshot pkl (needed to render edits)')
@click.option('--adapter', 'adapter_paths', multiple=True, metavar='FILE', help='Adapter file(s) to load onto --network')
@click.option('--device', default='auto', show_default=True)
@click.option('--adapter-index', type=int, default=0, show_default=True, help='Which loaded adapter renders')
@click.option('--direction', 'direction_path', type=str, help='Direction .npy to apply (with --fit-direction: written here)')
@click.option('--strength', 'strengths', type=str, default='-2,-1,0,1,2', show_default=True,
              help='Comma-separated edit strengths')
@click.option('--layers', type=str, help='Edit only these W+ layers, e.g. 0-5 (default: all)')
@click.option('--latents', type=str, help='Comma-separated latent files to edit')
@click.option('--dataset', type=str, help='Folder: edit every *_latent.npy in it')
@click.option('--outdir', type=str, help='Where renders (and --save-latents) go')
@click.option('--save-latents', is_flag=True, help='Also write every edited latent')
@click.option('--fit-direction', 'fit', is_flag=True, help='Fit --direction from --positive / --negative latents first')
@click.option('--positive', type=str, help='Latents with the attribute (folder or comma-separated files)')
@click.option('--negative', type=str, help='Latents without it (folder or comma-separated files)')
@click.option('--method', type=click.Choice(['mean', 'svm']), default='svm', show_default=True)
@click.option('--svm-c', type=float, default=1.0, show_default=True, help='SVM regularization C')
@inf.view_options
@inf.user_errors
def main(network_pkl, adapter_paths, device, adapter_index, direction_path, strengths, layers, latents, dataset,
         outdir, save_latents, fit, positive, negative, method, svm_c, num_views, yaw_range, pitch,
         fov_deg, neural_rendering_resolution, render_seed):
    """Fit and/or apply a latent direction."""
    if not direction_path:
        raise inf.InputError('pass --direction=<npy> (the direction to apply, or where --fit-direction writes it)')
    if fit:
        if not (positive and negative):
            raise inf.InputError('--fit-direction needs --positive and --negative latent sets')
        pos, _ = read_latent_set(positive)
        neg, _ = read_latent_set(negative)
        direction, accuracy = fit_direction(pos, neg, method, svm_c)
        out = direction[np.newaxis] if direction.shape[0] > 1 else direction  # W+ [1, L, D]; W [1, D]
        inf.save_npy(direction_path, out.astype(np.float32))
        click.echo(f'fitted a {method} direction from {len(pos)} positive / {len(neg)} negative latents '
                   f'(training accuracy {accuracy:.2f}); wrote {direction_path}')
        if not (latents or dataset):
            return
    latent_paths = inf.collect_latent_paths(latents, dataset)
    if not latent_paths:
        raise inf.InputError('nothing to edit: pass --latents or --dataset')
    if not network_pkl or not outdir:
        raise inf.InputError('rendering edits needs --network and --outdir')
    strength_list = inf.parse_floats(strengths)
    if not strength_list:
        raise inf.InputError('--strength must list at least one number')
    device = inf.resolve_device(device)
    G = inf.load_generator(network_pkl, adapter_paths, device)
    inf.select_adapter(G, adapter_index)
    try:
        direction = inf.load_latent(direction_path, G).to(device)
    except inf.InputError as e:
        raise inf.InputError(f'direction: {e}') from e
    mask = layer_mask(layers, inf.num_ws(G))
    samples = [(inf.latent_name(p), inf.load_latent(p, G).to(device)) for p in latent_paths]
    cameras = inf.orbit_labels(G, inf.yaw_sweep(num_views, yaw_range), pitch, fov_deg, device)
    frontal = inf.camera_label(G, fov_deg=fov_deg, device=device)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)

    grid_rows = []
    for name, ws in tqdm(samples, desc='edit'):
        view_rows, frontal_row = [], []
        for s in strength_list:
            edited = apply_edit(ws, direction, s, mask)
            if save_latents:
                inf.save_latent(outdir / f'{name}_edit{s:+g}_latent.npy', edited, overwrite=True)
            view_rows.append(inf.render_views(G, edited, cameras, neural_rendering_resolution, seed=render_seed))
            with torch.no_grad():
                frontal_row.append(inf.render(G, edited, frontal, neural_rendering_resolution, seed=render_seed).cpu())
        inf.save_image(inf.image_grid(view_rows), outdir / f'{name}_edit.png')
        grid_rows.append(torch.cat(frontal_row))
    inf.save_image(inf.image_grid(grid_rows), outdir / 'grid.png')
    click.echo(f'edited {len(samples)} latent(s) at strengths {strength_list}; wrote {outdir}')


if __name__ == '__main__':
    main()
