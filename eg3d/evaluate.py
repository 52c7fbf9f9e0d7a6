"""Compare pretrained, fully fine-tuned and adapter-personalized generators on an identity's held-out selfies.

    python evaluate.py --dataset=selfies_heldout --base=base.pkl --adapter=me.safetensors \
        --full=full_finetune.pkl --outdir=eval

Every model renders each held-out image from its latent and camera; against the photo it gets
LPIPS (lower is better), PSNR and SSIM (higher is better) and the identity similarity (cosine of face
descriptors, higher is better): by default dlib's face network, shipped with the project's
dependencies and used by prepare_dataset.py's identity filter (images where it finds no face are
skipped and counted); `--id_model=model_ir_se50.pth` uses ArcFace IR-SE50 instead, `--id_model=none`
skips it. Novel poses (--novel-yaws, a yaw sweep around the frontal view) have no ground-truth photo,
so there only the identity similarity to the photo is measured.

Models (any subset, at least one): --base (pretrained), --adapter (base + that adapter; repeatable),
--full (fully fine-tuned snapshot; repeatable), --network (any other snapshot, e.g. an adapter
training snapshot; repeatable). Writes `metrics.md` (table), `metrics.json` (means and per-image
values), `comparison.png` (photo | each model, one row per image) and `novel_views.png`.
"""

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import click
import numpy as np
import torch
from tqdm import tqdm

from training import inference as inf

METRICS = [('lpips', 'LPIPS', 'lower'), ('psnr', 'PSNR (dB)', 'higher'), ('ssim', 'SSIM', 'higher'),
           ('id', 'ID sim.', 'higher'), ('id_novel', 'ID sim. novel poses', 'higher')]


def load_models(base: Optional[str], adapter_paths, full_paths, network_paths, device) -> Dict[str, torch.nn.Module]:
    """{name: generator} for every model asked for (kept on the CPU until evaluated); checks them all first."""
    if adapter_paths and not base:
        raise inf.InputError('--adapter needs --base: the adapter is loaded onto the base model')
    if not (base or full_paths or network_paths):
        raise inf.InputError('nothing to evaluate: pass --base, --adapter, --full and/or --network')
    models = {}
    if base:
        models['base'] = inf.load_generator(base, (), 'cpu')
        for path in adapter_paths:
            models[f'adapter {Path(path).stem}'] = inf.load_generator(base, [path], 'cpu')
    for kind, paths in (('full', full_paths), ('network', network_paths)):
        for path in paths:
            models[f'{kind} {Path(path).stem}'] = inf.load_generator(path, (), 'cpu')
    shapes = {name: (G.img_resolution, inf.num_ws(G), G.w_dim) for name, G in models.items()}
    if len(set(shapes.values())) > 1:
        raise inf.InputError(f'the models differ in resolution / num_ws / w_dim: {shapes}; compare models of one base')
    return models


def load_identity_model(spec: str, device):
    """`dlib` (shipped), `none`, or the path of ArcFace IR-SE50 weights."""
    from training import face_identity
    if spec == 'none':
        return None
    if spec == 'dlib':
        from photo_prep.face_models import ModelsMissing
        try:
            return face_identity.DlibIdentity()
        except ModelsMissing as e:
            raise inf.InputError(f'{e} (or pass --id_model=none)') from e
    try:
        return face_identity.ArcFaceIdentity(spec, device)
    except (FileNotFoundError, ValueError) as e:
        raise inf.InputError(str(e)) from e


