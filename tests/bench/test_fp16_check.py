"""bench/fp16_check.py: its merged-weight reference agrees with the adapters and catches a wrong gradient."""
import copy
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / 'bench'))

import fp16_check  # noqa: E402
from training import adapters, synthetic_identity  # noqa: E402
from training.adapters.inject import adapter_layers  # noqa: E402


def test_gradient_check_passes_the_adapters_and_fails_a_wrong_reference():
    base = fp16_check.build_generator('tiny')
    adapted = adapters.inject(copy.deepcopy(base), adapters.AdapterConfig(r=1))
    fp16_check.randomize_factors(adapted)
    reference = copy.deepcopy(base)
    factors = fp16_check.merged_reference(reference, adapted)
    c = torch.from_numpy(synthetic_identity.camera_labels(1, seed=1))
    with torch.no_grad():
        ws = adapted.mapping(torch.randn([1, base.z_dim], generator=torch.Generator().manual_seed(0)), c)
    errors = fp16_check.gradient_errors(adapted, reference, factors, ws, c, 32, force_fp32=True)
    assert len(errors) == 2 * len(adapter_layers(adapted))
    assert fp16_check.worst(errors) <= fp16_check.GRAD_RTOL_FP32

    name = next(n for n in factors if n.startswith('superresolution') and n.endswith('lora_B'))
    with torch.no_grad():
        factors[name].mul_(1.5)  # a reference that no longer holds the adapter's delta
    errors = fp16_check.gradient_errors(adapted, reference, factors, ws, c, 32, force_fp32=True)
    assert fp16_check.worst(errors) > 10 * fp16_check.GRAD_RTOL_FP32


def test_worst_error_is_infinite_when_one_is_not_finite():
    assert fp16_check.worst([1e-4, 2e-3]) == 2e-3
    assert fp16_check.worst([1e-4, math.nan]) == math.inf
