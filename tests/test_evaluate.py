"""evaluate.py: metrics of base / full / adapter models on held-out selfies rank ground truth > personalized > base.

The synthetic identity is rendered by G_person = G_base + a rank-1 change of every convolution weight
(training.synthetic_identity). That change is exactly what a rank-1 LoRA adapter on G_base represents,
so the ground-truth adapter is built from the SVD of each weight change. The "personalized" model is
that adapter with every B factor halved: each layer moves halfway from the base to the person, which
stands in for an adapter trained part of the way (training itself is tested with the training loop).
"""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import evaluate
from training import adapters
from training import inference as inf
from training import synthetic_identity
from training.adapters.inject import adapter_layers, base_name

FAST = ['--lpips=alex-random', '--nrr=32', '--device=cpu']


@pytest.fixture(scope='module')
def models(tiny_identity, tmp_path_factory):
    """Paths: the person as a plain pkl, its exact rank-1 adapter, and that adapter halfway."""
    out = tmp_path_factory.mktemp('eval_models')
    G_base = synthetic_identity.build_tiny_generator(0)  # write_identity's defaults: seed 0, rank 1, strength 0.5
    G_person = synthetic_identity.apply_low_rank_change(G_base, seed=1, rank=1, strength=0.5)
    synthetic_identity.save_generator_pkl(G_person, str(out / 'person.pkl'))
    person = G_person.state_dict()
    G = inf.load_generator(tiny_identity / 'base.pkl')
    assert all(torch.equal(v, G_base.state_dict()[k]) for k, v in G.state_dict().items())  # same base as the data
    adapters.inject(G, adapters.AdapterConfig(r=1, conv_factorization='standard'))
    with torch.no_grad():
        for name, layer in adapter_layers(G):
            weight = layer.base_layer.weight
            delta = (person[f'{base_name(name)}.weight'] - weight).reshape(weight.shape[0], -1)
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            layer.lora_A[0] = vh[:1]
            layer.lora_B[0] = u[:, :1] * s[:1] / layer.scaling
    adapters.save(G, str(out / 'truth.safetensors'))
    with torch.no_grad():
        for _, layer in adapter_layers(G):
            layer.lora_B.mul_(0.5)
    adapters.save(G, str(out / 'halfway.safetensors'))
    return out


def run(args):
    return CliRunner().invoke(evaluate.main, [str(a) for a in args])


def test_ground_truth_beats_personalized_beats_base(tiny_identity, models, tmp_path):
    result = run(['--dataset', tiny_identity / 'heldout', '--base', tiny_identity / 'base.pkl',
                  '--adapter', models / 'truth.safetensors', '--adapter', models / 'halfway.safetensors',
                  '--network', models / 'person.pkl', '--novel-yaws=0.3', '--outdir', tmp_path, *FAST])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / 'metrics.json').read_text())['summary']
    assert list(summary) == ['base', 'adapter truth', 'adapter halfway', 'network person']
    mean = {model: {k: v['mean'] for k, v in s.items() if v} for model, s in summary.items()}
    for truth in ('network person', 'adapter truth'):
        assert mean[truth]['psnr'] > mean['adapter halfway']['psnr'] > mean['base']['psnr']
        assert mean[truth]['ssim'] > mean['adapter halfway']['ssim'] > mean['base']['ssim']
        assert mean[truth]['lpips'] < mean['adapter halfway']['lpips'] < mean['base']['lpips']
    # the exact adapter reproduces the person's weights
    assert mean['adapter truth']['psnr'] == pytest.approx(mean['network person']['psnr'], abs=0.05)
    assert 'id' not in mean['base']  # no --id_model: no identity columns

    table = (tmp_path / 'metrics.md').read_text()
    assert '| adapter halfway |' in table and 'PSNR (dB) (higher is better)' in table and 'ID sim.' not in table
    import PIL.Image
    grid = np.asarray(PIL.Image.open(tmp_path / 'comparison.png'))
    assert grid.shape == (2 * 128 + 2, 5 * 128 + 4 * 2, 3)  # 2 images x (photo + 4 models), 2 px gaps
    assert (tmp_path / 'novel_views.png').is_file()


