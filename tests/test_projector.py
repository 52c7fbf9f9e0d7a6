"""projector.py: inverting aligned images with known cameras into W / W+."""
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import projector
from training import inference as inf
from training import synthetic_identity

FAST = ['--lpips=alex-random', '--w-avg-samples=200', '--nrr=16', '--device=cpu']


def run(args):
    return CliRunner().invoke(projector.main, [str(a) for a in args])


def test_projection_recovers_a_reachable_target_and_returns_w_plus_shape():
    """The target is the base's own render of a latent near w_avg, so W can reach it: 6 steps must
    cut the MSE to under a third (measured: a sixth), and the reported loss is the returned latent's."""
    G = synthetic_identity.build_tiny_generator(0).eval().requires_grad_(False)
    c = torch.from_numpy(synthetic_identity.camera_labels(1, seed=0))
    w_avg, _ = projector.w_statistics(G, c, 200)
    w_true = w_avg + 0.5 * torch.randn(w_avg.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        target = inf.render(G, w_true.expand(1, 14, -1), c, 16, seed=0)
    result = projector.project(G, target, c, num_steps=6, latent_space='w', w_avg_samples=200,
                               initial_learning_rate=0.05, neural_rendering_resolution=16, progress=False)
    assert result.ws.shape == (1, 14, 512)
    assert torch.equal(result.ws[:, 0], result.ws[:, 13])  # W: one vector shared by every layer
    assert len(result.losses) == 6
    assert result.final_loss < result.initial_loss / 3
    with torch.no_grad():
        start = (inf.render(G, w_avg.expand(1, 14, -1), c, 16, seed=0) - target).square().mean()
        final = (inf.render(G, result.ws, c, 16, seed=0) - target).square().mean()
    assert result.initial_loss == pytest.approx(float(start), rel=1e-5)
    assert result.final_loss == pytest.approx(float(final), rel=1e-5)
    assert not any(p.requires_grad for p in G.parameters())


def test_settings_follow_the_start():
    """From w_avg the EG3D projector (Adam, noise ramp); from a given start (the encoder's estimate) L-BFGS, and Adam
    there without w noise."""
    G = synthetic_identity.build_tiny_generator(0).eval().requires_grad_(False)
    c = torch.from_numpy(synthetic_identity.camera_labels(1, seed=0))
    target = torch.zeros(1, 3, G.img_resolution, G.img_resolution)
    w_init = torch.randn(1, 14, 512, generator=torch.Generator().manual_seed(1))

    def ws(**kwargs):
        return projector.project(G, target, c, num_steps=3, latent_space='w_plus', w_avg_samples=200,
                                 neural_rendering_resolution=16, progress=False, **kwargs).ws
    assert projector.resolve_settings(None, False, None, None) == ('adam', 0.01, 0.05)
    assert projector.resolve_settings(None, True, None, None) == ('lbfgs', projector.LBFGS_LEARNING_RATE, 0.0)
    assert projector.resolve_settings('adam', True, None, None) == ('adam', *projector.ENCODER_START)
    assert projector.ENCODER_START[1] == 0
    assert torch.equal(ws(), ws(optimizer='adam', initial_learning_rate=0.01, initial_noise_factor=0.05))
    from_encoder = ws(w_init=w_init)
    assert torch.equal(from_encoder, ws(w_init=w_init, optimizer='lbfgs', initial_learning_rate=1.0))
    adam = ws(w_init=w_init, optimizer='adam')
    assert torch.equal(adam, ws(w_init=w_init, optimizer='adam', initial_learning_rate=projector.ENCODER_START[0],
                                initial_noise_factor=0.0))
    assert not torch.equal(from_encoder, adam)
    assert not torch.equal(adam, ws(w_init=w_init, optimizer='adam', initial_noise_factor=0.05))
    with pytest.raises(ValueError, match='deterministic'):
        projector.resolve_settings('lbfgs', True, None, 0.05)
    with pytest.raises(ValueError, match='adam, lbfgs'):
        projector.resolve_settings('sgd', False, None, None)


def reachable_target(G, c):
    """(w_avg start [1, 14, 512], a target the base renders from a W+ latent near it)."""
    w_avg, _ = projector.w_statistics(G, c, 200)
    w_true = w_avg + 0.5 * torch.randn((1, 14, 512), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return w_avg.repeat(1, 14, 1), inf.render(G, w_true, c, 16, seed=0)


def test_lbfgs_spends_exactly_its_passes_and_returns_the_best_point(monkeypatch):
    """`num_steps` counts generator passes: L-BFGS stops inside a line search when they are spent, and the latent it
    returns is the best it evaluated (on its render seed), not the last trial point."""
    G = synthetic_identity.build_tiny_generator(0).eval().requires_grad_(False)
    c = torch.from_numpy(synthetic_identity.camera_labels(1, seed=0))
    start, target = reachable_target(G, c)
    renders = []
    render = inf.render
    monkeypatch.setattr(inf, 'render', lambda *args, **kwargs: renders.append(1) or render(*args, **kwargs))
    for num_steps in (1, 4, 7):
        renders.clear()
        result = projector.project(G, target, c, num_steps=num_steps, latent_space='w_plus', w_init=start,
                                   neural_rendering_resolution=16, progress=False)
        assert len(result.losses) == num_steps and len(renders) == num_steps + 2   # + the start's and the result's
        with torch.no_grad():
            at_result = float((render(G, result.ws, c, 16, seed=1) - target).square().mean())
        assert at_result == pytest.approx(min(result.losses), rel=1e-5)
        if num_steps == 1:   # the first pass evaluates the start
            assert torch.equal(result.ws, start)
        else:
            assert min(result.losses) < result.losses[0] and result.final_loss < result.initial_loss
    for optimizer in projector.OPTIMIZERS:   # no pass at all: the start comes back
        for w_init in (start, None):
            result = projector.project(G, target, c, num_steps=0, w_init=w_init, optimizer=optimizer,
                                       neural_rendering_resolution=16, latent_space='w_plus', w_avg_samples=200,
                                       progress=False)
            assert result.losses == [] and result.final_loss == result.initial_loss
    assert torch.equal(result.ws, start)


def test_lbfgs_fits_further_than_adam_in_the_same_passes():
    """The reason L-BFGS is the encoder start's default, in small: 12 passes from the same start."""
    G = synthetic_identity.build_tiny_generator(0).eval().requires_grad_(False)
    c = torch.from_numpy(synthetic_identity.camera_labels(1, seed=0))
    start, target = reachable_target(G, c)
    final = {name: projector.project(G, target, c, num_steps=12, latent_space='w_plus', w_init=start, optimizer=name,
                                     neural_rendering_resolution=16, progress=False).final_loss
             for name in projector.OPTIMIZERS}
    assert final['lbfgs'] < final['adam'] / 2, final


def test_an_encoder_start_without_noise_samples_no_w_statistics(monkeypatch):
    """Only the w_avg start and the noise ramp read w_avg / w_std: the encoder start skips the mapping samples."""
    G = synthetic_identity.build_tiny_generator(0).eval().requires_grad_(False)
    c = torch.from_numpy(synthetic_identity.camera_labels(1, seed=0))
    target = torch.zeros(1, 3, G.img_resolution, G.img_resolution)
    w_init = torch.randn(1, 14, 512, generator=torch.Generator().manual_seed(1))
    calls = []
    sample = projector.w_statistics
    monkeypatch.setattr(projector, 'w_statistics', lambda *args, **kwargs: calls.append(1) or sample(*args, **kwargs))

    def project(**kwargs):
        return projector.project(G, target, c, num_steps=2, latent_space='w_plus', w_avg_samples=200,
                                 neural_rendering_resolution=16, progress=False, **kwargs)
    result = project(w_init=w_init)
    assert calls == [] and result.final_loss < result.initial_loss
    project(w_init=w_init, optimizer='adam', initial_noise_factor=0.05)
    project()
    assert calls == [1, 1]


def test_learning_rate_schedule_ramps_up_and_down():
    lrs = [projector.learning_rate(i, 100, 0.01, 0.05, 0.25) for i in range(100)]
    assert lrs[0] == 0 and max(lrs) == pytest.approx(0.01)
    assert lrs[2] < lrs[5] and lrs[99] < lrs[80]


def test_cli_writes_latent_in_dataset_format_and_refuses_overwrite(tiny_identity, tmp_path):
    out = tmp_path / 'out'
    args = ['--network', tiny_identity / 'base.pkl', '--target', tiny_identity / 'train' / 'image_1.png', '--outdir', out,
            '--num-steps=2', *FAST]
    result = run(args)
    assert result.exit_code == 0, result.output
    latent = np.load(out / 'image_1_latent.npy')
    assert latent.shape == (1, 14, 512) and latent.dtype == np.float32
    assert (out / 'image_1_projection.png').is_file()
    again = run(args)
    assert again.exit_code == 1 and '--overwrite' in again.output
    assert np.array_equal(np.load(out / 'image_1_latent.npy'), latent)
    assert run(args + ['--overwrite', '--latent-space=w_plus']).exit_code == 0


def test_cli_dataset_mode_projects_only_images_without_latents(tiny_identity, tmp_path):
    folder = tmp_path / 'selfies'
    shutil.copytree(tiny_identity / 'train', folder)
    (folder / 'image_2_latent.npy').unlink()
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob('*_latent.npy')}
    result = run(['--network', tiny_identity / 'base.pkl', '--dataset', folder, '--num-steps=1', *FAST])
    assert result.exit_code == 0, result.output
    assert np.load(folder / 'image_2_latent.npy').shape == (1, 14, 512)
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob('*_latent.npy') if p.name in before} == before
    assert 'image_2.png' in result.output and 'image_0.png' not in result.output
    done = run(['--network', tiny_identity / 'base.pkl', '--dataset', folder, *FAST])
    assert done.exit_code == 0 and 'already has a latent' in done.output


