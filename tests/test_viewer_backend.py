"""viewer_backend.py: identities on one base, base beside personalized, latent sources, edits, downloads, errors."""
import numpy as np
import pytest
import torch

import demo
import edit
import sample_alpha
from training import adapters
from training import inference as inf
from training import synthetic_identity
from viewer_backend import View, ViewerBackend

NRR = 16


def make_identity(base_pkl, path, seed):
    """Adapter file of a synthetic person of `base_pkl`: the demo's exact rank-1 adapter of a seeded change."""
    G = inf.load_generator(base_pkl)
    person = synthetic_identity.apply_low_rank_change(G, seed=seed, rank=1, strength=1.0)
    adapters.save(demo.groundtruth_adapter(G, person, rank=1), str(path))
    return path


@pytest.fixture(scope='module')
def files(tiny_identity, tmp_path_factory):
    """Two identities of the tiny base, one adapter of another base, an edit direction."""
    folder = tmp_path_factory.mktemp('viewer')
    base = tiny_identity / 'base.pkl'
    other = synthetic_identity.build_tiny_generator(seed=5)
    adapters.inject(other, adapters.AdapterConfig(r=1))
    adapters.save(other, str(folder / 'other_base.safetensors'))
    np.save(folder / 'direction.npy', np.random.RandomState(0).randn(1, 512).astype(np.float32))
    return dict(base=base, ann=make_identity(base, folder / 'ann.safetensors', 1),
                ben=make_identity(base, folder / 'ben.safetensors', 2), other=folder / 'other_base.safetensors',
                direction=folder / 'direction.npy', dataset=tiny_identity / 'train', folder=folder)


@pytest.fixture(scope='module')
def backend(files):
    return ViewerBackend(str(files['base']), [str(files['ann']), str(files['ben'])], str(files['dataset']),
                         [str(files['direction'])], device='cpu', neural_rendering_resolution=NRR)


def alone(files, adapter, ws, yaw, row):
    """Row `row` of a batch of two renders by one adapter loaded alone on a fresh base (the reference for the
    registry's slots; a batch of two, as the viewer's, so that the renderer's depth jitter is the same)."""
    G = inf.load_generator(files['base'], [adapter] if adapter else [])
    with torch.no_grad():
        images = inf.render(G, ws.expand(2, -1, -1), inf.camera_label(G, yaw=yaw).expand(2, -1), NRR)
    return inf.to_uint8(images)[row]


def mean_difference(a, b):
    return np.abs(a.astype(int) - b).mean()


def test_base_beside_each_identity_as_loaded_alone(files, backend):
    assert backend.info()['identities'] == ['ann', 'ben'] and backend.errors == []
    view = View(identity='ann', source='dataset', latent='image_1', yaw=0.3)
    ws = inf.load_latent(files['dataset'] / 'image_1_latent.npy', backend.G)
    base, ann = backend.render_pair(view)
    _, ben = backend.render_pair(View(identity='ben', source='dataset', latent='image_1', yaw=0.3))
    np.testing.assert_allclose(base, alone(files, None, ws, 0.3, row=0), atol=1)
    np.testing.assert_allclose(ann, alone(files, files['ann'], ws, 0.3, row=1), atol=1)
    np.testing.assert_allclose(ben, alone(files, files['ben'], ws, 0.3, row=1), atol=1)
    assert mean_difference(ann, base) > 1 and mean_difference(ann, ben) > 1
    only_base, none = backend.render_pair(View(identity='', source='dataset', latent='image_1', yaw=0.3))
    assert none is None  # the base alone renders a batch of one: other depth jitter, the same picture
    assert mean_difference(only_base, base) < 0.5 and np.abs(only_base.astype(int) - base).max() <= 4


def test_pose_change_reuses_planes_and_matches_a_fresh_render(files, backend):
    backend.render_pair(View(identity='ann', seed=3, yaw=0.0))
    turned = backend.render_pair(View(identity='ann', seed=3, yaw=0.4))  # same latent: cached planes
    fresh = ViewerBackend(str(files['base']), [str(files['ann'])], device='cpu', neural_rendering_resolution=NRR)
    expected = fresh.render_pair(View(identity='ann', seed=3, yaw=0.4))
    assert np.array_equal(turned[0], expected[0]) and np.array_equal(turned[1], expected[1])
    assert not np.array_equal(turned[1], backend.render_pair(View(identity='ann', seed=3, yaw=0.0))[1])


