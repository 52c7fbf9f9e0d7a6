"""Adapter files: one adapter's tensors as safetensors, with its config and the base's fingerprint.

Layout (PEFT conventions where they fit):
- tensors `<module>.lora_A` [R, fan_in], `<module>.lora_B` [fan_out, R], AdaLoRA `<module>.lora_E`
  [R, 1] (only the kept triplets), extras `<module>.bias_delta` / `.noise_strength_delta` /
  `.const_delta`; `<module>` is the layer's name in the plain generator
  (e.g. `backbone.synthesis.b64.conv0`, `backbone.synthesis.b64.conv0.affine`);
- string metadata: `format` 'pt', `peft_type` 'LORA' / 'ADALORA', `r`, `lora_alpha`, `lora_dropout`,
  `target_modules` (JSON list), `rank_pattern` (JSON {`<module>.lora_E`: [bool, ...]}, AdaLoRA),
  `adapter_config` (AdapterConfig JSON), `base_fingerprint` (JSON), `eg3d_adapter_version`.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import load as deserialize_safetensors
from safetensors.torch import save as serialize_safetensors

import dnnlib
from training.adapters.config import AdapterConfig
from training.adapters.inject import (adapter_layers, base_name, get_config, inject, is_injected,
                                      num_adapters)
from training.adapters.layers import AdapterLayer

FORMAT_VERSION = '1'
EXTRA_NAMES = ('bias_delta', 'noise_strength_delta', 'const_delta')

# ----------------------------------------------------------------------------
# Fingerprint of the base generator.


def _json_plain(value: Any) -> Any:
    """`value` as plain JSON data (tuples -> lists, numpy scalars -> numbers, others -> repr)."""
    return json.loads(json.dumps(value, sort_keys=True, default=lambda v: v.item() if hasattr(v, 'item') else repr(v)))


def _weights_sha256(params: List[Tuple[str, torch.Tensor]]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of `params` (the expensive part: one pass over the base)."""
    h = hashlib.sha256()
    for name, p in params:
        t = p.detach().to('cpu').contiguous()
        h.update(f'{name}:{str(t.dtype)}:{list(t.shape)};'.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# G -> (state key, weights sha256). Hashing the base costs a pass over all of its weights (and a
# GPU-to-CPU copy); saving K adapter files or swapping adapters in a registry must not repeat it.
_SHA_CACHE: 'weakref.WeakKeyDictionary[torch.nn.Module, Tuple[tuple, str]]' = weakref.WeakKeyDictionary()


def _state_key(params: List[Tuple[str, torch.Tensor]]) -> tuple:
    """What changes whenever a weight does: in-place writes bump a tensor's version counter, and
    replacing a tensor (or its `.data`) changes its storage. Writes through `.data` bypass the version
    counter: after those, call `forget_fingerprint`."""
    # pylint: disable-next=protected-access
    return tuple((name, p.data_ptr(), p._version, p.dtype, tuple(p.shape), str(p.device)) for name, p in params)


def forget_fingerprint(G: torch.nn.Module) -> None:
    """Drop G's cached weight hash (needed only after writing weights through `param.data`)."""
    _SHA_CACHE.pop(G, None)


def fingerprint(G: torch.nn.Module) -> Dict[str, Any]:
    """Identity of the base generator: class name, init kwargs and sha256 of its parameters.

    Works on a plain or an injected G (adapter tensors are left out, names are the plain ones).
    Buffers are not hashed: `w_avg` legitimately moves when training updates the EMAs. The hash is
    computed once per G and reused until one of its base parameters changes (`_state_key`).
    """
    adapter_ids = {id(p) for _, layer in adapter_layers(G) for p in layer.adapter_parameters()}
    params = sorted((base_name(n), p) for n, p in G.named_parameters() if id(p) not in adapter_ids)
    key = _state_key(params)
    cached = _SHA_CACHE.get(G)
    if cached is None or cached[0] != key:
        cached = (key, _weights_sha256(params))
        _SHA_CACHE[G] = cached
    init_kwargs = G.__dict__.get('_init_kwargs', None)
    return {
        'class_name': getattr(type(G), '_orig_class_name', type(G).__name__),
        'init_kwargs': _json_plain(dict(init_kwargs)) if init_kwargs is not None else None,
        'num_params': int(sum(p.numel() for _, p in params)),
        'weights_sha256': cached[1],
    }


def _fingerprint_mismatch(expected: Dict[str, Any], actual: Dict[str, Any]) -> Optional[str]:
    for key, what in (('class_name', 'class'), ('init_kwargs', 'constructor arguments'),
                      ('num_params', 'parameter count'), ('weights_sha256', 'weights')):
        if expected.get(key) != actual.get(key):
            if key == 'init_kwargs' and (expected.get(key) is None or actual.get(key) is None):
                continue
            return what
    return None

# ----------------------------------------------------------------------------
# Save.


def _layer_tensors(name: str, layer: AdapterLayer, k: int) -> Tuple[Dict[str, torch.Tensor], Optional[list]]:
    """Tensors of adapter k of one wrapper (AdaLoRA: kept triplets only) and its rank pattern."""
    out = {}
    pattern = None
    A = layer.lora_A[k].detach()
    B = layer.lora_B[k].detach()
    if layer.adalora:
        keep = layer.rank_mask[k].detach() > 0
        pattern = [bool(v) for v in keep.tolist()]
        out[f'{name}.lora_A'] = A[keep]
        out[f'{name}.lora_E'] = layer.lora_E[k].detach()[keep]
        out[f'{name}.lora_B'] = B[:, keep]
    else:
        out[f'{name}.lora_A'] = A
        out[f'{name}.lora_B'] = B
    for extra in EXTRA_NAMES:
        if extra in layer._parameters:
            out[f'{name}.{extra}'] = layer._parameters[extra][k].detach()
    return {key: t.to('cpu').contiguous().clone() for key, t in out.items()}, pattern


def save(G: torch.nn.Module, path: str, index: int = 0) -> None:
    """Write adapter `index` of G to `path` (safetensors; written to a temp file, then renamed)."""
    cfg = get_config(G)
    K = num_adapters(G)
    if not 0 <= int(index) < K:
        raise IndexError(f'adapter index {index} out of range for {K} adapters')
    tensors: Dict[str, torch.Tensor] = {}
    rank_pattern = {}
    targets = []
    for name, layer in adapter_layers(G):
        module = base_name(name)
        targets.append(module)
        t, pattern = _layer_tensors(module, layer, int(index))
        tensors.update(t)
        if pattern is not None:
            rank_pattern[f'{module}.lora_E'] = pattern
    metadata = {
        'format': 'pt',
        'eg3d_adapter_version': FORMAT_VERSION,
        'peft_type': 'ADALORA' if cfg.adalora else 'LORA',
        'r': str(cfg.rank),
        'lora_alpha': repr(float(cfg.alpha)),
        'lora_dropout': repr(float(cfg.dropout)),
        'target_modules': json.dumps(targets),
        'rank_pattern': json.dumps(rank_pattern) if cfg.adalora else 'null',
        'adapter_config': cfg.to_json(),
        'base_fingerprint': json.dumps(fingerprint(G), sort_keys=True),
    }
    with dnnlib.util.atomic_write_path(path) as tmp:
        # Serialized in memory and written with open(): safetensors' save_file creates files with mode 0600.
        with open(tmp, 'wb') as file:
            file.write(serialize_safetensors(tensors, metadata=metadata))

# ----------------------------------------------------------------------------
# Read / load.


def _read(path: str, with_tensors: bool = True) -> Tuple[Dict[str, str], Dict[str, torch.Tensor]]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'Adapter file not found: {path}')
    try:
        with safe_open(path, framework='pt', device='cpu') as f:
            metadata = f.metadata() or {}
        # Tensors come from the file's bytes: every `safe_open(...).get_tensor` call keeps some memory
        # (safetensors 0.8; safetensors issue #369), which grows without bound in a registry that swaps
        # thousands of files.
        if with_tensors:
            with open(path, 'rb') as file:
                tensors = deserialize_safetensors(file.read())
        else:
            tensors = {}
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f'{path} is not a readable safetensors adapter file: {e}') from e
    for key in ('adapter_config', 'base_fingerprint', 'target_modules'):
        if key not in metadata:
            raise ValueError(f'{path} is not an EG3D adapter file (metadata "{key}" missing)')
    return metadata, tensors


