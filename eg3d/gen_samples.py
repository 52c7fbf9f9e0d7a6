"""Multi-view images (and optionally shapes) of a (personalized) EG3D generator.

    python gen_samples.py --network=base.pkl --adapter=me.safetensors --seeds=0-3 --trunc=0.7 --outdir=out
    python gen_samples.py --network=snapshot.pkl --dataset=selfies --outdir=out --shapes --shape-res=256
    python gen_samples.py --network=snapshot.pkl --interpolate a_latent.npy b_latent.npy --steps=7 --outdir=out

One PNG per sample (a row of views over a yaw sweep) plus `grid.png` (all rows). Several --adapter
flags load one adapter per identity onto the same base; each sample is then rendered with every
adapter (`<name>_adapter<i>.png`), or with those chosen by --adapter-index. `--save-latents` writes
each sample's W+ latent (`<name>_latent.npy`, e.g. seeds as negatives for `edit.py --fit-direction`).
`--shapes` writes the density volume (`<name>.mrc`) and its iso-surface (`<name>.ply`).
"""

from pathlib import Path

import click
from tqdm import tqdm

import shape_utils
from training import inference as inf


@click.command()
@inf.network_options
@inf.sample_options
@click.option('--outdir', required=True, type=str)
@click.option('--steps', type=int, default=5, show_default=True, help='Interpolation steps (ends included)')
@inf.view_options
@click.option('--save-latents', is_flag=True, help='Also write each sample\'s latent (<name>_latent.npy)')
@click.option('--shapes', is_flag=True, help='Also export the density volume (.mrc) and mesh (.ply)')
@click.option('--shape-res', type=int, default=256, show_default=True, help='Grid resolution of --shapes')
@click.option('--shape-level', type=float, default=shape_utils.DEFAULT_LEVEL, show_default=True,
              help='Iso-level of the mesh (raw density)')
@inf.user_errors
def main(network_pkl, adapter_paths, device, adapter_index, outdir, seeds, truncation_psi, truncation_cutoff,
         latents, dataset, interpolate, steps, num_views, yaw_range, pitch, fov_deg, neural_rendering_resolution,
         render_seed, save_latents, shapes, shape_res, shape_level):
    """Render seeds / latents / interpolations from several views; optionally export shapes."""
    device = inf.resolve_device(device)
    latent_paths = inf.collect_latent_paths(latents, dataset)
    if shapes and shape_res < 2:
        raise inf.InputError('--shape-res must be at least 2')
    G = inf.load_generator(network_pkl, adapter_paths, device)
    indices = inf.adapter_indices(G, adapter_index)
    suffix = (lambda i: f'_adapter{i}') if inf.num_adapters(G) > 1 else (lambda i: '')
    cameras = inf.orbit_labels(G, inf.yaw_sweep(num_views, yaw_range), pitch, fov_deg, device)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)

    rows = []
    for index in indices:
        inf.select_adapter(G, index)
        samples = inf.gather_latents(G, inf.parse_range(seeds), truncation_psi, truncation_cutoff, latent_paths,
                                     interpolate, steps, fov_deg)
        for name, ws in tqdm(samples, desc=f'render{suffix(index)}', disable=len(samples) == 1):
            views = inf.render_views(G, ws, cameras, neural_rendering_resolution, seed=render_seed)
            rows.append(views)
            stem = outdir / f'{name}{suffix(index)}'
            inf.save_image(inf.image_grid([views]), f'{stem}.png')
            if save_latents:
                inf.save_latent(f'{stem}_latent.npy', ws, overwrite=True)
            if shapes:
                written = shape_utils.export_shape(G, ws, stem, shape_res, shape_level)
                if 'mesh_error' in written:
                    click.echo(f'{name}: no mesh written: {written["mesh_error"]}', err=True)
    inf.save_image(inf.image_grid(rows), outdir / 'grid.png')
    click.echo(f'wrote {len(rows)} sample(s) to {outdir}')


if __name__ == '__main__':
    main()
