"""train_encoder.py: the encoder's command line (resume, input checks before work)."""
import json
import shutil

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

import train_encoder
from training import synthetic_identity as si
from training.encoder.training_loop import training_loop

FAST = ['--batch=1', '--iters=2', '--lpips=none', '--nrr=16', '--replay=1', '--device=cpu', '--progress=False']


def run(args):
    return CliRunner().invoke(train_encoder.main, [str(a) for a in args])


def encoder_files(outdir):
    return sorted(outdir.glob('*/encoder-*.safetensors'))


def test_resume_equals_an_uninterrupted_run(tiny_identity, tmp_path):
    base = tiny_identity / 'base.pkl'
    whole = run(['--network', base, '--outdir', tmp_path / 'whole', '--kimg=0.002', *FAST])
    assert whole.exit_code == 0, whole.output
    first = run(['--network', base, '--outdir', tmp_path / 'parts', '--kimg=0.001', *FAST])
    assert first.exit_code == 0, first.output
    half, = encoder_files(tmp_path / 'parts')
    assert half.name == 'encoder-000000.001.safetensors'
    second = run(['--network', base, '--outdir', tmp_path / 'parts', '--kimg=0.002', '--resume', half, *FAST])
    assert second.exit_code == 0, second.output
    expected, = encoder_files(tmp_path / 'whole')
    resumed = encoder_files(tmp_path / 'parts')[-1]
    assert resumed.name == expected.name == 'encoder-000000.002.safetensors'
    a, b = load_file(str(expected)), load_file(str(resumed))
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    assert not all(np.array_equal(a[k].numpy(), load_file(str(half))[k].numpy()) for k in a)  # it did train
    log = (resumed.parent / 'log.txt').read_text()
    assert 'Restored optimizer state' in log
    assert 'by heart' not in log  # --replay=1 with 2 iterations: a third of a draw per example


def test_replay_defaults_to_four_thirds_draws_and_a_resumed_run_keeps_its_own(tiny_identity, tmp_path):
    base = tiny_identity / 'base.pkl'
    no_replay = [a for a in FAST if not a.startswith('--replay')]   # 2 iterations: 4 * 3 // 3 = 4 updates
    fresh = run(['--network', base, '--outdir', tmp_path / 'fresh', '--kimg=0.001', *no_replay])
    assert fresh.exit_code == 0, fresh.output
    options, = (tmp_path / 'fresh').glob('*/training_options.json')
    assert json.loads(options.read_text())['replay'] == 4

    first = run(['--network', base, '--outdir', tmp_path / 'runs', '--kimg=0.001', *FAST])   # --replay=1
    assert first.exit_code == 0, first.output
    half, = encoder_files(tmp_path / 'runs')
    resumed = run(['--network', base, '--outdir', tmp_path / 'runs', '--kimg=0.002', '--resume', half, *no_replay])
    assert resumed.exit_code == 0, resumed.output
    runs = sorted((tmp_path / 'runs').glob('*/training_options.json'))
    assert [json.loads(p.read_text())['replay'] for p in runs] == [1, 1]


def write_bad_folder(folder, base_pkl):
    shutil.copytree(base_pkl.parent / 'train', folder)
    PIL.Image.new('RGB', (64, 64)).save(folder / 'image_0.png')
    PIL.Image.new('RGB', (128, 128)).save(folder / 'unlabelled.png')


def test_bad_data_names_the_files_before_any_work(tiny_identity, tmp_path):
    folder = tmp_path / 'photos'
    write_bad_folder(folder, tiny_identity / 'base.pkl')
    result = run(['--network', tiny_identity / 'base.pkl', '--outdir', tmp_path / 'runs', '--kimg=0.002',
                  '--data', folder, *FAST])
    assert result.exit_code == 1
    assert f'{folder / "image_0.png"}: image is 64x64' in result.output
    assert f'{folder / "unlabelled.png"}: no camera label' in result.output
    assert not (tmp_path / 'runs').exists()


def test_resume_from_an_encoder_of_another_base_is_refused(tiny_identity, tmp_path):
    from training.encoder import W3DEncoder, EncoderConfig, save
    G = si.build_tiny_generator(1)
    path = tmp_path / 'encoder-000001.safetensors'
    save(str(path), W3DEncoder(EncoderConfig.for_generator(14, 512, 128)), G.backbone.mapping.w_avg.repeat(14, 1), G)
    result = run(['--network', tiny_identity / 'base.pkl', '--outdir', tmp_path / 'runs', '--kimg=0.002',
                  '--resume', path, *FAST])
    assert result.exit_code == 1
    assert 'trained on a different generator' in result.output and str(path) in result.output
    assert not (tmp_path / 'runs').exists()