def test_cli_missing_camera_label_is_a_clear_error(tiny_identity, tmp_path):
    folder = tmp_path / 'nolabel'
    folder.mkdir()
    shutil.copy(tiny_identity / 'train' / 'image_0.png', folder / 'photo.png')
    (folder / 'dataset.json').write_text(json.dumps({'labels': []}))
    result = run(['--network', tiny_identity / 'base.pkl', '--target', folder / 'photo.png', '--outdir', tmp_path, *FAST])
    assert result.exit_code == 1
    assert 'no "labels"' in result.output or 'no camera label' in result.output
    (folder / 'dataset.json').unlink()
    result = run(['--network', tiny_identity / 'base.pkl', '--dataset', folder, *FAST])
    assert result.exit_code == 1 and 'dataset.json' in result.output


def test_cli_input_errors_come_before_work(tiny_identity, tmp_path):
    result = run(['--network', tmp_path / 'missing.pkl', '--target', tiny_identity / 'train' / 'image_0.png',
                  '--outdir', tmp_path, *FAST])
    assert result.exit_code == 1 and 'Network pickle not found' in result.output
    result = run(['--network', tiny_identity / 'base.pkl', '--outdir', tmp_path, *FAST])
    assert result.exit_code == 1 and 'exactly one of --target' in result.output
    result = run(['--network', tiny_identity / 'base.pkl', '--target', tiny_identity / 'train' / 'image_0.png',
                  '--adapter', tmp_path / 'missing.safetensors', '--outdir', tmp_path, *FAST])
    assert result.exit_code == 1 and 'Adapter file not found' in result.output
    assert not list(tmp_path.glob('*_latent.npy'))


