"""AdapterConfig: what to adapt and how (LoRA or AdaLoRA), serialisable to JSON.

One dataclass, PEFT-style: defaults reproduce My3DGen (rank 1 on the synthesis network and the
superresolution module), every field carries a help text in its metadata (`AdapterConfig.help()`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

COMPONENTS = ('mapping', 'synthesis', 'superresolution', 'decoder')
EXTRAS = ('none', 'my3dgen')
CONV_FACTORIZATIONS = ('my3dgen', 'standard')


def _field(default: Any, help: str) -> Any:  # pylint: disable=redefined-builtin
    return field(default=default, metadata={'help': help})


@dataclass
class AdapterConfig:
    """Configuration of the low-rank adapters injected by `adapters.inject`."""

    r: int = _field(1, 'LoRA rank of every adapted layer (ignored when adalora=True: init_r is used).')
    alpha: float = _field(1.0, 'LoRA alpha; the delta is scaled by alpha / r (AdaLoRA: alpha / (rank + 1e-5)).')
    dropout: float = _field(0.0, 'Dropout probability on the adapter branch input (training only).')
    targets: Tuple[str, ...] = _field(('synthesis', 'superresolution'),
        'Components to adapt, any of mapping, synthesis, superresolution, decoder.')
    extras: str = _field('none',
        "'none': adapter factors only. 'my3dgen': also train (as zero-initialised per-adapter deltas) the "
        'biases, noise strengths and constant input of the adapted layers, as My3DGen does.')
    conv_factorization: str = _field('my3dgen',
        "'my3dgen': A (r*k, in*k*k), B (out, r*k) as in My3DGen; 'standard': A (r, in*k*k), B (out, r).")
    adalora: bool = _field(False, 'Use AdaLoRA (SVD-form adapters with importance-based rank pruning).')
    init_r: int = _field(12, 'AdaLoRA: initial rank of every adapted layer.')
    target_r: int = _field(8, 'AdaLoRA: average rank per layer after pruning (sets the final budget).')
    tinit: int = _field(0, 'AdaLoRA: warm-up steps before pruning starts.')
    tfinal: int = _field(0, 'AdaLoRA: final steps trained with the rank pattern fixed.')
    delta_t: int = _field(1, 'AdaLoRA: steps between two rank re-allocations.')
    beta1: float = _field(0.85, 'AdaLoRA: EMA coefficient of the sensitivity |p * grad|.')
    beta2: float = _field(0.85, 'AdaLoRA: EMA coefficient of the uncertainty of the sensitivity.')
    orth_reg_weight: float = _field(0.5, 'AdaLoRA: weight of the orthogonal regularisation of P and Q.')
    total_step: Optional[int] = _field(None, 'AdaLoRA: total number of training steps (needed by the budget schedule).')

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        self.targets = tuple(self.targets)
        unknown = [t for t in self.targets if t not in COMPONENTS]
        if unknown or not self.targets:
            raise ValueError(f'AdapterConfig.targets must be a non-empty subset of {COMPONENTS}, got {self.targets}')
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f'AdapterConfig.targets has duplicates: {self.targets}')
        if self.extras not in EXTRAS:
            raise ValueError(f'AdapterConfig.extras must be one of {EXTRAS}, got {self.extras!r}')
        if self.conv_factorization not in CONV_FACTORIZATIONS:
            raise ValueError(f'AdapterConfig.conv_factorization must be one of {CONV_FACTORIZATIONS}, '
                             f'got {self.conv_factorization!r}')
        for name in ('r', 'init_r'):
            if int(getattr(self, name)) < 1:
                raise ValueError(f'AdapterConfig.{name} must be >= 1, got {getattr(self, name)}')
        if self.target_r < 0:
            raise ValueError(f'AdapterConfig.target_r must be >= 0, got {self.target_r}')
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f'AdapterConfig.dropout must be in [0, 1), got {self.dropout}')
        if self.delta_t < 1:
            raise ValueError(f'AdapterConfig.delta_t must be >= 1, got {self.delta_t}')
        for name in ('beta1', 'beta2'):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f'AdapterConfig.{name} must be in (0, 1), got {getattr(self, name)}')

    @property
    def rank(self) -> int:
        """Rank each layer starts with: init_r for AdaLoRA, r otherwise."""
        return int(self.init_r) if self.adalora else int(self.r)

    # -- serialisation -------------------------------------------------------------------------

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d['targets'] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> 'AdapterConfig':
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f'Unknown AdapterConfig fields: {unknown}')
        return cls(**d)

    def to_json(self, indent: Optional[int] = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> 'AdapterConfig':
        return cls.from_dict(json.loads(s))

    @classmethod
    def help(cls) -> Dict[str, str]:
        """Field name -> help text (for command-line interfaces and docs)."""
        return {f.name: f.metadata['help'] for f in dataclasses.fields(cls)}