def read_config(path: str) -> AdapterConfig:
    """The AdapterConfig stored in an adapter file."""
    metadata, _ = _read(path, with_tensors=False)
    return AdapterConfig.from_json(metadata['adapter_config'])


def read_metadata(path: str) -> Dict[str, Any]:
    """All metadata of an adapter file, JSON fields decoded."""
    metadata, _ = _read(path, with_tensors=False)
    out: Dict[str, Any] = dict(metadata)
    for key in ('target_modules', 'rank_pattern', 'adapter_config', 'base_fingerprint'):
        out[key] = json.loads(metadata[key])
    return out


def _kept_ranks(rank_pattern: Dict[str, list]) -> Dict[str, int]:
    return {key[:-len('.lora_E')]: int(sum(bool(v) for v in mask)) for key, mask in rank_pattern.items()}


def load(G: torch.nn.Module, path: str, index: int = 0, check_base: bool = True) -> torch.nn.Module:
    """Load the adapter in `path` into slot `index` of G; inject first if G is plain. Returns G.

    A plain G is injected with the file's config and `index + 1` adapters; a pruned AdaLoRA adapter
    then builds only its kept ranks. Raises ValueError naming the file when the file was made for
    another base generator (class, constructor arguments or weights differ; skip with
    check_base=False) or when its tensors do not fit G's adapters.
    """
    path = os.fspath(path)
    metadata, tensors = _read(path)
    cfg = AdapterConfig.from_json(metadata['adapter_config'])
    rank_pattern = json.loads(metadata.get('rank_pattern', 'null')) or {}
    targets = json.loads(metadata['target_modules'])
    index = int(index)
    if index < 0:
        raise IndexError(f'adapter index must be >= 0, got {index}')

    if check_base:
        expected = json.loads(metadata['base_fingerprint'])
        what = _fingerprint_mismatch(expected, fingerprint(G))
        if what is not None:
            raise ValueError(f'{path}: this adapter was trained on a different base generator (its {what} differ '
                             f'from this generator\'s: file expects {expected.get("class_name")} with '
                             f'{expected.get("num_params")} parameters, sha256 {expected.get("weights_sha256", "")[:12]}...). '
                             f'Load it onto the generator it was trained from, or pass check_base=False.')

    if not is_injected(G):
        ranks = _kept_ranks(rank_pattern) if cfg.adalora else None
        if ranks is not None:
            ranks = {name: ranks.get(name, 0) for name in targets}
        try:
            inject(G, cfg, num_adapters=index + 1, ranks=ranks)
        except KeyError as e:
            raise ValueError(f'{path}: its rank pattern does not cover layer {e} of this generator') from e
    else:
        K = num_adapters(G)
        if index >= K:
            raise IndexError(f'{path}: adapter slot {index} does not exist (G holds {K} adapters)')
        model_cfg = get_config(G)
        for field in ('adalora', 'conv_factorization', 'extras'):
            if getattr(model_cfg, field) != getattr(cfg, field):
                raise ValueError(f'{path}: adapter {field}={getattr(cfg, field)!r} does not match this generator\'s '
                                 f'adapters ({field}={getattr(model_cfg, field)!r})')

    layers = {base_name(name): layer for name, layer in adapter_layers(G)}
    if sorted(layers) != sorted(targets):
        missing = sorted(set(targets) - set(layers))
        extra = sorted(set(layers) - set(targets))
        raise ValueError(f'{path}: adapted layers differ from this generator\'s (in the file only: {missing[:5]}, '
                         f'in the generator only: {extra[:5]})')
    expected_keys = set()
    with torch.no_grad():
        for module, layer in layers.items():
            keys = _copy_into(path, module, layer, index, tensors, rank_pattern.get(f'{module}.lora_E'))
            expected_keys.update(keys)
    unexpected = sorted(set(tensors) - expected_keys)
    if unexpected:
        raise ValueError(f'{path}: unexpected tensors {unexpected[:5]} (extras or targets differ from this generator\'s)')
    return G


