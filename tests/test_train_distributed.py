"""Data-parallel personalization on CPU (gloo): 2 processes equal 1 process with the same global batch."""
import contextlib
import glob
import json
import os
import socket
import subprocess
import sys
from unittest import mock

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import train
from training import synthetic_identity as si
from training.recipe import Recipe

EG3D_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'eg3d')


@pytest.fixture(scope='module')
def identity(tmp_path_factory):
    return si.ensure_identity(str(tmp_path_factory.getbasetemp() / 'synthetic-identity-4'), views=4, heldout=0,
                              strength=0.3)


def _args(identity, outdir, kimg, data=None, batch=2):
    # Global batch 2 in passes of 1 image; density regularisation on step 0; LPIPS with a random backbone. The
    # paper's constant-rate Adam: the comparison is of the data-parallel arithmetic, at a step size where float32
    # rounding stays well inside the tolerance.
    return [f'--outdir={outdir}', f'--data={data or identity.train}', f'--resume={identity.base_pkl}', '--cfg=resume',
            '--device=cpu', '--lora=1', f'--batch={batch}', '--batch-gpu=1', f'--kimg={kimg}', '--tick=0.002', '--snap=1',
            '--recipe=my3dgen',
            '--lpips=alex-random', '--neural_rendering_resolution_initial=32', '--grid=0',
            '--progress=False']


