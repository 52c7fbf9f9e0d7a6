"""Just-in-time building and loading of the C++/CUDA plugins behind the fast op paths.

`get_plugin()` builds an extension with `torch.utils.cpp_extension.load` (ninja) into a cache
directory keyed by a hash of the sources, the build options and the torch / CUDA / Python / GPU
architecture versions, and raises `PluginUnavailable` with a readable reason on failure.
The ops call `load_plugin()` instead, which returns None and warns once per plugin, so they fall
back to their reference implementations; EG3D_OPS_IMPL=cuda turns that fallback into an error.
See docs/cuda_ops.md.
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys
import uuid
import warnings
from typing import Dict, List, Optional

import torch

verbosity = 'brief'  # Build messages: 'none', 'brief' (one line per plugin) or 'full' (compiler output).

IMPL_ENV = 'EG3D_OPS_IMPL'               # 'ref': reference implementations everywhere; 'cuda': no fallback.
EXTENSIONS_DIR_ENV = 'EG3D_EXTENSIONS_DIR'  # Root of the build cache.
DEFAULT_EXTENSIONS_DIR = os.path.join('~', '.cache', 'eg3d_lora', 'extensions')


_TOOLKIT_HINT = ('install a CUDA toolkit (nvcc) whose major version matches this PyTorch build (CUDA {cuda}) and '
                 'point CUDA_HOME to it, with a C++ compiler and ninja')


class PluginUnavailable(RuntimeError):
    """A plugin could not be built or loaded: `str(e)` says why, `e.hint` how to fix it."""

    def __init__(self, reason: str, hint: str = _TOOLKIT_HINT):
        super().__init__(reason)
        self.hint = hint.format(cuda=torch.version.cuda)


class PluginUnavailableWarning(UserWarning):
    """Emitted once per plugin when an op falls back to its reference implementation."""


_loaded: Dict[str, object] = {}    # module_name -> loaded extension module
_failed: Dict[str, str] = {}       # module_name -> reason it is unavailable (warned once)


def reference_forced() -> bool:
    """True when EG3D_OPS_IMPL=ref asks for the reference implementations."""
    return os.environ.get(IMPL_ENV, '').strip().lower() == 'ref'


def fallback_forbidden() -> bool:
    """True when EG3D_OPS_IMPL=cuda makes an unavailable plugin an error (cluster jobs that must not run slow)."""
    return os.environ.get(IMPL_ENV, '').strip().lower() == 'cuda'


def unavailable_plugins() -> Dict[str, str]:
    """Plugins this process fell back from: module name -> why (for run logs)."""
    return dict(_failed)


def extensions_dir() -> str:
    return os.path.abspath(os.path.expanduser(os.environ.get(EXTENSIONS_DIR_ENV) or DEFAULT_EXTENSIONS_DIR))


def load_plugin(module_name: str, sources: List[str], headers: Optional[List[str]] = None,
                source_dir: Optional[str] = None, **build_kwargs) -> Optional[object]:
    """The plugin module, or None (with one warning per plugin) if it cannot be had.

    For the ops: None means "use the reference implementation". Never raises, unless
    EG3D_OPS_IMPL=cuda forbids the fallback: then it raises `PluginUnavailable` (at every call).
    """
    if module_name in _loaded:
        return _loaded[module_name]
    if module_name in _failed:
        if fallback_forbidden():
            raise PluginUnavailable(f'EG3D CUDA plugin "{module_name}" is unavailable and {IMPL_ENV}=cuda forbids '
                                    f'the reference fallback: {_failed[module_name]}')
        return None
    try:
        if not torch.cuda.is_available():
            raise PluginUnavailable('no CUDA device is visible to PyTorch (torch.cuda.is_available() is False).',
                                    hint='run on a machine with an NVIDIA GPU and driver')
        return get_plugin(module_name, sources, headers=headers, source_dir=source_dir, **build_kwargs)
    except Exception as e:
        if not isinstance(e, PluginUnavailable):
            e = PluginUnavailable(f'{type(e).__name__}: {e}')
        _failed[module_name] = str(e)
        if fallback_forbidden():
            raise PluginUnavailable(f'EG3D CUDA plugin "{module_name}" is unavailable and {IMPL_ENV}=cuda forbids the '
                                    f'reference fallback: {e}', hint=e.hint) from e
        warnings.warn(
            f'EG3D CUDA plugin "{module_name}" is unavailable; using the slower reference implementation instead.\n'
            f'Reason: {e}\n'
            f'To fix: {e.hint}. To silence this warning and always use the reference implementation, '
            f'set {IMPL_ENV}=ref.', PluginUnavailableWarning, stacklevel=2)
        return None


def get_plugin(module_name: str, sources: List[str], headers: Optional[List[str]] = None,
               source_dir: Optional[str] = None, **build_kwargs) -> object:
    """Build (if not cached) and import a C++/CUDA extension. Raises PluginUnavailable on failure.

    `sources` / `headers` are file names, relative to `source_dir` when given; `build_kwargs`
    go to `torch.utils.cpp_extension.load` (e.g. extra_cuda_cflags).
    """
    assert verbosity in ('none', 'brief', 'full')
    if module_name in _loaded:
        return _loaded[module_name]
    headers = list(headers or [])
    if source_dir is not None:
        sources = [os.path.join(source_dir, s) for s in sources]
        headers = [os.path.join(source_dir, h) for h in headers]
    needs_cuda = any(s.endswith('.cu') for s in sources)
    nvcc_version = _check_cuda_toolchain() if needs_cuda else None

    try:
        key = _build_key(sources + headers, nvcc_version, build_kwargs)
        build_dir = os.path.join(extensions_dir(), f'{module_name}-{key}')
        _populate_build_dir(build_dir, sources + headers)
    except OSError as e:
        raise PluginUnavailable(f'could not prepare the build directory: {e}',
                                hint=f'make sure the sources exist and {EXTENSIONS_DIR_ENV} is writable') from e
    if verbosity != 'none':
        # 'brief' keeps the outcome on the same line; 'full' is followed by the compiler output.
        print(f'Compiling/loading CUDA plugin {module_name} ({build_dir})...',
              end=(' ' if verbosity == 'brief' else '\n'), flush=True)
    try:
        import torch.utils.cpp_extension
        module = torch.utils.cpp_extension.load(
            name=module_name, build_directory=build_dir, verbose=(verbosity == 'full'),
            sources=[os.path.join(build_dir, os.path.basename(s)) for s in sources], **build_kwargs)
    except Exception as e:
        if verbosity == 'brief':
            print('failed.')
        compiling = 'Error building extension' in str(e)
        failed = 'the compiler failed' if compiling else f'loading failed ({type(e).__name__})'
        raise PluginUnavailable(f'{failed} (build directory {build_dir}):\n{_first_error_lines(str(e))}') from e
    if verbosity == 'brief':
        print('ok.')
    _loaded[module_name] = module
    return module


def _find_nvcc() -> Optional[str]:
    """Path of nvcc: $CUDA_HOME/bin/nvcc (as torch sees CUDA_HOME), else the one on PATH."""
    import torch.utils.cpp_extension
    cuda_home = torch.utils.cpp_extension.CUDA_HOME
    if cuda_home:
        candidate = os.path.join(cuda_home, 'bin', 'nvcc')
        if os.path.isfile(candidate):
            return candidate
    return shutil.which('nvcc')


def _nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, '--version'], capture_output=True, text=True, timeout=60, check=False).stdout
    match = re.search(r'release (\d+\.\d+)', out)
    if not match:
        raise PluginUnavailable(f'could not read the CUDA version from "{nvcc} --version".')
    return match.group(1)


def _check_cuda_toolchain() -> str:
    """Raise PluginUnavailable unless torch has CUDA and a matching nvcc exists; return nvcc's version."""
    if torch.version.cuda is None:
        raise PluginUnavailable(f'this PyTorch build ({torch.__version__}) has no CUDA support.',
                                hint='install a CUDA build of PyTorch and a CUDA toolkit of the same major version')
    nvcc = _find_nvcc()
    if nvcc is None:
        raise PluginUnavailable('nvcc (the CUDA compiler) was not found: CUDA_HOME is not set to a CUDA toolkit '
                                'and nvcc is not on PATH.')
    version = _nvcc_version(nvcc)
    if version.split('.')[0] != torch.version.cuda.split('.')[0]:
        raise PluginUnavailable(f'CUDA version mismatch: {nvcc} is CUDA {version} but PyTorch was built with '
                                f'CUDA {torch.version.cuda}.')
    return version


