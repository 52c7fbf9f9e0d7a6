"""Training loop: resume equals the uninterrupted run, full fine-tuning, generator rebuild, file tags."""
import json
import os

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