@pytest.fixture(scope='module')
def random_arcface(tmp_path_factory):
    from training.arcface import IRSE50
    path = tmp_path_factory.mktemp('arcface') / 'model_ir_se50.pth'
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(IRSE50().state_dict(), path)
    return path


def _cosine(a, b):
    a, b = a.flatten(1), b.flatten(1)
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).tolist()


def test_identity_similarity_with_arcface_weights(tiny_identity, models, random_arcface, tmp_path):
    result = run(['--dataset', tiny_identity / 'heldout', '--base', tiny_identity / 'base.pkl', '--id_model', random_arcface,
                  '--network', models / 'person.pkl', '--novel-yaws=0.3', '--outdir', tmp_path, *FAST])
    assert result.exit_code == 0, result.output
    per_image = json.loads((tmp_path / 'metrics.json').read_text())['per_image']
    assert len(per_image['base']['id']) == 2 and len(per_image['base']['id_novel']) == 2
    # The base's similarity, recomputed here: its render at each photo's camera (seed 0, 32 px neural
    # rendering) against the photo, through ArcFace on 112 x 112 average-pooled images.
    from training.arcface import IRSE50
    from training.dataset import read_identity
    G = inf.load_generator(tiny_identity / 'base.pkl')
    _, images, cameras, latents = read_identity(str(tiny_identity / 'heldout'), resolution=G.img_resolution,
                                                num_ws=G.backbone.num_ws, w_dim=G.w_dim)
    photos = torch.from_numpy(images).float() / 127.5 - 1
    with torch.no_grad():
        renders = inf.render(G, torch.from_numpy(latents), torch.from_numpy(cameras), 32, seed=0).clamp(-1, 1)
        arcface = IRSE50.load(str(random_arcface), torch.device('cpu'))
        embed = lambda x: arcface(torch.nn.functional.adaptive_avg_pool2d(x, (112, 112)))
        expected = _cosine(embed(renders), embed(photos))
    assert per_image['base']['id'] == pytest.approx(expected, abs=1e-5)
    # The person renders (almost) the photos themselves: more similar than the base, image by image.
    assert all(p > 0.99 and p > b for p, b in zip(per_image['network person']['id'], per_image['base']['id']))
    assert 'ID sim. novel poses' in (tmp_path / 'metrics.md').read_text()


def test_input_errors_before_work(tiny_identity, models, tmp_path):
    base = ['--dataset', tiny_identity / 'heldout', '--outdir', tmp_path / 'o', *FAST]
    result = run(base + ['--base', tiny_identity / 'base.pkl', '--id_model', tmp_path / 'missing.pth'])
    assert result.exit_code == 1 and 'model_ir_se50.pth' in result.output and 'does not exist' in result.output
    (tmp_path / 'junk.pth').write_bytes(b'junk')
    result = run(base + ['--base', tiny_identity / 'base.pkl', '--id_model', tmp_path / 'junk.pth'])
    assert result.exit_code == 1 and 'cannot read' in result.output
    result = run(base + ['--adapter', models / 'truth.safetensors'])
    assert result.exit_code == 1 and '--adapter needs --base' in result.output
    result = run(base)
    assert result.exit_code == 1 and 'nothing to evaluate' in result.output
    other = tmp_path / 'other_base.pkl'
    synthetic_identity.save_generator_pkl(synthetic_identity.build_tiny_generator(seed=7), str(other))
    result = run(base + ['--base', other, '--adapter', models / 'truth.safetensors'])
    assert result.exit_code == 1 and 'different base generator' in result.output
    result = run(['--dataset', tmp_path, '--base', tiny_identity / 'base.pkl', '--outdir', tmp_path / 'o', *FAST])
    assert result.exit_code == 1 and 'dataset.json' in result.output  # no held-out set there
    assert not (tmp_path / 'o').exists()
