"""Fixtures of the adapter tests (helpers live in adapter_testlib.py)."""
import copy

import pytest
import torch

from adapter_testlib import build_tiny_generator


@pytest.fixture(scope='module')
def tiny_golden(golden_dir) -> dict:
    return torch.load(golden_dir / 'tiny128.pt', weights_only=False)


@pytest.fixture(scope='module')
def tiny_base(tiny_golden) -> torch.nn.Module:
    """Built once per test module; tests take a `copy.deepcopy` before injecting."""
    return build_tiny_generator(tiny_golden)


@pytest.fixture
def tiny_G(tiny_base) -> torch.nn.Module:
    return copy.deepcopy(tiny_base)


@pytest.fixture(params=['branch', 'merged'])
def conv_path(request, monkeypatch) -> str:
    """Run a test through both training paths of adapted convolutions: the low-rank branch and the
    merged weight (by default `layers.merged_weight_is_cheaper` picks one per layer by size; test layers are small)."""
    monkeypatch.setenv('EG3D_ADAPTER_CONV_PATH', request.param)
    return request.param


@pytest.fixture(params=['fast', 'reference'])
def implementation(request, monkeypatch) -> str:
    """Run a test through both implementations of the adapted layers: the fast kernels
    (`training/adapters/kernels.py`) and the plain PyTorch reference path of `layers.py`."""
    monkeypatch.setenv('EG3D_ADAPTER_KERNELS', request.param)
    return request.param


@pytest.fixture
def count_hashes(monkeypatch):
    """Counts the passes over the base's weights (`files._weights_sha256` calls)."""
    from training.adapters import files
    calls = []
    real = files._weights_sha256  # pylint: disable=protected-access
    monkeypatch.setattr(files, '_weights_sha256', lambda params: calls.append(1) or real(params))
    return calls
