"""Many identities on one frozen base: adapter files loaded into and evicted from a fixed set of slots.

A rendering service keeps one copy of the base generator with `capacity` adapter slots and swaps
identities in and out by name; a batch may mix any loaded identities:

    registry = AdapterRegistry(G, capacity=64)
    registry.load('alice', 'adapters/alice-000500.safetensors')
    registry.load('bob', 'adapters/bob-000500.safetensors')
    registry.select(['alice', 'bob', 'alice'])   # sample i renders with names[i]'s adapter
    images = G.synthesis(ws, c)['image']

When every slot is taken, loading a new name evicts the least recently used identity. An evicted
slot is zeroed, so it renders the plain base until it is reused.
"""

from collections import OrderedDict
from typing import List, Optional, Sequence

import torch

from training.adapters.config import AdapterConfig
from training.adapters.files import load as load_adapter
from training.adapters.files import read_config
from training.adapters.inject import adapter_layers, inject, is_injected, num_adapters, select


class AdapterRegistry:
    """Named adapters in the slots of one generator, least recently used evicted first."""

    def __init__(self, G: torch.nn.Module, capacity: int, config: Optional[AdapterConfig] = None):
        """`G`: a plain generator (injected with `capacity` slots on the first load, with that file's
        config, or now with `config`) or one already injected with `capacity` adapters."""
        if int(capacity) < 1:
            raise ValueError(f'capacity must be >= 1, got {capacity}')
        self.G = G
        self.capacity = int(capacity)
        if is_injected(G) and num_adapters(G) != self.capacity:
            raise ValueError(f'the generator holds {num_adapters(G)} adapter slots, not capacity={self.capacity}')
        if config is not None and not is_injected(G):
            inject(G, config, num_adapters=self.capacity)
        self._slots: 'OrderedDict[str, int]' = OrderedDict()  # name -> slot, least recently used first

    @property
    def names(self) -> List[str]:
        """Loaded identities, least recently used first."""
        return list(self._slots)

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, name: str) -> bool:
        return name in self._slots

    def slot(self, name: str) -> int:
        if name not in self._slots:
            raise KeyError(f'identity {name!r} is not loaded (loaded: {", ".join(self._slots) or "none"})')
        return self._slots[name]

    def load(self, name: str, path: str) -> int:
        """Load the adapter file `path` as identity `name` (replacing its previous adapter); return its slot."""
        if not is_injected(self.G):
            inject(self.G, read_config(path), num_adapters=self.capacity)
        if name in self._slots:
            slot = self._slots[name]
        elif len(self._slots) < self.capacity:
            slot = min(set(range(self.capacity)) - set(self._slots.values()))
        else:
            slot = self._slots[next(iter(self._slots))]
            self.evict(next(iter(self._slots)))
        try:
            load_adapter(self.G, path, index=slot)
        except Exception:
            self._clear(slot)  # a partly copied adapter must not stay behind under any name
            self._slots.pop(name, None)
            raise
        self._slots[name] = slot
        self._slots.move_to_end(name)
        return slot

    def evict(self, name: str) -> None:
        """Forget identity `name`; its slot renders the base until it is reused."""
        self._clear(self.slot(name))
        del self._slots[name]

    def select(self, names: Sequence[str]) -> torch.Tensor:
        """Render sample i of the next batch with identity names[i]; returns the slot indices."""
        slots = torch.tensor([self.slot(n) for n in names], dtype=torch.int64)
        for n in dict.fromkeys(names):
            self._slots.move_to_end(n)
        select(self.G, slots)
        return slots

    @torch.no_grad()
    def _clear(self, slot: int) -> None:
        for _, layer in adapter_layers(self.G):
            for param in layer.adapter_parameters():
                param[slot].zero_()
            if 'rank_mask' in layer._buffers:  # pylint: disable=protected-access
                layer.rank_mask[slot].fill_(1)
