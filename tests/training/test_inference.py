"""training.inference: loading networks, cameras, latents, images and metrics for the after-training scripts."""
import json

import numpy as np
import pytest
import torch

from training import inference as inf


@pytest.fixture(scope='module')
def G(tiny_identity):
    return inf.load_generator(tiny_identity / 'base.pkl')


def test_parse_range_and_floats():
    assert inf.parse_range('0-3,7') == [0, 1, 2, 3, 7]
    assert inf.parse_range('') == []
    assert inf.parse_floats('-1,0,2.5') == [-1.0, 0.0, 2.5]
    with pytest.raises(inf.InputError, match='integers'):
        inf.parse_range('0-x')
    with pytest.raises(inf.InputError, match='numbers'):
        inf.parse_floats('1,two')


def test_load_generator_is_frozen_eval_generator(G):
    assert not G.training
    assert not any(p.requires_grad for p in G.parameters())
    assert inf.num_ws(G) == 14 and inf.num_adapters(G) == 0


def test_load_generator_missing_files_are_clear_errors(tiny_identity, tmp_path):
    with pytest.raises(inf.InputError, match='Network pickle not found'):
        inf.load_generator(tmp_path / 'nope.pkl')
    with pytest.raises(inf.InputError, match='Adapter file not found'):
        inf.load_generator(tiny_identity / 'base.pkl', [tmp_path / 'nope.safetensors'])
    bad = tmp_path / 'bad.pkl'
    bad.write_bytes(b'not a pickle')
    with pytest.raises(inf.InputError, match='could not load network pickle'):
        inf.load_generator(bad)


def test_camera_label_matches_dataset_convention(G):
    c = inf.camera_label(G)
    assert c.shape == (1, 25)
    cam2world = c[0, :16].reshape(4, 4)
    # frontal camera on the +z axis at the average radius, looking at the pivot
    assert torch.allclose(cam2world[:3, 3], torch.tensor([0, 0, 2.7]), atol=1e-4)
    assert abs(float(c[0, 16]) - 4.26) < 0.01 and float(c[0, 18]) == pytest.approx(0.5)
    sweep = inf.orbit_labels(G, inf.yaw_sweep(3, 0.4))
    assert sweep.shape == (3, 25) and torch.allclose(sweep[1], c[0])
    assert float(sweep[0, 3]) == pytest.approx(-float(sweep[2, 3]), abs=1e-5)  # symmetric yaws mirror the x position


def test_read_labels_and_label_for_image(tiny_identity, tmp_path):
    labels = inf.read_labels(tiny_identity / 'train')
    assert sorted(labels) == ['image_0.png', 'image_1.png', 'image_2.png']
    assert inf.label_for_image(tiny_identity / 'train' / 'image_1.png').shape == (25,)
    c = np.arange(25, dtype=np.float32)
    np.save(tmp_path / 'c.npy', c)
    assert np.array_equal(inf.label_for_image(tiny_identity / 'train' / 'image_1.png', tmp_path / 'c.npy'), c)
    np.save(tmp_path / 'short.npy', c[:16])
    with pytest.raises(inf.InputError, match='25'):
        inf.label_for_image(tiny_identity / 'train' / 'image_1.png', tmp_path / 'short.npy')
    (tmp_path / 'dataset.json').write_text(json.dumps({'labels': [['other.png', c.tolist()]]}))
    with pytest.raises(inf.InputError, match='no camera label for x.png'):
        inf.label_for_image(tmp_path / 'x.png')
    with pytest.raises(inf.InputError, match='no dataset.json'):
        inf.label_for_image(tmp_path / 'sub' / 'x.png')
    (tmp_path / 'dataset.json').write_text(json.dumps({'labels': [['x.png']]}))
    with pytest.raises(inf.InputError, match=r'is not \[filename, \[25 floats\]\]'):
        inf.read_labels(tmp_path)