def test_latent_only_sets_the_latent_loss_alone(tiny_identity, tmp_path, monkeypatch):
    captured = {}
    monkeypatch.setattr(train_encoder, 'launch', lambda c, outdir, desc: captured.update(c=c))
    result = run(['--network', tiny_identity / 'base.pkl', '--outdir', tmp_path / 'runs', '--kimg=0.002',
                  '--latent-only', *FAST])
    assert result.exit_code == 0, result.output
    assert captured['c'].loss_weights == dict(image=0.0, lpips=0.0, id=0.0, latent=1.0, mirror=0.0,
                                              converged=1.0)


def test_latent_only_refuses_photos_without_latents(tiny_identity, tmp_path):
    folder = tmp_path / 'photos'
    shutil.copytree(tiny_identity / 'train', folder)
    for latent in folder.glob('*_latent.npy'):
        latent.unlink()
    result = run(['--network', tiny_identity / 'base.pkl', '--outdir', tmp_path / 'runs', '--kimg=0.002',
                  '--data', folder, '--latent-only', *FAST])
    assert result.exit_code == 1
    assert '--latent-only' in result.output and 'image_N_latent.npy' in result.output
    assert not (tmp_path / 'runs').exists()


def test_an_unknown_training_option_is_an_error(tmp_path):
    """A misspelt option fails before any work (it was silently dropped), as train.py's options do."""
    with pytest.raises(TypeError, match="unexpected keyword argument 'kimg'"):
        training_loop(run_dir=str(tmp_path), network_pkl='never-read.pkl', kimg=1, device='cpu')
    assert not (tmp_path / 'log.txt').exists()


def test_a_replay_that_memorizes_is_warned_about(tiny_identity, tmp_path):
    memorizing = [a for a in FAST if not a.startswith('--replay')] + ['--replay=7']  # 7 / (2 + 1) draws per example
    result = run(['--network', tiny_identity / 'base.pkl', '--outdir', tmp_path / 'runs', '--kimg=0.001', *memorizing])
    assert result.exit_code == 0, result.output
    log, = (tmp_path / 'runs').glob('*/log.txt')
    assert 'draws each stored example about 2.3 times' in log.read_text()
    assert 'Use --replay=6 or less' in log.read_text()


def test_backbone_options_are_checked_before_work_and_resnet34_trains_from_the_weights(tiny_identity, tmp_path):
    import torch
    import torchvision
    from training.encoder import load
    from training.inference import load_generator
    base = tiny_identity / 'base.pkl'
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / 'resnet34.pth')
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / 'resnet18.pth')
    refusals = {
        '--backbone=resnet34 starts from ImageNet weights': ['--backbone=resnet34'],
        '--backbone-weights needs --backbone=resnet34': ['--backbone-weights', tmp_path / 'resnet34.pth'],
        f'--backbone-weights: {tmp_path / "resnet18.pth"}: not a ResNet-34 checkpoint':
            ['--backbone=resnet34', '--backbone-weights', tmp_path / 'resnet18.pth'],
        '--resume continues the backbone in its encoder file':
            ['--resume', tmp_path / 'any.safetensors', '--backbone=resnet34'],
    }
    for message, flags in refusals.items():
        result = run(['--network', base, '--outdir', tmp_path / 'refused', '--kimg=0.001', *flags, *FAST])
        assert result.exit_code == 1 and message in result.output, result.output
    assert not (tmp_path / 'refused').exists()

    result = run(['--network', base, '--outdir', tmp_path / 'runs', '--kimg=0.001', '--backbone=resnet34',
                  '--backbone-weights', tmp_path / 'resnet34.pth', *FAST])
    assert result.exit_code == 0, result.output
    path, = encoder_files(tmp_path / 'runs')
    encoder, _, _ = load(str(path), load_generator(base))
    assert encoder.config.backbone == 'resnet34'
    imagenet = torch.load(tmp_path / 'resnet34.pth', weights_only=True)['layer3.0.conv1.weight']
    trained = encoder.stages[2][0].conv1.weight
    assert 0 < float((trained - imagenet).abs().max()) < 0.01    # started from the file, then trained a step
    assert 'ImageNet ResNet-34 weights' in (path.parent / 'log.txt').read_text()
