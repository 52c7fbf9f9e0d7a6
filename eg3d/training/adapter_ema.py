"""An exponential moving average (EMA) of the trained tensors: EG3D's G_ema, cheap for adapters.

EG3D keeps G_ema, an average of G's weights with a half-life in images that ramps up with the images
seen. A recipe with `ema_half_life` does the same for the trainable tensors only (the adapters: a few
hundred KB), and what the run hands out is the average:

  ema = AdapterEMA(trainable, recipe)                   # None-safe: make_ema returns None without EMA
  per step:  ema.update(cur_nimg, batch_size, total_nimg)   # after the optimizer step
  with applied(ema):                                    # the trainable tensors hold the average inside
      score the held-out views, write the best / periodic files

The training-state file keeps both the average and the raw tensors (`state_dict`), so a resumed run
continues the raw trajectory exactly even though the snapshot pickle holds the average.
"""

import contextlib
from typing import Iterator, List, Optional

import torch

from training.recipe import Recipe


class AdapterEMA:
    """EMA of `params` with a half-life of `recipe.ema_half_life` x the run's images, ramped up as in EG3D.

    The half-life of a step is min(ema_half_life * total_nimg, ema_rampup * cur_nimg): early in the run
    the average follows the weights closely, so it does not drag the starting point along.
    """

    def __init__(self, params: List[torch.nn.Parameter], recipe: Recipe):
        self.params = list(params)
        self.half_life = float(recipe.ema_half_life)
        self.rampup = recipe.ema_rampup
        self.average = [p.detach().clone() for p in self.params]

    def beta(self, cur_nimg: int, batch_size: int, total_nimg: int) -> float:
        """Weight of the old average in the step that ends at `cur_nimg` images."""
        half_life_nimg = self.half_life * total_nimg
        if self.rampup is not None:
            half_life_nimg = min(half_life_nimg, self.rampup * cur_nimg)
        return 0.5 ** (batch_size / max(half_life_nimg, 1e-8))

    @torch.no_grad()
    def update(self, cur_nimg: int, batch_size: int, total_nimg: int) -> None:
        beta = self.beta(cur_nimg, batch_size, total_nimg)
        for avg, p in zip(self.average, self.params):
            avg.lerp_(p.detach(), 1 - beta)

    @torch.no_grad()
    def restart(self) -> None:
        """The average starts again from the tensors as they are now (after an initialisation changed them)."""
        for avg, p in zip(self.average, self.params):
            avg.copy_(p.detach())

    def state_dict(self) -> dict:
        return dict(average=[a.clone() for a in self.average], raw=[p.detach().clone() for p in self.params])

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore the average and the raw tensors (the snapshot's generator holds the average)."""
        if len(state['average']) != len(self.params) or len(state['raw']) != len(self.params):
            raise ValueError(f'the saved EMA holds {len(state["average"])} tensors, this run trains {len(self.params)}')
        for avg, raw, saved_avg, p in zip(self.average, state['raw'], state['average'], self.params):
            avg.copy_(saved_avg)
            p.copy_(raw)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Inside, the trainable tensors hold the average; the raw ones come back on exit (also on errors)."""
        with torch.no_grad():
            for avg, p in zip(self.average, self.params):
                tmp = p.detach().clone()
                p.copy_(avg)
                avg.copy_(tmp)
        try:
            yield
        finally:
            with torch.no_grad():
                for avg, p in zip(self.average, self.params):
                    tmp = p.detach().clone()
                    p.copy_(avg)
                    avg.copy_(tmp)


def make_ema(params: List[torch.nn.Parameter], recipe: Recipe) -> Optional[AdapterEMA]:
    """The recipe's EMA of `params`, or None when the recipe keeps no average."""
    return AdapterEMA(params, recipe) if recipe.ema_half_life is not None else None


def applied(ema: Optional[AdapterEMA]) -> contextlib.AbstractContextManager:
    """`ema.swapped_in()`, or nothing to do without an EMA."""
    return ema.swapped_in() if ema is not None else contextlib.nullcontext()
