"""gen_videos.py: orbit videos (mp4) of seeds / latents and a latent interpolation, readable back with imageio."""
import imageio
import numpy as np
import pytest
from click.testing import CliRunner

import gen_videos

FAST = ['--nrr=16', '--frames=4', '--fps=4', '--device=cpu']


def run(args):
    return CliRunner().invoke(gen_videos.main, [str(a) for a in args])


def read_frames(path):
    with imageio.get_reader(path, format='FFMPEG') as reader:
        return [np.asarray(f) for f in reader]


def test_orbit_is_closed_and_symmetric():
    angles = gen_videos.orbit_angles(8, 0.35, 0.25)
    assert angles[0] == pytest.approx((0.0, 0.25))
    assert angles[2] == pytest.approx((0.35, 0.0), abs=1e-9) and angles[6] == pytest.approx((-0.35, 0.0), abs=1e-9)


def test_videos_for_seeds_latents_and_interpolation(tiny_identity, tmp_path):
    a, b = tiny_identity / 'heldout' / 'image_0_latent.npy', tiny_identity / 'heldout' / 'image_1_latent.npy'
    result = run(['--network', tiny_identity / 'base.pkl', '--seeds=0', '--dataset', tiny_identity / 'heldout',
                  '--interpolate', a, b, '--outdir', tmp_path, *FAST])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        'image_0.mp4', 'image_1.mp4', 'interp_image_0_image_1.mp4', 'seed0000.mp4']
    for video in tmp_path.iterdir():
        frames = read_frames(video)
        assert len(frames) == 4 and frames[0].shape == (128, 128, 3)
        assert not np.array_equal(frames[0], frames[1])  # the camera moves
    assert imageio.get_reader(tmp_path / 'seed0000.mp4', format='FFMPEG').get_meta_data()['fps'] == 4


def test_errors_before_rendering(tiny_identity, tmp_path):
    result = run(['--network', tiny_identity / 'base.pkl', '--outdir', tmp_path / 'o', *FAST])
    assert result.exit_code == 1 and 'nothing to render' in result.output
    np.save(tmp_path / 'bad_latent.npy', np.zeros((3, 512), np.float32))
    result = run(['--network', tiny_identity / 'base.pkl', '--latents', tmp_path / 'bad_latent.npy',
                  '--outdir', tmp_path / 'o', *FAST])
    assert result.exit_code == 1 and 'shape [3, 512]' in result.output
    assert not list(tmp_path.rglob('*.mp4'))
