"""Miscellaneous helpers: attribute dicts, a stdout/stderr tee, lookup of objects by
dotted name, and opening local files or (cached) URLs.

Names and meaning follow the official StyleGAN/EG3D `dnnlib.util`, so configuration
strings such as `class_name='training.triplane.TriPlaneGenerator'` work unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import importlib
import io
import os
import re
import sys
import tempfile
import types
import urllib.error
import urllib.parse
import urllib.request
import uuid
from contextvars import ContextVar
from typing import Any, BinaryIO, Optional, Tuple, Union

import numpy as np


# Attribute dict and logger.

class EasyDict(dict):
    """A dict whose items can also be read and written as attributes (`d.key`)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None


class Logger:
    """Tee stdout and stderr into an optional log file, flushing after each write.

    While the logger is open, `sys.stdout` and `sys.stderr` point to it; everything written
    to either goes to the original stdout and, if `file_name` is given, to that file.
    `close()` (or leaving the `with` block) restores the original streams.
    """

    def __init__(self, file_name: Optional[str] = None, file_mode: str = 'w', should_flush: bool = True):
        self.file = None if file_name is None else open(file_name, file_mode)
        self.should_flush = should_flush
        self.stdout, self.stderr = sys.stdout, sys.stderr  # restored by close()
        sys.stdout = sys.stderr = self

    def __enter__(self) -> 'Logger':
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        self.close()

    def _targets(self):
        return [stream for stream in (self.file, self.stdout) if stream is not None]

    def write(self, text: Union[str, bytes]) -> None:
        if isinstance(text, bytes):
            text = text.decode()
        if not text:
            return  # some debuggers crash on an empty write followed by a flush
        for stream in self._targets():
            stream.write(text)
        if self.should_flush:
            self.flush()

    def flush(self) -> None:
        for stream in self._targets():
            stream.flush()

    def isatty(self) -> bool:
        return False

    def close(self) -> None:
        """Flush, close the file and restore the streams (only those still pointing here)."""
        self.flush()
        # A logger opened later may have taken over a stream: leave that one alone.
        if sys.stdout is self:
            sys.stdout = self.stdout
        if sys.stderr is self:
            sys.stderr = self.stderr
        if self.file is not None:
            self.file.close()
            self.file = None


# Cache directory.

def make_cache_dir_path(*paths: str) -> str:
    """Path inside the cache dir: $DNNLIB_CACHE_DIR, else ~/.cache/dnnlib."""
    if 'DNNLIB_CACHE_DIR' in os.environ:
        return os.path.join(os.environ['DNNLIB_CACHE_DIR'], *paths)
    for home_var in ('HOME', 'USERPROFILE'):  # POSIX, then Windows
        if home_var in os.environ:
            return os.path.join(os.environ[home_var], '.cache', 'dnnlib', *paths)
    return os.path.join(tempfile.gettempdir(), '.cache', 'dnnlib', *paths)


# Small helpers.

def _split_duration(seconds: Union[int, float]) -> Tuple[int, int, int, int, int]:
    """(total seconds, days, hours, minutes, seconds) of a duration rounded to whole seconds."""
    total = int(np.rint(seconds))
    minutes, secs = divmod(total, 60)
    hours, mins = divmod(minutes, 60)
    days, hrs = divmod(hours, 24)
    return total, days, hrs, mins, secs


def format_time(seconds: Union[int, float]) -> str:
    """Human-readable duration: '42s', '3m 07s', '2h 05m 09s', '1d 03h 20m'."""
    total, days, hrs, mins, secs = _split_duration(seconds)
    if total < 60:
        return f'{total}s'
    if total < 3600:
        return f'{total // 60}m {secs:02}s'
    if days == 0:
        return f'{hrs}h {mins:02}m {secs:02}s'
    return f'{days}d {hrs:02}h {mins:02}m'


def format_time_brief(seconds: Union[int, float]) -> str:
    """Like `format_time` but with only the two largest units."""
    total, days, hrs, mins, secs = _split_duration(seconds)
    if total < 60:
        return f'{total}s'
    if total < 3600:
        return f'{total // 60}m {secs:02}s'
    if days == 0:
        return f'{hrs}h {mins:02}m'
    return f'{days}d {hrs:02}h'


# Looking up objects by dotted name.

def get_obj_from_module(module: types.ModuleType, obj_name: str) -> Any:
    """Follow the dotted attribute path `obj_name` starting at `module` ('' = the module itself)."""
    return functools.reduce(getattr, obj_name.split('.'), module) if obj_name else module


def get_module_from_obj_name(obj_name: str) -> Tuple[types.ModuleType, str]:
    """Split a dotted name into (imported module, attribute path inside it).

    Tries the longest importable module prefix first. Shorthands 'np.' and 'tf.' are expanded.
    An error raised while importing an existing module is propagated (not masked).
    """
    for short, full in (('np.', 'numpy.'), ('tf.', 'tensorflow.')):
        if obj_name.startswith(short):
            obj_name = full + obj_name[len(short):]
    parts = obj_name.split('.')

    for cut in range(len(parts), 0, -1):  # longest module prefix first
        module_name, local_name = '.'.join(parts[:cut]), '.'.join(parts[cut:])
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            # Only "this very module does not exist" means: try a shorter prefix.
            if e.name is not None and module_name != e.name and not module_name.startswith(e.name + '.'):
                raise
            continue
        try:
            get_obj_from_module(module, local_name)
        except AttributeError:
            continue
        return module, local_name
    raise ImportError(f'Cannot find a Python object named "{obj_name}"')


_name_lookup_guard: ContextVar = ContextVar('dnnlib_name_lookup_guard', default=None)


