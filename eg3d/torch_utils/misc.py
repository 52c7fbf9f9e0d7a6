"""Small PyTorch helpers used across the networks and the training loop (official names)."""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

import dnnlib

# ----------------------------------------------------------------------------
# Cached constant tensors: avoids re-creating (and re-uploading) the same constant.

_constant_cache: dict = dict()


def constant(value: Any, shape: Optional[Sequence[int]] = None, dtype: Optional[torch.dtype] = None,
             device: Optional[torch.device] = None, memory_format: Optional[torch.memory_format] = None) -> torch.Tensor:
    """A cached tensor holding `value` (broadcast to `shape` if given). Do not modify it in place."""
    value = np.asarray(value)
    if shape is not None:
        shape = tuple(shape)
    if dtype is None:
        dtype = torch.get_default_dtype()
    if device is None:
        device = torch.device('cpu')
    if memory_format is None:
        memory_format = torch.contiguous_format

    key = (value.shape, value.dtype, value.tobytes(), shape, dtype, device, memory_format)
    tensor = _constant_cache.get(key, None)
    if tensor is None:
        tensor = torch.as_tensor(value.copy(), dtype=dtype, device=device)
        if shape is not None:
            tensor, _ = torch.broadcast_tensors(tensor, torch.empty(shape))
        tensor = tensor.contiguous(memory_format=memory_format)
        _constant_cache[key] = tensor
    return tensor


nan_to_num = torch.nan_to_num
symbolic_assert = torch._assert  # pylint: disable=protected-access

# ----------------------------------------------------------------------------


@contextlib.contextmanager
def suppress_tracer_warnings() -> Iterator[None]:
    """Silence torch.jit.TracerWarning inside the block (used around shape asserts)."""
    flt = ('ignore', None, torch.jit.TracerWarning, None, 0)
    warnings.filters.insert(0, flt)
    try:
        yield
    finally:
        if flt in warnings.filters:
            warnings.filters.remove(flt)


def assert_shape(tensor: torch.Tensor, ref_shape: Sequence[Any]) -> None:
    """Raise AssertionError unless `tensor.shape` matches `ref_shape` (None = any size)."""
    if tensor.ndim != len(ref_shape):
        raise AssertionError(f'Wrong number of dimensions: got {tensor.ndim}, expected {len(ref_shape)}')
    for idx, (size, ref_size) in enumerate(zip(tensor.shape, ref_shape)):
        if ref_size is None:
            continue
        if isinstance(ref_size, torch.Tensor):
            with suppress_tracer_warnings():
                symbolic_assert(torch.equal(torch.as_tensor(size), ref_size), f'Wrong size for dimension {idx}')
        elif isinstance(size, torch.Tensor):
            with suppress_tracer_warnings():
                symbolic_assert(torch.equal(size, torch.as_tensor(ref_size)), f'Wrong size for dimension {idx}: expected {ref_size}')
        elif size != ref_size:
            raise AssertionError(f'Wrong size for dimension {idx}: got {size}, expected {ref_size}')


def profiled_function(fn):
    """Decorator: run `fn` inside `torch.autograd.profiler.record_function(fn.__name__)`."""
    def decorator(*args, **kwargs):
        with torch.autograd.profiler.record_function(fn.__name__):
            return fn(*args, **kwargs)
    decorator.__name__ = fn.__name__
    decorator.__qualname__ = getattr(fn, '__qualname__', fn.__name__)
    decorator.__doc__ = fn.__doc__
    decorator.__wrapped__ = fn
    return decorator

# ----------------------------------------------------------------------------


