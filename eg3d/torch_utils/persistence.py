"""Pickling of network objects in the official EG3D/StyleGAN "persistent class" format.

A class decorated with `@persistent_class` records the arguments of every constructor call
(`obj.init_args`, `obj.init_kwargs`) and pickles as

    (_reconstruct_persistent_obj, (meta,))
    meta = dict(type='class', version=6, module_src=<source of the defining module>,
                class_name=<bare class name>, state=<copy of obj.__dict__>)

exactly like the official code, so official EG3D can unpickle our snapshots and we can read
theirs. `_reconstruct_persistent_obj` below is the *trusting* reconstructor: it executes the
embedded module source, as the official one does. `legacy.load_network_pkl` uses a safe
reconstructor instead (see `legacy.py`), which maps `class_name` to a class of this project via
`find_safe_class()` and never executes anything from the file.
"""

from __future__ import annotations

import copy
import inspect
import sys
import types
import uuid
from typing import Any, Callable, Dict, List

import torch

import dnnlib


_version = 6                                   # format version written into every meta dict
_decorators: set = set()                       # all persistent classes
_import_hooks: List[Callable] = []             # hooks applied to meta before trusted reconstruction
_module_to_src_dict: Dict[types.ModuleType, str] = dict()
_src_to_module_dict: Dict[str, types.ModuleType] = dict()

# Classes that the safe loader may build: bare class name -> {module name: persistent class}.
# Filled automatically for classes defined in this project's `training.*` modules; other
# classes (e.g. test fixtures) can be added with `register_safe_class()`.
_safe_registry: Dict[str, Dict[str, type]] = dict()

# EG3D pickles store bare class names. Where several of our modules define the same name, the
# class in the module listed here wins (the official EG3D generators use the StyleGAN2 ones).
_preferred_modules = ('training.networks_stylegan2',)


def persistent_class(orig_class: type) -> type:
    """Class decorator: record constructor arguments and pickle with the module source.

    The returned class is a subclass of `orig_class` with the same name. Each instance gets
    `_init_args` (tuple) and `_init_kwargs` (dict) in its `__dict__`, deep copies of the
    constructor arguments, exposed read-only as `init_args` / `init_kwargs`. Constructor
    arguments must be plain data (numbers, strings, lists, dicts, ...): passing an
    `nn.Module` raises TypeError, because deep-copying it would store a second copy of its
    weights in every snapshot. Attach sub-modules after construction instead.
    """
    if not isinstance(orig_class, type):
        raise TypeError('persistent_class() expects a class')
    if is_persistent(orig_class):
        return orig_class
    if orig_class.__module__ not in sys.modules:
        raise RuntimeError(f'Module {orig_class.__module__} of class {orig_class.__name__} is not imported')
    # The whole defining module is embedded, so helpers next to the class travel with it.
    defining_src = _module_to_src(sys.modules[orig_class.__module__])

    class Decorator(orig_class):
        _orig_module_src = defining_src
        _orig_class_name = orig_class.__name__

        def __init__(self, *args, **kwargs):
            _check_init_arguments(orig_class.__name__, args, kwargs)
            super().__init__(*args, **kwargs)
            self._init_args = copy.deepcopy(args)
            self._init_kwargs = copy.deepcopy(kwargs)

        @property
        def init_args(self) -> tuple:
            return copy.deepcopy(self._init_args)

        @property
        def init_kwargs(self) -> dnnlib.EasyDict:
            return dnnlib.EasyDict(copy.deepcopy(self._init_kwargs))

        def __reduce__(self):
            getstate = getattr(self, '__getstate__', None)
            state = getstate() if callable(getstate) else self.__dict__
            state = dict(state) if state is not None else dict(self.__dict__)
            meta = dict(type='class', version=_version, module_src=self._orig_module_src,
                        class_name=self._orig_class_name, state=state)
            return (_reconstruct_persistent_obj, (meta,))

    Decorator.__name__ = orig_class.__name__
    Decorator.__qualname__ = orig_class.__qualname__
    Decorator.__module__ = orig_class.__module__
    Decorator.__doc__ = orig_class.__doc__
    _decorators.add(Decorator)
    if orig_class.__module__.startswith('training.'):
        register_safe_class(Decorator)
    return Decorator


def is_persistent(obj: Any) -> bool:
    """Whether `obj` is a persistent class or an instance of one."""
    cls = obj if isinstance(obj, type) else type(obj)
    return cls in _decorators


def import_hook(hook: Callable) -> Callable:
    """Register `hook(meta) -> meta`, applied before trusted reconstruction of each object.

    `meta` is an EasyDict with fields type, version, module_src, class_name, state; a hook may
    e.g. patch `meta.module_src`. (Official API; the safe loader does not run hooks on source.)
    """
    if not callable(hook):
        raise TypeError('import_hook() expects a callable')
    _import_hooks.append(hook)
    return hook


# Registry used by the safe loader.

