"""make_demo_base.py (training the demo base on the procedural heads) and the committed networks/demo-heads.pkl."""
import subprocess
import sys

import numpy as np
import torch

import legacy
import make_demo_base
from camera_utils import label_from_yaw_pitch
from conftest import REPO_ROOT
from training import procedural_heads as ph
from training import synthetic_identity as si

COMMITTED_BASE = REPO_ROOT / 'networks' / 'demo-heads.pkl'


def psnr_against_renderer(G, seed, yaws):
    """PSNR of G(z_seed) against the exact render of head `seed`, over views at `yaws`."""
    z = ph.latent_from_seed(seed, G.z_dim)
    labels = torch.from_numpy(np.stack([label_from_yaw_pitch(yaw, 0.0) for yaw in yaws])).float()
    truth = ph.render(ph.HeadScene(ph.params_from_latent(z).expand(len(yaws), -1)), labels, G.img_resolution)
    with torch.no_grad():
        image = G(z.expand(len(yaws), -1), labels, neural_rendering_resolution=32, noise_mode='const')['image']
    assert torch.isfinite(image).all()
    return float(10 * torch.log10(4 / (image.clamp(-1, 1) - truth['image']).square().mean()))


def test_committed_base_loads_safely_and_renders_its_family():
    data = legacy.load_network_pkl(str(COMMITTED_BASE))  # the safe loader: no code runs
    G = data['G_ema']
    assert data['demo_base']['family'] == 'training.procedural_heads'
    heads = psnr_against_renderer(G, make_demo_base.EVAL_SEED + 100, (-0.4, 0.2))
    untrained = psnr_against_renderer(si.build_tiny_generator(0), make_demo_base.EVAL_SEED + 100, (-0.4, 0.2))
    assert heads > untrained + 5, (heads, untrained)


def run_cli(tmp_path, *args):
    cmd = [sys.executable, str(REPO_ROOT / 'eg3d' / 'make_demo_base.py'), f'--out={tmp_path / "base.pkl"}',
           f'--state={tmp_path / "state.pt"}', f'--preview={tmp_path / "preview.png"}', '--batch=1', *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)


def test_training_resumes_from_its_checkpoint_and_refuses_other_options(tmp_path):
    first = run_cli(tmp_path, '--steps=1', '--eval_heads=0')
    assert first.returncode == 0, first.stderr
    assert torch.load(tmp_path / 'state.pt', weights_only=True)['step'] == 1
    second = run_cli(tmp_path, '--steps=2', '--eval_heads=1')
    assert second.returncode == 0, second.stderr
    assert 'Resuming' in second.stdout and torch.load(tmp_path / 'state.pt', weights_only=True)['step'] == 2
    info = legacy.load_network_pkl(str(tmp_path / 'base.pkl'))['demo_base']
    assert info['steps'] == 2 and np.isfinite(info['eval_psnr']) and (tmp_path / 'preview.png').is_file()

    other = run_cli(tmp_path, '--steps=3', '--lr=0.01', '--eval_heads=0')
    assert other.returncode != 0 and 'other options' in other.stderr
    assert torch.load(tmp_path / 'state.pt', weights_only=True)['step'] == 2  # the checkpoint is untouched


def test_face_mask_covers_the_face_and_not_the_hair_or_background():
    label = torch.from_numpy(label_from_yaw_pitch(0.0, 0.0)).float()[None]
    truth = ph.render(ph.HeadScene(ph.params_from_seed(1)), label, 64)
    mask = make_demo_base.face_mask(label, truth['depth'])[0, 0]
    rows = mask.nonzero()[:, 0]
    assert mask.sum() > 50 and mask[truth['mask'][0, 0] == 0].sum() == 0  # some face, nothing off the head
    head_rows = truth['mask'][0, 0].nonzero()[:, 0]
    assert rows.min() > head_rows.min() + 5  # the hair cap above the forehead is not face
    assert mask[32, 32] == 1  # the nose, at the image centre of a frontal view


def test_training_starts_from_a_pickle_with_fresh_adam(tmp_path):
    started = run_cli(tmp_path, f'--init={COMMITTED_BASE}', '--steps=10000', '--minutes=0', '--eval_heads=0')
    assert started.returncode == 0, started.stderr
    steps = legacy.load_network_pkl(str(COMMITTED_BASE))['demo_base']['steps']
    assert 'Starting from' in started.stdout
    state = torch.load(tmp_path / 'state.pt', weights_only=True)
    assert state['step'] == steps  # the step count goes on from the pickle's (--minutes=0: no step taken)
    committed = legacy.load_network_pkl(str(COMMITTED_BASE))['G_ema'].state_dict()
    assert all(torch.equal(state['G'][k], v) for k, v in committed.items())
    assert state['options']['init'].startswith('demo-heads.pkl sha256:')  # no path of this machine in the record

    missing = run_cli(tmp_path, f'--init={tmp_path / "nothing.pkl"}', f'--state={tmp_path / "other.pt"}')
    assert missing.returncode != 0 and 'nothing.pkl does not exist' in missing.stderr
