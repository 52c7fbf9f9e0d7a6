"""train.py: the users' command line, input checks, and an end-to-end personalization on a synthetic identity."""
import json
import os
import shutil
import urllib.error

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import legacy
import train
from training import adapters
from training import synthetic_identity as si
from training.recipe import DEFAULT_RECIPE, RECIPES
from training.dataset import read_identity

USER_COMMAND = ('--outdir={outdir} --data={data} --resume={resume} --cfg=ffhq --batch=4 --gpus=4 --snap=5 --kimg=500 '
                '--lora=1 --lora_alpha=1 --adalora=False --freeze_render=False')
TINY = ['--cfg=resume', '--device=cpu', '--lpips=none', '--neural_rendering_resolution_initial=32', '--progress=False']


@pytest.fixture(scope='module')
def identity(tmp_path_factory):
    return si.ensure_identity(str(tmp_path_factory.getbasetemp() / 'synthetic-identity-4'), views=4, heldout=0,
                              strength=0.3)


def _invoke(args, monkeypatch=None, capture=None):
    if capture is not None:
        monkeypatch.setattr(train, 'launch_training', lambda c, desc, outdir, dry_run: capture.update(c=c, desc=desc))
    return CliRunner().invoke(train.main, args, catch_exceptions=False)


def test_the_users_command_parses_exactly_as_written(identity, tmp_path, monkeypatch):
    # The real command uses --lpips=alex (the default); offline here, so the LPIPS check is stubbed.
    monkeypatch.setattr('training.loss.make_lpips', lambda net, device: None)
    captured = {}
    args = USER_COMMAND.format(outdir=tmp_path, data=identity.train, resume=identity.base_pkl).split()
    result = _invoke(args, monkeypatch, captured)
    assert result.exit_code == 0, result.output
    c = captured['c']
    assert c.num_gpus == 4 and c.batch_size == 4 and c.batch_gpu == 1 and c.total_kimg == 500
    assert c.network_snapshot_ticks == 5 and c.cfg == 'ffhq' and c.freeze_render is False
    assert c.adapter_config['r'] == 1 and c.adapter_config['alpha'] == 1 and c.adapter_config['adalora'] is False
    assert c.adapter_config['targets'] == ['synthesis', 'superresolution']
    assert c.loss_kwargs.lpips_net == 'alex' and c.recipe == RECIPES[DEFAULT_RECIPE].to_dict()
    assert c.val_views is None and c.val_data is None and c.early_stop is None
    assert c.allow_tf32 is False  # official numerics unless asked
    assert captured['desc'] == 'ffhq-train-gpus4-batch4-lora1'


def test_my3dgen_recipe_reproduces_the_papers_optimizer_settings(identity, tmp_path, monkeypatch):
    captured = {}
    result = _invoke([f'--outdir={tmp_path}', f'--data={identity.train}', f'--resume={identity.base_pkl}', '--lora=1',
                      '--recipe=my3dgen'] + TINY, monkeypatch, captured)
    assert result.exit_code == 0, result.output
    c = captured['c']
    assert c.G_opt_kwargs == dict(class_name='torch.optim.Adam', lr=0.0025, betas=[0.0, 0.99], eps=1e-8)
    assert c.recipe == dict(name='my3dgen', lr=0.0025, betas=[0.0, 0.99], eps=1e-8, warmup=0.0, decay='constant',
                            final_lr=1.0, b_lr_ratio=1.0, grad_clip=None, ema_half_life=None, ema_rampup=None,
                            init='random', init_passes=2, optimizer='adam',  # PEFT's random A, B = 0; passes unused
                            a_fan_in_exponent=0.0, b_fan_in_exponent=0.0, riemannian_reg=None, step_search=None,
                            images_per_step=None)  # a step per batch, as in EG3D


