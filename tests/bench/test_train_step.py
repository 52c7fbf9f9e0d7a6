"""bench/train_step.py: the CPU peak of live tensor bytes that stands in for CUDA's peak allocated memory."""
import sys
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parents[2] / 'bench'
sys.path.insert(0, str(BENCH_DIR))

from train_step import peak_tensor_bytes  # noqa: E402

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
