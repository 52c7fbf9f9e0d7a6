"""Training recipes: the optimizer, its learning-rate schedule and gradient clipping, by name.

A recipe is plain data (`Recipe`, serialisable to a dict for training_options.json):

  optimizer = make_optimizer(G, trainable, recipe)    # Adam (or schedule-free Adam); LoRA+ puts the B
                                                      # factors in their own group, a fan-in exponent
                                                      # gives each layer's factors their own rate
  per step:   set_learning_rate(optimizer, recipe, cur_nimg, total_nimg)   # warm-up, then decay
              clip_gradients(trainable, recipe)        # after the all-reduce, before the step

`RECIPES['my3dgen']` is the paper's (EG3D's G optimizer at a constant rate), a step per batch;
`RECIPES['adapter-per-image']`, the default, was chosen by `bench/recipe.py` (docs/training.md, "Recipes"): it
takes the batch one image of each identity at a time (step_batch).
"""

import dataclasses
import math
from typing import Any, Dict, List, Optional, Tuple

import torch

from training.adapters.layers import AdapterLayer
from training.riemannian import FactorPair, RiemannianAdam
from training.schedule_free import ScheduleFreeAdam

DECAYS = ('constant', 'cosine')
OPTIMIZERS = ('adam', 'schedulefree')
# The class each optimizer builds (Recipe.optimizer_class).
OPTIMIZER_CLASSES = dict(adam='torch.optim.Adam', schedulefree='training.schedule_free.ScheduleFreeAdam')
INITS = ('random', 'gradient')
# The fan-in at which a fan-in exponent leaves a factor's rate unchanged: EG3D's w_dim, the fan-in of every
# affine (style) layer (also the median fan-in of the tiny generator's adapted layers).
FAN_IN_REFERENCE = 512


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Adam settings and schedule of a personalization run."""

    name: str
    lr: float                            # peak learning rate (of the A factors, or of every parameter)
    betas: Tuple[float, float]           # Adam betas
    eps: float = 1e-8
    warmup: float = 0.0                  # fraction of the run's images with a linear warm-up from 0
    decay: str = 'constant'              # after warm-up: 'constant', or 'cosine' down to final_lr * lr
    final_lr: float = 1.0                # end of the cosine decay, as a fraction of lr
    b_lr_ratio: float = 1.0              # LoRA+: learning rate of the B factors / lr
    grad_clip: Optional[float] = None    # max global L2 norm of the trainable gradients; None = no clipping
    ema_half_life: Optional[float] = None  # EMA of the trained tensors (training/adapter_ema.py): half-life as a
                                           # fraction of the run's images; None = no EMA (files hold the raw weights)
    ema_rampup: Optional[float] = None   # the EMA's half-life is at most this fraction of the images seen (EG3D's)
    init: str = 'random'                 # adapters' start: 'random' (PEFT's: A random, B = 0) or 'gradient' (A from
                                         # the first batch's weight gradients, training/gradient_init.py; B = 0)
    init_passes: int = 2                 # init='gradient': forward/backward passes on the first batch (no new images)
    optimizer: str = 'adam'              # 'adam', or 'schedulefree' (training/schedule_free.py: its own average
                                         # replaces the decay and the EMA, so decay='constant' and no EMA)
    a_fan_in_exponent: float = 0.0       # each layer's A factor at rate * (fan_in / FAN_IN_REFERENCE)^-exponent: the
                                         # delta is weight_gain * B A with weight_gain = fan_in^-1/2, so an A step
                                         # moves the output ~fan_in^1/2 times as much as in a narrow layer
    b_fan_in_exponent: float = 0.0       # the same for the B factors (on top of b_lr_ratio)
    riemannian_reg: Optional[float] = None  # Riemannian-preconditioned LoRA (training/riemannian.py) with this
                                            # damping; None = plain Adam on the raw gradients
    step_search: Optional[float] = None  # after each step, a quadratic fit of the batch loss along it (one more
                                         # forward pass, training/step_search.py) scales it by a factor in
                                         # [0, step_search]; None = the optimizer's step as it is
    images_per_step: Optional[int] = None  # images of each identity per optimizer step: the batch is taken in
                                           # several steps (step_batch); None = the whole batch in one step, EG3D's

    def __post_init__(self) -> None:
        problems = []
        if not self.lr > 0:
            problems.append(f'lr must be > 0, got {self.lr}')
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f'betas must be two numbers in [0, 1), got {list(self.betas)}')
        if not 0 <= self.warmup < 1:
            problems.append(f'warmup must be a fraction in [0, 1), got {self.warmup}')
        if self.decay not in DECAYS:
            problems.append(f'decay must be one of {DECAYS}, got {self.decay!r}')
        if not 0 <= self.final_lr <= 1:
            problems.append(f'final_lr must be in [0, 1], got {self.final_lr}')
        if not self.b_lr_ratio > 0:
            problems.append(f'b_lr_ratio must be > 0, got {self.b_lr_ratio}')
        if self.grad_clip is not None and not self.grad_clip > 0:
            problems.append(f'grad_clip must be > 0 or None, got {self.grad_clip}')
        if self.ema_half_life is not None and not self.ema_half_life > 0:
            problems.append(f'ema_half_life must be > 0 or None, got {self.ema_half_life}')
        if self.ema_rampup is not None and not self.ema_rampup > 0:
            problems.append(f'ema_rampup must be > 0 or None, got {self.ema_rampup}')
        if self.init not in INITS:
            problems.append(f'init must be one of {INITS}, got {self.init!r}')
        if not (isinstance(self.init_passes, int) and self.init_passes >= 1):
            problems.append(f'init_passes must be an integer >= 1, got {self.init_passes!r}')
        if self.optimizer not in OPTIMIZERS:
            problems.append(f'optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}')
        if self.optimizer == 'schedulefree' and (self.decay != 'constant' or self.ema_half_life is not None):
            problems.append('optimizer=schedulefree averages the iterates itself: it needs decay=constant and '
                            'ema_half_life=None')
        if self.riemannian_reg is not None and not (isinstance(self.riemannian_reg, (int, float)) and
                                                    self.riemannian_reg > 0 and math.isfinite(self.riemannian_reg)):
            problems.append(f'riemannian_reg must be > 0 or None, got {self.riemannian_reg!r}')
        if self.riemannian_reg is not None and self.optimizer != 'adam':
            problems.append(f'riemannian_reg preconditions Adam\'s gradients: it needs optimizer=adam, got '
                            f'{self.optimizer!r}')
        if self.step_search is not None and not (isinstance(self.step_search, (int, float)) and
                                                 0 < self.step_search <= 100 and math.isfinite(self.step_search)):
            problems.append(f'step_search must be a number in (0, 100] or None, got {self.step_search!r}')
        if self.step_search is not None and self.optimizer != 'adam':
            problems.append(f'step_search scales the step the parameters take, but optimizer={self.optimizer!r} '
                            f'keeps its own iterates: it needs optimizer=adam')
        if self.images_per_step is not None and not (isinstance(self.images_per_step, int) and
                                                     not isinstance(self.images_per_step, bool) and
                                                     self.images_per_step >= 1):
            problems.append(f'images_per_step must be an integer >= 1 or None, got {self.images_per_step!r}')
        for field in ('a_fan_in_exponent', 'b_fan_in_exponent'):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and abs(value) <= 2):
                problems.append(f'{field} must be a number in [-2, 2], got {value!r}')
        if problems:
            raise ValueError(f'recipe {self.name!r}: ' + '; '.join(problems))
        object.__setattr__(self, 'betas', tuple(float(b) for b in self.betas))

    @property
    def optimizer_class(self) -> str:
        """The class make_optimizer builds, as training_options.json records it (G_opt_kwargs, EG3D's key)."""
        if self.riemannian_reg is not None:
            return 'training.riemannian.RiemannianAdam'
        return OPTIMIZER_CLASSES[self.optimizer]

    @property
    def scales_by_fan_in(self) -> bool:
        return self.a_fan_in_exponent != 0 or self.b_fan_in_exponent != 0

    def to_dict(self) -> Dict[str, Any]:
        return dict(dataclasses.asdict(self), betas=list(self.betas))

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> 'Recipe':
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f'unknown recipe fields: {unknown}')
        return cls(**d)

    def with_overrides(self, lr: Optional[float] = None, betas: Optional[List[float]] = None) -> 'Recipe':
        """This recipe with --glr / --betas applied where given."""
        changes = {k: v for k, v in dict(lr=lr, betas=tuple(betas) if betas is not None else None).items()
                   if v is not None}
        return dataclasses.replace(self, **changes)