@contextlib.contextmanager
def restrict_name_lookup(guard):
    """Within the block, `get_obj_by_name` (and so `construct_class_by_name`) first calls
    `guard(name)`, which raises to refuse a name. Used while building networks from untrusted
    pickled arguments, so that those arguments cannot name arbitrary callables."""
    token = _name_lookup_guard.set(guard)
    try:
        yield
    finally:
        _name_lookup_guard.reset(token)


def get_obj_by_name(name: str) -> Any:
    """The Python object with the given fully qualified name, e.g. 'torch.nn.Linear'."""
    guard = _name_lookup_guard.get()
    if guard is not None:
        guard(name)
    module, obj_name = get_module_from_obj_name(name)
    return get_obj_from_module(module, obj_name)


def call_func_by_name(*args, func_name: Optional[str] = None, **kwargs) -> Any:
    """Look up `func_name` and call it with the remaining arguments."""
    if func_name is None:
        raise ValueError('call_func_by_name() needs func_name')
    func_obj = get_obj_by_name(func_name)
    if not callable(func_obj):
        raise TypeError(f'"{func_name}" is not callable')
    return func_obj(*args, **kwargs)


def construct_class_by_name(*args, class_name: Optional[str] = None, **kwargs) -> Any:
    """Look up `class_name` and construct it with the remaining arguments."""
    if class_name is None:
        raise ValueError('construct_class_by_name() needs class_name')
    return call_func_by_name(*args, func_name=class_name, **kwargs)


# Files and URLs.

def is_url(obj: Any, allow_file_urls: bool = False) -> bool:
    """True for 'scheme://host.domain/...' strings (and file:// if allowed)."""
    if not isinstance(obj, str) or '://' not in obj:
        return False
    if allow_file_urls and obj.startswith('file://'):
        return True
    try:
        res = urllib.parse.urlparse(obj)
    except ValueError:
        return False
    return bool(res.scheme) and bool(res.netloc) and '.' in res.netloc


def _file_url_to_path(url: str) -> str:
    path = urllib.parse.unquote(urllib.parse.urlparse(url).path)
    if re.match(r'^/[a-zA-Z]:', path):  # file:///c:/foo -> c:/foo
        path = path[1:]
    return path


def open_url(url: str, cache_dir: Optional[str] = None, num_attempts: int = 3, verbose: bool = True,
             return_filename: bool = False, cache: bool = True, timeout: float = 60.0) -> Union[BinaryIO, str]:
    """Open a local path, a file:// URL, or an http(s) URL as a binary file object.

    Downloads are cached in `cache_dir` (default: `make_cache_dir_path('downloads')`) under the
    md5 of the URL, so a second call does not touch the network. With `return_filename=True`
    the local path is returned instead of an open file (requires `cache=True` for URLs).
    A download that fails after `num_attempts` raises IOError naming the URL.
    """
    if num_attempts < 1:
        raise ValueError('num_attempts must be >= 1')
    if return_filename and not cache:
        raise ValueError('return_filename=True requires cache=True')

    url = os.fspath(url)
    if not re.match('^[a-z][a-z0-9+.-]*://', url):
        return url if return_filename else open(url, 'rb')
    if url.startswith('file://'):
        path = _file_url_to_path(url)
        return path if return_filename else open(path, 'rb')
    if not url.startswith(('http://', 'https://')):
        raise ValueError(f'Unsupported URL scheme: {url}')

    if cache_dir is None:
        cache_dir = make_cache_dir_path('downloads')
    url_md5 = hashlib.md5(url.encode('utf-8')).hexdigest()
    if cache:
        cached = sorted(glob.glob(os.path.join(cache_dir, url_md5 + '_*')))
        if cached:
            return cached[0] if return_filename else open(cached[0], 'rb')

    data = None
    last_error: Optional[BaseException] = None
    if verbose:
        print(f'Downloading {url} ...', end='', flush=True)
    for _attempt in range(num_attempts):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as res:
                data = res.read()
            if len(data) == 0:
                raise IOError('no data received')
            break
        except (urllib.error.URLError, OSError, ValueError) as e:
            last_error = e
            data = None
    if verbose:
        print(' done' if data is not None else ' failed')
    if data is None:
        raise IOError(f'Could not download {url} after {num_attempts} attempt(s): {last_error}. '
                      f'If this machine is offline, download the file elsewhere and pass its local path.') from last_error

    if cache:
        url_name = re.sub(r'[^0-9a-zA-Z._-]', '_', os.path.basename(urllib.parse.urlparse(url).path)) or 'download'
        cache_file = os.path.join(cache_dir, url_md5 + '_' + url_name)
        temp_file = os.path.join(cache_dir, 'tmp_' + uuid.uuid4().hex + '_' + url_md5 + '_' + url_name)
        os.makedirs(cache_dir, exist_ok=True)
        with open(temp_file, 'wb') as f:
            f.write(data)
        os.replace(temp_file, cache_file)
        if return_filename:
            return cache_file
    return io.BytesIO(data)


@contextlib.contextmanager
def atomic_write_path(path: Union[str, os.PathLike]):
    """Yield a temporary path next to `path`; when the block succeeds it is renamed onto `path`.

    Readers never see a half-written file and a failure leaves an existing `path` untouched. Unlike
    `tempfile.mkstemp` (mode 0600), the file gets the usual permissions (0666 minus the umask), so
    snapshots stay readable by the other users of a shared cluster.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    name, ext = os.path.splitext(os.path.basename(path))
    # Keep the extension last: writers that pick the format from the name (imageio's ffmpeg) need it.
    tmp_path = os.path.join(directory, f'.{name}.{uuid.uuid4().hex[:12]}.tmp{ext}')
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_path)
