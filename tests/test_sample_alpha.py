"""sample_alpha.py: MyStyle alpha-space samples are (dilated) convex combinations of the identity's anchors."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import sample_alpha
from training import inference as inf


@pytest.mark.parametrize('beta', [0.0, 0.1])
@pytest.mark.parametrize('per_sample', [2, 0])
def test_weights_sum_to_one_within_the_margin(beta, per_sample):
    weights = sample_alpha.sample_alpha_weights(5, 200, anchors_per_sample=per_sample, beta=beta, seed=3)
    assert weights.shape == (200, 5)
    assert np.allclose(weights.sum(1), 1.0)
    k = per_sample or 5
    used = weights != 0
    assert (used.sum(1) == k).all()
    assert weights.min() >= -beta - 1e-12 and weights.max() <= 1 + (k - 1) * beta + 1e-12
    if beta > 0:  # the dilation is actually used
        assert (weights < 0).any()
    else:
        assert (weights >= 0).all()


def test_weights_are_seeded_and_checked():
    a = sample_alpha.sample_alpha_weights(4, 3, seed=1)
    assert np.array_equal(a, sample_alpha.sample_alpha_weights(4, 3, seed=1))
    assert not np.array_equal(a, sample_alpha.sample_alpha_weights(4, 3, seed=2))
    with pytest.raises(inf.InputError, match='beta'):
        sample_alpha.sample_alpha_weights(4, 3, beta=-0.1)


def test_combine_uses_the_same_weights_on_every_layer():
    anchors = torch.randn(3, 14, 512)
    weights = np.array([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    out = sample_alpha.combine(anchors, weights)
    assert torch.allclose(out[0], anchors[0])
    assert torch.allclose(out[1], 0.2 * anchors[0] + 0.3 * anchors[1] + 0.5 * anchors[2], atol=1e-5)


def test_cli_saves_latents_weights_and_renders(tiny_identity, tmp_path):
    result = CliRunner().invoke(sample_alpha.main, [
        '--network', str(tiny_identity / 'base.pkl'), '--dataset', str(tiny_identity / 'train'), '--outdir', str(tmp_path),
        '--num-samples=2', '--anchors-per-sample=2', '--beta=0.05', '--nrr=16', '--num-views=2', '--device=cpu'])
    assert result.exit_code == 0, result.output
    weights = np.load(tmp_path / 'alpha_weights.npy')
    meta = json.loads((tmp_path / 'alpha_samples.json').read_text())
    assert weights.shape == (2, 3) and np.allclose(weights.sum(1), 1) and weights.min() >= -0.05 - 1e-12
    assert [s['name'] for s in meta['samples']] == ['alpha_0000', 'alpha_0001'] and meta['beta'] == 0.05
    G = inf.load_generator(tiny_identity / 'base.pkl')
    anchors = torch.cat([inf.load_latent(p, G) for p in meta['anchors']])
    for i in range(2):
        latent = np.load(tmp_path / f'alpha_{i:04d}_latent.npy')
        assert latent.shape == (1, 14, 512)
        assert np.allclose(latent[0], sample_alpha.combine(anchors, weights[i:i + 1])[0].numpy(), atol=1e-5)
        assert (tmp_path / f'alpha_{i:04d}.png').is_file()
    assert (tmp_path / 'grid.png').is_file()


def test_cli_needs_anchors(tiny_identity, tmp_path):
    result = CliRunner().invoke(sample_alpha.main, ['--network', str(tiny_identity / 'base.pkl'), '--outdir', str(tmp_path)])
    assert result.exit_code == 1 and 'no anchors' in result.output
    result = CliRunner().invoke(sample_alpha.main, ['--network', str(tiny_identity / 'base.pkl'), '--outdir', str(tmp_path),
                                                    '--dataset', str(tmp_path)])
    assert result.exit_code == 1 and 'no *_latent.npy files' in result.output
