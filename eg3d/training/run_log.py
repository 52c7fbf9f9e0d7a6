"""The run's log: rank 0 writes each message to the console (above the progress bar) and to log.txt."""

import os

import tqdm

from torch_utils import custom_ops


class RunLog:
    """`log(msg)` in every process; only rank 0 writes."""

    def __init__(self, run_dir: str, rank: int):
        self.path = os.path.join(run_dir, 'log.txt')
        self.rank = rank
        self._logged_fallbacks = set()

    def __call__(self, msg: str) -> None:
        if self.rank == 0:
            tqdm.tqdm.write(msg)
            with open(self.path, 'a') as f:
                f.write(msg + '\n')

    def op_fallbacks(self) -> None:
        """Each CUDA plugin the ops fell back from, with the reason, once (not only as a Python warning)."""
        for name, reason in custom_ops.unavailable_plugins().items():
            if name not in self._logged_fallbacks:
                self._logged_fallbacks.add(name)
                self(f'Warning: CUDA plugin "{name}" is unavailable, its ops run the slower reference implementation '
                     f'(set {custom_ops.IMPL_ENV}=cuda to make this an error). Reason: {reason}')