def encoder_file(G, path, seed=0):
    """An encoder for G with random (non-zero) heads, saved as train_encoder.py does."""
    from training.encoder import EncoderConfig, W3DEncoder, save
    torch.manual_seed(seed)
    encoder = W3DEncoder(EncoderConfig.for_generator(inf.num_ws(G), G.w_dim, G.img_resolution))
    with torch.no_grad():
        for head in encoder.heads:
            head.linear.weight.normal_(0, 0.02)
    save(str(path), encoder, G.backbone.mapping.w_avg.repeat(inf.num_ws(G), 1), G,
         training={'iters': 2, 'neural_rendering_resolution': 16})
    return path


def test_cli_encoder_only_writes_the_encoder_estimate(tiny_identity, tmp_path):
    from training.encoder import encode, load
    G = inf.load_generator(tiny_identity / 'base.pkl')
    path = encoder_file(G, tmp_path / 'encoder-000001.safetensors')
    image = tiny_identity / 'heldout' / 'image_0.png'
    encoder, w_avg, _ = load(str(path), G)
    c = torch.from_numpy(inf.label_for_image(image)).unsqueeze(0)  # the camera of dataset.json beside the image
    target = inf.load_image(image, G.img_resolution)
    for guard, flags in ((False, ['--no-encoder-guard']), (True, [])):
        result = run(['--network', tiny_identity / 'base.pkl', '--target', image, '--outdir', tmp_path / f'out{guard}',
                      '--encoder', path, '--num-steps=0', '--latent-space=w_plus', '--lpips=none',
                      '--w-avg-samples=200', '--device=cpu', *flags])
        assert result.exit_code == 0, result.output
        assert 'encoder (2 iterations)' in result.output
        written = np.load(tmp_path / f'out{guard}' / 'image_0_latent.npy')
        expected = encode(G, encoder, w_avg, target, c, 2, 16, guard=guard)[-1].ws
        assert np.allclose(written, expected.numpy(), atol=1e-5)
        if not guard:
            assert not np.allclose(written, w_avg.numpy()[None])  # the raw residuals of the random heads move it
    with torch.no_grad():
        error = [float((inf.render(G, torch.from_numpy(np.load(tmp_path / f'out{guard}' / 'image_0_latent.npy')), c,
                                   16, seed=0) - target).square().mean()) for guard in (False, True)]
        start = float((inf.render(G, w_avg[None], c, 16, seed=0) - target).square().mean())
    assert error[1] <= min(error[0], start)                                 # the guarded estimate is never worse


