"""The CPU demo (eg3d/demo.py): its pieces, and one end-to-end run with tiny settings (2 views, 1 step)."""
import json
import os

import imageio
import numpy as np
import PIL.Image
import pytest
import torch

import demo
import legacy
import viewer
from training import adapters
from training import inference as inf
from training import synthetic_identity as si
from training.dataset import read_identity


def _tree_state(folder):
    """{relative path: (size, mtime_ns)} of every file below `folder`."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            st = os.stat(os.path.join(root, name))
            out[os.path.relpath(os.path.join(root, name), folder)] = (st.st_size, st.st_mtime_ns)
    return out


def test_groundtruth_adapter_turns_base_into_person(tmp_path):
    G = si.build_tiny_generator(0)
    P = si.apply_low_rank_change(G, seed=1, rank=1, strength=1.0)
    path = tmp_path / 'truth.safetensors'
    adapters.save(demo.groundtruth_adapter(G, P, rank=1), str(path))
    loaded = adapters.load(si.build_tiny_generator(0), str(path)).eval()  # plain base + the file
    c = torch.from_numpy(demo.camera_labels(G, [(0.3, -0.1)]))
    ws = torch.from_numpy(si.identity_latents(G, 1, seed=3))
    with torch.no_grad():
        want = inf.render(P, ws, c, 32, seed=5)
        got = inf.render(loaded, ws, c, 32, seed=5)
        base = inf.render(G, ws, c, 32, seed=5)
    assert (got - want).abs().max() < 1e-3
    assert (base - want).abs().max() > 0.1  # the person really differs from the base


def test_groundtruth_adapter_rejects_a_change_of_higher_rank():
    G = si.build_tiny_generator(0)
    P = si.apply_low_rank_change(G, seed=1, rank=2, strength=1.0)
    with pytest.raises(RuntimeError, match='not of rank 1'):
        demo.groundtruth_adapter(G, P, rank=1)


def test_training_poses_spread_like_ffhq_and_heldout_poses_are_disjoint():
    yaws, pitches = np.array(demo.training_poses(4000, seed=0)).T
    assert 0.25 < yaws.std() < 0.32 and 0.1 < pitches.std() < 0.13
    assert abs(yaws).max() <= 0.8 and abs(pitches).max() <= 0.35
    train = set(demo.training_poses(50, seed=2))
    held = demo.heldout_poses(8)
    assert len(set(held)) == 8 and not train & set(held)
    assert held[0][0] == pytest.approx(-0.6) and held[-1][0] == pytest.approx(0.6)


def test_prepare_base_refuses_a_foreign_pickle(tmp_path):
    path = tmp_path / 'base.pkl'
    si.save_generator_pkl(si.build_tiny_generator(1), str(path))
    before = path.read_bytes()
    with pytest.raises(demo.DemoError, match='not the demo base'):
        demo.prepare_base(path, seed=0)
    assert path.read_bytes() == before


def test_prepare_identity_refuses_a_folder_it_did_not_write(tmp_path):
    paths = demo.DemoPaths.from_options(str(tmp_path / 'base.pkl'), str(tmp_path / 'me'), str(tmp_path / 'runs'))
    paths.data.mkdir()
    (paths.data / 'selfie.png').write_bytes(b'mine')
    recipe = demo.Recipe(seed=0, views=2, heldout=1, rank=1, strength=1.0)
    with pytest.raises(demo.DemoError, match='not written by the demo'):
        demo.prepare_identity(paths, recipe, si.build_tiny_generator(0))
    assert (paths.data / 'selfie.png').read_bytes() == b'mine'


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
    """One demo run with tiny settings: 2 training views, 2 held-out views, one training step, 2 video frames."""
    root = tmp_path_factory.mktemp('demo')
    args = [f'--outdir={root / "runs"}', f'--base={root / "networks" / "base.pkl"}',
            f'--data={root / "datasets" / "me"}', '--views=2', '--heldout=2', '--kimg=0.002', '--batch=2',
            '--frames=2', '--strength=1']
    demo.main.main(args, standalone_mode=False)
    paths = demo.DemoPaths.from_options(str(root / 'networks' / 'base.pkl'), str(root / 'datasets' / 'me'),
                                        str(root / 'runs'))
    return root, paths, args


def test_demo_writes_base_identity_and_ground_truth_apart(demo_run):
    _, paths, _ = demo_run
    data = legacy.load_network_pkl(str(paths.base_pkl))
    assert adapters.fingerprint(data['G_ema']) == adapters.fingerprint(si.build_tiny_generator(0))
    names, images, cameras, latents = read_identity(str(paths.data), resolution=128, num_ws=14, w_dim=512)
    assert len(names) == 2 and images.shape == (2, 3, 128, 128) and latents.shape == (2, 14, 512)
    held_names, _, held_cameras, _ = read_identity(str(paths.heldout), resolution=128, num_ws=14, w_dim=512)
    assert len(held_names) == 2
    assert not any(np.allclose(h, c) for h in held_cameras for c in cameras)
    assert sorted(os.listdir(paths.data)) == sorted(names + [n.replace('.png', '_latent.npy') for n in names]
                                                    + ['dataset.json'])
    assert (paths.groundtruth / demo.GROUNDTRUTH_ADAPTER).is_file()
    manifest = json.loads((paths.groundtruth / demo.MANIFEST).read_text())
    assert manifest['recipe']['views'] == 2 and manifest['recipe']['strength'] == 1.0


def test_demo_trains_evaluates_and_renders(demo_run):
    _, paths, _ = demo_run
    (run_dir,) = [p for p in paths.outdir.iterdir() if p.is_dir()]
    summary = json.loads((run_dir / 'demo_summary.json').read_text())
    assert (run_dir / 'adapter-000000.002.safetensors').is_file()
    assert summary['adapter'].endswith('adapter-000000.002.safetensors')
    assert 0 < summary['adapter_params'] < 0.05 * summary['base_params']
    metrics = summary['metrics']
    assert set(metrics) == {'base', 'personalized', 'ground truth'}
    # The ground-truth model differs from the images only by the renderer's ray jitter.
    assert metrics['ground truth']['psnr'] > metrics['base']['psnr'] + 5
    assert metrics['ground truth']['lpips'] < metrics['base']['lpips']
    # One training step already moves the adapter towards the person, on the held-out views
    # (here +0.3 dB PSNR and -7% LPIPS; an untrained adapter scores exactly as the base).
    assert metrics['personalized']['psnr'] > metrics['base']['psnr'] + 0.15
    assert metrics['personalized']['lpips'] < 0.97 * metrics['base']['lpips']
    assert all(np.isfinite(v) for m in metrics.values() for v in m.values())
    grid = np.asarray(PIL.Image.open(summary['grid']))
    assert grid.shape[0] == 26 + 3 * 128 + 2 * 2 and grid.shape[1] > 2 * 128 + 2
    frames = imageio.mimread(summary['video'])
    assert len(frames) == 2 and frames[0].shape[:2] == (128, 128)


def test_demo_rerun_reuses_base_and_identity(demo_run, capsys):
    root, paths, _ = demo_run
    before = {p: _tree_state(p) for p in (paths.data, paths.heldout, paths.groundtruth)}
    base_stat = os.stat(paths.base_pkl).st_mtime_ns
    capsys.readouterr()
    G = demo.prepare_base(paths.base_pkl, seed=0)
    demo.prepare_identity(paths, demo.Recipe(seed=0, views=2, heldout=2, rank=1, strength=1.0), G)
    out = capsys.readouterr().out
    assert out.count('reusing') == 2
    assert os.stat(paths.base_pkl).st_mtime_ns == base_stat
    assert {p: _tree_state(p) for p in before} == before


def test_identity_check_notices_edits_and_other_settings(demo_run):
    _, paths, _ = demo_run
    G = si.build_tiny_generator(0)
    fingerprints = demo.model_fingerprints(G, si.apply_low_rank_change(G, seed=1, rank=1, strength=1.0))
    recipe = demo.Recipe(seed=0, views=2, heldout=2, rank=1, strength=1.0)
    assert demo.identity_is_valid(paths, recipe, fingerprints, G) == (True, '')
    other = demo.Recipe(seed=0, views=3, heldout=2, rank=1, strength=1.0)
    assert not demo.identity_is_valid(paths, other, fingerprints, G)[0]
    other_person = demo.model_fingerprints(G, si.apply_low_rank_change(G, seed=1, rank=1, strength=0.9))
    assert not demo.identity_is_valid(paths, recipe, other_person, G)[0]
    labels = paths.heldout / 'dataset.json'
    original = labels.read_text()
    try:
        labels.write_text(original.replace('image_0', 'image_9'))
        valid, why = demo.identity_is_valid(paths, recipe, fingerprints, G)
        assert not valid and 'dataset.json' in why
    finally:
        labels.write_text(original)


def test_viewer_command_opens_the_demo_identity(tmp_path):
    paths = demo.DemoPaths.from_options(str(tmp_path / 'base.pkl'), str(tmp_path / 'me'), str(tmp_path / 'runs'))
    adapter = tmp_path / 'runs' / '00000-demo' / 'adapter-000080.safetensors'
    words = demo.viewer_command(paths, adapter).split()
    assert words[1].endswith('viewer.py')
    params = viewer.main.make_context('viewer', words[2:]).params
    assert params['network_pkl'] == str(paths.base_pkl) and params['adapter_paths'] == (str(adapter),)
    assert params['dataset'] == str(paths.data) and params['neural_rendering_resolution'] == 32
    assert params['host'] == '127.0.0.1'
