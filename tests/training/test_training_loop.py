"""Training loop: resume equals the uninterrupted run, full fine-tuning, generator rebuild, file tags."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import legacy
from training import configs
from training import synthetic_identity as si
from training import training_loop as tl


@pytest.fixture(scope='module')
def identity(tmp_path_factory):
    """Four views of a synthetic person and the base pickle (shared by the tests of a session)."""
    return si.ensure_identity(str(tmp_path_factory.getbasetemp() / 'synthetic-identity-4'), views=4, heldout=0,
                              strength=0.3)


def _run(run_dir, identity, resume_pkl=None, **overrides):
    os.makedirs(run_dir, exist_ok=True)
    opts = dict(run_dir=str(run_dir), training_set_kwargs=dict(path=identity.train), resume_pkl=resume_pkl or identity.base_pkl,
                cfg='resume', neural_rendering_resolution=32, batch_size=2, batch_gpu=1, total_kimg=0.006,
                kimg_per_tick=0.002, network_snapshot_ticks=1, density_reg_every=2, device='cpu', grid_rows=0,
                progress_bar=False, loss_kwargs=dict(lpips_net='alex-random'), G_opt_kwargs=dict(lr=0.01, betas=[0, 0.99]))
    opts.update(overrides)
    return tl.training_loop(**opts)


ADALORA = dict(r=1, alpha=1.0, adalora=True, init_r=2, target_r=1, total_step=2, tinit=0, tfinal=0, delta_t=1)


@pytest.mark.parametrize('conv_path', ['auto', 'branch'])
def test_resumed_run_equals_uninterrupted_run(identity, tmp_path, monkeypatch, conv_path):
    """AdaLoRA (adapters + Adam moments + rank allocator + density reg): stop after snapshot 1, resume.
    On both training paths of the adapted convolutions (EG3D_ADAPTER_CONV_PATH; 'branch' is FFHQ 512's)."""
    monkeypatch.setenv('EG3D_ADAPTER_CONV_PATH', conv_path)
    full = tmp_path / 'full'
    _run(full, identity, adapter_config=ADALORA, total_kimg=0.004, density_reg_every=1)
    snapshots = sorted(f for f in os.listdir(full) if f.startswith('network-snapshot-'))
    assert snapshots == ['network-snapshot-000000.002.pkl', 'network-snapshot-000000.004.pkl']
    resumed = tmp_path / 'resumed'
    result = _run(resumed, identity, resume_pkl=str(full / 'network-snapshot-000000.002.pkl'), adapter_config=None,
                  total_kimg=0.004, density_reg_every=1)
    assert result['step'] == 2 and result['cur_nimg'] == 4
    a, b = load_file(str(full / 'adapter-000000.004.safetensors')), load_file(str(resumed / 'adapter-000000.004.safetensors'))
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key
    state_a = torch.load(full / 'training-state-000000.004.pt', weights_only=True)
    state_b = torch.load(resumed / 'training-state-000000.004.pt', weights_only=True)
    scores_a, scores_b = state_a['allocator']['exp_avg_ipt'], state_b['allocator']['exp_avg_ipt']
    assert scores_a.keys() == scores_b.keys() and len(scores_a) > 0
    assert all(torch.equal(scores_a[k], scores_b[k]) for k in scores_a)
    stats_a = [json.loads(line) for line in open(full / 'stats.jsonl')]
    stats_b = [json.loads(line) for line in open(resumed / 'stats.jsonl')]
    assert [s['loss/total'] for s in stats_a[1:]] == [s['loss/total'] for s in stats_b]
    assert 'loss/density' in stats_a[0] and 'loss/orth' in stats_a[0] and 'loss/lpips' in stats_a[0]
    assert 'Restored optimizer state' in open(resumed / 'log.txt').read()


def test_full_finetuning_with_frozen_renderer(identity, tmp_path):
    run = tmp_path / 'full-ft'
    result = _run(run, identity, adapter_config=None, freeze_render=True, batch_size=1, total_kimg=0.001,
                  kimg_per_tick=0.001, density_reg_every=1)
    base = legacy.load_network_pkl(identity.base_pkl)['G']
    snap = legacy.load_network_pkl(str(run / 'network-snapshot-000000.001.pkl'))
    assert snap['adapter_config'] is None and snap['G'] is snap['G_ema'] and snap['D'] is None
    assert not any(f.startswith('adapter-') for f in os.listdir(run))
    trained, before = snap['G'].state_dict(), base.state_dict()
    assert trained.keys() == before.keys()
    changed = {k for k in trained if not torch.equal(trained[k], before[k])}
    assert any(k.startswith('backbone.synthesis.') for k in changed)
    assert any(k.startswith('superresolution.') for k in changed)
    assert not any(k.startswith(('decoder.', 'backbone.mapping.')) for k in changed)
    assert snap['training_set_kwargs']['path'] == identity.train and result['step'] == 1


def test_rebuild_generator_applies_rendering_and_fp16_options_keeps_weights():
    G = si.build_tiny_generator(0)
    G.register_buffer('dataset_label_std', torch.ones(25))
    G2 = tl.rebuild_generator(G, dict(configs.DATASET_RENDERING['afhq'], density_reg=0.5), g_num_fp16_res=2,
                              sr_num_fp16_res=1)
    assert G2.rendering_kwargs['avg_camera_pivot'] == [0, 0, -0.06] and G2.rendering_kwargs['density_reg'] == 0.5
    assert G2.rendering_kwargs['depth_resolution'] == 48
    assert G2.init_kwargs['num_fp16_res'] == 2 and G2.init_kwargs['conv_clamp'] == 256
    assert G2.init_kwargs['sr_num_fp16_res'] == 1
    assert all(torch.equal(a, b) for a, b in zip(G.state_dict().values(), G2.state_dict().values()))
    assert G.rendering_kwargs['depth_resolution'] == 12  # the source is untouched


def test_kimg_tags_and_chunk_seeds():
    assert tl.kimg_tag(500000) == '000500' and tl.kimg_tag(120) == '000000.120' and tl.kimg_tag(1500) == '000001.500'
    assert tl.chunk_seed(0, 3, 1) == tl.chunk_seed(0, 3, 1)
    assert len({tl.chunk_seed(s, k, c) for s in range(2) for k in range(3) for c in range(3)}) == 18


def test_unknown_options_are_an_error():
    with pytest.raises(TypeError, match="unexpected keyword argument 'batch_sizes'"):
        tl.training_loop(batch_sizes=4)
    with pytest.raises(ValueError, match=r"metrics=\['fid50k_full'\]"):
        tl.training_loop(metrics=['fid50k_full'])


def test_op_fallback_goes_to_the_log_and_tf32_follows_the_option(identity, tmp_path, monkeypatch):
    """A CUDA plugin the ops fell back from (here: recorded as failed to build) is named in log.txt with its reason."""
    from torch_utils import custom_ops
    monkeypatch.setattr(custom_ops, '_failed', {'upfirdn2d_plugin': 'the compiler failed (build directory /x)'})
    try:
        _run(tmp_path, identity, adapter_config=dict(r=1), batch_size=1, total_kimg=0.002, kimg_per_tick=0.001,
             allow_tf32=True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    log = (tmp_path / 'log.txt').read_text()
    assert log.count('CUDA plugin "upfirdn2d_plugin" is unavailable') == 1  # once, not at every step
    assert 'EG3D_OPS_IMPL=cuda' in log and 'Reason: the compiler failed (build directory /x)' in log


def test_nonfinite_gradients_are_counted_and_reported(identity, tmp_path, monkeypatch):
    """A NaN and an inf in one step's adapter gradients: stats.jsonl and log.txt report them; the adapters
    stay finite."""
    from training import adapters
    real = adapters.trainable_parameters
    poisoned = []

    def poison_first_backward(grad):
        if poisoned:
            return grad
        poisoned.append(1)
        grad = grad.clone()
        grad.view(-1)[:2] = torch.tensor([float('nan'), float('inf')])
        return grad

    def trainable_with_a_hook(G):
        params = real(G)
        params[0].register_hook(poison_first_backward)
        return params
    monkeypatch.setattr(adapters, 'trainable_parameters', trainable_with_a_hook)
    _run(tmp_path, identity, adapter_config=dict(r=1), batch_size=1, total_kimg=0.002, kimg_per_tick=0.001)
    stats = [json.loads(line) for line in open(tmp_path / 'stats.jsonl')]
    assert [(s['grad/nonfinite_entries'], s['grad/nonfinite_steps']) for s in stats] == [(2, 1), (0, 0)]
    log = (tmp_path / 'log.txt').read_text()
    assert log.count('had NaN/inf gradients') == 1 and '1 step(s) of this tick had NaN/inf gradients (2 entries' in log
    final = load_file(str(tmp_path / 'adapter-000000.002.safetensors'))
    assert all(torch.isfinite(t).all() for t in final.values())


# --- validation, best files, early stopping -------------------------------------------------------

# A constant rate this high makes the held-out curve of the 8-view identity fall, then rise and fall again
# (measured: 0.0131 at the start, 0.0117 after step 1, then 0.0140, 0.0405, 0.0662, 0.0162).
UNSTABLE = dict(name='unstable', lr=0.03, betas=[0, 0.99])
LORA1 = dict(r=1, alpha=1.0)


def _run_validated(run_dir, identity8, **overrides):
    return _run(run_dir, identity8, **dict(dict(adapter_config=LORA1, recipe=UNSTABLE, batch_size=1, kimg_per_tick=0.001,
                                                total_kimg=0.005, loss_kwargs=dict(lpips_net='none')), **overrides))


@pytest.fixture(scope='module')
def oscillating(identity8, tmp_path_factory):
    """A validated run of 5 one-step ticks whose held-out curve oscillates; a snapshot every tick."""
    run = tmp_path_factory.mktemp('oscillating')
    _run_validated(run, identity8)
    return run


def _stats(run):
    return [json.loads(line) for line in open(run / 'stats.jsonl')]


def _adapter_score(identity8, adapter_path):
    """The held-out score of an adapter file loaded onto a fresh base, computed outside the training loop."""
    from training import adapters, validation
    from training.dataset import IdentitySet
    from training.loss import PersonalizationLoss
    G = adapters.load(legacy.load_network_pkl(identity8.base_pkl)['G'], str(adapter_path))
    _, views = validation.split_heldout(IdentitySet(identity8.train), 1)
    loss_fn = PersonalizationLoss(torch.device('cpu'), lpips_net='none')
    return validation.score_views(G, views, loss_fn, 32, seed=0, device=torch.device('cpu'))['run']['loss']


def test_best_file_is_the_state_with_the_best_recorded_validation_score(oscillating, identity8):
    stats = _stats(oscillating)
    assert [s['step'] for s in stats] == [0, 1, 2, 3, 4, 5] and all('val/psnr_raw' in s for s in stats)
    best = min(stats, key=lambda s: s['val/loss'])
    record = json.load(open(oscillating / 'best.json'))['run']
    assert record['step'] == best['step'] and record['loss'] == best['val/loss']
    assert stats[-1]['val/best_loss'] == best['val/loss'] and stats[-1]['val/best_kimg'] == best['kimg']
    best_file = load_file(str(oscillating / 'adapter-best.safetensors'))
    periodic = load_file(str(oscillating / f'adapter-{tl.kimg_tag(best["step"])}.safetensors'))
    assert best_file.keys() == periodic.keys() and all(torch.equal(best_file[k], periodic[k]) for k in best_file)
    snapshot = legacy.load_network_pkl(str(oscillating / 'network-snapshot-best.pkl'))
    assert snapshot['personalization']['step'] == best['step']
    assert _adapter_score(identity8, oscillating / 'adapter-best.safetensors') == pytest.approx(best['val/loss'], rel=1e-5)


def test_on_an_oscillating_curve_the_best_file_beats_the_last(oscillating, identity8):
    losses = [s['val/loss'] for s in _stats(oscillating)]
    rises = [b > a for a, b in zip(losses, losses[1:])]
    assert rises[0] is False and any(rises) and rises[-1] is False  # down, up, ..., down: it oscillates
    best = _adapter_score(identity8, oscillating / 'adapter-best.safetensors')
    last = _adapter_score(identity8, oscillating / 'adapter-000000.005.safetensors')
    assert best < 0.8 * last and best < losses[0]


def test_resume_keeps_the_best_so_far(oscillating, identity8, tmp_path):
    """Continue from the snapshot after step 3 (the best was at step 1): the best state and files are the same."""
    resumed = tmp_path / 'resumed'
    _run_validated(resumed, identity8, resume_pkl=str(oscillating / 'network-snapshot-000000.003.pkl'), adapter_config=None)
    assert 'Restored the best-so-far validation state' in open(resumed / 'log.txt').read()
    full, again = (json.load(open(run / 'best.json')) for run in (oscillating, resumed))
    assert full == again
    a, b = (load_file(str(run / 'adapter-best.safetensors')) for run in (oscillating, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [s['val/loss'] for s in _stats(resumed)] == [s['val/loss'] for s in _stats(oscillating)[4:]]


def test_early_stop_ends_the_run_and_heldout_views_are_never_trained_on(identity8, tmp_path, monkeypatch):
    from training import validation
    from training.dataset import IdentitySet
    from training.loss import PersonalizationLoss
    seen = []
    original = PersonalizationLoss.__call__

    def recording(self, G, real_img, *args, **kwargs):
        seen.extend(((img + 1) * 127.5).round().to(torch.uint8).numpy().tobytes() for img in real_img)
        return original(self, G, real_img, *args, **kwargs)
    monkeypatch.setattr(PersonalizationLoss, '__call__', recording)
    result = _run_validated(tmp_path, identity8, total_kimg=0.008, early_stop=2)
    stats = _stats(tmp_path)
    best_step = min(stats, key=lambda s: s['val/loss'])['step']
    assert result['step'] == best_step + 2 < 8 and stats[-1]['step'] == result['step']
    assert 'Early stop: no validation improvement in 2 ticks' in open(tmp_path / 'log.txt').read()
    assert f'network-snapshot-{tl.kimg_tag(result["step"])}.pkl' in os.listdir(tmp_path)

    _, views = validation.split_heldout(IdentitySet(identity8.train), 1)
    assert len(seen) == result['step'] and len(set(seen)) > 1
    assert views.images[0].tobytes() not in seen


def test_a_continued_run_keeps_the_recipe_its_training_state_recorded(oscillating, identity8, tmp_path):
    """Another --recipe (or a changed default) does not change a continued run's schedule: the recorded one is used."""
    lora_plus = dict(name='lora-plus', lr=0.01, betas=[0.9, 0.99], b_lr_ratio=4.0)
    _run_validated(tmp_path, identity8, resume_pkl=str(oscillating / 'network-snapshot-000000.003.pkl'),
                   adapter_config=None, recipe=lora_plus)
    assert "Continuing with the run's recipe {'name': 'unstable'" in open(tmp_path / 'log.txt').read()
    state = torch.load(tmp_path / 'training-state-000000.005.pt', weights_only=True)
    assert state['recipe']['name'] == 'unstable' and state['recipe']['lr'] == 0.03


def test_resuming_a_state_without_a_recipe_with_another_optimizer_layout_is_a_clear_error(oscillating, identity8,
                                                                                          tmp_path):
    """Training states from before recipes were recorded: a LoRA+ recipe cannot take their one-group Adam state."""
    old_run = tmp_path / 'old-run'
    shutil.copytree(oscillating, old_run)
    state_path = old_run / 'training-state-000000.003.pt'
    state = torch.load(state_path, weights_only=True)
    del state['recipe']
    torch.save(state, state_path)
    lora_plus = dict(name='lora-plus', lr=0.01, betas=[0.9, 0.99], b_lr_ratio=4.0)
    with pytest.raises(ValueError, match="the run used the recipe 'my3dgen'.*--recipe=lora-plus"):
        _run_validated(tmp_path / 'run', identity8, resume_pkl=str(old_run / 'network-snapshot-000000.003.pkl'),
                       adapter_config=None, recipe=lora_plus)
