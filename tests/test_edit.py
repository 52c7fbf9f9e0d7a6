"""edit.py: applying latent directions (strength 0 is the identity) and fitting them (mean difference, linear SVM)."""
import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import edit
from training import inference as inf

FAST = ['--nrr=16', '--num-views=2', '--device=cpu']


def run(args):
    return CliRunner().invoke(edit.main, [str(a) for a in args])


def two_classes(tmp_path, n=12, shift=1.5, wplus=True):
    """Latent folders whose classes differ along a known unit direction (plus isotropic noise)."""
    rng = np.random.RandomState(0)
    true = rng.randn(512)
    true /= np.linalg.norm(true)
    folders = []
    for name, sign in (('pos', 1), ('neg', -1)):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(n):
            w = rng.randn(512) * 0.05 + sign * shift / 2 * true
            arr = np.repeat(w[None, None], 14, axis=1) if wplus else w[None]
            np.save(folder / f'image_{i}_latent.npy', arr.astype(np.float32))
        folders.append(folder)
    return folders, true


def test_apply_edit_strength_zero_is_identity_and_respects_layers():
    ws, direction = torch.randn(2, 14, 512), torch.randn(1, 14, 512)
    assert torch.equal(edit.apply_edit(ws, direction, 0.0), ws)
    mask = edit.layer_mask('0-3', 14)
    out = edit.apply_edit(ws, direction, 2.0, mask)
    assert torch.allclose(out[:, :4], ws[:, :4] + 2 * direction[:, :4])
    assert torch.equal(out[:, 4:], ws[:, 4:])
    with pytest.raises(inf.InputError, match='layer 20'):
        edit.layer_mask('20', 14)


@pytest.mark.parametrize('method', ['mean', 'svm'])
def test_fit_direction_recovers_the_separating_direction(tmp_path, method):
    (pos, neg), true = two_classes(tmp_path)
    p, _ = edit.read_latent_set(str(pos))
    n, _ = edit.read_latent_set(str(neg))
    direction, accuracy = edit.fit_direction(p, n, method)
    assert direction.shape == (14, 512)
    assert np.linalg.norm(direction[0]) == pytest.approx(1.0, rel=1e-6)  # unit norm per layer
    assert accuracy == 1.0
    assert direction[0] @ true > 0.7  # points from negative to positive, along the true direction


def test_linear_svm_matches_the_closed_form_and_separates():
    # two points +-e0: by symmetry b = 0, w = (a, 0) minimizing 0.5 a^2 + 2 C (1 - a)^2 -> a = 4C / (1 + 4C)
    w, b = edit.fit_linear_svm(np.array([[1.0, 0.0], [-1.0, 0.0]]), np.array([1.0, -1.0]), C=1.0)
    assert w == pytest.approx([0.8, 0.0], abs=1e-5) and b == pytest.approx(0.0, abs=1e-5)
    rng = np.random.RandomState(1)
    x = np.concatenate([rng.randn(20, 5) + [3, 0, 0, 0, 0], rng.randn(20, 5) - [3, 0, 0, 0, 0]])
    y = np.concatenate([np.ones(20), -np.ones(20)])
    w, b = edit.fit_linear_svm(x, y)
    assert np.mean(np.sign(x @ w + b) == y) == 1.0 and np.argmax(np.abs(w)) == 0


def test_cli_fit_then_apply(tiny_identity, tmp_path):
    (pos, neg), _ = two_classes(tmp_path, wplus=False)
    direction = tmp_path / 'attr.npy'
    result = run(['--fit-direction', '--positive', pos, '--negative', neg, '--method=svm', '--direction', direction])
    assert result.exit_code == 0, result.output
    assert np.load(direction).shape == (1, 512) and 'training accuracy 1.00' in result.output

    out = tmp_path / 'out'
    result = run(['--network', tiny_identity / 'base.pkl', '--dataset', tiny_identity / 'heldout', '--direction', direction,
                  '--strength=0,3', '--save-latents', '--outdir', out, *FAST])
    assert result.exit_code == 0, result.output
    original = np.load(tiny_identity / 'heldout' / 'image_0_latent.npy')
    assert np.array_equal(np.load(out / 'image_0_edit+0_latent.npy'), original)
    moved = np.load(out / 'image_0_edit+3_latent.npy') - original
    assert np.allclose(moved[0], 3 * np.load(direction)[0], atol=1e-5)
    grid = np.asarray(PIL.Image.open(out / 'grid.png'))
    assert grid.shape == (2 * 128, 2 * 128, 3)  # rows: latents, columns: strengths
    views = np.asarray(PIL.Image.open(out / 'image_0_edit.png'))
    assert views.shape == (2 * 128, 2 * 128, 3)  # rows: strengths, columns: views


def test_strength_zero_renders_like_the_unedited_latent(tiny_identity, tmp_path):
    np.save(tmp_path / 'd.npy', np.random.RandomState(0).randn(1, 14, 512).astype(np.float32))
    latent = tiny_identity / 'heldout' / 'image_1_latent.npy'
    result = run(['--network', tiny_identity / 'base.pkl', '--latents', latent, '--direction', tmp_path / 'd.npy',
                  '--strength=0', '--outdir', tmp_path / 'o', '--num-views=1', '--nrr=16', '--device=cpu'])
    assert result.exit_code == 0, result.output
    G = inf.load_generator(tiny_identity / 'base.pkl')
    expected = inf.render(G, inf.load_latent(latent, G), inf.camera_label(G), 16, seed=0)
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / 'o' / 'grid.png')), inf.to_uint8(expected[0]))


def test_cli_errors(tiny_identity, tmp_path):
    result = run(['--network', tiny_identity / 'base.pkl', '--latents', tiny_identity / 'heldout' / 'image_0_latent.npy',
                  '--outdir', tmp_path])
    assert result.exit_code == 1 and 'pass --direction' in result.output
    np.save(tmp_path / 'bad.npy', np.zeros((1, 7, 512), np.float32))
    result = run(['--network', tiny_identity / 'base.pkl', '--latents', tiny_identity / 'heldout' / 'image_0_latent.npy',
                  '--direction', tmp_path / 'bad.npy', '--outdir', tmp_path / 'o', *FAST])
    assert result.exit_code == 1 and 'direction:' in result.output and '[1, 7, 512]' in result.output
    (pos, neg), _ = two_classes(tmp_path, n=2)
    np.save(neg / 'image_9_latent.npy', np.zeros((1, 512), np.float32))
    result = run(['--fit-direction', '--positive', pos, '--negative', neg, '--direction', tmp_path / 'x.npy'])
    assert result.exit_code == 1 and 'different shapes' in result.output