@pytest.mark.parametrize('name, optimizer_class, check, printed', [
    ('adapter-sf', 'training.schedule_free.ScheduleFreeAdam',
     lambda r: r['optimizer'] == 'schedulefree' and r['ema_half_life'] is None,
     'Recipe:              adapter-sf (schedule-free Adam lr 0.02'),
    ('adapter-search', 'torch.optim.Adam', lambda r: r['step_search'] == 2.0,
     'cosine rate, EMA half-life 0.05 of the run, step search up to 2x)'),
    ('adapter-per-image', 'torch.optim.Adam', lambda r: r['step_search'] == 2.0 and r['images_per_step'] == 1,
     'Optimizer step:      1 images (1 per pass): recipe adapter-per-image takes 1 image(s) of each identity'),
])
def test_named_recipes_are_recorded_with_their_optimizer_and_printed(identity, tmp_path, monkeypatch, capsys, name,
                                                                    optimizer_class, check, printed):
    captured = {}
    result = _invoke([f'--outdir={tmp_path}', f'--data={identity.train}', f'--resume={identity.base_pkl}', '--lora=1',
                      f'--recipe={name}'] + TINY, monkeypatch, captured)
    assert result.exit_code == 0, result.output
    c = captured['c']
    assert c.G_opt_kwargs['class_name'] == optimizer_class and c.recipe['name'] == name and check(c.recipe)
    train.print_options(c)
    assert printed in capsys.readouterr().out


@pytest.mark.parametrize('flags, check', [
    ([], lambda c: c.adapter_config is None and c.mode == 'full'),
    (['--lora=2', '--adalora=True', '--kimg=0.2'],
     lambda c: c.adapter_config['adalora'] and c.adapter_config['target_r'] == 2 and c.adapter_config['init_r'] == 4
     and c.adapter_config['total_step'] == 200),  # 200 images in the default recipe's steps of one image
    (['--lora=1', '--lora_targets=synthesis,decoder', '--lora_extras=my3dgen', '--conv_factorization=standard',
      '--lora_dropout=0.1'],
     lambda c: c.adapter_config['targets'] == ['synthesis', 'decoder'] and c.adapter_config['extras'] == 'my3dgen'
     and c.adapter_config['conv_factorization'] == 'standard' and c.adapter_config['dropout'] == 0.1),
    (['--kimg=0.02', '--tick=0.004', '--batch=2', '--batch-gpu=1', '--glr=0.01', '--betas=0.5,0.9', '--seed=3',
      '--mirror=true', '--density_reg=0', '--density_reg_every=8', '--g_num_fp16_res=2', '--sr_num_fp16_res=4',
      '--nobench=1', '--workers=3', '--metrics=none', '--desc=x', '--lpips=alex-random', '--allow-tf32=true'],
     lambda c: c.total_kimg == 0.02 and c.kimg_per_tick == 0.004 and c.batch_gpu == 1 and c.G_opt_kwargs.lr == 0.01
     and c.G_opt_kwargs.betas == [0.5, 0.9] and c.random_seed == 3 and c.training_set_kwargs.xflip
     and c.training_set_kwargs.max_size == 8 and c.loss_kwargs.density_reg == 0
     and c.density_reg_every == 8 and c.g_num_fp16_res == 2 and c.sr_num_fp16_res == 4
     and c.cudnn_benchmark is False and c.loss_kwargs.lpips_net == 'alex-random' and c.allow_tf32 is True),
])
def test_options(identity, tmp_path, monkeypatch, flags, check):
    captured = {}
    result = _invoke([f'--outdir={tmp_path}', f'--data={identity.train}', f'--resume={identity.base_pkl}'] + TINY + flags,
                     monkeypatch, captured)
    assert result.exit_code == 0, result.output
    assert check(captured['c'])


def test_dry_run_checks_and_writes_nothing(identity, tmp_path):
    result = _invoke([f'--outdir={tmp_path / "runs"}', f'--data={identity.train}', f'--resume={identity.base_pkl}',
                      '--lora=1', '--dry-run'] + TINY)
    assert result.exit_code == 0, result.output
    assert 'Dry run; exiting.' in result.output and not (tmp_path / 'runs').exists()


