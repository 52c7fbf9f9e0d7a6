"""Statistics of a tick (the steps between two reports), summed over processes, and where they are written.

Per step: the loss terms (each a mean over the global batch), every sample's total loss by identity,
and how many gradient entries were NaN/inf. At the tick: one float64 all-reduce gives every process
the same means; rank 0 appends them to stats.jsonl and TensorBoard.

(These are not reported through torch_utils.training_stats, EG3D's collector: it reduces in float32,
keeps per-name counters in module globals, and cannot carry the per-identity sums, so it was removed.)
"""

import json
import os
from typing import Dict, Tuple

import numpy as np
import torch

# Entries that locate a line of stats.jsonl rather than measure something (not TensorBoard scalars).
_POSITION_KEYS = ('tick', 'kimg', 'step', 'timestamp')


class TickStats:
    """Sums over the steps of this tick, in this process."""

    def __init__(self, num_identities: int, device: torch.device):
        self.num_identities = num_identities
        self.term_sums: Dict[str, list] = {}                     # name: [sum of step means, steps]
        self.identity_sums = np.zeros([2, num_identities])      # per identity: sum of losses, samples
        self.nonfinite = torch.zeros([2], dtype=torch.int64, device=device)  # entries, steps with any

    def add_step(self, terms: Dict[str, float], nonfinite_entries: torch.Tensor) -> None:
        for name, value in terms.items():
            acc = self.term_sums.setdefault(name, [0.0, 0])
            acc[0] += value
            acc[1] += 1
        self.nonfinite += torch.stack([nonfinite_entries, (nonfinite_entries > 0).long()])

    def add_samples(self, identity: np.ndarray, per_sample_loss: torch.Tensor) -> None:
        np.add.at(self.identity_sums[0], identity, per_sample_loss.detach().cpu().double().numpy())
        np.add.at(self.identity_sums[1], identity, 1)

    def reduce(self, num_gpus: int) -> Tuple[Dict[str, float], np.ndarray, Tuple[int, int]]:
        """(mean of each term, per-identity [sum, count] [2, K], (nonfinite entries, steps)) over all processes.

        Every process adds the share of its chunks to a step's terms, so the sum over processes is
        the step's value; the step count is divided by the number of processes that counted it.
        """
        names = sorted(self.term_sums)
        packed = torch.tensor([self.term_sums[n][0] for n in names] + [self.term_sums[n][1] for n in names] +
                              self.identity_sums.ravel().tolist(), dtype=torch.float64, device=self.nonfinite.device)
        if num_gpus > 1:
            torch.distributed.all_reduce(packed)
        means = {n: packed[i].item() / max(packed[len(names) + i].item() / num_gpus, 1) for i, n in enumerate(names)}
        per_identity = packed[2 * len(names):].reshape(2, self.num_identities).cpu().numpy()
        entries, steps = (int(v) for v in self.nonfinite.tolist())
        return means, per_identity, (entries, steps)

    def reset(self) -> None:
        self.term_sums = {}
        self.identity_sums[:] = 0
        self.nonfinite.zero_()


class StatsWriter:
    """stats.jsonl (one JSON line per report) and, when installed, TensorBoard; rank 0 only."""

    def __init__(self, run_dir: str, rank: int):
        self.path = os.path.join(run_dir, 'stats.jsonl') if rank == 0 else None
        self.tensorboard = None
        if rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tensorboard = SummaryWriter(run_dir)
            except ImportError:
                pass  # TensorBoard is optional.

    def write(self, entry: Dict[str, float], global_step: int) -> None:
        if self.path is None:
            return
        with open(self.path, 'a') as f:
            f.write(json.dumps(entry) + '\n')
        if self.tensorboard is not None:
            for key, value in entry.items():
                if key not in _POSITION_KEYS:
                    self.tensorboard.add_scalar(key, value, global_step=global_step)
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