def register_safe_class(cls: type) -> type:
    """Allow the safe loader to build persistent class `cls` for its bare class name."""
    if not is_persistent(cls):
        raise TypeError(f'{cls!r} is not a persistent class')
    _safe_registry.setdefault(cls.__name__, dict())[cls.__module__] = cls
    return cls


def find_safe_class(class_name: str) -> type:
    """The registered persistent class for a bare class name; KeyError if none or ambiguous."""
    candidates = _safe_registry.get(class_name, {})
    if len(candidates) == 1:
        return next(iter(candidates.values()))
    for module_name in _preferred_modules:
        if module_name in candidates:
            return candidates[module_name]
    if not candidates:
        raise KeyError(f'no persistent class named "{class_name}" is registered')
    raise KeyError(f'class name "{class_name}" is ambiguous: defined in {sorted(candidates)}')


# Trusted reconstruction (official behaviour): executes the embedded module source.

def _reconstruct_persistent_obj(meta: dict) -> Any:
    """Called by `pickle` / `copy.deepcopy` to rebuild a persistent object.

    WARNING: for sources not already loaded in this process this executes `meta['module_src']`.
    Only reached by plain `pickle.load` (trusted files) and by `copy.deepcopy`.
    """
    meta = dnnlib.EasyDict(meta, state=dnnlib.EasyDict(meta['state']))
    for hook in _import_hooks:
        meta = hook(meta)
        if meta is None:
            raise RuntimeError('A persistence import hook returned None')
    if meta.version != _version:
        raise ValueError(f'Unsupported persistent object version {meta.version} (expected {_version})')
    if meta.type != 'class':
        raise ValueError(f'Unsupported persistent object type {meta.type!r}')
    if meta.module_src:
        module = _src_to_module(meta.module_src)
        if meta.class_name not in module.__dict__:
            raise ValueError(f'Embedded module source does not define class "{meta.class_name}"')
        decorator_class = persistent_class(module.__dict__[meta.class_name])
    else:
        # No source stored (stripped file, or a class whose source was unavailable): fall back
        # to this project's class of that name, if there is exactly one.
        try:
            decorator_class = find_safe_class(meta.class_name)
        except KeyError as e:
            raise ValueError(f'Persistent object "{meta.class_name}" carries no module source and {e.args[0]}; '
                             f'use the safe loader (legacy.load_network_pkl without allow_unsafe).') from None
    obj = decorator_class.__new__(decorator_class)  # no __init__: the state is restored as saved
    if callable(getattr(obj, '__setstate__', None)):
        obj.__setstate__(meta.state)
    else:
        vars(obj).update(meta.state)
    return obj


def _module_to_src(module: types.ModuleType) -> str:
    """Source text of a module (cached). Empty string if the source cannot be found."""
    if module in _module_to_src_dict:
        return _module_to_src_dict[module]
    try:
        text = inspect.getsource(module)
    except (OSError, TypeError):
        text = ''
    _module_to_src_dict[module] = text
    if text:
        _src_to_module_dict.setdefault(text, module)
    return text


def _src_to_module(src: str) -> types.ModuleType:
    """The module for a source text: an already loaded one, else a new module running `src`."""
    known = _src_to_module_dict.get(src)
    if known is not None:
        return known
    fresh = types.ModuleType(f'_imported_module_{uuid.uuid4().hex}')
    # Registered before exec so that code in `src` can find its own module (e.g. for pickling).
    sys.modules[fresh.__name__] = fresh
    _module_to_src_dict[fresh] = src
    _src_to_module_dict[src] = fresh
    exec(src, fresh.__dict__)  # pylint: disable=exec-used
    return fresh


_PLAIN_SCALARS = (type(None), bool, int, float, complex, str, bytes)


def _check_init_arguments(class_name: str, args: tuple, kwargs: dict) -> None:
    """Raise TypeError if a constructor argument holds an nn.Module (or is otherwise unpicklable data)."""
    def visit(value: Any, where: str) -> None:
        if isinstance(value, _PLAIN_SCALARS):
            return
        if isinstance(value, torch.nn.Module):
            raise TypeError(
                f'{class_name}: constructor argument {where} is a torch.nn.Module ({type(value).__name__}). '
                f'Persistent classes record deep copies of their init arguments, so this would store a '
                f'second copy of its weights in every snapshot. Pass plain data (ints, strings, dicts) '
                f'and attach the module after construction instead.')
        if isinstance(value, dict):
            for k, v in value.items():
                visit(k, f'{where}[{k!r}] (key)')
                visit(v, f'{where}[{k!r}]')
            return
        if isinstance(value, (list, tuple, set, frozenset)):
            for i, v in enumerate(value):
                visit(v, f'{where}[{i}]')
            return
        # numpy scalars/arrays, tensors, dtypes, ...: recorded as given (deep-copied).

    for i, v in enumerate(args):
        visit(v, f'args[{i}]')
    for k, v in kwargs.items():
        visit(v, f'{k!r}')