@pytest.mark.parametrize('flags, message', [
    (['--metrics=fid50k_full'], 'no metric implementations'),
    (['--id_regularization=True'], '--id_model=<path to model_ir_se50.pth>'),
    (['--sym_regularization=True'], '--id_model=<path to model_ir_se50.pth>'),
    (['--id_regularization=True', '--id_model=/nonexistent/model_ir_se50.pth'], "'/nonexistent/model_ir_se50.pth' does not exist"),
    (['--lora=1', '--freeze_render=True', '--lora_targets=synthesis,decoder'], '--freeze_render=True freezes the decoder'),
    (['--adalora=True'], '--adalora=True needs --lora'),
    (['--batch=3', '--gpus=2'], '--batch must be a multiple of --gpus'),
    (['--batch=4', '--batch-gpu=3'], '--batch must be a multiple of --gpus times --batch-gpu'),
    (['--lora=1', '--lora_targets=synthesis,eyes'], 'adapter options'),
    (['--val-views=4'], '--val-views=4 would leave none for training'),
    (['--val-views=1', '--val-data=/x'], '--val-data names the validation views'),
    (['--early-stop=3'], '--early-stop needs validation views'),
    (['--early-stop=3', '--val-views=0'], '--early-stop needs validation'),
    (['--val-data=/nonexistent/views'], "'/nonexistent/views'"),
    (['--glr=0.01', '--betas=1,0.99'], 'betas must be two numbers in [0, 1)'),
    (['--lora=1', '--adalora=True', '--recipe=adapter-sf'], 'cannot train AdaLoRA'),
])
def test_option_errors(identity, tmp_path, flags, message):
    result = _invoke([f'--outdir={tmp_path}', f'--data={identity.train}', f'--resume={identity.base_pkl}'] + TINY + flags)
    assert result.exit_code != 0 and message in result.output, result.output


def test_offline_lpips_error_says_where_to_put_the_weights(identity, tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))

    def offline(*args, **kwargs):
        raise urllib.error.URLError('offline')
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', offline)
    args = [f'--outdir={tmp_path}', f'--data={identity.train}', f'--resume={identity.base_pkl}', '--cfg=ffhq', '--lpips=alex']
    result = _invoke(args)
    expected = os.path.join(str(tmp_path / 'torch'), 'hub', 'checkpoints', 'alexnet-owt-7be5be79.pth')
    assert result.exit_code != 0 and expected in result.output and '--lpips=none' in result.output


def test_bad_dataset_is_reported_with_its_files_before_training(identity, tmp_path):
    data = tmp_path / 'broken'
    shutil.copytree(identity.train, data)
    os.remove(data / 'image_1_latent.npy')
    np.save(data / 'image_2_latent.npy', np.zeros((1, 13, 512), np.float32))
    result = _invoke([f'--outdir={tmp_path / "runs"}', f'--data={data}', f'--resume={identity.base_pkl}'] + TINY)
    assert result.exit_code != 0
    assert 'image_1.png: image has no latent: expected image_1_latent.npy' in result.output
    assert 'image_2_latent.npy: latent has shape [1, 13, 512]' in result.output
    assert not (tmp_path / 'runs').exists()


def test_unsafe_resume_pickle_is_refused(identity, tmp_path):
    bad = tmp_path / 'evil.pkl'
    bad.write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    result = _invoke([f'--outdir={tmp_path}', f'--data={identity.train}', f'--resume={bad}'] + TINY)
    assert result.exit_code != 0 and '--resume: cannot load' in result.output and 'system' in result.output


def test_torchrun_environment_is_detected(monkeypatch):
    monkeypatch.setenv('RANK', '3')
    monkeypatch.setenv('WORLD_SIZE', '8')
    monkeypatch.setenv('LOCAL_RANK', '1')
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '4')
    assert train._torchrun_env() == dict(rank=3, world_size=8, local_rank=1, local_world_size=4)
    monkeypatch.delenv('RANK')
    assert train._torchrun_env() == {}

# --- end to end ------------------------------------------------------------------------------------

E2E_STEPS = 14
E2E_VIEWS, E2E_HELDOUT = 10, 3


@pytest.fixture(scope='module')
def person(tmp_path_factory):
    """Training and held-out views of a person = base + rank-1 change of every conv; base.pkl is the base."""
    return si.ensure_identity(str(tmp_path_factory.getbasetemp() / 'synthetic-identity-e2e'), views=E2E_VIEWS,
                              heldout=E2E_HELDOUT, strength=0.3)


