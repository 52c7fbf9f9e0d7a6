"""The CPU demo (eg3d/demo.py): its pieces, and one small end-to-end run on the committed base (4 views, 4 steps)."""
import json
import os

import imageio
import numpy as np
import PIL.Image
import pytest
import torch

import demo
import viewer
from training import adapters
from training import inference as inf
from training import procedural_heads as ph
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


def test_load_base_refuses_a_missing_or_foreign_pickle(tmp_path):
    with pytest.raises(demo.DemoError, match='does not exist'):
        demo.load_base(tmp_path / 'missing.pkl')
    path = tmp_path / 'base.pkl'
    si.save_generator_pkl(si.build_tiny_generator(1), str(path))  # a generator, but not trained on the heads
    with pytest.raises(demo.DemoError, match='not a demo base trained on the head family'):
        demo.load_base(path)


def test_person_lies_outside_the_head_family():
    params = demo.person_params()
    outside = [name for name, value in zip(ph.PARAM_NAMES, params[0]) if not 0 <= value <= 1]
    assert sorted(outside) == sorted(demo.PERSON_FEATURES)
    # The family's nearest head (those features clamped to its range) looks visibly different.
    c = torch.from_numpy(demo.camera_labels(si.build_tiny_generator(0), [(0.4, 0.0)]))
    person = demo.render_person(params, c, 64)['image']
    nearest = demo.render_person(params.clamp(0, 1), c, 64)['image']
    assert (person - nearest).abs().mean() > 0.05


def test_prepare_identity_refuses_a_folder_it_did_not_write(tmp_path):
    paths = demo.DemoPaths.from_options(str(tmp_path / 'base.pkl'), str(tmp_path / 'me'), str(tmp_path / 'runs'))
    paths.data.mkdir()
    (paths.data / 'selfie.png').write_bytes(b'mine')
    recipe = demo.Recipe(seed=0, views=2, heldout=1)
    with pytest.raises(demo.DemoError, match='not written by the demo'):
        demo.prepare_identity(paths, recipe, si.build_tiny_generator(0))
    assert (paths.data / 'selfie.png').read_bytes() == b'mine'


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
    """A small demo run on the committed base: 4 training views, 2 held-out views (yaw -0.6 and +0.6), 4 steps."""
    root = tmp_path_factory.mktemp('demo')
    args = [f'--outdir={root / "runs"}', f'--data={root / "datasets" / "me"}', '--views=4', '--heldout=2',
            '--kimg=0.008', '--batch=2', '--frames=2']
    demo.main.main(args, standalone_mode=False)
    paths = demo.DemoPaths.from_options(str(demo.REPO_ROOT / 'networks' / 'demo-heads.pkl'),
                                        str(root / 'datasets' / 'me'), str(root / 'runs'))
    return root, paths, args


def test_demo_writes_the_person_in_the_dataset_format(demo_run):
    _, paths, _ = demo_run
    G, _ = demo.load_base(paths.base_pkl)
    names, images, cameras, latents = read_identity(str(paths.data), resolution=128, num_ws=14, w_dim=512)
    assert len(names) == 4 and images.shape == (4, 3, 128, 128) and latents.shape == (4, 14, 512)
    assert np.allclose(latents, demo.person_latent(G).numpy())  # one person: the anchor head's latent
    # The images are the exact renderer's, from the cameras in dataset.json.
    truth = demo.render_person(demo.person_params(), torch.from_numpy(cameras[:1]), 128)['image']
    assert np.abs((truth[0] * 127.5 + 128).clamp(0, 255).to(torch.uint8).numpy().astype(int)
                  - images[0].astype(int)).max() <= 1
    held_names, _, held_cameras, _ = read_identity(str(paths.heldout), resolution=128, num_ws=14, w_dim=512)
    assert len(held_names) == 2
    assert not any(np.allclose(h, c) for h in held_cameras for c in cameras)
    assert sorted(os.listdir(paths.data)) == sorted(names + [n.replace('.png', '_latent.npy') for n in names]
                                                    + ['dataset.json'])
    manifest = json.loads((paths.groundtruth / demo.MANIFEST).read_text())
    assert manifest['recipe']['views'] == 2 * manifest['recipe']['heldout'] == 4
    assert manifest['person']['params'] == demo.person_params()[0].tolist()


def test_demo_personalized_beats_the_base_on_heldout_views(demo_run):
    _, paths, _ = demo_run
    (run_dir,) = [p for p in paths.outdir.iterdir() if p.is_dir()]
    summary = json.loads((run_dir / 'demo_summary.json').read_text())
    assert summary['adapter'].endswith('adapter-000000.008.safetensors')
    assert 0 < summary['adapter_params'] < 0.05 * summary['base_params']
    metrics = summary['metrics']
    assert set(metrics) == {'base', 'personalized'}
    assert all(np.isfinite(v) for m in metrics.values() for v in m.values())
    # Eight one-image steps (the default recipe takes the batch of 2 one image at a time) already bring the adapter
    # closer to the renderer's person on views at yaw +-0.6 (+4.8 dB PSNR, LPIPS* 0.66x with the committed
    # 1,851-step base; an untrained adapter scores as the base).
    assert metrics['personalized']['psnr'] > metrics['base']['psnr'] + 1.0
    assert metrics['personalized']['lpips'] < 0.9 * metrics['base']['lpips']
    assert metrics['base']['depth_error'] < 0.1  # the base draws a head where the renderer does
    grid = np.asarray(PIL.Image.open(summary['grid']))
    assert grid.shape[0] == 26 + 6 * 128 + 5 * 2 and grid.shape[1] == 130 + 2 * 128 + 2
    frames = imageio.mimread(summary['video'])
    assert len(frames) == 2 and frames[0].shape[:2] == (32 + 128, 3 * 128 + 2 * 8)


def test_demo_rerun_reuses_the_identity(demo_run, capsys):
    _, paths, _ = demo_run
    before = {p: _tree_state(p) for p in (paths.data, paths.heldout, paths.groundtruth)}
    G, _ = demo.load_base(paths.base_pkl)
    capsys.readouterr()
    demo.prepare_identity(paths, demo.Recipe(seed=0, views=4, heldout=2), G)
    assert capsys.readouterr().out.count('reusing') == 1
    assert {p: _tree_state(p) for p in before} == before


def test_identity_check_notices_edits_and_other_settings(demo_run):
    _, paths, _ = demo_run
    G, _ = demo.load_base(paths.base_pkl)
    fingerprints = demo.base_fingerprint(G)
    recipe = demo.Recipe(seed=0, views=4, heldout=2)
    assert demo.identity_is_valid(paths, recipe, fingerprints, G) == (True, '')
    assert not demo.identity_is_valid(paths, demo.Recipe(seed=0, views=3, heldout=2), fingerprints, G)[0]
    other_base = si.build_tiny_generator(0)
    assert not demo.identity_is_valid(paths, recipe, demo.base_fingerprint(other_base), other_base)[0]
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
