"""dnnlib.util: EasyDict, lookup by name, open_url (local, file://, cached http), Logger, format_time."""
import collections
import http.server
import math
import os
import socket
import sys
import threading

import pytest
import torch

import dnnlib
from dnnlib import util


def test_easydict_attribute_access_mirrors_items():
    d = dnnlib.EasyDict(a=1)
    d.b = 2
    assert d == {'a': 1, 'b': 2} and d.a == 1 and d['b'] == 2
    del d.a
    assert 'a' not in d
    with pytest.raises(AttributeError):
        _ = d.missing
    with pytest.raises(AttributeError):
        del d.missing


def test_lookup_and_construct_by_name():
    assert util.get_obj_by_name('torch.nn.Linear') is torch.nn.Linear
    assert util.get_obj_by_name('np.float32').__name__ == 'float32'
    assert util.call_func_by_name(16, func_name='math.sqrt') == 4.0
    od = util.construct_class_by_name([('x', 1)], class_name='collections.OrderedDict')
    assert isinstance(od, collections.OrderedDict) and od['x'] == 1
    layer = util.construct_class_by_name(3, 4, class_name='torch.nn.Linear', bias=False)
    assert layer.weight.shape == (4, 3) and layer.bias is None
    with pytest.raises(ImportError):
        util.get_obj_by_name('no_such_module_xyz.Thing')
    with pytest.raises(ImportError):
        util.get_obj_by_name('torch.nn.NoSuchLayer')
    with pytest.raises(ValueError):
        util.construct_class_by_name(class_name=None)


def test_lookup_propagates_errors_inside_an_existing_module(tmp_path, monkeypatch):
    (tmp_path / 'broken_mod_for_dnnlib_test.py').write_text('import not_installed_dependency_xyz\nX = 1\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match='not_installed_dependency_xyz'):
        util.get_obj_by_name('broken_mod_for_dnnlib_test.X')


def test_restrict_name_lookup_refuses_before_importing():
    seen = []

    def guard(name):
        seen.append(name)
        if name != 'math.sqrt':
            raise PermissionError(name)

    with util.restrict_name_lookup(guard):
        assert util.call_func_by_name(9, func_name='math.sqrt') == 3.0
        with pytest.raises(PermissionError):
            util.construct_class_by_name(class_name='antigravity_like_module_never_imported.X')
    assert 'antigravity_like_module_never_imported' not in sys.modules
    assert seen == ['math.sqrt', 'antigravity_like_module_never_imported.X']
    assert util.get_obj_by_name('math.pi') == math.pi  # guard removed after the block


def test_open_url_local_path_and_file_url(tmp_path):
    path = tmp_path / 'a b.bin'
    path.write_bytes(b'hello')
    with util.open_url(str(path)) as f:
        assert f.read() == b'hello'
    with util.open_url(path.as_uri()) as f:  # file:///.../a%20b.bin
        assert f.read() == b'hello'
    assert util.open_url(path.as_uri(), return_filename=True) == str(path)
    assert util.is_url('https://example.com/x.pkl') and not util.is_url(str(path))
    assert util.is_url(path.as_uri(), allow_file_urls=True)


class _Handler(http.server.BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self):  # noqa: N802
        type(self).hits += 1
        body = b'network-bytes'
        self.send_response(200)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_open_url_downloads_once_then_uses_cache(tmp_path):
    server = http.server.HTTPServer(('127.0.0.1', 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    # is_url() wants a dotted host name; 127.0.0.1 has dots.
    url = f'http://127.0.0.1:{server.server_address[1]}/dir/net.pkl'
    try:
        with util.open_url(url, cache_dir=str(tmp_path), verbose=False) as f:
            assert f.read() == b'network-bytes'
    finally:
        server.shutdown()
        server.server_close()
    assert _Handler.hits == 1
    cached = os.listdir(tmp_path)
    assert len(cached) == 1 and cached[0].endswith('_net.pkl')
    # Server is gone: the second open must come from the cache.
    with util.open_url(url, cache_dir=str(tmp_path), verbose=False) as f:
        assert f.read() == b'network-bytes'
    assert util.open_url(url, cache_dir=str(tmp_path), return_filename=True).startswith(str(tmp_path))


def test_open_url_offline_failure_names_the_url(tmp_path):
    with socket.socket() as s:  # find a port nobody listens on
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    url = f'http://127.0.0.1:{port}/missing.pkl'
    with pytest.raises(IOError, match=f'127.0.0.1:{port}/missing.pkl'):
        util.open_url(url, cache_dir=str(tmp_path), num_attempts=1, verbose=False, timeout=5)
    assert os.listdir(tmp_path) == []


def test_logger_tees_stdout_and_stderr_to_file(tmp_path, capsys):
    log_path = tmp_path / 'log.txt'
    with util.Logger(file_name=str(log_path), file_mode='w'):
        print('to stdout')
        print('to stderr', file=sys.stderr)
    print('after close')
    text = log_path.read_text()
    assert 'to stdout' in text and 'to stderr' in text and 'after close' not in text
    assert 'to stdout' in capsys.readouterr().out


def test_format_time():
    assert util.format_time(42) == '42s'
    assert util.format_time(187) == '3m 07s'
    assert util.format_time(2 * 3600 + 5 * 60 + 9) == '2h 05m 09s'
    assert util.format_time(86400 + 3 * 3600 + 20 * 60) == '1d 03h 20m'
    assert util.format_time_brief(2 * 3600 + 5 * 60 + 9) == '2h 05m'


def test_make_cache_dir_path(monkeypatch, tmp_path):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path))
    assert util.make_cache_dir_path('downloads') == os.path.join(str(tmp_path), 'downloads')


def test_atomic_write_path_renames_on_success_and_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / 'snapshot.pkl'
    target.write_bytes(b'old')
    with pytest.raises(RuntimeError):
        with dnnlib.util.atomic_write_path(target) as tmp:
            with open(tmp, 'wb') as f:
                f.write(b'half')
            raise RuntimeError('crash while writing')
    assert target.read_bytes() == b'old' and list(tmp_path.iterdir()) == [target]
    with dnnlib.util.atomic_write_path(target) as tmp:
        with open(tmp, 'wb') as f:
            f.write(b'new')
    assert target.read_bytes() == b'new' and list(tmp_path.iterdir()) == [target]
    # Usual permissions (0666 minus the umask), not mkstemp's 0600: shared clusters can read snapshots.
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