def read_heldout(path: str, G: torch.nn.Module) -> Tuple[List[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    """(names, photos [N, 3, R, R] in [-1, 1], cameras [N, 25], latents [N, num_ws, w_dim]), validated."""
    from training.dataset import DatasetError, read_identity
    try:
        names, images, cameras, latents = read_identity(path, resolution=G.img_resolution, num_ws=inf.num_ws(G),
                                                        w_dim=G.w_dim)
    except DatasetError as e:
        raise inf.InputError(str(e)) from e
    photos = torch.from_numpy(images).float() / 127.5 - 1
    return names, photos, torch.from_numpy(cameras), torch.from_numpy(latents)


@torch.no_grad()
def evaluate_model(G: torch.nn.Module, photos: torch.Tensor, cameras: torch.Tensor, latents: torch.Tensor,
                   lpips_model: Optional[torch.nn.Module], id_model,
                   novel_cameras: Sequence[torch.Tensor], neural_rendering_resolution: Optional[int], render_seed: int,
                   batch_size: int, device: torch.device, desc: str) -> Dict[str, object]:
    """Per-image metrics of one model and its renders (CPU) at the photos' cameras and at the novel cameras.
    Identity similarities are NaN where the identity model finds no face."""
    from training.face_identity import similarities
    per_image = {key: [] for key, _, _ in METRICS}
    renders, novel = [], []
    for start in tqdm(range(0, len(photos), batch_size), desc=desc, leave=False):
        photo = photos[start:start + batch_size].to(device)
        ws = latents[start:start + batch_size].to(device)
        image = inf.render(G, ws, cameras[start:start + batch_size].to(device), neural_rendering_resolution,
                           seed=render_seed)
        renders.append(image.float().cpu())
        per_image['psnr'] += inf.psnr(image, photo).tolist()
        per_image['ssim'] += inf.ssim(image, photo).tolist()
        if lpips_model is not None:
            per_image['lpips'] += inf.lpips_distance(lpips_model, image, photo).tolist()
        photo_id = id_model(photo) if id_model is not None else None
        if photo_id is not None:
            per_image['id'] += similarities(id_model(image), photo_id)
        # Novel poses: every image for the identity similarity; without ArcFace only the first, for the figure.
        ws_novel = ws if photo_id is not None else ws[:1]
        sims = []
        for c in (novel_cameras if (photo_id is not None or start == 0) else []):
            view = inf.render(G, ws_novel, c.unsqueeze(0).expand(len(ws_novel), -1).to(device),
                              neural_rendering_resolution, seed=render_seed)
            if start == 0:
                novel.append(view[:1].float().cpu())
            if photo_id is not None:
                sims.append(similarities(id_model(view), photo_id))
        if sims:
            per_image['id_novel'] += [_mean_of_scored(column) for column in zip(*sims)]
    return {'per_image': per_image, 'renders': torch.cat(renders), 'novel': novel}


def _mean_of_scored(values) -> float:
    scored = [v for v in values if not np.isnan(v)]
    return float(np.mean(scored)) if scored else float('nan')


def summarize(per_image: Dict[str, List[float]]) -> Dict[str, Optional[Dict[str, float]]]:
    """Mean, std and count of each metric over the images that have it (identity: where a face was found)."""
    summary = {}
    for key, values in per_image.items():
        scored = [v for v in values if not np.isnan(v)]
        summary[key] = {'mean': float(np.mean(scored)), 'std': float(np.std(scored)), 'count': len(scored)} \
            if scored else None
    return summary


def markdown_table(summary: Dict[str, dict], num_images: int, novel_yaws: List[float]) -> str:
    columns = [(key, title, better) for key, title, better in METRICS
               if any(summary[m][key] is not None for m in summary)]
    lines = [f'Evaluated on {num_images} held-out image(s); mean ± std over images (identity: over the images '
             'where a face was found, their count in brackets when fewer).',
             '' if not novel_yaws else f'Novel poses: yaw {", ".join(f"{y:+.2f}" for y in novel_yaws)} rad.', '',
             '| model | ' + ' | '.join(f'{title} ({better} is better)' for _, title, better in columns) + ' |',
             '|---|' + '---|' * len(columns)]
    for model, s in summary.items():
        cells = [(f'{s[key]["mean"]:.4f} ± {s[key]["std"]:.4f}'
                  + (f' ({s[key]["count"]})' if s[key]['count'] < num_images else '')) if s[key] else 'n/a'
                 for key, _, _ in columns]
        lines.append(f'| {model} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


@click.command()
@click.option('--dataset', required=True, type=str, help='Held-out identity folder (images, latents, dataset.json)')
@click.option('--base', type=str, help='Pretrained base pkl')
@click.option('--adapter', 'adapter_paths', multiple=True, help='Adapter file on --base (repeatable: one model each)')
@click.option('--full', 'full_paths', multiple=True, help='Fully fine-tuned snapshot pkl (repeatable)')
@click.option('--network', 'network_paths', multiple=True, help='Other personalized snapshot pkl (repeatable)')
@click.option('--outdir', required=True, type=str)
@click.option('--id_model', '--id-model', 'id_model_path', type=str, default='dlib', show_default=True,
              help='Identity network: dlib (shipped), none, or ArcFace IR-SE50 weights (model_ir_se50.pth)')
@click.option('--lpips', 'lpips_kind', type=click.Choice(inf.LPIPS_CHOICES), default='alex', show_default=True)
@click.option('--novel-yaws', type=str, default='-0.5,-0.25,0.25,0.5', show_default=True,
              help='Yaws (radians) of the novel poses; empty to skip')
@click.option('--nrr', 'neural_rendering_resolution', type=int, default=None, help='Neural rendering resolution')
@click.option('--render-seed', type=int, default=0, show_default=True)
@click.option('--batch', 'batch_size', type=int, default=4, show_default=True)
@click.option('--grid-rows', type=int, default=6, show_default=True, help='Images shown in comparison.png')
@click.option('--device', default='auto', show_default=True)
@inf.user_errors
def main(dataset, base, adapter_paths, full_paths, network_paths, outdir, id_model_path, lpips_kind, novel_yaws,
         neural_rendering_resolution, render_seed, batch_size, grid_rows, device):
    """Evaluate base / full fine-tuning / adapters on held-out selfies: LPIPS, PSNR, SSIM, identity similarity."""
    device = inf.resolve_device(device)
    id_model = load_identity_model(id_model_path, device)
    models = load_models(base, adapter_paths, full_paths, network_paths, device)
    reference = next(iter(models.values()))
    names, photos, cameras, latents = read_heldout(dataset, reference)
    lpips_model = inf.build_lpips(lpips_kind, device)
    yaws = inf.parse_floats(novel_yaws)
    novel_cameras = inf.orbit_labels(reference, yaws, device='cpu') if yaws else []
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)

    results = {}
    for name, G in models.items():
        G.to(device)
        results[name] = evaluate_model(G, photos, cameras, latents, lpips_model, id_model, novel_cameras,
                                       neural_rendering_resolution, render_seed, batch_size, device, desc=name)
        G.cpu()
    summary = {name: summarize(r['per_image']) for name, r in results.items()}
    table = markdown_table(summary, len(names), yaws)
    (outdir / 'metrics.md').write_text(table)
    (outdir / 'metrics.json').write_text(json.dumps(
        {'dataset': dataset, 'images': names, 'novel_yaws': yaws, 'lpips': lpips_kind,
         'summary': summary, 'per_image': {n: r['per_image'] for n, r in results.items()}}, indent=2))
    rows = [torch.cat([photos[i:i + 1]] + [r['renders'][i:i + 1] for r in results.values()])
            for i in range(min(grid_rows, len(names)))]
    inf.save_image(inf.image_grid(rows, pad=2), outdir / 'comparison.png')
    if yaws:
        inf.save_image(inf.image_grid([torch.cat(r['novel']) for r in results.values()], pad=2),
                       outdir / 'novel_views.png')
    click.echo('columns of comparison.png: photo | ' + ' | '.join(results))
    click.echo(table)


if __name__ == '__main__':
    main()