class InfiniteSampler(torch.utils.data.Sampler):
    """Endless sampler for DataLoader: yields this rank's share of an endlessly reshuffled order.

    With `shuffle`, the order is permuted once with `seed` and then keeps changing: after each
    item, the current slot is swapped with a random slot up to `window_size * len` positions back.
    """

    def __init__(self, dataset, rank: int = 0, num_replicas: int = 1, shuffle: bool = True, seed: int = 0,
                 window_size: float = 0.5):
        if len(dataset) <= 0:
            raise ValueError('InfiniteSampler needs a non-empty dataset')
        if not (num_replicas > 0 and 0 <= rank < num_replicas):
            raise ValueError(f'Invalid rank {rank} for num_replicas {num_replicas}')
        if not 0 <= window_size <= 1:
            raise ValueError('window_size must be in [0, 1]')
        super().__init__()
        self.dataset = dataset
        self.rank = rank
        self.num_replicas = num_replicas
        self.shuffle = shuffle
        self.seed = seed
        self.window_size = window_size

    def __iter__(self):
        order = np.arange(len(self.dataset))
        rnd = None
        window = 0
        if self.shuffle:
            rnd = np.random.RandomState(self.seed)
            rnd.shuffle(order)
            window = int(np.rint(order.size * self.window_size))

        idx = 0
        while True:
            i = idx % order.size
            if idx % self.num_replicas == self.rank:
                yield order[i]
            if window >= 2:
                j = (i - rnd.randint(window)) % order.size
                order[i], order[j] = order[j], order[i]
            idx += 1

# ----------------------------------------------------------------------------
# Parameters and buffers.


def params_and_buffers(module: torch.nn.Module) -> List[torch.Tensor]:
    if not isinstance(module, torch.nn.Module):
        raise TypeError('expected a torch.nn.Module')
    return list(module.parameters()) + list(module.buffers())


def named_params_and_buffers(module: torch.nn.Module) -> List[Tuple[str, torch.Tensor]]:
    if not isinstance(module, torch.nn.Module):
        raise TypeError('expected a torch.nn.Module')
    return list(module.named_parameters()) + list(module.named_buffers())


@torch.no_grad()
def copy_params_and_buffers(src_module: torch.nn.Module, dst_module: torch.nn.Module, require_all: bool = False) -> None:
    """Copy every parameter/buffer of `dst_module` that `src_module` has under the same name.

    With `require_all`, a name missing from `src_module` is an error; otherwise it is skipped
    with a warning. A shape mismatch is always an error (it names the tensor and both shapes).
    """
    if not isinstance(src_module, torch.nn.Module) or not isinstance(dst_module, torch.nn.Module):
        raise TypeError('copy_params_and_buffers() expects two torch.nn.Module objects')
    src_tensors = dict(named_params_and_buffers(src_module))
    for name, tensor in named_params_and_buffers(dst_module):
        if name not in src_tensors:
            if require_all:
                raise KeyError(f'copy_params_and_buffers: "{name}" is missing from the source module')
            print(f'Warning: parameter {name} is not in the source module!')
            continue
        src = src_tensors[name]
        if src.shape != tensor.shape:
            raise ValueError(f'copy_params_and_buffers: shape mismatch for "{name}": '
                             f'source {list(src.shape)}, destination {list(tensor.shape)}')
        tensor.copy_(src.detach()).requires_grad_(tensor.requires_grad)

# ----------------------------------------------------------------------------
# DistributedDataParallel helpers.


@contextlib.contextmanager
def ddp_sync(module: torch.nn.Module, sync: bool) -> Iterator[None]:
    """Skip DDP gradient all-reduce inside the block when `sync` is False."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError('expected a torch.nn.Module')
    if sync or not isinstance(module, torch.nn.parallel.DistributedDataParallel):
        yield
    else:
        with module.no_sync():
            yield


def check_ddp_consistency(module: torch.nn.Module, ignore_regex: Optional[str] = None) -> None:
    """Assert that every parameter/buffer equals rank 0's copy (NaNs compare equal).

    Names are '<ModuleClass>.<tensor name>'; those fully matching `ignore_regex` are skipped.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError('expected a torch.nn.Module')
    for name, tensor in named_params_and_buffers(module):
        fullname = type(module).__name__ + '.' + name
        if ignore_regex is not None and re.fullmatch(ignore_regex, fullname):
            continue
        tensor = tensor.detach()
        if tensor.is_floating_point():
            tensor = nan_to_num(tensor)
        other = tensor.clone()
        torch.distributed.broadcast(tensor=other, src=0)
        if not (tensor == other).all():
            raise AssertionError(f'{fullname} differs between processes')