def _heldout_loss(G, person):
    """Mean MSE + raw MSE over held-out views, rendered with the seeds their targets were rendered with."""
    names, images, cameras, latents = read_identity(person.heldout)
    targets = torch.from_numpy(images).float() / 127.5 - 1
    losses = []
    G = G.eval()
    with torch.no_grad():
        for i in range(len(names)):
            torch.manual_seed(4 + E2E_VIEWS + i)  # write_identity(seed=0) renders view j with seed 4 + j
            out = G.synthesis(torch.from_numpy(latents[i:i + 1]), torch.from_numpy(cameras[i:i + 1]),
                              neural_rendering_resolution=32, noise_mode='const')
            raw_target = torch.nn.functional.interpolate(targets[i:i + 1], size=(32, 32), mode='bilinear',
                                                         align_corners=False, antialias=True)
            losses.append(float((out['image'] - targets[i:i + 1]).square().mean() +
                                (out['image_raw'] - raw_target).square().mean()))
    return float(np.mean(losses))


@pytest.mark.parametrize('conv_path', ['auto', 'branch'])
def test_end_to_end_lora_recovers_the_person(person, tmp_path, monkeypatch, conv_path):
    """Rank-1 LoRA on the unchanged base, ~1 CPU-minute: held-out loss at least halves; files reload identically.
    'auto': the tiny config's narrow layers train through the merged weight; 'branch': through the low-rank
    branch, the path of every FFHQ 512 layer (EG3D_ADAPTER_CONV_PATH)."""
    monkeypatch.setenv('EG3D_ADAPTER_CONV_PATH', conv_path)
    outdir = tmp_path / 'runs'
    args = [f'--outdir={outdir}', f'--data={person.train}', f'--resume={person.base_pkl}', '--lora=1', '--batch=1',
            f'--kimg={E2E_STEPS / 1000}', f'--tick={E2E_STEPS / 2000}', '--snap=2', '--glr=0.01', '--density_reg=0',
            '--grid=1'] + TINY
    result = _invoke(args)
    assert result.exit_code == 0, result.output
    run = outdir / os.listdir(outdir)[0]
    assert run.name == '00000-resume-train-gpus1-batch1-lora1'
    tag = f'000000.{E2E_STEPS:03d}'
    files = set(os.listdir(run))
    for name in ['training_options.json', 'log.txt', 'stats.jsonl', f'network-snapshot-{tag}.pkl',
                 f'adapter-{tag}.safetensors', f'training-state-{tag}.pt', f'grid-{tag}.png', 'grid-000000-start.png']:
        assert name in files, name
    stats = [json.loads(line) for line in open(run / 'stats.jsonl')]
    assert len(stats) == 3 and stats[-1]['step'] == E2E_STEPS and 'sec_per_kimg' in stats[-1]
    assert 'mem/cpu_rss_gb' in stats[-1] and 'loss/mse' in stats[-1]
    # The default validation: 1 of the 10 views held out, scored at the start and every tick; the best is kept.
    assert stats[0]['step'] == 0 and all('val/mse' in s and 'val/psnr_raw' in s for s in stats)
    assert {'adapter-best.safetensors', 'network-snapshot-best.pkl', 'best.json'} <= files
    assert json.load(open(run / 'best.json'))['run']['loss'] == min(s['val/loss'] for s in stats)

    base = legacy.load_network_pkl(person.base_pkl)['G']
    snapshot = legacy.load_network_pkl(str(run / f'network-snapshot-{tag}.pkl'))
    trained = snapshot['G_ema']
    before, after = _heldout_loss(base, person), _heldout_loss(trained, person)
    print(f'held-out loss {before:.5f} -> {after:.5f} ({after / before:.2f}x)')
    assert after <= 0.5 * before

    # The adapter file on a fresh base renders the same pixels as the snapshot.
    assert snapshot['adapter_config']['r'] == 1 and adapters.is_injected(trained)
    fresh = adapters.load(legacy.load_network_pkl(person.base_pkl)['G'], str(run / f'adapter-{tag}.safetensors'))
    _, _, cameras, latents = read_identity(person.heldout)
    renders = []
    for G in (trained, fresh):
        torch.manual_seed(7)
        with torch.no_grad():
            renders.append(G.eval().synthesis(torch.from_numpy(latents[:2]), torch.from_numpy(cameras[:2]),
                                              neural_rendering_resolution=32, noise_mode='const')['image'])
    assert torch.equal(renders[0], renders[1])
