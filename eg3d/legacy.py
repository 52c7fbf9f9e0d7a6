"""Loading and saving network snapshot pickles (`network-snapshot-*.pkl`).

`load_network_pkl(f)` reads official EG3D snapshots and this project's snapshots WITHOUT
executing anything from the file (the default). Official pickles embed the source code of the
network modules and rebuild objects by running it; the safe loader instead

  * lets the unpickler resolve only an allow-list of globals (tensor/storage rebuilders, numpy
    scalars, a few plain container/renderer classes); anything else raises `UnsafePickleError`;
  * maps each persistent object's bare `class_name` to this project's class
    (`torch_utils.persistence.find_safe_class`), constructs it from the recorded init
    args/kwargs, puts the recorded (already rebuilt) child modules in place of the constructed
    ones, and copies the recorded parameters/buffers with a strict name/shape check.

`load_network_pkl(f, allow_unsafe=True)` is the official behaviour (plain unpickling, which
executes the embedded sources) for trusted files that the safe loader cannot read.

`save_network_pkl(data, path)` writes a snapshot atomically in the official format.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import importlib
import io
import os
import pickle
import random
import warnings
from typing import Any, BinaryIO, Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch

import dnnlib
from torch_utils import misc, persistence


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle references something the safe loader does not allow."""


class _SkippedAugmentPipe:
    """Stands in for the ADA `AugmentPipe` of official snapshots (e.g. AFHQ): personalization never
    augments, so the safe loader drops it instead of building it; only valid as `data['augment_pipe']`."""


_OPT_IN_HINT = ('If you trust this file, load it with allow_unsafe=True (command line: --trust-pickle); '
                'that executes code stored in the pickle.')

# Modules whose persistent classes the safe loader may build (imported on first use so that
# their classes register themselves with `torch_utils.persistence`).
_NETWORK_MODULES = (
    'training.networks_stylegan2',
    'training.superresolution',
    'training.triplane',
    'training.dual_discriminator',
    'training.adapters.layers',
)

# Non-persistent classes that may appear inside network objects; rebuilt by the unpickler as
# `cls.__new__(cls)` followed by a state update with (already safely unpickled) data.
_PLAIN_CLASS_PATHS = (
    'training.volumetric_rendering.renderer.ImportanceRenderer',
    'training.volumetric_rendering.ray_marcher.MipRayMarcher2',
    'training.volumetric_rendering.ray_sampler.RaySampler',
    'training.triplane.OSGDecoder',
)
_PLAIN_TORCH_CLASSES = (
    torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.Identity, torch.nn.Softplus,
)

# nn.Module bookkeeping entries of a module's __dict__; everything else is a plain attribute.
_MODULE_INTERNALS = frozenset([
    'training', '_parameters', '_buffers', '_non_persistent_buffers_set', '_modules',
    '_backward_pre_hooks', '_backward_hooks', '_is_full_backward_hook', '_forward_hooks',
    '_forward_hooks_with_kwargs', '_forward_hooks_always_called', '_forward_pre_hooks',
    '_forward_pre_hooks_with_kwargs', '_state_dict_hooks', '_state_dict_pre_hooks',
    '_load_state_dict_pre_hooks', '_load_state_dict_post_hooks', '_compiled_call_impl',
    '_init_args', '_init_kwargs',
])

# Public API.


def load_network_pkl(f: Union[str, os.PathLike, BinaryIO], force_fp16: bool = False,
                     allow_unsafe: bool = False) -> dict:
    """Load a network snapshot; returns a dict with at least G, G_ema, D, training_set_kwargs, augment_pipe.

    `f` is a path or a binary file object. Missing `D`, `training_set_kwargs` and `augment_pipe`
    are filled in as None; extra keys (e.g. `adapter_config`) are kept. Tensors are loaded onto
    the CPU. The global torch/numpy/random RNG states are left as they were.
    With `force_fp16`, G, G_ema and D are rebuilt with num_fp16_res=4, conv_clamp=256.
    """
    if isinstance(f, (str, os.PathLike)):
        with open(f, 'rb') as file:
            return load_network_pkl(file, force_fp16=force_fp16, allow_unsafe=allow_unsafe)

    file_label = getattr(f, 'name', None)
    file_label = str(file_label) if isinstance(file_label, (str, os.PathLike)) else None
    with _preserve_rng_state():
        if allow_unsafe:
            data = _TrustedUnpickler(f).load()
        else:
            _import_network_modules()
            with dnnlib.util.restrict_name_lookup(_allowed_name_lookup):
                data = _SafeUnpickler(f, file_label).load()
        data = _normalize_snapshot(data, file_label)
        if force_fp16:
            _convert_to_fp16(data)
    return data