def test_cli_encoder_of_another_generator_is_refused(tiny_identity, tmp_path):
    from training.synthetic_identity import build_tiny_generator
    path = encoder_file(build_tiny_generator(7), tmp_path / 'other.safetensors')
    result = run(['--network', tiny_identity / 'base.pkl', '--target', tiny_identity / 'heldout' / 'image_1.png',
                  '--outdir', tmp_path / 'out', '--encoder', path, '--num-steps=0', '--lpips=none', '--device=cpu'])
    assert result.exit_code == 1
    assert 'trained on a different generator' in result.output and 'other.safetensors' in result.output
    assert not (tmp_path / 'out' / 'image_1_latent.npy').exists()


def test_cli_encoder_start_optimizers(tiny_identity, tmp_path):
    """With --encoder: L-BFGS by default, Adam on request; the w noise with L-BFGS is refused before any work."""
    G = inf.load_generator(tiny_identity / 'base.pkl')
    path = encoder_file(G, tmp_path / 'encoder-000001.safetensors')
    args = ['--network', tiny_identity / 'base.pkl', '--target', tiny_identity / 'heldout' / 'image_0.png',
            '--encoder', path, '--num-steps=3', '--latent-space=w_plus', '--lpips=none', '--w-avg-samples=200',
            '--device=cpu']
    refused = run(args + ['--outdir', tmp_path / 'noise', '--noise-factor=0.05'])
    assert refused.exit_code == 1 and '--noise-factor=0.05 needs --optimizer=adam' in refused.output
    assert not (tmp_path / 'noise').exists()
    for name, flags in (('lbfgs', []), ('adam', ['--optimizer=adam', '--noise-factor=0.05'])):
        result = run(args + ['--outdir', tmp_path / name, *flags])
        assert result.exit_code == 0, result.output
        assert f'3 {name} steps' in result.output
    assert not np.array_equal(np.load(tmp_path / 'lbfgs' / 'image_0_latent.npy'),
                              np.load(tmp_path / 'adam' / 'image_0_latent.npy'))