RECIPES = {
    # My3DGen / EG3D: Adam(lr 0.0025, betas (0, 0.99), eps 1e-8), one group, constant rate, no clipping.
    'my3dgen': Recipe('my3dgen', lr=0.0025, betas=(0.0, 0.99)),
    # Measured by bench/recipe.py (docs/training.md, "Recipes").
    'adapter': Recipe('adapter', lr=0.02, betas=(0.9, 0.99), warmup=0.1, decay='cosine', final_lr=0.0,
                      b_lr_ratio=4.0, grad_clip=None, ema_half_life=0.05, ema_rampup=0.5),
    # The same with schedule-free Adam (its average in place of the cosine and the EMA): faster on the bench
    # (3.4x against 2.8x over 8 runs) but with a larger first overshoot, and no AdaLoRA (docs/training.md).
    'adapter-sf': Recipe('adapter-sf', lr=0.02, betas=(0.9, 0.99), warmup=0.1, decay='constant', final_lr=1.0,
                         b_lr_ratio=4.0, grad_clip=None, ema_half_life=None, ema_rampup=None,
                         optimizer='schedulefree'),
    # `adapter` with a step search (training/step_search.py): at FFHQ's layer widths faster at the start and
    # better at the end, for one more forward pass per step (docs/training.md).
    'adapter-search': Recipe('adapter-search', lr=0.02, betas=(0.9, 0.99), warmup=0.1, decay='cosine', final_lr=0.0,
                             b_lr_ratio=4.0, grad_clip=None, ema_half_life=0.05, ema_rampup=0.5, step_search=2.0),
    # `adapter-search` taking one image of each identity per step: the same images and compute buy four times the
    # steps of a batch of 4, and reach My3DGen's best in 5.4x fewer images (docs/training.md, "Recipes").
    'adapter-per-image': Recipe('adapter-per-image', lr=0.02, betas=(0.9, 0.99), warmup=0.1, decay='cosine',
                                final_lr=0.0, b_lr_ratio=4.0, grad_clip=None, ema_half_life=0.05, ema_rampup=0.5,
                                step_search=2.0, images_per_step=1),
}
DEFAULT_RECIPE = 'adapter-per-image'


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f'unknown recipe {name!r}; choose one of {", ".join(RECIPES)}')
    return RECIPES[name]


