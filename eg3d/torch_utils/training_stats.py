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
    if name not in _counters:
        _counters[name] = dict()
    elems = torch.as_tensor(value)
    if elems.numel() == 0:
        return value
    elems = elems.detach().flatten().to(_reduce_dtype)
    moments = torch.stack([torch.ones_like(elems).sum(), elems.sum(), elems.square().sum()])
    moments = moments.to(_counter_dtype)
    device = moments.device
    if device not in _counters[name]:
        _counters[name][device] = torch.zeros_like(moments)
    _counters[name][device].add_(moments)
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
        self._cumulative: Dict[str, torch.Tensor] = dict()
        self._moments: Dict[str, torch.Tensor] = dict()
        self.update()
        self._moments.clear()

    def names(self) -> List[str]:
        """Names reported so far that match the regex."""
        return [name for name in _counters if self._regex.fullmatch(name)]

    def update(self) -> None:
        """Take the values accumulated since the previous update (one all-reduce if multi-process)."""
        if not self._keep_previous:
            self._moments.clear()
        for name, cumulative in _sync(self.names()):
            if name not in self._cumulative:
                self._cumulative[name] = torch.zeros([_num_moments], dtype=_counter_dtype)
            delta = cumulative - self._cumulative[name]
            self._cumulative[name].copy_(cumulative)
            if float(delta[0]) != 0:
                self._moments[name] = delta

    def _get_delta(self, name: str) -> torch.Tensor:
        if not self._regex.fullmatch(name):
            raise KeyError(f'"{name}" does not match this collector\'s regex')
        if name not in self._moments:
            self._moments[name] = torch.zeros([_num_moments], dtype=_counter_dtype)
        return self._moments[name]

    def num(self, name: str) -> int:
        return int(self._get_delta(name)[0])

    def mean(self, name: str) -> float:
        delta = self._get_delta(name)
        if int(delta[0]) == 0:
            return float('nan')
        return float(delta[1] / delta[0])

    def std(self, name: str) -> float:
        delta = self._get_delta(name)
        if int(delta[0]) == 0 or not np.isfinite(float(delta[1])):
            return float('nan')
        if int(delta[0]) == 1:
            return 0.0
        mean = float(delta[1] / delta[0])
        raw_var = float(delta[2] / delta[0])
        return float(np.sqrt(max(raw_var - mean * mean, 0)))

    def as_dict(self) -> dnnlib.EasyDict:
        """{name: EasyDict(num=, mean=, std=)} for every collected name."""
        stats = dnnlib.EasyDict()
        for name in self.names():
            stats[name] = dnnlib.EasyDict(num=self.num(name), mean=self.mean(name), std=self.std(name))
        return stats

    def __getitem__(self, name: str) -> float:
        return self.mean(name)


def _sync(names: List[str]) -> List[Tuple[str, torch.Tensor]]:
    """Move the per-device counters of `names` into the global cumulative counters."""
    if len(names) == 0:
        return []
    global _sync_called
    _sync_called = True

    device = _sync_device if _sync_device is not None else torch.device('cpu')
    deltas = []
    for name in names:
        delta = torch.zeros([_num_moments], dtype=_counter_dtype, device=device)
        for counter in _counters[name].values():
            delta.add_(counter.to(device))
            counter.zero_()
        deltas.append(delta)
    deltas = torch.stack(deltas)

    if _sync_device is not None:
        torch.distributed.all_reduce(deltas)

    deltas = deltas.cpu()
    for idx, name in enumerate(names):
        if name not in _cumulative:
            _cumulative[name] = torch.zeros([_num_moments], dtype=_counter_dtype)
        _cumulative[name].add_(deltas[idx])
    return [(name, _cumulative[name]) for name in names]