# ----------------------------------------------------------------------------


def print_module_summary(module: torch.nn.Module, inputs: Sequence[Any], max_nesting: int = 3,
                         skip_redundant: bool = True) -> Any:
    """Run `module(*inputs)` and print a table of parameters, buffers and output shapes per
    submodule (up to `max_nesting` levels deep). Returns the module's outputs."""
    if not isinstance(module, torch.nn.Module) or isinstance(module, torch.jit.ScriptModule):
        raise TypeError('print_module_summary() expects a (non-scripted) torch.nn.Module')
    if not isinstance(inputs, (tuple, list)):
        raise TypeError('inputs must be a tuple or list')

    entries = []
    nesting = [0]

    def pre_hook(_mod, _inputs):
        nesting[0] += 1

    def post_hook(mod, _inputs, outputs):
        nesting[0] -= 1
        if nesting[0] <= max_nesting:
            outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
            outputs = [t for t in outputs if isinstance(t, torch.Tensor)]
            entries.append(dnnlib.EasyDict(mod=mod, outputs=outputs))

    hooks = [mod.register_forward_pre_hook(pre_hook) for mod in module.modules()]
    hooks += [mod.register_forward_hook(post_hook) for mod in module.modules()]
    try:
        outputs = module(*inputs)
    finally:
        for hook in hooks:
            hook.remove()

    # Count each tensor once: at the first (innermost-finished) module that owns or produced it.
    tensors_seen = set()
    for e in entries:
        e.unique_params = [t for t in e.mod.parameters() if id(t) not in tensors_seen]
        e.unique_buffers = [t for t in e.mod.buffers() if id(t) not in tensors_seen]
        e.unique_outputs = [t for t in e.outputs if id(t) not in tensors_seen]
        tensors_seen |= {id(t) for t in e.unique_params + e.unique_buffers + e.unique_outputs}
    if skip_redundant:
        entries = [e for e in entries if e.unique_params or e.unique_buffers or e.unique_outputs]

    rows = [[type(module).__name__, 'Parameters', 'Buffers', 'Output shape', 'Datatype']]
    rows += [['---'] * len(rows[0])]
    param_total = 0
    buffer_total = 0
    submodule_names = {mod: name for name, mod in module.named_modules()}
    for e in entries:
        name = '<top-level>' if e.mod is module else submodule_names.get(e.mod, type(e.mod).__name__)
        param_size = sum(t.numel() for t in e.unique_params)
        buffer_size = sum(t.numel() for t in e.unique_buffers)
        output_shapes = [str(list(t.shape)) for t in e.outputs]
        output_dtypes = [str(t.dtype).split('.')[-1] for t in e.outputs]
        rows += [[
            name + (':0' if len(e.outputs) >= 2 else ''),
            str(param_size) if param_size else '-',
            str(buffer_size) if buffer_size else '-',
            (output_shapes + ['-'])[0],
            (output_dtypes + ['-'])[0],
        ]]
        for idx in range(1, len(e.outputs)):
            rows += [[name + f':{idx}', '-', '-', output_shapes[idx], output_dtypes[idx]]]
        param_total += param_size
        buffer_total += buffer_size
    rows += [['---'] * len(rows[0])]
    rows += [['Total', str(param_total), str(buffer_total), '-', '-']]

    widths = [max(len(cell) for cell in column) for column in zip(*rows)]
    print()
    for row in rows:
        print('  '.join(cell + ' ' * (width - len(cell)) for cell, width in zip(row, widths)))
    print()
    return outputs