def step_batch(recipe: Recipe, batch_size: int, batch_gpu: int, num_identities: int, num_gpus: int) -> Tuple[int, int]:
    """(images per optimizer step over all processes, images per forward pass per process) of a run with
    `batch_size` images per step as EG3D counts them (--batch) and `batch_gpu` per pass (--batch-gpu).

    A recipe with images_per_step takes the batch in steps of that many images of each identity: the
    smallest such step that every process gets an equal share of (so one person on 4 GPUs takes steps of
    4 images, and 16 people on 4 GPUs steps of 16), never more than the batch; a pass is then the largest
    divisor of a process's share that is at most batch_gpu. The image stream is the same either way: step
    s of n images takes images s * n ... (s + 1) * n - 1 of it, so such a run equals a run at --batch n.
    """
    if recipe.images_per_step is None:
        return batch_size, batch_gpu
    step = min(batch_size, math.lcm(recipe.images_per_step * num_identities, num_gpus))
    per_process = step // num_gpus
    per_pass = max(d for d in range(1, min(batch_gpu, per_process) + 1) if per_process % d == 0)
    return step, per_pass

#----------------------------------------------------------------------------


def _is_b_factor(name: str) -> bool:
    return name.endswith('.lora_B')


def _lr_scales(G: torch.nn.Module, trainable: List[torch.nn.Parameter], recipe: Recipe) -> List[float]:
    """Each trainable tensor's rate relative to recipe.lr: b_lr_ratio for the B factors (LoRA+), times
    (fan_in / FAN_IN_REFERENCE)^-exponent for the A and B factors of a layer with that fan-in (AdaLoRA's
    singular values E keep the base rate)."""
    b_ids = {id(p) for name, p in G.named_parameters() if _is_b_factor(name)}
    fan_ins, adapter_ids = {}, set()
    for module in G.modules():
        if isinstance(module, AdapterLayer):
            fan_ins[id(module.lora_A)] = fan_ins[id(module.lora_B)] = module.fan_in
            adapter_ids.update(id(p) for p in module.adapter_parameters())
    if recipe.scales_by_fan_in and any(id(p) not in adapter_ids for p in trainable):
        raise ValueError(f'recipe {recipe.name!r}: a fan-in exponent scales the rates of adapter factors, but '
                         f'full fine-tuning trains the base weights; use a recipe without a_fan_in_exponent and '
                         f'b_fan_in_exponent')
    scales = []
    for p in trainable:
        is_b = id(p) in b_ids
        exponent = recipe.b_fan_in_exponent if is_b else recipe.a_fan_in_exponent
        fan_in_scale = (fan_ins[id(p)] / FAN_IN_REFERENCE) ** -exponent if id(p) in fan_ins and exponent else 1.0
        scales.append((recipe.b_lr_ratio if is_b else 1.0) * fan_in_scale)
    return scales


