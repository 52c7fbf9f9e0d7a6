"""Turn a person's photos into a training-ready identity folder: aligned 512x512 crops in EG3D's FFHQ convention,
camera labels, latents and a report.

    python prepare_dataset.py --photos=~/photos/Barack --outdir=../datasets/Barack \\
        --network=../networks/ffhqrebalanced512-128.pkl

Runs offline on a CPU: faces, landmarks and identity come from dlib models shipped in a registry package
(docs/datasets.md). Writes image_N.png, dataset.json, image_N_latent.npy (with --network), prepare_report.json
(every photo: kept or rejected, why, its crop quad, pose, identity similarity and sharpness) and
contact_sheet.png. A non-empty --outdir is refused unless --resume continues a run there.
"""
import sys
from pathlib import Path
from typing import Optional

import click
import torch
from tqdm import tqdm

import projector
from photo_prep import crop, outputs, pipeline
from photo_prep.face_models import FaceModels, ModelsMissing
from training import inference as inf
from training.dataset_files import latent_name


def project_latents(outdir: Path, records, G: torch.nn.Module, device: torch.device,
                    start: Optional[projector.EncoderStart], options: dict) -> None:
    """image_N_latent.npy for every kept crop that has none yet, with the project's projector (starting from the
    encoder's estimate when one is given)."""
    todo = [r for r in records if r.status == 'kept' and not (outdir / latent_name(r.image)).is_file()]
    if not todo:
        click.echo('every kept image already has a latent')
        return
    lpips_model = inf.build_lpips(options.pop('lpips_kind'), device)
    for record in tqdm(todo, desc='latents'):
        image_path = outdir / record.image
        target = inf.load_image(image_path, G.img_resolution).to(device)
        c = torch.from_numpy(record.label).float().to(device).unsqueeze(0)
        w_init = None if start is None else start.estimate(G, target, c, options['neural_rendering_resolution'],
                                                           options['seed'])
        result = projector.project(G, target, c, lpips_model=lpips_model, w_init=w_init, desc=record.image, **options)
        inf.save_latent(outdir / latent_name(record.image), result.ws, overwrite=True)


@click.command()
@click.option('--photos', 'photo_dir', required=True, type=str, help='Folder of photos of one person (searched recursively)')
@click.option('--outdir', required=True, type=str, help='Identity folder to write (must be new or empty)')
@click.option('--network', 'network_pkl', type=str, help='Generator pkl: project a latent for every kept image')
@click.option('--resolution', type=int, default=None,
              help='Crop size [default: the --network generator\'s resolution, else 512 (EG3D FFHQ)]')
@click.option('--skip-latents', is_flag=True, help='Write images and labels only; project later (or rerun with --resume)')
@click.option('--resume', is_flag=True, help='Continue a run in --outdir: unchanged images keep their latents')
@click.option('--identity-filter/--no-identity-filter', default=True, show_default=True,
              help='Keep the person seen in most photos (by face embedding); in each photo their largest face')
@click.option('--dedupe/--no-dedupe', default=True, show_default=True, help='Reject near-duplicate crops')
@click.option('--max-hash-distance', type=int, default=6, show_default=True,
              help='Near-duplicate: crop hashes differ in at most this many of 64 bits')
@click.option('--min-sharpness', type=float, default=15.0, show_default=True,
              help='Reject crops whose sharpness (Laplacian variance, docs/datasets.md) is below this')
@click.option('--min-face', type=float, default=256.0, show_default=True,
              help='Reject faces whose crop covers fewer photo pixels than this (512/256: at most 2x upscaling)')
@click.option('--max-yaw', type=float, default=60.0, show_default=True, help='Reject heads turned further (degrees)')
@click.option('--latent-space', type=click.Choice(['w', 'w_plus']), default='w_plus', show_default=True)
@click.option('--num-steps', type=click.IntRange(min=0), default=500, show_default=True,
              help='Projector steps per image (0 with --encoder: the encoder\'s estimate only)')
@click.option('--encoder', 'encoder_path', type=str, help='Encoder file (train_encoder.py): start from its estimate')
@click.option('--lpips', 'lpips_kind', type=click.Choice(inf.LPIPS_CHOICES), default='vgg', show_default=True)
@click.option('--w-avg-samples', type=int, default=10000, show_default=True)
@click.option('--nrr', 'neural_rendering_resolution', type=int, default=None, help='Neural rendering resolution')
@click.option('--seed', type=int, default=0, show_default=True)
@click.option('--device', default='auto', show_default=True)
@inf.user_errors
def main(photo_dir, outdir, network_pkl, resolution, skip_latents, resume, identity_filter, dedupe, max_hash_distance,
         min_sharpness, min_face, max_yaw, latent_space, num_steps, encoder_path, lpips_kind, w_avg_samples,
         neural_rendering_resolution, seed, device):
    """Photos of one person -> aligned, camera-labelled identity folder (+ latents)."""
    photo_dir, outdir = Path(photo_dir).expanduser(), Path(outdir).expanduser()
    try:
        if not photo_dir.is_dir():
            raise pipeline.PrepareError(f'--photos {photo_dir}: folder not found')
        if network_pkl is None and not skip_latents:
            raise pipeline.PrepareError('pass --network=<generator pkl> to project latents, or --skip-latents')
        outputs.check_outdir(outdir, resume)
        device = inf.resolve_device(device)
        G = None if (network_pkl is None or skip_latents) else inf.load_generator(network_pkl, (), device)
        if G is not None and resolution not in (None, G.img_resolution):
            raise pipeline.PrepareError(f'--resolution={resolution}, but {network_pkl} renders {G.img_resolution} px')
        resolution = resolution or (G.img_resolution if G is not None else crop.OUTPUT_SIZE)
        if encoder_path is not None and G is None:
            raise pipeline.PrepareError('--encoder needs --network (and no --skip-latents)')
        start = projector.EncoderStart.load(encoder_path, G, None, device) if encoder_path else None
        if start is not None and neural_rendering_resolution is None:
            neural_rendering_resolution = start.neural_rendering_resolution  # render as the encoder was trained
        options = pipeline.PrepareOptions(resolution=resolution, identity_filter=identity_filter, dedupe=dedupe,
                                         max_hash_distance=max_hash_distance, min_sharpness=min_sharpness,
                                         min_face=min_face, max_yaw=max_yaw)
        models = FaceModels()
        records = pipeline.analyse(photo_dir, options, models, progress=lambda it: tqdm(list(it), desc='photos'))
        pipeline.check_kept(photo_dir, records)
    except (pipeline.PrepareError, ModelsMissing) as err:
        click.echo(f'Error: {err}', err=True)
        sys.exit(1)
    outputs.write_folder(outdir, records)
    tally = pipeline.counts(records)
    click.echo(f'{tally["kept"]} kept, {tally["rejected"]} rejected; wrote {outdir}')
    rejected = pipeline.summarise_rejections(records)
    if rejected:
        click.echo('rejected:\n' + rejected)
    if G is not None:
        project_latents(outdir, records, G, device, start,
                        dict(num_steps=num_steps, latent_space=latent_space, lpips_kind=lpips_kind,
                             w_avg_samples=w_avg_samples, neural_rendering_resolution=neural_rendering_resolution,
                             seed=seed))
    click.echo(f'report: {outdir / outputs.REPORT}; check the labels at a glance in {outdir / outputs.SHEET}')


if __name__ == '__main__':
    main()
