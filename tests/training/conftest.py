"""Fixtures shared by the training tests."""
import os

import pytest
import torch
from safetensors.torch import load_file

import dnnlib
from training import synthetic_identity as si
from training import training_loop as tl


@pytest.fixture(scope='session')
def identity8(tmp_path_factory) -> dnnlib.EasyDict:
    """Eight views of a synthetic person and its tiny base: one view is held out by the default --val-views."""
    return si.ensure_identity(str(tmp_path_factory.getbasetemp() / 'synthetic-identity-8'), views=8, heldout=0,
                              strength=0.3)


@pytest.fixture(scope='session')
def train_tiny(identity8):
    """`train_tiny(run_dir, recipe, resume_pkl=None, **overrides)`: four one-image steps of rank-1 LoRA on identity8
    with the recipe (a dict), a tick and a snapshot after every step; returns training_loop's result."""
    def run(run_dir, recipe: dict, resume_pkl=None, **overrides):
        os.makedirs(run_dir, exist_ok=True)
        opts = dict(run_dir=str(run_dir), training_set_kwargs=dict(path=identity8.train),
                    resume_pkl=resume_pkl or identity8.base_pkl, cfg='resume', neural_rendering_resolution=32,
                    batch_size=1, batch_gpu=1, total_kimg=0.004, kimg_per_tick=0.001, network_snapshot_ticks=1,
                    device='cpu', grid_rows=0, progress_bar=False, loss_kwargs=dict(lpips_net='none'),
                    adapter_config=dict(r=1, alpha=1.0), recipe=recipe)
        opts.update(overrides)
        return tl.training_loop(**opts)
    return run


@pytest.fixture
def resume_halfway(train_tiny, tmp_path):
    """`resume_halfway(run, recipe)`: continues a `train_tiny` run from its step-2 snapshot in a new folder, checks
    that its last and best adapter files equal the uninterrupted run's, and returns the new folder."""
    def resume(run, recipe: dict):
        resumed = tmp_path / 'resumed'
        train_tiny(resumed, recipe, resume_pkl=str(run / 'network-snapshot-000000.002.pkl'), adapter_config=None)
        for name in ('adapter-000000.004.safetensors', 'adapter-best.safetensors'):
            a, b = load_file(str(run / name)), load_file(str(resumed / name))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        return resumed
    return resume