def _factor_pairs(G: torch.nn.Module, trainable: List[torch.nn.Parameter], recipe: Recipe) -> List[FactorPair]:
    """(lora_A, lora_B) of every adapted layer, for the Riemannian preconditioner; every trainable tensor must
    be one of them."""
    pairs = [(m.lora_A, m.lora_B) for m in G.modules() if isinstance(m, AdapterLayer) and m.rank > 0]
    paired = {id(p) for pair in pairs for p in pair}
    if any(id(p) not in paired for p in trainable):
        raise ValueError(f'recipe {recipe.name!r}: riemannian_reg preconditions the A and B factors of LoRA '
                         f'adapters, but this run also trains other tensors (full fine-tuning, or AdaLoRA\'s '
                         f'singular values); use an Adam recipe without riemannian_reg')
    trained = {id(p) for p in trainable}
    return [(A, B) for A, B in pairs if id(A) in trained and id(B) in trained]


def make_optimizer(G: torch.nn.Module, trainable: List[torch.nn.Parameter], recipe: Recipe) -> torch.optim.Optimizer:
    """Adam (schedule-free, or on Riemannian-preconditioned gradients) over `trainable` (in that order). Each
    group records `lr_scale`, its rate relative to recipe.lr.

    Tensors at the same rate share a group, in the order of their first tensor, so without LoRA+ and
    fan-in exponents there is one group, exactly the optimizer EG3D builds; with LoRA+ alone, the A
    factors' group and the B factors' group.
    """
    groups: Dict[float, dict] = {}
    for p, scale in zip(trainable, _lr_scales(G, trainable, recipe)):
        groups.setdefault(scale, dict(params=[], lr_scale=scale))['params'].append(p)
    groups = list(groups.values())
    for group in groups:
        group['lr'] = recipe.lr * group['lr_scale']
    if recipe.riemannian_reg is not None:
        return RiemannianAdam(groups, _factor_pairs(G, trainable, recipe), recipe.riemannian_reg, lr=recipe.lr,
                              betas=recipe.betas, eps=recipe.eps)
    if recipe.optimizer == 'schedulefree':
        return ScheduleFreeAdam(groups, lr=recipe.lr, betas=recipe.betas, eps=recipe.eps)
    return torch.optim.Adam(groups, lr=recipe.lr, betas=recipe.betas, eps=recipe.eps)


def lr_factor(recipe: Recipe, cur_nimg: int, total_nimg: int) -> float:
    """Learning rate of the step that starts after `cur_nimg` images, as a fraction of recipe.lr."""
    progress = min(max(cur_nimg / max(total_nimg, 1), 0.0), 1.0)
    if recipe.warmup > 0 and progress < recipe.warmup:
        return (cur_nimg + 1) / (recipe.warmup * total_nimg + 1)
    if recipe.decay == 'constant':
        return 1.0
    span = max(1 - recipe.warmup, 1e-12)
    cosine = 0.5 * (1 + math.cos(math.pi * (progress - recipe.warmup) / span))
    return recipe.final_lr + (1 - recipe.final_lr) * cosine


def set_learning_rate(optimizer: torch.optim.Optimizer, recipe: Recipe, cur_nimg: int, total_nimg: int) -> float:
    """Set every group's rate for the next step; returns the base rate (recipe.lr times the schedule)."""
    lr = recipe.lr * lr_factor(recipe, cur_nimg, total_nimg)
    for group in optimizer.param_groups:
        group['lr'] = lr * group.get('lr_scale', 1.0)  # states saved before recipes had one group
    return lr


def clip_gradients(params: List[torch.nn.Parameter], recipe: Recipe) -> Optional[float]:
    """Clip the global gradient norm to recipe.grad_clip; returns the norm before clipping (None: no clipping)."""
    if recipe.grad_clip is None:
        return None
    return float(torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip))
