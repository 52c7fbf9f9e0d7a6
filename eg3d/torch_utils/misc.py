"""Small PyTorch helpers used across the networks and the training loop (official names)."""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

_constant_cache: dict = dict()  # reused constant tensors (avoids rebuilding / re-uploading them)


def constant(value: Any, shape: Optional[Sequence[int]] = None, dtype: Optional[torch.dtype] = None,
             device: Optional[torch.device] = None, memory_format: Optional[torch.memory_format] = None) -> torch.Tensor:
    """A cached tensor holding `value` (broadcast to `shape` if given). Do not modify it in place."""
    array = np.asarray(value)
    shape = None if shape is None else tuple(shape)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    device = torch.device('cpu') if device is None else device
    memory_format = torch.contiguous_format if memory_format is None else memory_format

    key = (array.shape, array.dtype, array.tobytes(), shape, dtype, device, memory_format)
    cached = _constant_cache.get(key)
    if cached is None:
        cached = torch.as_tensor(array.copy(), dtype=dtype, device=device)
        if shape is not None:
            cached = torch.broadcast_to(cached, torch.broadcast_shapes(cached.shape, shape))
        cached = cached.contiguous(memory_format=memory_format)
        _constant_cache[key] = cached
    return cached


nan_to_num = torch.nan_to_num
symbolic_assert = torch._assert  # pylint: disable=protected-access


@contextlib.contextmanager
def suppress_tracer_warnings() -> Iterator[None]:
    """Silence torch.jit.TracerWarning inside the block (used around shape asserts)."""
    # A filter entry is pushed by hand: catch_warnings() does not nest safely with tracing.
    ignore_tracer = ('ignore', None, torch.jit.TracerWarning, None, 0)
    warnings.filters.insert(0, ignore_tracer)
    try:
        yield
    finally:
        if ignore_tracer in warnings.filters:
            warnings.filters.remove(ignore_tracer)


def assert_shape(tensor: torch.Tensor, ref_shape: Sequence[Any]) -> None:
    """Raise AssertionError unless `tensor.shape` matches `ref_shape` (None = any size).

    Sizes that are tensors (while tracing) are checked with a symbolic assert instead.
    """
    if tensor.ndim != len(ref_shape):
        raise AssertionError(f'shape check: expected {len(ref_shape)} dimensions, tensor has {tensor.ndim}')
    for dim, (actual, wanted) in enumerate(zip(tensor.shape, ref_shape)):
        if wanted is None:
            continue
        if isinstance(actual, torch.Tensor) or isinstance(wanted, torch.Tensor):
            with suppress_tracer_warnings():
                same = torch.equal(torch.as_tensor(actual), torch.as_tensor(wanted))
                symbolic_assert(same, f'shape check: dimension {dim} should be {wanted}')
        elif actual != wanted:
            raise AssertionError(f'shape check: dimension {dim} has size {actual}, expected {wanted}')


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
    source = dict(named_params_and_buffers(src_module))
    for name, tensor in named_params_and_buffers(dst_module):
        if name not in source:
            if require_all:
                raise KeyError(f'copy_params_and_buffers: "{name}" is missing from the source module')
            print(f'Warning: parameter {name} is not in the source module!')
            continue
        src = source[name]
        if src.shape != tensor.shape:
            raise ValueError(f'copy_params_and_buffers: shape mismatch for "{name}": '
                             f'source {list(src.shape)}, destination {list(tensor.shape)}')
        tensor.copy_(src.detach()).requires_grad_(tensor.requires_grad)


def check_ddp_consistency(module: torch.nn.Module, ignore_regex: Optional[str] = None) -> None:
    """Assert that every parameter/buffer equals rank 0's copy (NaNs compare equal).

    Names are '<ModuleClass>.<tensor name>'; those fully matching `ignore_regex` are skipped.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError('expected a torch.nn.Module')
    for name, tensor in named_params_and_buffers(module):
        qualified = f'{type(module).__name__}.{name}'
        if ignore_regex is not None and re.fullmatch(ignore_regex, qualified):
            continue
        mine = tensor.detach()
        if mine.is_floating_point():
            mine = nan_to_num(mine)  # so that NaNs compare equal
        rank0 = mine.clone()
        torch.distributed.broadcast(tensor=rank0, src=0)
        if not (mine == rank0).all():
            raise AssertionError(f'{qualified} differs between processes')


def print_module_summary(module: torch.nn.Module, inputs: Sequence[Any], max_nesting: int = 3,
                         skip_redundant: bool = True) -> Any:
    """Run `module(*inputs)` and print a table of parameters, buffers and output shapes per
    submodule (up to `max_nesting` levels deep). Returns the module's outputs."""
    if not isinstance(module, torch.nn.Module) or isinstance(module, torch.jit.ScriptModule):
        raise TypeError('print_module_summary() expects a (non-scripted) torch.nn.Module')
    if not isinstance(inputs, (tuple, list)):
        raise TypeError('inputs must be a tuple or list')

    finished = []  # (submodule, its tensor outputs) in the order the calls return
    depth = [0]

    def enter(_mod, _inputs):
        depth[0] += 1

    def leave(mod, _inputs, outputs):
        depth[0] -= 1
        if depth[0] <= max_nesting:
            outs = outputs if isinstance(outputs, (tuple, list)) else [outputs]
            finished.append((mod, [t for t in outs if isinstance(t, torch.Tensor)]))

    handles = [mod.register_forward_pre_hook(enter) for mod in module.modules()]
    handles += [mod.register_forward_hook(leave) for mod in module.modules()]
    try:
        outputs = module(*inputs)
    finally:
        for handle in handles:
            handle.remove()

    # Each tensor is counted once: at the first (innermost-finished) module that owns or produced it.
    seen = set()

    def unseen(tensors):
        return [t for t in tensors if id(t) not in seen]

    listed = []
    for mod, outs in finished:
        own_params, own_buffers, new_outs = unseen(mod.parameters()), unseen(mod.buffers()), unseen(outs)
        seen.update(id(t) for t in own_params + own_buffers + new_outs)
        if own_params or own_buffers or new_outs or not skip_redundant:
            listed.append((mod, outs, own_params, own_buffers))

    header = [type(module).__name__, 'Parameters', 'Buffers', 'Output shape', 'Datatype']
    rule = ['---'] * len(header)
    table = [header, rule]
    names = {mod: name for name, mod in module.named_modules()}
    total_params = total_buffers = 0
    for mod, outs, own_params, own_buffers in listed:
        label = '<top-level>' if mod is module else names.get(mod, type(mod).__name__)
        n_params = sum(t.numel() for t in own_params)
        n_buffers = sum(t.numel() for t in own_buffers)
        shapes = [str(list(t.shape)) for t in outs] or ['-']
        dtypes = [str(t.dtype).split('.')[-1] for t in outs] or ['-']
        table.append([label + (':0' if len(outs) > 1 else ''), str(n_params) if n_params else '-',
                      str(n_buffers) if n_buffers else '-', shapes[0], dtypes[0]])
        table.extend([f'{label}:{i}', '-', '-', shapes[i], dtypes[i]] for i in range(1, len(outs)))
        total_params += n_params
        total_buffers += n_buffers
    table += [rule, ['Total', str(total_params), str(total_buffers), '-', '-']]

    widths = [max(len(cell) for cell in column) for column in zip(*table)]
    print()
    for row in table:
        print('  '.join(cell.ljust(width) for cell, width in zip(row, widths)))
    print()
    return outputs
