"""invert_pti.py: pivotal tuning of the adapters (or, --full, of the whole generator) around a projected pivot."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import invert_pti
import legacy
from training import adapters
from training import inference as inf
from training import synthetic_identity

FAST = ['--lpips=alex-random', '--w-avg-samples=200', '--nrr=16', '--num-views=2', '--device=cpu']


@pytest.fixture(scope='module')
def fresh_adapter(tiny_identity, tmp_path_factory):
    """A freshly injected rank-1 adapter of the base (B = 0: renders exactly like the base)."""
    G = inf.load_generator(tiny_identity / 'base.pkl')
    adapters.inject(G, adapters.AdapterConfig(r=1))
    path = tmp_path_factory.mktemp('pti') / 'fresh.safetensors'
    adapters.save(G, str(path))
    return path


def run(args):
    return CliRunner().invoke(invert_pti.main, [str(a) for a in args])


def test_tuning_changes_only_the_adapters_and_improves_the_fit(tiny_identity, fresh_adapter):
    G = inf.load_generator(tiny_identity / 'base.pkl', [fresh_adapter])
    image = tiny_identity / 'train' / 'image_0.png'
    target = inf.load_image(image, G.img_resolution)
    c = torch.from_numpy(inf.label_for_image(image)).unsqueeze(0)
    pivot = inf.load_latent(tiny_identity / 'train' / 'image_0_latent.npy', G)
    before = {k: v.clone() for k, v in G.state_dict().items()}
    params = invert_pti.tunable_parameters(G, full=False)
    adapter_ids = {id(p) for p in params}
    assert params and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for p in G.parameters() if id(p) not in adapter_ids)

    _, fit_before = invert_pti.fit_metrics(G, pivot, target, c, None, 1.0, 16, 0)
    losses = invert_pti.pivotal_tuning(G, params, pivot, target, c, num_steps=5, learning_rate=0.01,
                                       neural_rendering_resolution=16, progress=False)
    _, fit_after = invert_pti.fit_metrics(G, pivot, target, c, None, 1.0, 16, 0)
    assert len(losses) == 5 and fit_after['loss'] < fit_before['loss']

    changed = {k for k, v in G.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all('lora_' in k for k in changed)


def test_full_tuning_unfreezes_every_weight(tiny_identity):
    G = inf.load_generator(tiny_identity / 'base.pkl')
    params = invert_pti.tunable_parameters(G, full=True)
    assert len(params) == len(list(G.parameters())) and all(p.requires_grad for p in G.parameters())


def test_cli_adapter_mode_writes_latent_adapter_render_and_report(tiny_identity, fresh_adapter, tmp_path):
    result = run(['--network', tiny_identity / 'base.pkl', '--adapter', fresh_adapter,
                  '--target', tiny_identity / 'train' / 'image_1.png', '--outdir', tmp_path,
                  '--num-steps=2', '--pti-steps=3', '--pti-lr=0.01', *FAST])
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / 'image_1_latent.npy').shape == (1, 14, 512)
    report = json.loads((tmp_path / 'image_1_pti.json').read_text())
    assert report['mode'] == 'adapter' and len(report['losses']) == 3
    assert report['after']['loss'] < report['before']['loss']
    assert (tmp_path / 'image_1_pti.png').is_file()
    tuned = tmp_path / 'image_1_pti_adapter.safetensors'
    G = inf.load_generator(tiny_identity / 'base.pkl', [tuned])  # loads back onto the same base
    assert inf.num_adapters(G) == 1


def test_cli_full_mode_writes_a_plain_tuned_snapshot(tiny_identity, tmp_path):
    result = run(['--network', tiny_identity / 'base.pkl', '--full', '--target', tiny_identity / 'train' / 'image_2.png',
                  '--latent', tiny_identity / 'train' / 'image_2_latent.npy', '--outdir', tmp_path,
                  '--pti-steps=2', '--pti-lr=0.01', *FAST])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / 'image_2_latent.npy').exists()  # the given pivot is not copied
    tuned = legacy.load_network_pkl(tmp_path / 'image_2_pti.pkl')['G_ema']
    base = inf.load_generator(tiny_identity / 'base.pkl')
    assert not adapters.is_injected(tuned)
    diffs = [k for k, v in base.state_dict().items() if not torch.equal(v, tuned.state_dict()[k])]
    assert any(k.startswith('backbone.synthesis') for k in diffs)


def test_cli_errors_before_work(tiny_identity, fresh_adapter, tmp_path):
    target = tiny_identity / 'train' / 'image_0.png'
    result = run(['--network', tiny_identity / 'base.pkl', '--target', target, '--outdir', tmp_path, *FAST])
    assert result.exit_code == 1 and 'carries no adapters' in result.output

    other = tmp_path / 'other_base.pkl'
    synthetic_identity.save_generator_pkl(synthetic_identity.build_tiny_generator(seed=7), str(other))
    result = run(['--network', other, '--adapter', fresh_adapter, '--target', target, '--outdir', tmp_path, *FAST])
    assert result.exit_code == 1 and 'different base generator' in result.output

    np.save(tmp_path / 'bad_latent.npy', np.zeros((1, 9, 512), np.float32))
    result = run(['--network', tiny_identity / 'base.pkl', '--adapter', fresh_adapter, '--target', target,
                  '--latent', tmp_path / 'bad_latent.npy', '--outdir', tmp_path, *FAST])
    assert result.exit_code == 1 and '[1, 14, 512]' in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ['bad_latent.npy', 'other_base.pkl']


def test_encoder_gives_the_pivot(tiny_identity, fresh_adapter, tmp_path):
    from training.encoder import EncoderConfig, W3DEncoder, encode, save
    G = inf.load_generator(tiny_identity / 'base.pkl')
    torch.manual_seed(0)
    encoder = W3DEncoder(EncoderConfig.for_generator(inf.num_ws(G), G.w_dim, G.img_resolution))
    with torch.no_grad():
        for head in encoder.heads:
            head.linear.weight.normal_(0, 0.02)
    w_avg = G.backbone.mapping.w_avg.repeat(inf.num_ws(G), 1)
    path = tmp_path / 'encoder.safetensors'
    save(str(path), encoder, w_avg, G, training={'iters': 2})
    image = tiny_identity / 'heldout' / 'image_1.png'
    result = run(['--network', tiny_identity / 'base.pkl', '--adapter', fresh_adapter, '--target', image,
                  '--outdir', tmp_path / 'out', '--encoder', path, '--num-steps=0', '--latent-space=w_plus',
                  '--pti-steps=1', '--no-encoder-guard', *FAST])
    assert result.exit_code == 0, result.output
    c = torch.from_numpy(inf.label_for_image(image)).unsqueeze(0)
    expected = encode(G, encoder.eval(), w_avg, inf.load_image(image, G.img_resolution), c, 2, 16, guard=False)[-1].ws
    written = np.load(tmp_path / 'out' / 'image_1_latent.npy')
    assert np.allclose(written, expected.numpy(), atol=1e-5)
    assert not np.allclose(written, w_avg.numpy()[None])
