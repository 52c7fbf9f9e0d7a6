"""Data-parallel personalization on CPU (gloo): 2 processes equal 1 process with the same global batch."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import train
from training import synthetic_identity as si

EG3D_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'eg3d')


@pytest.fixture(scope='module')
def identity(tmp_path_factory):
    return si.ensure_identity(str(tmp_path_factory.getbasetemp() / 'synthetic-identity-4'), views=4, heldout=0,
                              strength=0.3)


def _args(identity, outdir, kimg, data=None, batch=2):
    # Global batch 2 in passes of 1 image; density regularisation on step 0; LPIPS with a random backbone.
    return [f'--outdir={outdir}', f'--data={data or identity.train}', f'--resume={identity.base_pkl}', '--cfg=resume',
            '--device=cpu', '--lora=1', f'--batch={batch}', '--batch-gpu=1', f'--kimg={kimg}', '--tick=0.002', '--snap=1',
            '--lpips=alex-random', '--neural_rendering_resolution_initial=32', '--grid=0',
            '--progress=False']


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


def test_multi_identity_run_on_two_processes_equals_one_process(tmp_path_factory, tmp_path):
    """Two identities, global batch 4 in passes of 1 (each pass one identity): per-identity adapters and stats agree."""
    people = si.ensure_identity(str(tmp_path_factory.getbasetemp() / 'synthetic-people-2'), count=2, views=4, heldout=2,
                                strength=0.3)
    runs = {}
    for gpus in (1, 2):
        outdir = tmp_path / f'gpus{gpus}'
        args = _args(people, outdir, kimg=0.004, data=people.people, batch=4)
        result = CliRunner().invoke(train.main, args + [f'--gpus={gpus}', '--tick=0.004'], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        runs[gpus] = os.path.join(outdir, sorted(os.listdir(outdir))[0])
    for name in people.names:
        one, two = (load_file(os.path.join(runs[g], 'adapters', f'{name}-000000.004.safetensors')) for g in (1, 2))
        _assert_close(two, one)
    stats = [json.loads(open(os.path.join(runs[g], 'stats.jsonl')).readline()) for g in (1, 2)]
    for name in people.names:
        assert stats[1][f'identity/{name}/loss'] == pytest.approx(stats[0][f'identity/{name}/loss'], rel=1e-5)