def save_network_pkl(data: dict, path: Union[str, os.PathLike]) -> None:
    """Pickle a snapshot dict to `path` atomically (temp file in the same dir, then rename).

    Persistent network objects are written in the official EG3D format. If writing fails, an
    existing file at `path` is left untouched and no temporary file remains.
    """
    if not isinstance(data, dict):
        raise TypeError('save_network_pkl() expects a dict (e.g. {"G": ..., "G_ema": ..., ...})')
    with dnnlib.util.atomic_write_path(path) as tmp_path:
        with open(tmp_path, 'wb') as file:
            pickle.dump(data, file, protocol=4)
            file.flush()
            os.fsync(file.fileno())

# Snapshot layout.


def _normalize_snapshot(data: Any, file_label: Optional[str]) -> dict:
    where = f' in {file_label}' if file_label else ''
    if isinstance(data, tuple) and any(isinstance(x, _TFNetworkStub) for x in data):
        raise ValueError(f'TensorFlow-era network pickle{where}: converting StyleGAN2-TF pickles is not supported.')
    if not isinstance(data, dict):
        raise ValueError(f'Network pickle{where} holds a {type(data).__name__}, expected a dict with G and G_ema.')
    for key in ('training_set_kwargs', 'augment_pipe', 'D'):
        data.setdefault(key, None)
    if isinstance(data['augment_pipe'], _SkippedAugmentPipe):
        warnings.warn(f'Network pickle{where}: its AugmentPipe (ADA augmentation) was not loaded; '
                      f'personalization does not use it, so "augment_pipe" is None.')
        data['augment_pipe'] = None
    if _contains_skipped_augment_pipe(list(data.values())):
        raise UnsafePickleError(f'Network pickle{where} holds an AugmentPipe outside "augment_pipe"; '
                                f'the safe loader cannot build it. {_OPT_IN_HINT}')
    for key in ('G', 'G_ema'):
        if not isinstance(data.get(key), torch.nn.Module):
            raise ValueError(f'Network pickle{where} has no network under "{key}".')
    for key in ('D', 'augment_pipe'):
        if data[key] is not None and not isinstance(data[key], torch.nn.Module):
            raise ValueError(f'Network pickle{where}: "{key}" is a {type(data[key]).__name__}, expected a network or None.')
    if data['training_set_kwargs'] is not None and not isinstance(data['training_set_kwargs'], dict):
        raise ValueError(f'Network pickle{where}: "training_set_kwargs" must be a dict or None.')
    return data


def _contains_skipped_augment_pipe(value: Any, _depth: int = 0) -> bool:
    """Whether plain containers (not networks: their state is checked when rebuilt) hold a dropped AugmentPipe."""
    if isinstance(value, _SkippedAugmentPipe):
        return True
    if _depth > 50:
        return False
    if isinstance(value, dict):
        return any(_contains_skipped_augment_pipe(v, _depth + 1) for v in value.values())
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(_contains_skipped_augment_pipe(v, _depth + 1) for v in value)
    return False


def _convert_to_fp16(data: dict) -> None:
    """Official `force_fp16`: rebuild G, D, G_ema with num_fp16_res=4 and conv_clamp=256."""
    for key in ('G', 'D', 'G_ema'):
        old = data.get(key)
        if old is None:
            continue
        if not persistence.is_persistent(old):
            raise ValueError(f'force_fp16: "{key}" ({type(old).__name__}) is not a persistent network')
        if any(name.split('.')[-1].startswith('lora_') for name, _ in old.named_parameters()):
            raise ValueError(f'force_fp16: "{key}" carries adapters, which a rebuild from its init arguments would drop; '
                             f'load the base pickle with force_fp16 and then its adapter file (training.adapters.load).')
        kwargs = copy.deepcopy(old.init_kwargs)
        # Generators keep these options inside synthesis_kwargs, discriminators at top level.
        target = kwargs['synthesis_kwargs'] if 'synthesis_kwargs' in kwargs else kwargs
        target.update(num_fp16_res=4, conv_clamp=256)
        if kwargs == old.init_kwargs:
            continue  # already configured that way
        with dnnlib.util.restrict_name_lookup(_allowed_name_lookup):
            new = type(old)(*old.init_args, **kwargs).eval().requires_grad_(False)
        # Buffers registered after construction (e.g. dataset_label_std) are carried over.
        new_names = {name for name, _ in misc.named_params_and_buffers(new)}
        for name, buf in old.named_buffers(recurse=False):
            if name not in new_names:
                new.register_buffer(name, buf.clone())
        misc.copy_params_and_buffers(old, new, require_all=True)
        data[key] = new