def _copy_into(path: str, module: str, layer: AdapterLayer, k: int, tensors: Dict[str, torch.Tensor],
               pattern: Optional[list]) -> list:
    """Copy one layer's tensors from the file into slot k of `layer`; return the keys used."""
    def get(key):
        if key not in tensors:
            raise ValueError(f'{path}: tensor "{key}" is missing (extras or targets differ from this generator\'s)')
        return tensors[key]

    def check(key, t, shape):
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f'{path}: shape mismatch for "{key}": file has {tuple(t.shape)}, this generator '
                             f'expects {tuple(shape)} (different rank, factorization or base architecture)')

    used = []
    A, B = get(f'{module}.lora_A'), get(f'{module}.lora_B')
    used += [f'{module}.lora_A', f'{module}.lora_B']
    R = layer.rank
    dev = layer.lora_A.device
    if layer.adalora:
        E = get(f'{module}.lora_E')
        used.append(f'{module}.lora_E')
        kept = A.shape[0]
        if pattern is None:
            pattern = [True] * kept
        if sum(bool(v) for v in pattern) != kept:
            raise ValueError(f'{path}: rank pattern of {module} keeps {sum(pattern)} triplets but lora_A has {kept}')
        check(f'{module}.lora_A', A, (kept, layer.fan_in))
        check(f'{module}.lora_B', B, (layer.fan_out, kept))
        check(f'{module}.lora_E', E, (kept, 1))
        if R == kept:
            pos = torch.arange(kept)
        elif R == len(pattern):
            pos = torch.tensor([i for i, v in enumerate(pattern) if v], dtype=torch.int64)
        else:
            raise ValueError(f'{path}: shape mismatch for "{module}.lora_A": file keeps {kept} of {len(pattern)} '
                             f'ranks, this generator\'s layer has rank {R}')
        for p in (layer.lora_A, layer.lora_B, layer.lora_E):
            p[k].zero_()
        pos = pos.to(dev)
        layer.lora_A[k].index_copy_(0, pos, A.to(dev))
        layer.lora_E[k].index_copy_(0, pos, E.to(dev))
        layer.lora_B[k].index_copy_(1, pos, B.to(dev))
        mask = torch.zeros(R, device=dev)
        mask[pos] = 1
        layer.rank_mask[k].copy_(mask)
    else:
        check(f'{module}.lora_A', A, layer.lora_A.shape[1:])
        check(f'{module}.lora_B', B, layer.lora_B.shape[1:])
        layer.lora_A[k].copy_(A)
        layer.lora_B[k].copy_(B)
    for extra in EXTRA_NAMES:
        if extra in layer._parameters:
            key = f'{module}.{extra}'
            t = get(key)
            check(key, t, layer._parameters[extra].shape[1:])
            layer._parameters[extra][k].copy_(t)
            used.append(key)
    return used