def test_latent_sources(files, backend):
    anchors = torch.cat([inf.load_latent(p, backend.G) for p in inf.latents_in_folder(files['dataset'])])
    mean = backend.latent(View(identity='ann', source='dataset', latent='mean'))
    torch.testing.assert_close(mean, anchors.mean(0, keepdim=True))
    weights = sample_alpha.sample_alpha_weights(len(anchors), 1, 3, 0.0, seed=4)
    torch.testing.assert_close(backend.latent(View(identity='ann', source='alpha', alpha_seed=4)),
                               sample_alpha.combine(anchors, weights))
    assert not torch.equal(backend.latent(View(source='alpha', alpha_seed=4)),
                           backend.latent(View(source='alpha', alpha_seed=5)))
    torch.testing.assert_close(backend.latent(View(identity='ben', seed=7, truncation=0.5)),
                               inf.seed_latents(backend.G, [7], 0.5))


def test_edit_strength_moves_the_latent_along_the_direction(files, backend):
    plain = View(identity='ann', source='dataset', latent='image_0')
    direction = inf.load_latent(files['direction'], backend.G)
    for strength in (0.0, 2.5):
        edited = View(identity='ann', source='dataset', latent='image_0', direction='direction', strength=strength)
        torch.testing.assert_close(backend.latent(edited), edit.apply_edit(backend.latent(plain), direction, strength))
    zero = View(identity='ann', source='dataset', latent='image_0', direction='direction', strength=0.0)
    assert all(np.array_equal(a, b) for a, b in zip(backend.render_pair(zero), backend.render_pair(plain)))


def test_downloads_are_an_image_a_video_and_a_mesh(files):
    backend = ViewerBackend(str(files['base']), [str(files['ann'])], device='cpu', neural_rendering_resolution=NRR,
                            video_frames=2, shape_res=24, shape_level=2.5)
    view = View(identity='ann', seed=1)
    assert np.array_equal(backend.image(view), backend.render_pair(view)[1])
    assert backend.video(view)[4:8] == b'ftyp'
    mesh = backend.mesh(view)
    assert mesh.startswith(b'ply\n') and b'element face' in mesh
    with pytest.raises(inf.InputError, match='outside the density range'):
        ViewerBackend(str(files['base']), device='cpu', shape_res=16, shape_level=1e6).mesh(view.__class__())


def test_bad_files_are_collected_with_their_names(files, tmp_path):
    missing = tmp_path / 'missing.safetensors'
    backend = ViewerBackend(str(files['base']), [str(files['ann']), str(missing), str(files['other'])],
                            str(tmp_path / 'no_dataset'), [str(tmp_path / 'no_direction.npy')], device='cpu')
    assert backend.info()['identities'] == ['ann']
    errors = '\n'.join(backend.errors)
    assert len(backend.errors) == 4
    assert f'Adapter file not found: {missing}' in errors
    assert str(files['other']) in errors and 'different base generator' in errors
    assert 'no_dataset' in errors and 'no_direction.npy' in errors
    with pytest.raises(inf.InputError, match='not a readable safetensors'):
        backend.add_identity(str(files['base']))
    with pytest.raises(inf.InputError, match='no dataset latents'):
        backend.render_pair(View(source='alpha'))


def test_a_pickle_that_is_no_eg3d_network_is_an_input_error(tmp_path):
    junk = tmp_path / 'junk.pkl'
    junk.write_bytes(b'not a pickle at all')
    with pytest.raises(inf.InputError, match='junk.pkl'):
        ViewerBackend(str(junk), device='cpu')
    with pytest.raises(inf.InputError, match='not found'):
        ViewerBackend(str(tmp_path / 'absent.pkl'), device='cpu')


@pytest.mark.parametrize('data, message', [
    ({'yaw': 'left'}, 'yaw must be a number'),
    ({'identity': 3}, 'identity must be a string'),
    ({'source': 'dream'}, 'latent source'),
    ({'zoom': 2}, 'unknown view field'),
    ({'pitch': float('nan')}, 'finite'),
    ({'seed': -1}, r'seed must lie in \[0, 2\^32\)'),
])
def test_view_json_is_checked(data, message):
    with pytest.raises(inf.InputError, match=message):
        View.from_json(data)