def _cuda_arch_key() -> str:
    """The GPU architectures the build targets (as torch.utils.cpp_extension will choose them)."""
    arch_list = os.environ.get('TORCH_CUDA_ARCH_LIST')
    if arch_list:
        return arch_list
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ';'.join(f'{major}.{minor}' for major, minor in caps)
    return 'default'


def _build_key(files: List[str], nvcc_version: Optional[str], build_kwargs: dict) -> str:
    digest = hashlib.sha256()
    for path in sorted(files):
        with open(path, 'rb') as fh:
            digest.update(os.path.basename(path).encode() + b'\0' + fh.read() + b'\0')
    env = [torch.__version__, str(torch.version.cuda), str(nvcc_version), _cuda_arch_key(),
           f'py{sys.version_info.major}.{sys.version_info.minor}', repr(sorted(build_kwargs.items()))]
    digest.update('\0'.join(env).encode())
    return digest.hexdigest()[:16]


def _populate_build_dir(build_dir: str, files: List[str]) -> None:
    """Copy the sources into the keyed build dir once (atomic rename, safe for concurrent processes)."""
    if os.path.isdir(build_dir):
        return
    staging = f'{build_dir}.tmp-{uuid.uuid4().hex}'
    os.makedirs(staging)
    for path in files:
        shutil.copyfile(path, os.path.join(staging, os.path.basename(path)))
    try:
        os.replace(staging, build_dir)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not os.path.isdir(build_dir):  # a concurrent process that got there first is fine
            raise


def _first_error_lines(message: str, max_lines: int = 8) -> str:
    """The compiler's diagnostics ('...: error: ...') from a build failure message, else its first lines."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r'\berror\s*:', line, re.IGNORECASE)]
    picked = (errors or lines)[:max_lines]
    return '\n'.join(picked)
