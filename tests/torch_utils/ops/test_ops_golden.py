"""The ops reproduce the official EG3D reference outputs and gradients stored in tests/data/golden/ops.pt."""
import importlib
from pathlib import Path

import pytest
import torch

# Functions of this package covered here; other golden cases belong to the network tests.
_FUNCTIONS = {
    'torch_utils.ops.upfirdn2d.setup_filter',
    'torch_utils.ops.upfirdn2d.upfirdn2d',
    'torch_utils.ops.upfirdn2d.upsample2d',
    'torch_utils.ops.upfirdn2d.downsample2d',
    'torch_utils.ops.upfirdn2d.filter2d',
    'torch_utils.ops.bias_act.bias_act',
    'torch_utils.ops.conv2d_resample.conv2d_resample',
}
ATOL = 1e-5   # float32 ops, absolute
RTOL = 1e-4   # only matters for entries of large magnitude


def _load_cases():
    path = Path(__file__).resolve().parents[2] / 'data' / 'golden' / 'ops.pt'
    try:
        cases = torch.load(path, weights_only=True)
    except Exception:
        cases = torch.load(path, weights_only=False)
    return {name: case for name, case in cases.items() if case['fn'] in _FUNCTIONS}


_CASES = _load_cases()


def _resolve(dotted):
    module, name = dotted.rsplit('.', 1)
    return getattr(importlib.import_module(module), name)


def test_every_function_has_cases():
    assert {case['fn'] for case in _CASES.values()} == _FUNCTIONS
    assert len(_CASES) == 83


@pytest.mark.parametrize('name', sorted(_CASES))
def test_matches_official(name):
    case = _CASES[name]
    fn = _resolve(case['fn'])
    inputs = {k: v.clone().requires_grad_(k in case['grad_wrt']) for k, v in case['inputs'].items()}
    out = fn(**inputs, **case['kwargs'])
    torch.testing.assert_close(out, case['output'], atol=ATOL, rtol=RTOL)
    if case['grad_wrt']:
        grads = torch.autograd.grad((out * case['cotangent']).sum(), [inputs[k] for k in case['grad_wrt']])
        for k, g in zip(case['grad_wrt'], grads):
            torch.testing.assert_close(g, case['grads'][k], atol=ATOL, rtol=RTOL, msg=lambda m, k=k: f'd/d{k}: {m}')
