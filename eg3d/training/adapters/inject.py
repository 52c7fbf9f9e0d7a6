"""Injecting adapters into a generator, selecting adapters per sample, counting and merging.

`inject` walks the targeted components of the generator and replaces, in place, every
FullyConnectedLayer (mapping FCs, style affines, decoder FCs), Conv2dLayer, SynthesisLayer and
ToRGBLayer by the matching wrapper of `layers.py`, with the original layer attached as its child
`base_layer` (no copy). The base is frozen; only adapter tensors require grad.
"""

from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from training import networks_stylegan2 as sg2
from training.adapters.config import COMPONENTS, AdapterConfig
from training.adapters.layers import (AdapterLayer, LoraConv2dLayer, LoraFullyConnectedLayer,
                                      LoraSynthesisLayer, LoraToRGBLayer)

CONFIG_ATTR = 'adapter_config'  # plain dict stored on the generator by inject()

# ----------------------------------------------------------------------------
# Walking the generator.


def component_roots(G: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    """Component name -> module for the components G has.

    TriPlaneGenerator: mapping / synthesis from `G.backbone`, plus `G.superresolution`, `G.decoder`.
    A StyleGAN2 Generator (or any module) provides whichever of these attributes are modules.
    """
    roots = {}
    backbone = G._modules.get('backbone', None)
    for name in COMPONENTS:
        host = backbone if (backbone is not None and name in ('mapping', 'synthesis')) else G
        module = host._modules.get(name, None)
        if isinstance(module, torch.nn.Module):
            roots[name] = module
    return roots


def base_name(name: str) -> str:
    """Module name in the plain generator: the name with the wrappers' `base_layer` hops removed."""
    return '.'.join(part for part in name.split('.') if part != 'base_layer')


def adapter_layers(G: torch.nn.Module) -> List[Tuple[str, AdapterLayer]]:
    """(name in G, wrapper) for every adapter wrapper, parents before children."""
    return [(name, m) for name, m in G.named_modules() if isinstance(m, AdapterLayer)]


def is_injected(G: torch.nn.Module) -> bool:
    """Whether G holds adapter wrappers."""
    return any(isinstance(m, AdapterLayer) for m in G.modules())


def get_config(G: torch.nn.Module) -> AdapterConfig:
    """The AdapterConfig G was injected with."""
    cfg = G.__dict__.get(CONFIG_ATTR, None)
    if cfg is None:
        raise ValueError('This generator has no adapters (call adapters.inject or adapters.load first)')
    return AdapterConfig.from_dict(cfg)


def num_adapters(G: torch.nn.Module) -> int:
    """K, the number of adapters every wrapper holds."""
    layers = adapter_layers(G)
    if not layers:
        raise ValueError('This generator has no adapters (call adapters.inject or adapters.load first)')
    return layers[0][1].num_adapters

# ----------------------------------------------------------------------------
# Injection.


def layer_rank(cfg: AdapterConfig, kernel_size: int) -> Tuple[int, int]:
    """(R, rank_unit): inner dimension of a layer's factors and the rank unit (k for 'my3dgen' convs)."""
    unit = int(kernel_size) if cfg.conv_factorization == 'my3dgen' else 1
    return cfg.rank * unit, unit


def layer_scaling(cfg: AdapterConfig, rank_unit: int) -> float:
    """LoRA: alpha / r. AdaLoRA (PEFT): alpha / (initial rank + 1e-5), alpha <= 0 meaning alpha = rank."""
    if not cfg.adalora:
        return float(cfg.alpha) / float(cfg.r)
    r0 = float(cfg.init_r * rank_unit)
    alpha = float(cfg.alpha) if cfg.alpha > 0 else r0
    return alpha / (r0 + 1e-5)


def _make_wrapper(base: torch.nn.Module, cfg: AdapterConfig, K: int, rank: Optional[int],
                  const_shape: Optional[Sequence[int]]) -> AdapterLayer:
    extras = (cfg.extras == 'my3dgen')
    common = dict(num_adapters=K, dropout=cfg.dropout, adalora=cfg.adalora)
    if isinstance(base, sg2.FullyConnectedLayer):
        R, unit = layer_rank(cfg, 1)
        wrapper = LoraFullyConnectedLayer(base.in_features, base.out_features, rank=R if rank is None else rank,
            scaling=layer_scaling(cfg, unit), rank_unit=unit, bias_delta=extras and base.bias is not None, **common)
    else:
        O, I, kh, kw = base.weight.shape
        if kh != kw:
            raise ValueError(f'Only square kernels are supported, got {tuple(base.weight.shape)}')
        R, unit = layer_rank(cfg, kh)
        kwargs = dict(rank=R if rank is None else rank, scaling=layer_scaling(cfg, unit), rank_unit=unit, **common)
        if isinstance(base, sg2.SynthesisLayer):
            wrapper = LoraSynthesisLayer(I, O, kh, bias_delta=extras, noise_delta=extras and base.use_noise,
                                         const_shape=list(const_shape) if (extras and const_shape) else None, **kwargs)
        elif isinstance(base, sg2.ToRGBLayer):
            wrapper = LoraToRGBLayer(I, O, kh, bias_delta=extras, **kwargs)
        elif isinstance(base, sg2.Conv2dLayer):
            wrapper = LoraConv2dLayer(I, O, kh, bias_delta=extras and base.bias is not None, **kwargs)
        else:
            raise TypeError(f'No adapter for {type(base).__name__}')
    wrapper.to(device=base.weight.device)
    wrapper.base_layer = base
    return wrapper


_TARGET_TYPES = (sg2.FullyConnectedLayer, sg2.Conv2dLayer, sg2.SynthesisLayer, sg2.ToRGBLayer)


def _wrap_children(parent: torch.nn.Module, prefix: str, cfg: AdapterConfig, K: int,
                   ranks: Optional[Dict[str, int]]) -> None:
    for name, child in list(parent._modules.items()):
        if child is None:
            continue
        path = f'{prefix}.{name}' if prefix else name
        if isinstance(child, AdapterLayer):
            raise ValueError(f'{path} already holds adapters; inject() works on a plain generator')
        if not isinstance(child, _TARGET_TYPES):
            _wrap_children(child, path, cfg, K, ranks)
            continue
        if isinstance(child, (sg2.SynthesisLayer, sg2.ToRGBLayer)):
            aff = f'{path}.affine'
            child.affine = _make_wrapper(child.affine, cfg, K, None if ranks is None else ranks[aff], None)
        const_shape = None
        if isinstance(child, sg2.SynthesisLayer) and getattr(parent, 'in_channels', None) == 0 \
                and name == 'conv1' and isinstance(parent._parameters.get('const', None), torch.Tensor):
            const_shape = list(parent.const.shape)  # the block's learned constant feeds this layer only
        setattr(parent, name, _make_wrapper(child, cfg, K, None if ranks is None else ranks[path], const_shape))


def inject(G: torch.nn.Module, config: AdapterConfig, num_adapters: int = 1,
           ranks: Optional[Dict[str, int]] = None) -> torch.nn.Module:
    """Wrap every targeted layer of G in place with `num_adapters` adapters; freeze the base; return G.

    `ranks` (module name in the plain generator -> inner rank) overrides the per-layer rank; used
    when loading a pruned AdaLoRA adapter, which keeps only the surviving triplets.
    At initialization the injected G computes exactly what the base computes (B = 0 or E = 0).
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError('inject() expects an AdapterConfig')
    if int(num_adapters) < 1:
        raise ValueError(f'num_adapters must be >= 1, got {num_adapters}')
    if is_injected(G):
        raise ValueError('This generator already holds adapters; inject() works on a plain generator')
    roots = component_roots(G)
    missing = [t for t in config.targets if t not in roots]
    if missing:
        raise ValueError(f'Generator {type(G).__name__} has no component(s) {missing} (has {sorted(roots)})')
    names = {id(m): n for n, m in G.named_modules()}
    G.requires_grad_(False)
    for buf in G.buffers():
        buf.requires_grad_(False)
    for target in config.targets:
        root = roots[target]
        _wrap_children(root, names[id(root)], config, int(num_adapters), ranks)
    for _, layer in adapter_layers(G):
        for p in layer.adapter_parameters():
            p.requires_grad_(True)
    G.__dict__[CONFIG_ATTR] = config.to_dict()
    return G

# ----------------------------------------------------------------------------
# Selection, parameters, counts.


def select(G: torch.nn.Module, idx: Union[int, Sequence[int], torch.Tensor]) -> None:
    """Choose the adapter of each sample: an int (whole batch) or a LongTensor [N] (sample i uses idx[i]).

    The choice is a plain attribute of the wrappers: not saved, not pickled, reset by deepcopy.
    """
    layers = adapter_layers(G)
    if not layers:
        raise ValueError('This generator has no adapters (call adapters.inject or adapters.load first)')
    K = layers[0][1].num_adapters
    if not isinstance(idx, torch.Tensor) and not isinstance(idx, (list, tuple)):
        idx = int(idx)
        if not 0 <= idx < K:
            raise IndexError(f'adapter index {idx} out of range for {K} adapters')
    else:
        idx = torch.as_tensor(idx)
        if idx.ndim != 1 or idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise ValueError(f'select() expects an int or a 1-D integer tensor, got {idx.dtype} {tuple(idx.shape)}')
        idx = idx.to(torch.int64)
        if idx.device.type == 'cpu' and idx.numel() > 0:
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= K:
                raise IndexError(f'adapter indices must lie in [0, {K}), got [{lo}, {hi}]')
            if lo == hi:
                idx = lo  # one adapter for the whole batch: the cheaper shared path
        if K == 1:
            idx = 0
    if isinstance(idx, torch.Tensor):
        idx = idx.to(layers[0][1].lora_A.device)
    for _, layer in layers:
        layer.adapter_index = idx


def trainable_parameters(G: torch.nn.Module) -> List[torch.nn.Parameter]:
    """The parameters to optimise: every adapter tensor (factors and, with extras, the deltas)."""
    return [p for _, layer in adapter_layers(G) for p in layer.adapter_parameters() if p.requires_grad]


def parameter_table(G: torch.nn.Module) -> Dict[str, int]:
    """Adapter parameters per component, their total, all trainable parameters and the base's total."""
    table = {name: 0 for name in COMPONENTS}
    for comp, root in component_roots(G).items():
        table[comp] = sum(p.numel() for m in root.modules() if isinstance(m, AdapterLayer)
                          for p in m.adapter_parameters())
    adapter_ids = {id(p) for _, layer in adapter_layers(G) for p in layer.adapter_parameters()}
    table['adapter_total'] = sum(p.numel() for _, layer in adapter_layers(G) for p in layer.adapter_parameters())
    table['trainable_total'] = sum(p.numel() for p in G.parameters() if p.requires_grad)
    table['base_total'] = sum(p.numel() for p in G.parameters() if id(p) not in adapter_ids)
    return table


def format_parameter_table(G: torch.nn.Module) -> str:
    """Printable version of `parameter_table` (train.py prints it at start)."""
    t = parameter_table(G)
    desc = ''
    if is_injected(G):
        cfg = get_config(G)
        kind = f'AdaLoRA init_r={cfg.init_r} target_r={cfg.target_r}' if cfg.adalora else f'LoRA r={cfg.r}'
        desc = (f'{kind}, alpha={cfg.alpha:g}, targets={"+".join(cfg.targets)}, extras={cfg.extras}, '
                f'conv_factorization={cfg.conv_factorization}, num_adapters={num_adapters(G)}')
    base = max(t['base_total'], 1)
    rows = [(name, t[name]) for name in COMPONENTS] + [('adapter total', t['adapter_total']),
                                                        ('trainable total', t['trainable_total']),
                                                        ('base generator', t['base_total'])]
    width = max(len(r[0]) for r in rows)
    lines = [f'Adapters: {desc}' if desc else 'Adapters: none']
    lines += [f'  {name:<{width}}  {n:>12,}  {100.0 * n / base:8.4f}% of base' for name, n in rows]
    return '\n'.join(lines)

# ----------------------------------------------------------------------------
# Merging.


@torch.no_grad()
def fold_adapter(layer: AdapterLayer, index: int, parent: torch.nn.Module) -> torch.nn.Module:
    """Add adapter `index` of `layer` into its base layer's tensors (and the parent's const); return the base."""
    base = layer.base_layer
    base.weight.add_(layer.delta_weight(index).to(base.weight.dtype))
    params = layer._parameters
    if 'bias_delta' in params:
        base.bias.add_(params['bias_delta'][index])
    if 'noise_strength_delta' in params:
        base.noise_strength.add_(params['noise_strength_delta'][index])
    if 'const_delta' in params:
        parent.const.add_(params['const_delta'][index])
    return base


def merge(G: torch.nn.Module, index: int = 0) -> torch.nn.Module:
    """A deep copy of G with adapter `index` folded into the weights: a plain generator, no adapter modules.

    Its state_dict keys are the base's; its output equals the adapted G's (with adapter `index`
    selected) up to float rounding. All parameters of the result require grad, as after construction.
    """
    if not is_injected(G):
        raise ValueError('merge() expects a generator with adapters')
    K = num_adapters(G)
    if not 0 <= int(index) < K:
        raise IndexError(f'adapter index {index} out of range for {K} adapters')
    M = copy.deepcopy(G)
    for name, layer in reversed(adapter_layers(M)):  # children (style affines) before their parents
        parent_name, _, child = name.rpartition('.')
        parent = M.get_submodule(parent_name) if parent_name else M
        setattr(parent, child, fold_adapter(layer, int(index), parent))
    M.__dict__.pop(CONFIG_ATTR, None)
    M.requires_grad_(True)
    return M
