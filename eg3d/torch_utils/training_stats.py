"""Cheap collection of training statistics across devices and processes (official API).

`report(name, value)` adds the count, sum and sum of squares of some scalars to per-device
counters; a `Collector` periodically sums those counters over devices and (after
`init_multiprocessing`) over processes with one all-reduce, and exposes mean/std/num.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Tuple

import numpy as np
import torch

import dnnlib

from . import misc

_num_moments = 3                  # [count, sum, sum of squares]
_reduce_dtype = torch.float32     # dtype of the per-report reduction
_counter_dtype = torch.float64    # dtype of the running counters
_rank = 0                         # rank of this process
_sync_device = None               # device used for the all-reduce; None = single process
_sync_called = False              # has _sync() run yet?
_counters: Dict[str, Dict[torch.device, torch.Tensor]] = dict()   # name -> device -> moments
_cumulative: Dict[str, torch.Tensor] = dict()                     # name -> moments (CPU), summed over all


def init_multiprocessing(rank: int, sync_device) -> None:
    """Enable cross-process collection. Call after `torch.distributed.init_process_group()` and
    before the first `Collector.update()`. `sync_device` is the device for the all-reduce
    (e.g. `torch.device('cuda', rank)`, or `torch.device('cpu')` with the gloo backend), or None."""
    global _rank, _sync_device
    if _sync_called:
        raise RuntimeError('init_multiprocessing() must be called before the first Collector.update()')
    _rank = rank
    _sync_device = sync_device


@misc.profiled_function
def report(name: str, value: Any) -> Any:
    """Record a set of scalars (Python number, list, array or tensor) under `name`; returns `value`.

    Every process must report every name at least once, in the same order; a process with
    nothing to report can call `report(name, [])`.
    """
    per_device = _counters.setdefault(name, dict())  # registers the name even for empty reports
    scalars = torch.as_tensor(value)
    if scalars.numel() == 0:
        return value
    flat = scalars.detach().flatten().to(_reduce_dtype)
    # Reduce on the tensor's own device (no host sync); accumulate in float64.
    stats = torch.stack([torch.ones_like(flat).sum(), flat.sum(), flat.square().sum()]).to(_counter_dtype)
    if stats.device not in per_device:
        per_device[stats.device] = torch.zeros_like(stats)
    per_device[stats.device].add_(stats)
    return value


def report0(name: str, value: Any) -> Any:
    """Like `report`, but only rank 0's scalars count (other ranks report nothing)."""
    report(name, value if _rank == 0 else [])
    return value


class Collector:
    """Mean/std/count of reported statistics between the last two calls of `update()`.

    `regex` selects which names to collect. With `keep_previous`, a statistic that received
    nothing since the previous update keeps its previous values.
    """

    def __init__(self, regex: str = '.*', keep_previous: bool = True):
        self._regex = re.compile(regex)
        self._keep_previous = keep_previous
        self._cumulative: Dict[str, torch.Tensor] = dict()  # global totals seen at the last update
        self._moments: Dict[str, torch.Tensor] = dict()     # what arrived between the last two updates
        # Start from the current totals, so that earlier reports are not counted.
        self.update()
        self._moments.clear()

    def names(self) -> List[str]:
        """Names reported so far that match the regex."""
        return [name for name in _counters if self._regex.fullmatch(name)]

    def update(self) -> None:
        """Take the values accumulated since the previous update (one all-reduce if multi-process)."""
        if not self._keep_previous:
            self._moments.clear()
        for name, total in _sync(self.names()):
            previous = self._cumulative.setdefault(name, torch.zeros([_num_moments], dtype=_counter_dtype))
            increment = total - previous
            previous.copy_(total)
            if float(increment[0]) != 0:
                self._moments[name] = increment

    def _get_delta(self, name: str) -> torch.Tensor:
        if not self._regex.fullmatch(name):
            raise KeyError(f'"{name}" does not match this collector\'s regex')
        return self._moments.setdefault(name, torch.zeros([_num_moments], dtype=_counter_dtype))

    def _stats(self, name: str) -> Tuple[float, float, float]:
        count, total, total_sq = self._get_delta(name).tolist()
        return count, total, total_sq

    def num(self, name: str) -> int:
        return int(self._stats(name)[0])

    def mean(self, name: str) -> float:
        count, total, _ = self._stats(name)
        return float('nan') if count == 0 else total / count

    def std(self, name: str) -> float:
        count, total, total_sq = self._stats(name)
        if count == 0 or not np.isfinite(total):
            return float('nan')
        if count == 1:
            return 0.0
        mean = total / count
        # Var = E[x^2] - E[x]^2, clipped at 0 against rounding.
        return float(np.sqrt(max(total_sq / count - mean * mean, 0)))

    def as_dict(self) -> dnnlib.EasyDict:
        """{name: EasyDict(num=, mean=, std=)} for every collected name."""
        return dnnlib.EasyDict({name: dnnlib.EasyDict(num=self.num(name), mean=self.mean(name), std=self.std(name))
                                for name in self.names()})

    def __getitem__(self, name: str) -> float:
        return self.mean(name)


def _sync(names: List[str]) -> List[Tuple[str, torch.Tensor]]:
    """Move the per-device counters of `names` into the global cumulative counters."""
    if not names:
        return []
    global _sync_called
    _sync_called = True

    device = torch.device('cpu') if _sync_device is None else _sync_device
    rows = []
    for name in names:
        row = torch.zeros([_num_moments], dtype=_counter_dtype, device=device)
        for counter in _counters[name].values():
            row.add_(counter.to(device))
            counter.zero_()  # handed over: start counting afresh
        rows.append(row)
    table = torch.stack(rows)
    if _sync_device is not None:
        torch.distributed.all_reduce(table)  # sum over processes

    table = table.cpu()
    for name, row in zip(names, table):
        _cumulative.setdefault(name, torch.zeros([_num_moments], dtype=_counter_dtype)).add_(row)
    return [(name, _cumulative[name]) for name in names]
