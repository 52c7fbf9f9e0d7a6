"""bench/train_step.py: the CPU peak of live tensor bytes that stands in for CUDA's peak allocated memory."""
import importlib.util
from pathlib import Path

import torch

# Loaded from its file: with bench/ first on sys.path, `import viewer` in later test modules would find
# bench/viewer.py instead of eg3d/viewer.py.
_SPEC = importlib.util.spec_from_file_location('bench_train_step',
                                               Path(__file__).resolve().parents[2] / 'bench' / 'train_step.py')
train_step = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(train_step)
peak_tensor_bytes = train_step.peak_tensor_bytes

MIB = 1 << 20


def test_peak_counts_what_is_alive_at_once():
    def step():
        a = torch.empty(MIB)           # 4 MiB
        b = a + 1                      # 8 MiB alive
        del a
        c = torch.empty(2 * MIB)       # b + c: 12 MiB
        del b, c
        d = torch.empty(MIB)
        e = torch.empty(4 * MIB)       # d + e: 20 MiB, the peak
        return d, e

    assert peak_tensor_bytes(step) == 20 * MIB


def test_views_count_their_storage_once():
    def step():
        a = torch.empty(MIB)
        views = [a[i::4] for i in range(4)] + [a.view(2, -1)]
        return views

    assert peak_tensor_bytes(step) == 4 * MIB
