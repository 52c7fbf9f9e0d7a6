"""train_encoder.py on 2 CPU processes (gloo) computes what 1 process computes at the same global batch."""
import glob
import json
import os
import re

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import train_encoder
from training import synthetic_identity as si

# Adam with beta1 = 0 and an eps far above every |gradient| updates by lr / eps * gradient: plain SGD with
# step size SGD_LR. An encoder's change is then SGD_LR times the sum of its gradients, so comparing the
# changes compares the gradients: gradients summed instead of averaged over processes (or chunks) fail.
SGD_EPS = 1e4
SGD_LR = 30.0
HEAD_LINEAR = re.compile(r'^encoder\.heads\.\d+\.linear\.')
LAUNCH = train_encoder.launch  # the real launcher (the test captures the options by replacing it)


@pytest.fixture(scope='module')
def base_pkl(tmp_path_factory):
    path = tmp_path_factory.mktemp('encoder-base') / 'base.pkl'
    si.save_generator_pkl(si.build_tiny_generator(0), str(path))
    return path


def sgd_run(base_pkl, outdir, gpus, monkeypatch):
    """(run directory, encoder file after step 1, after step 2) of a run on `gpus` processes: global batch 2 in
    passes of 1 image, 2 ReStyle iterations, one replay update per step, Adam turned into SGD."""
    captured = {}
    monkeypatch.setattr(train_encoder, 'launch', lambda c, outdir, desc: captured.update(c=c, desc=desc))
    args = [f'--network={base_pkl}', f'--outdir={outdir}', '--kimg=0.004', '--batch=2', '--batch-gpu=1', '--iters=2',
            '--lpips=none', '--nrr=16', '--replay=1', '--snap=1', '--device=cpu', '--progress=False', f'--gpus={gpus}']
    result = CliRunner().invoke(train_encoder.main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    c = captured['c']
    c.update(lr=SGD_LR * SGD_EPS, adam_kwargs=dict(betas=(0.0, 0.99), eps=SGD_EPS), kimg_per_tick=0.002)
    if gpus == 1:  # the threads of each process of the 2-process run: a convolution sums in another order otherwise
        init_process = train_encoder._init_process
        monkeypatch.setattr(train_encoder, '_init_process', lambda c, rank, world_size: init_process(c, rank, 2))
    threads = torch.get_num_threads()
    try:
        LAUNCH(c, str(outdir), captured['desc'])
    finally:
        torch.set_num_threads(threads)
    run_dir, = glob.glob(os.path.join(outdir, '*'))
    step1, step2 = (load_file(os.path.join(run_dir, f'encoder-000000.00{k}.safetensors')) for k in (2, 4))
    return run_dir, step1, step2


def updates(step1, step2):
    """{name: change}: step 1's for the heads' last layers (they start at zero: the only layers step 1's first
    update moves), step 2's for every encoder tensor."""
    out = {f'step 1 {k}': v for k, v in step1.items() if HEAD_LINEAR.search(k)}
    out.update({f'step 2 {k}': step2[k] - step1[k] for k in step1 if k.startswith('encoder.')})
    return out


def test_two_gloo_processes_compute_the_updates_of_one(base_pkl, tmp_path, monkeypatch):
    """Both runs add the same float32 numbers in the same order (threads per process, chunk sums), so they agree
    far inside the tolerance: a last-bit difference can flip a (Leaky/P)ReLU unit and move a head's next update
    by percents, which no tolerance on float32 noise would cover."""
    one_dir, *one = sgd_run(base_pkl, tmp_path / 'one', 1, monkeypatch)
    two_dir, *two = sgd_run(base_pkl, tmp_path / 'two', 2, monkeypatch)
    assert torch.equal(one[1]['w_avg'], two[1]['w_avg'])
    want, got, values = updates(*one), updates(*two), one[1]
    assert want.keys() == got.keys()
    for key in want:  # 1% of the update, plus float32 rounding of the tensor it was taken from
        noise = 1e-2 * float(want[key].abs().max()) + 1e-6 * float(values[key.split(' ')[-1]].abs().max())
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=noise, msg=lambda m, key=key: f'{key}: {m}')
    # The heads' last layers move far above that tolerance in both steps: a gradient scale of 2 cannot pass.
    heads = [key for key in want if HEAD_LINEAR.search(key.split(' ')[-1]) and key.endswith('weight')]
    assert len(heads) == 2 * 14
    for key in heads:
        assert float(want[key].abs().max()) > 1e-3 * float(values[key.split(' ')[-1]].abs().max()) > 0, key
    stats = [[json.loads(line) for line in open(os.path.join(d, 'stats.jsonl'))] for d in (one_dir, two_dir)]
    assert len(stats[0]) == len(stats[1]) == 2
    for tick_one, tick_two in zip(*stats):
        for name in ('loss/latent', 'loss/image', 'loss/replay_latent'):
            assert tick_two[name] == pytest.approx(tick_one[name], rel=1e-4), name
