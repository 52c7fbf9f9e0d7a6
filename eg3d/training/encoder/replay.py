"""Replay of ReStyle states: extra latent-loss updates without new renders (for CPU-sized budgets).

Every iteration of a training batch is one example of the problem the encoder solves: given the photo,
the render y of the current latent w and the camera, predict the residual w_true - w. Rendering is what
costs (a G forward per example); the encoder update is cheap. The buffer keeps the latest examples
(photo and render already resized to the encoder's input, as float16) whose true latent is known, and
`updates` extra Adam steps per training step draw minibatches from it with the latent loss only.
Each photo also adds its converged example (the photo as its own render, at its true latent: residual
zero), as the `converged` loss term does; without it early buffers hold only inputs near w_avg.
The buffer is part of the training state, so a resumed run still continues exactly.

Replay trades generalization for updates: an example drawn many times is learnt by heart. Measured on the demo
base (docs/benchmarks.md, encoder round 5): at 8 draws per example the encoder fitted the buffer three times
better than fresh photos and got worse the longer it trained; at 1.3 draws it did not, and it was 2-4x better.
"""

from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F

from training.encoder.loss import latent_loss
from training.encoder.restyle import Iteration

FIELDS = ('inputs', 'cameras', 'ws', 'targets')
# Above this many draws per stored example the training loop warns that the encoder will memorize the buffer.
MEMORIZING_DRAWS = 2.0
# train_encoder.py's default: about 4/3 draws per example, the replay of encoder rounds 5-9 (docs/benchmarks.md).
DEFAULT_DRAWS = (4, 3)


def default_updates(iters: int) -> int:
    """Replay updates per step that draw each stored example about 4/3 times: 8 at 5 iterations."""
    numerator, denominator = DEFAULT_DRAWS
    return numerator * (iters + 1) // denominator


def draws_per_example(replay: int, iters: int) -> float:
    """How often a stored example is drawn, on average, before a full buffer drops it.

    Each photo whose latent is known adds iters + 1 examples per step, and each of the `replay` updates draws one
    example per photo, whatever the capacity (a larger buffer keeps an example longer but draws it less often).
    Photos without a latent add nothing, so mixed data draws the known ones more often than this.
    """
    return replay / (iters + 1)


class ReplayBuffer:
    """FIFO of (photo ++ render at the encoder's input size, camera, current W+, true W+), at most `capacity`."""

    def __init__(self, capacity: int, input_resolution: int):
        self.capacity = int(capacity)
        self.input_resolution = int(input_resolution)
        self.data: Dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return 0 if not self.data else int(self.data['ws'].shape[0])

    def add(self, photos: torch.Tensor, cameras: torch.Tensor, states: List[Iteration], targets: torch.Tensor,
            known: torch.Tensor) -> None:
        """The inputs of every iteration (state i-1: w, render) with the photo, and the converged example
        (the photo as the render, at the true w); only rows whose w is known."""
        keep = known.cpu()
        if self.capacity <= 0 or not bool(keep.any()):
            return
        small = self._resize(photos.detach().float().cpu()[keep])
        rows = {name: [] for name in FIELDS}
        for state in states[:-1]:  # the last state is never an input
            rows['inputs'].append(torch.cat([small, self._resize(state.image.float().cpu()[keep])], dim=1).half())
            rows['cameras'].append(cameras.detach().cpu()[keep])
            rows['ws'].append(state.ws.cpu()[keep])
            rows['targets'].append(targets.detach().cpu()[keep])
        rows['inputs'].append(torch.cat([small, small], dim=1).half())
        rows['cameras'].append(cameras.detach().cpu()[keep])
        rows['ws'].append(targets.detach().cpu()[keep])
        rows['targets'].append(targets.detach().cpu()[keep])
        for name in FIELDS:
            new = torch.cat(rows[name])
            joined = torch.cat([self.data[name], new]) if name in self.data else new
            self.data[name] = joined[-self.capacity:]

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        r = self.input_resolution
        return F.interpolate(x, size=(r, r), mode='area') if x.shape[-1] > r else x

    def update(self, encoder: torch.nn.Module, batch_size: int, seed: int, device: torch.device) -> torch.Tensor:
        """Latent loss of one minibatch drawn with `seed` (to backpropagate); the caller steps the optimizer.

        An empty buffer gives a zero loss that still reaches every parameter (all processes then all-reduce alike).
        """
        if len(self) == 0:
            return sum(p.sum() for p in encoder.parameters()) * 0
        index = torch.from_numpy(np.random.RandomState(seed % (2**32)).randint(0, len(self), batch_size))
        inputs = self.data['inputs'][index].to(device).float()
        ws = self.data['ws'][index].to(device)
        pred = ws + encoder(inputs[:, :3], inputs[:, 3:], self.data['cameras'][index].to(device))
        return latent_loss(pred, self.data['targets'][index].to(device), torch.ones(batch_size, device=device)).mean()

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return dict(self.data)

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.data = {name: state[name] for name in FIELDS} if state else {}