@contextlib.contextmanager
def _threads_of_one_of_two_processes():
    """A one-process run in this process at the thread count each of two spawned processes takes (train.py gives
    a process cpu_count / processes threads): CPU kernels sum in an order that depends on their thread count, and
    these comparisons are of the data-parallel arithmetic. The test process's thread count is restored."""
    threads = torch.get_num_threads()
    try:
        with mock.patch('os.cpu_count', return_value=max(1, (os.cpu_count() or 1) // 2)):
            yield
    finally:
        torch.set_num_threads(threads)


def _adapter(outdir, tag):
    run = os.path.join(outdir, sorted(os.listdir(outdir))[0])
    return load_file(os.path.join(run, f'adapter-{tag}.safetensors')), open(os.path.join(run, 'log.txt')).read()


def _assert_close(a, b, tol=1e-5):
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=tol), (key, (a[key] - b[key]).abs().max())


@pytest.fixture(scope='module')
def single_process_run(identity, tmp_path_factory):
    outdir = tmp_path_factory.mktemp('one-process')
    with _threads_of_one_of_two_processes():
        result = CliRunner().invoke(train.main, _args(identity, outdir, 0.004), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return outdir


def test_two_spawned_gloo_processes_equal_one_process(identity, single_process_run, tmp_path):
    outdir = tmp_path / 'two-processes'
    result = CliRunner().invoke(train.main, _args(identity, outdir, 0.004) + ['--gpus=2'], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    two, log = _adapter(outdir, '000000.004')
    one, _ = _adapter(single_process_run, '000000.004')
    _assert_close(two, one)
    # check_ddp_consistency ran at every snapshot: the ranks hold bit-identical weights.
    assert log.count('identical on all 2 processes') == 2
    assert '-gpus2-batch2-lora1' in os.listdir(outdir)[0]


def test_torchrun_launch_equals_one_process(identity, single_process_run, tmp_path):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    outdir = tmp_path / 'torchrun'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes=1', '--nproc_per_node=2', '--rdzv-backend=c10d',
           f'--rdzv-endpoint=127.0.0.1:{port}', 'train.py'] + _args(identity, outdir, 0.004)  # the rate schedule depends on --kimg
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(cmd, cwd=EG3D_DIR, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two, log = _adapter(outdir, '000000.004')
    one, _ = _adapter(single_process_run, '000000.004')
    _assert_close(two, one)
    assert 'identical on all 2 processes' in log


# --- gradient scale ---------------------------------------------------------------------------------
# Adam hardly changes when every gradient is scaled, so the runs above would not notice gradients
# summed instead of averaged over processes. With beta1 = 0 and an eps far above every |gradient|,
# Adam's update is lr / eps * gradient: plain SGD, here with step size SGD_LR. An adapter's change
# between snapshots is then -SGD_LR times the gradient of that step, so comparing the changes compares
# the gradients themselves. (A factor moves only once B is non-zero: the step is large enough for A's
# second-step change to stand well above float32 rounding.)
SGD_EPS = 1e4
SGD_LR = 300.0
LAUNCH_TRAINING = train.launch_training  # the real launcher (tests capture the options by replacing it)


def _sgd_adapters(data, base_pkl, outdir, gpus, batch, monkeypatch):
    """{file name: tensors} of the adapter files of a 2-step run (train.py's options and launcher, Adam
    turned into SGD) on 1 or 2 processes."""
    captured = {}
    monkeypatch.setattr(train, 'launch_training', lambda c, desc, outdir, dry_run: captured.update(c=c, desc=desc))
    args = [f'--outdir={outdir}', f'--data={data}', f'--resume={base_pkl}', '--cfg=resume', '--device=cpu', '--lora=1',
            f'--batch={batch}', '--batch-gpu=1', f'--kimg={2 * batch / 1000}', f'--tick={batch / 1000}', '--snap=1',
            '--density_reg=0', '--lpips=alex-random', '--neural_rendering_resolution_initial=32', '--grid=0',
            '--progress=False', f'--gpus={gpus}']
    result = CliRunner().invoke(train.main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    c = captured['c']
    c.recipe = Recipe('sgd', lr=SGD_LR * SGD_EPS, betas=(0, 0.99), eps=SGD_EPS).to_dict()  # one group, constant rate
    c.G_opt_kwargs.update(lr=SGD_LR * SGD_EPS, betas=[0, 0.99], eps=SGD_EPS)
    LAUNCH_TRAINING(c, captured['desc'], str(outdir), dry_run=False)
    run = os.path.join(outdir, os.listdir(outdir)[0])
    files = [os.path.join(folder, name) for folder in (run, os.path.join(run, 'adapters')) if os.path.isdir(folder)
             for name in sorted(os.listdir(folder)) if name.endswith('.safetensors')]
    return {os.path.basename(path): load_file(path) for path in files}


def _updates(files):
    """{(adapter, tag, tensor): (change since the adapter's previous snapshot, value)} (B starts at zero; A
    does not move in the first step, where B = 0, so its first change is taken from zero and ignored)."""
    out, previous = {}, {}
    for name in sorted(files):
        adapter, tag = name[:-len('.safetensors')].rsplit('-', 1)
        for key, tensor in files[name].items():
            out[(adapter, tag, key)] = tensor - previous.get((adapter, key), torch.zeros_like(tensor)), tensor
            previous[(adapter, key)] = tensor
    return out


def _assert_same_gradients(two, one, moving=('lora_A', 'lora_B')):
    """Every update (a gradient times the step) equal to within 1% of its largest entry, plus the float32
    rounding of the factor it was taken from (the second step starts from first steps that differ in
    rounding, and the summation order over processes differs). Every factor of the kinds `moving` moved by
    far more than that, so gradients scaled by 2 (or by 1.1) fail."""
    assert two.keys() == one.keys() and len(one) >= 2
    a, b = _updates(two), _updates(one)
    assert a.keys() == b.keys()
    first = min(tag for _, tag, _ in b)
    updates = [key for key in b if not (key[2].endswith('lora_A') and key[1] == first)]  # not the initial A
    for key in updates:
        (got, _), (want, value) = a[key], b[key]
        noise = 1e-2 * float(want.abs().max()) + 1e-6 * float(value.abs().max())
        torch.testing.assert_close(got, want, rtol=0, atol=noise, msg=lambda m, key=key: f'{key}: {m}')
    for factor in moving:
        moved = {key[2] for key in updates if key[2].endswith(factor)
                 and b[key][0].abs().max() > 1e-4 * b[key][1].abs().max()}
        assert moved == {key[2] for key in b if key[2].endswith(factor)}, factor


@pytest.mark.parametrize('conv_path', ['auto', 'branch'])
def test_two_processes_compute_the_gradients_of_one(identity, tmp_path, monkeypatch, conv_path):
    """Single identity, batch 2 in passes of 1. 'auto': the tiny layers train through the merged weight;
    'branch': through the low-rank branch, as every FFHQ 512 layer (EG3D_ADAPTER_CONV_PATH)."""
    monkeypatch.setenv('EG3D_ADAPTER_CONV_PATH', conv_path)
    one, two = (_sgd_adapters(identity.train, identity.base_pkl, tmp_path / f'gpus{g}', g, 2, monkeypatch)
                for g in (1, 2))
    _assert_same_gradients(two, one)


def test_two_processes_compute_the_gradients_of_one_with_two_identities(tmp_path_factory, tmp_path, monkeypatch):
    """Two identities in balanced batches of 4 (passes of 1, each one identity; per-sample adapters take the
    low-rank branch): per-identity gradients and per-identity loss statistics agree."""
    people = si.ensure_identity(str(tmp_path_factory.getbasetemp() / 'synthetic-people-2'), count=2, views=4, heldout=2,
                                strength=0.3)
    one, two = (_sgd_adapters(people.people, people.base_pkl, tmp_path / f'gpus{g}', g, 4, monkeypatch) for g in (1, 2))
    assert len(one) == 4  # 2 identities x 2 snapshots
    _assert_same_gradients(two, one)
    stats = [[json.loads(line) for line in open(glob.glob(str(tmp_path / f'gpus{g}' / '*' / 'stats.jsonl'))[0])]
             for g in (1, 2)]
    for name in people.names:
        for tick_one, tick_two in zip(*stats):
            assert tick_two[f'identity/{name}/loss'] == pytest.approx(tick_one[f'identity/{name}/loss'], rel=1e-5)


def test_two_processes_with_the_step_search_equal_one_process(identity, tmp_path, monkeypatch):
    """The step search's factor comes from losses and a slope summed over processes: every process takes the
    same step, the one a single process takes."""
    runs = {}
    for gpus in (1, 2):
        captured = {}
        monkeypatch.setattr(train, 'launch_training', lambda c, desc, outdir, dry_run: captured.update(c=c, desc=desc))
        outdir = tmp_path / f'gpus{gpus}'
        result = CliRunner().invoke(train.main, _args(identity, outdir, 0.004) + [f'--gpus={gpus}'],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        c = captured['c']
        c.recipe = dict(c.recipe, name='my3dgen-search', step_search=2.0)
        with _threads_of_one_of_two_processes() if gpus == 1 else contextlib.nullcontext():
            LAUNCH_TRAINING(c, captured['desc'], str(outdir), dry_run=False)
        stats = [json.loads(line) for line in open(glob.glob(str(outdir / '*' / 'stats.jsonl'))[0])]
        runs[gpus] = _adapter(outdir, '000000.004') + ([s['loss/step_factor'] for s in stats],)
    (one, _, factors_one), (two, log, factors_two) = runs[1], runs[2]
    _assert_close(two, one)
    assert 'identical on all 2 processes' in log
    assert factors_two == pytest.approx(factors_one, rel=1e-4) and any(f != pytest.approx(1.0) for f in factors_one)