# Trusted (official) unpickling.


class _TFNetworkStub(dnnlib.EasyDict):
    """Stands in for `dnnlib.tflib.network.Network` of TensorFlow-era pickles."""


class _TrustedUnpickler(pickle.Unpickler):
    """Plain unpickling, except that TensorFlow-era networks become inert stubs."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ('dnnlib.tflib.network', 'Network'):
            return _TFNetworkStub
        return super().find_class(module, name)

# Safe unpickling: allowed globals.


def _import_network_modules() -> None:
    """Import the modules that define our persistent classes so that they register."""
    for module_name in _NETWORK_MODULES:
        try:
            importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is None or not (module_name == e.name or module_name.startswith(e.name + '.')):
                raise  # the module exists but one of its own imports is missing


def _plain_classes() -> Dict[Tuple[str, str], type]:
    classes = {(cls.__module__, cls.__qualname__): cls for cls in _PLAIN_TORCH_CLASSES}
    for path in _PLAIN_CLASS_PATHS:
        module_name, name = path.rsplit('.', 1)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue
        if isinstance(getattr(module, name, None), type):
            classes[(module_name, name)] = getattr(module, name)
    return classes


def _allowed_name_lookup(name: str) -> None:
    """Guard for `dnnlib.util.get_obj_by_name` while building networks from pickled kwargs:
    a constructor may only look up registered network classes (e.g. `superresolution_module`)."""
    module_name, _, obj_name = name.rpartition('.')
    allowed = {(cls.__module__, cls.__name__) for classes in persistence._safe_registry.values()  # pylint: disable=protected-access
               for cls in classes.values()}
    allowed |= set(_plain_classes())
    if (module_name, obj_name) not in allowed:
        raise UnsafePickleError(f'A network constructor was asked (by arguments stored in the pickle) to look up '
                                f'"{name}", which is not a known network class. {_OPT_IN_HINT}')


def _check_empty_hooks(hooks: Any, what: str) -> None:
    if hooks is not None and (not isinstance(hooks, dict) or len(hooks) != 0):
        raise UnsafePickleError(f'{what}: stored backward hooks are not supported by the safe loader. {_OPT_IN_HINT}')


def _safe_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    if not isinstance(storage, (torch.storage.TypedStorage, torch.storage.UntypedStorage)):
        raise UnsafePickleError(f'tensor storage has unexpected type {type(storage).__name__}')
    if not (isinstance(storage_offset, int) and isinstance(size, tuple) and isinstance(stride, tuple)
            and all(isinstance(x, int) for x in size + stride) and isinstance(requires_grad, bool)):
        raise UnsafePickleError('malformed tensor record')
    if metadata is not None and not isinstance(metadata, dict):
        raise UnsafePickleError('malformed tensor metadata')
    _check_empty_hooks(backward_hooks, 'tensor')
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,  # pylint: disable=protected-access
                                          collections.OrderedDict(), metadata)


def _safe_rebuild_parameter(data, requires_grad, backward_hooks):
    if not isinstance(data, torch.Tensor) or not isinstance(requires_grad, bool):
        raise UnsafePickleError('malformed parameter record')
    _check_empty_hooks(backward_hooks, 'parameter')
    return torch.nn.Parameter(data, requires_grad)


def _safe_rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    param = _safe_rebuild_parameter(data, requires_grad, backward_hooks)
    if state:  # Python attributes on a Parameter: not produced by any network here.
        raise UnsafePickleError('parameters with extra Python attributes are not supported by the safe loader. '
                                + _OPT_IN_HINT)
    return param


def _safe_load_from_bytes(blob):
    """Tensor storage from its legacy `torch.save` bytes, parsed with torch's weights-only loader."""
    if not isinstance(blob, (bytes, bytearray)):
        raise UnsafePickleError('malformed tensor storage record')
    try:
        return torch.load(io.BytesIO(blob), weights_only=True, map_location='cpu')
    except pickle.UnpicklingError as e:
        raise UnsafePickleError(f'tensor storage record refused by torch weights-only loader: {e}') from e