def test_latent_shapes_are_normalized_and_checked(G, tmp_path):
    w = np.random.RandomState(0).randn(1, 512).astype(np.float32)
    for shape in [(512,), (1, 512), (14, 512), (1, 14, 512)]:
        path = tmp_path / f'{len(shape)}_{shape[0]}_latent.npy'
        np.save(path, np.broadcast_to(w.reshape(-1), shape[:-1] + (512,)).copy())
        ws = inf.load_latent(path, G)
        assert ws.shape == (1, 14, 512)
        assert torch.allclose(ws[0, 5], torch.from_numpy(w[0]))
    np.save(tmp_path / 'wrong_latent.npy', np.zeros((1, 18, 512), np.float32))
    with pytest.raises(inf.InputError, match=r'shape \[1, 18, 512\].*\[1, 14, 512\]'):
        inf.load_latent(tmp_path / 'wrong_latent.npy', G)
    np.save(tmp_path / 'nan_latent.npy', np.full((1, 512), np.nan, np.float32))
    with pytest.raises(inf.InputError, match='NaN'):
        inf.load_latent(tmp_path / 'nan_latent.npy', G)


def test_save_latent_is_atomic_and_refuses_to_overwrite(tmp_path):
    ws = torch.randn(1, 14, 512)
    path = inf.save_latent(tmp_path / 'a_latent.npy', ws)
    assert np.array_equal(np.load(path), ws.numpy())
    with pytest.raises(inf.InputError, match='--overwrite'):
        inf.save_latent(path, ws * 2)
    inf.save_latent(path, ws * 2, overwrite=True)
    assert np.allclose(np.load(path), ws.numpy() * 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a_latent.npy']  # no temp files left


def test_gather_latents_names_and_interpolation(G, tiny_identity):
    a, b = tiny_identity / 'train' / 'image_0_latent.npy', tiny_identity / 'train' / 'image_1_latent.npy'
    samples = inf.gather_latents(G, seeds=[3], truncation_psi=0.7, latent_paths=[a], interpolate=(a, b), steps=3)
    assert [n for n, _ in samples] == ['seed0003', 'image_0', 'interp_image_0_image_1_000',
                                       'interp_image_0_image_1_001', 'interp_image_0_image_1_002']
    wa, wb = inf.load_latent(a, G), inf.load_latent(b, G)
    assert torch.equal(samples[2][1], wa) and torch.allclose(samples[4][1], wb)
    assert torch.allclose(samples[3][1], (wa + wb) / 2)
    with pytest.raises(inf.InputError, match='nothing to render'):
        inf.gather_latents(G)


def test_render_views_is_deterministic_for_a_seed(G):
    ws = inf.seed_latents(G, [0], 0.7)
    cams = inf.orbit_labels(G, [-0.3, 0.3])
    v1 = inf.render_views(G, ws, cams, neural_rendering_resolution=16, seed=5)
    v2 = inf.render_views(G, ws, cams, neural_rendering_resolution=16, seed=5)
    assert v1.shape == (2, 3, 128, 128) and torch.equal(v1, v2)
    assert not torch.equal(v1[0], v1[1])


def test_image_round_trip_and_grid(tmp_path):
    img = torch.rand(1, 3, 8, 8) * 2 - 1
    inf.save_image(img, tmp_path / 'x.png')
    back = inf.load_image(tmp_path / 'x.png')
    assert back.shape == (1, 3, 8, 8) and (back - img).abs().max() < 1 / 127
    assert inf.load_image(tmp_path / 'x.png', resolution=16).shape == (1, 3, 16, 16)
    grid = inf.image_grid([torch.zeros(2, 3, 8, 8), torch.zeros(1, 3, 8, 8)], pad=1)
    assert grid.shape == (17, 17, 3) and grid.dtype == np.uint8


def test_psnr_ssim_known_values():
    a = torch.zeros(2, 3, 16, 16)
    b = a.clone()
    b[1] += 0.2  # 0.1 in [0, 1] units -> MSE 0.01 -> 20 dB
    assert inf.psnr(a, b)[1].item() == pytest.approx(20.0, abs=1e-3)
    assert inf.psnr(a, b)[0].item() > 90
    noisy = (a + 0.5 * torch.randn_like(a)).clamp(-1, 1)
    s_same, s_noisy = inf.ssim(noisy, noisy), inf.ssim(noisy, a)
    assert torch.allclose(s_same, torch.ones(2), atol=1e-5)
    assert (s_noisy < 0.5).all()


def test_build_lpips_choices():
    assert inf.build_lpips('none') is None
    model = inf.build_lpips('alex-random')
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    d = inf.lpips_distance(model, x, x.flip(0))
    assert d.shape == (2,) and (d > 0).all()
    assert torch.allclose(inf.lpips_distance(model, x, x), torch.zeros(2), atol=1e-6)
    with pytest.raises(inf.InputError):
        inf.build_lpips('squeeze')
