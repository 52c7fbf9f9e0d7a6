"""Orbit videos (mp4) of a (personalized) EG3D generator: the camera circles the face.

    python gen_videos.py --network=base.pkl --adapter=me.safetensors --seeds=0-3 --outdir=out
    python gen_videos.py --network=snapshot.pkl --dataset=selfies --outdir=out --frames=240
    python gen_videos.py --network=snapshot.pkl --interpolate a_latent.npy b_latent.npy --outdir=out

One `<name>.mp4` per seed / latent (`<name>_adapter<i>.mp4` with several adapters). With --interpolate
one more video moves the latent from A to B while the camera orbits. The orbit is the official
EG3D one: yaw = r_yaw sin(2 pi t), pitch = r_pitch cos(2 pi t). Encoded with imageio-ffmpeg (libx264).
"""

import math
from pathlib import Path
from typing import List

import click
import imageio
import torch
from tqdm import tqdm

from training import inference as inf


def orbit_angles(num_frames: int, yaw_range: float, pitch_range: float) -> List[tuple]:
    """(yaw, pitch) per frame of one closed orbit."""
    return [(yaw_range * math.sin(2 * math.pi * i / num_frames), pitch_range * math.cos(2 * math.pi * i / num_frames))
            for i in range(num_frames)]


def write_video(path: Path, G: torch.nn.Module, latents: List[torch.Tensor], angles: List[tuple], fps: int,
                fov_deg: float, neural_rendering_resolution, render_seed: int, desc: str) -> None:
    """Frame i renders latents[i] (or the only latent) from angles[i]; written atomically."""
    def write(tmp):
        with imageio.get_writer(tmp, format='FFMPEG', mode='I', fps=fps, codec='libx264', quality=8) as writer:
            for i, (yaw, pitch) in enumerate(tqdm(angles, desc=desc, leave=False)):
                ws = latents[i] if len(latents) > 1 else latents[0]
                c = inf.camera_label(G, yaw, pitch, fov_deg)
                with torch.no_grad():
                    frame = inf.render(G, ws, c, neural_rendering_resolution, seed=render_seed)
                writer.append_data(inf.to_uint8(frame[0]))
    inf.atomic_write(path, write)


@click.command()
@inf.network_options
@inf.sample_options
@click.option('--outdir', required=True, type=str)
@click.option('--frames', 'num_frames', type=int, default=120, show_default=True, help='Frames per video')
@click.option('--fps', type=int, default=30, show_default=True)
@click.option('--yaw-range', type=float, default=0.35, show_default=True, help='Orbit yaw amplitude (radians)')
@click.option('--pitch-range', type=float, default=0.25, show_default=True, help='Orbit pitch amplitude (radians)')
@click.option('--fov', 'fov_deg', type=float, default=inf.DEFAULT_FOV_DEG, show_default=True)
@click.option('--nrr', 'neural_rendering_resolution', type=int, default=None, help='Neural rendering resolution')
@click.option('--render-seed', type=int, default=0, show_default=True)
@inf.user_errors
def main(network_pkl, adapter_paths, device, adapter_index, outdir, seeds, truncation_psi, truncation_cutoff,
         latents, dataset, interpolate, num_frames, fps, yaw_range, pitch_range, fov_deg,
         neural_rendering_resolution, render_seed):
    """Render orbit videos of seeds / latents, and an A -> B latent interpolation."""
    device = inf.resolve_device(device)
    latent_paths = inf.collect_latent_paths(latents, dataset)
    if num_frames < 1:
        raise inf.InputError('--frames must be at least 1')
    if not (seeds or latent_paths or interpolate):
        raise inf.InputError('nothing to render: pass --seeds, --latents, --dataset or --interpolate A B')
    G = inf.load_generator(network_pkl, adapter_paths, device)
    indices = inf.adapter_indices(G, adapter_index)
    suffix = (lambda i: f'_adapter{i}') if inf.num_adapters(G) > 1 else (lambda i: '')
    angles = orbit_angles(num_frames, yaw_range, pitch_range)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    args = (fps, fov_deg, neural_rendering_resolution, render_seed)

    count = 0
    for index in indices:
        inf.select_adapter(G, index)
        samples = inf.gather_latents(G, inf.parse_range(seeds), truncation_psi, truncation_cutoff, latent_paths,
                                     interpolate=None) if (seeds or latent_paths) else []
        for name, ws in samples:
            write_video(outdir / f'{name}{suffix(index)}.mp4', G, [ws], angles, *args, desc=name)
            count += 1
        if interpolate:
            a, b = (inf.load_latent(p, G).to(device) for p in interpolate)
            name = f'interp_{inf.latent_name(interpolate[0])}_{inf.latent_name(interpolate[1])}{suffix(index)}'
            path_latents = inf.interpolate_latents(a, b, max(num_frames, 2))[:num_frames]
            write_video(outdir / f'{name}.mp4', G, path_latents, angles, *args, desc=name)
            count += 1
    click.echo(f'wrote {count} video(s) to {outdir}')


if __name__ == '__main__':
    main()