def _safe_numpy_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes) \
            or len(data) != dtype.itemsize:
        raise UnsafePickleError('only numeric numpy scalars are allowed')
    return np.frombuffer(data, dtype=dtype, count=1)[0].copy()


def _safe_numpy_dtype(spec, align=False, copy_=False):
    if not isinstance(spec, str):
        raise UnsafePickleError('malformed numpy dtype record')
    dtype = np.dtype(spec, align=bool(align), copy=bool(copy_))
    if dtype.hasobject:
        raise UnsafePickleError('numpy object dtypes are not allowed')
    return dtype


def _safe_numpy_reconstruct(subtype, shape, dtype_code):
    if subtype is not np.ndarray:
        raise UnsafePickleError('only plain numpy arrays are allowed')
    return np.ndarray.__new__(np.ndarray, shape, dtype_code)


_SAFE_FUNCTIONS: Dict[Tuple[str, str], Callable] = {
    ('torch._utils', '_rebuild_tensor_v2'): _safe_rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): _safe_rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _safe_rebuild_parameter_with_state,
    ('torch.storage', '_load_from_bytes'): _safe_load_from_bytes,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('numpy._core.multiarray', 'scalar'): _safe_numpy_scalar,
    ('numpy.core.multiarray', 'scalar'): _safe_numpy_scalar,
    ('numpy', 'dtype'): _safe_numpy_dtype,
    ('numpy._core.multiarray', '_reconstruct'): _safe_numpy_reconstruct,
    ('numpy.core.multiarray', '_reconstruct'): _safe_numpy_reconstruct,
    ('numpy', 'ndarray'): np.ndarray,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('dnnlib.util', 'EasyDict'): dnnlib.EasyDict,
    ('torch', 'device'): torch.device,
}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals; nothing from the file is executed."""

    def __init__(self, file: BinaryIO, file_label: Optional[str]):
        super().__init__(file)
        self.file_label = file_label
        self.plain_classes = _plain_classes()

    def refuse(self, what: str) -> UnsafePickleError:
        where = f' in {self.file_label}' if self.file_label else ''
        return UnsafePickleError(f'Refusing to load {what}{where}: the safe network loader does not allow it. '
                                 + _OPT_IN_HINT)

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith('dnnlib.tflib'):
            raise ValueError(f'TensorFlow-era network pickle ({module}.{name})'
                             + (f' in {self.file_label}' if self.file_label else '')
                             + ': converting StyleGAN2-TF pickles is not supported.')
        if (module, name) == ('torch_utils.persistence', '_reconstruct_persistent_obj'):
            return functools.partial(_safe_reconstruct_persistent_obj, self)
        if (module, name) in _SAFE_FUNCTIONS:
            return _SAFE_FUNCTIONS[(module, name)]
        if (module, name) in self.plain_classes:
            return self.plain_classes[(module, name)]
        if module == 'torch' and isinstance(torch.__dict__.get(name), torch.dtype):
            return torch.__dict__[name]
        raise self.refuse(f'global "{module}.{name}"')

# Safe unpickling: persistent objects.


def _check_plain_data(value: Any, where: str, allow_modules: bool = False, _depth: int = 0) -> None:
    """Raise UnsafePickleError unless `value` is plain data (numbers, strings, containers, arrays, tensors).

    With `allow_modules`, nn.Module objects are accepted too: persistent ones (already checked when
    rebuilt) and allow-listed plain ones, whose own state is checked recursively.
    """
    if _depth > 100:
        raise UnsafePickleError(f'{where}: data nested too deeply')
    if isinstance(value, (type(None), bool, int, float, complex, str, bytes, np.generic, np.ndarray,
                          torch.Tensor, torch.dtype, torch.device)):
        if isinstance(value, np.ndarray) and value.dtype.hasobject:
            raise UnsafePickleError(f'{where}: numpy object arrays are not allowed')
        return
    if isinstance(value, dict):
        for k, v in value.items():
            _check_plain_data(k, f'{where} (key)', allow_modules, _depth + 1)
            _check_plain_data(v, f'{where}[{k!r}]', allow_modules, _depth + 1)
        return
    if isinstance(value, (list, tuple, set, frozenset)):
        for i, v in enumerate(value):
            _check_plain_data(v, f'{where}[{i}]', allow_modules, _depth + 1)
        return
    if isinstance(value, torch.nn.Module) and allow_modules:
        if persistence.is_persistent(value):
            return
        _check_plain_module(value, where, _depth + 1)
        return
    raise UnsafePickleError(f'{where}: unexpected object of type {type(value).__name__}')


def _check_plain_module(module: torch.nn.Module, where: str, depth: int = 0) -> None:
    if type(module) not in set(_plain_classes().values()):
        raise UnsafePickleError(f'{where}: module class {type(module).__name__} is not allowed')
    for key, value in module.__dict__.items():
        if key.startswith('__'):
            raise UnsafePickleError(f'{where}: attribute {key} is not allowed')
        _check_plain_data(value, f'{where}.{key}', allow_modules=True, _depth=depth)


def _safe_reconstruct_persistent_obj(unpickler: _SafeUnpickler, meta: Any) -> torch.nn.Module:
    """Rebuild a persistent object from its meta dict without executing its `module_src`."""
    if not isinstance(meta, dict) or not isinstance(meta.get('class_name'), str) or not isinstance(meta.get('state'), dict):
        raise unpickler.refuse('a malformed persistent-object record')
    class_name = meta['class_name']
    if meta.get('type') != 'class' or meta.get('version') != persistence._version:  # pylint: disable=protected-access
        raise unpickler.refuse(f'persistent object "{class_name}" of type {meta.get("type")!r} '
                               f'version {meta.get("version")!r}')
    try:
        cls = persistence.find_safe_class(class_name)
    except KeyError as e:
        if class_name == 'AugmentPipe':
            return _SkippedAugmentPipe()
        raise unpickler.refuse(f'persistent class "{class_name}" ({e.args[0]})') from None

    state = meta['state']
    init_args = state.get('_init_args', ())
    init_kwargs = state.get('_init_kwargs', {})
    if not isinstance(init_args, tuple) or not isinstance(init_kwargs, dict) or \
            not all(isinstance(k, str) for k in init_kwargs):
        raise unpickler.refuse(f'persistent object "{class_name}" with malformed init arguments')
    _check_plain_data(init_args, f'{class_name}.init_args')
    _check_plain_data(init_kwargs, f'{class_name}.init_kwargs')

    # The constructor also builds every child again, and all tensors it makes are then replaced
    # by the stored ones. So on a first try its random draws give 'meta' tensors (no memory, no
    # RNG use): loading is then about as fast as plain unpickling. If that construction fails
    # (the constructor computes with the random values) or leaves a meta tensor behind that the
    # pickle does not replace, the object is built again normally.
    for fast in (True, False):
        try:
            with torch.no_grad(), (_RandomToMeta() if fast else contextlib.nullcontext()):
                obj = cls(*copy.deepcopy(init_args), **copy.deepcopy(dict(init_kwargs)))
        except UnsafePickleError:
            raise
        except Exception as e:
            if fast:
                continue
            raise ValueError(f'Could not construct {class_name} from the init arguments stored in the pickle: '
                             f'{type(e).__name__}: {e}') from e
        _restore_children(obj, class_name, state)
        _restore_tensors(obj, class_name, state)
        _restore_attributes(obj, class_name, state)
        if not fast or not _has_meta_tensors(obj.__dict__):
            return obj
    raise AssertionError('unreachable')


class _RandomToMeta(torch.overrides.TorchFunctionMode):
    """Inside the block, random tensor factories return uninitialised 'meta' tensors."""
    _FACTORIES = {torch.randn, torch.rand, torch.randint, torch.randn_like, torch.rand_like, torch.randint_like}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self._FACTORIES:
            kwargs.pop('generator', None)
            kwargs['device'] = 'meta'
        return func(*args, **kwargs)


def _has_meta_tensors(value: Any, _depth: int = 0) -> bool:
    """Whether a (nested) attribute value holds a tensor on the 'meta' device.
    Child modules are skipped: they come from the pickle and were checked when rebuilt."""
    if isinstance(value, torch.Tensor):
        return value.is_meta
    if isinstance(value, torch.nn.Module) or _depth > 50:
        return False
    if isinstance(value, dict):
        return any(_has_meta_tensors(v, _depth + 1) for v in value.values())
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(_has_meta_tensors(v, _depth + 1) for v in value)
    return False


def _restore_children(obj: torch.nn.Module, class_name: str, state: dict) -> None:
    recorded = state.get('_modules', {})
    if not isinstance(recorded, dict):
        raise UnsafePickleError(f'{class_name}: malformed _modules')
    missing = [name for name in obj._modules if name not in recorded]  # pylint: disable=protected-access
    if missing:
        raise ValueError(f'{class_name}: the pickle has no stored child module(s) {missing} that the constructor creates')
    for name, child in recorded.items():
        if child is not None and not isinstance(child, torch.nn.Module):
            raise UnsafePickleError(f'{class_name}: child "{name}" is a {type(child).__name__}, not a module')
        if child is not None and not persistence.is_persistent(child):
            _check_plain_module(child, f'{class_name}.{name}')
        if name not in obj._modules and hasattr(obj, name):  # pylint: disable=protected-access
            raise ValueError(f'{class_name}: stored child module "{name}" clashes with an attribute of the same name')
        obj._modules[name] = child  # pylint: disable=protected-access


def _restore_tensors(obj: torch.nn.Module, class_name: str, state: dict) -> None:
    """Put the stored parameters/buffers on `obj` (strict: same names and shapes).

    Stored buffers that the constructor does not create (e.g. `dataset_label_std`, registered
    by the official training loop) are registered; any other mismatch is an error.
    """
    for kind in ('_parameters', '_buffers'):
        recorded = state.get(kind, {})
        if not isinstance(recorded, dict):
            raise UnsafePickleError(f'{class_name}: malformed {kind}')
        current = getattr(obj, kind)
        label = 'parameter' if kind == '_parameters' else 'buffer'
        for name in current:
            if name not in recorded:
                raise ValueError(f'{class_name}: {label} "{name}" (shape {_shape(current[name])}) is missing from the pickle')
        for name, value in recorded.items():
            if value is not None and not isinstance(value, torch.Tensor):
                raise UnsafePickleError(f'{class_name}: {label} "{name}" is a {type(value).__name__}')
            if name not in current:
                if kind == '_parameters':
                    raise ValueError(f'{class_name}: the pickle has parameter "{name}" (shape {_shape(value)}) '
                                     f'that this code does not create')
                if hasattr(obj, name):
                    raise ValueError(f'{class_name}: stored buffer "{name}" clashes with an attribute of the same name')
                persistent = name not in state.get('_non_persistent_buffers_set', set())
                obj.register_buffer(name, value, persistent=persistent)
                continue
            if (value is None) != (current[name] is None) or \
                    (value is not None and value.shape != current[name].shape):
                raise ValueError(f'{class_name}: {label} "{name}" has shape {_shape(value)} in the pickle but '
                                 f'{_shape(current[name])} in this code')
            if kind == '_parameters' and value is not None and not isinstance(value, torch.nn.Parameter):
                value = torch.nn.Parameter(value, requires_grad=value.requires_grad)
            current[name] = value


def _restore_attributes(obj: torch.nn.Module, class_name: str, state: dict) -> None:
    """Restore the training flag and the plain (non-tensor-container) attributes."""
    training = state.get('training', False)
    if not isinstance(training, bool):
        raise UnsafePickleError(f'{class_name}: malformed training flag')
    obj.training = training
    taken = set(obj._parameters) | set(obj._buffers) | set(obj._modules)  # pylint: disable=protected-access
    for key, value in state.items():
        if key in _MODULE_INTERNALS:
            continue
        if not isinstance(key, str) or key.startswith('__') or key in taken:
            raise UnsafePickleError(f'{class_name}: attribute name {key!r} is not allowed')
        _check_plain_data(value, f'{class_name}.{key}')
        obj.__dict__[key] = value


def _shape(value: Any) -> Any:
    return None if value is None else list(value.shape)


@contextlib.contextmanager
def _preserve_rng_state():
    """Constructors draw random initial weights; keep the caller's RNG streams unchanged."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
