"""Plugin building never breaks the ops: failures give one clear warning and the reference path."""
import warnings

import pytest
import torch

from torch_utils import custom_ops
from torch_utils.ops import bias_act, upfirdn2d

_BROKEN_SOURCE = 'int broken( {\n'
_PYBIND_SOURCE = '''#include <pybind11/pybind11.h>
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", [] { return 42; }); }
'''


@pytest.fixture(autouse=True)
def fresh_plugin_state(monkeypatch, tmp_path):
    """Empty plugin caches, a private build cache, quiet builds, no EG3D_OPS_IMPL from the caller."""
    monkeypatch.setattr(custom_ops, '_loaded', {})
    monkeypatch.setattr(custom_ops, '_failed', {})
    monkeypatch.setattr(custom_ops, 'verbosity', 'none')
    monkeypatch.setenv(custom_ops.EXTENSIONS_DIR_ENV, str(tmp_path / 'cache'))
    monkeypatch.delenv(custom_ops.IMPL_ENV, raising=False)


@pytest.fixture
def cuda_visible(monkeypatch):
    """Pretend a GPU is visible so that loading proceeds to the toolchain checks and the build."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)


def _write(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    return dict(sources=[name], source_dir=str(tmp_path))


def _load_capturing_warnings(module_name, **spec):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        first = custom_ops.load_plugin(module_name, **spec)
        second = custom_ops.load_plugin(module_name, **spec)
    plugin_warnings = [w for w in caught if issubclass(w.category, custom_ops.PluginUnavailableWarning)]
    return first, second, plugin_warnings


def _assert_one_warning(plugin_warnings, module_name, reason):
    assert len(plugin_warnings) == 1, [str(w.message) for w in plugin_warnings]
    message = str(plugin_warnings[0].message)
    assert module_name in message and reason in message
    assert 'reference implementation' in message
    assert 'To fix:' in message and f'{custom_ops.IMPL_ENV}=ref' in message  # how to fix or silence it


def test_compiler_error_warns_once_with_the_error(cuda_visible, tmp_path):
    spec = _write(tmp_path, 'broken.cpp', _BROKEN_SOURCE)
    first, second, caught = _load_capturing_warnings('eg3d_test_broken_plugin', **spec)
    assert first is None and second is None
    _assert_one_warning(caught, 'eg3d_test_broken_plugin', 'the compiler failed')
    assert 'broken.cpp' in str(caught[0].message) and 'error' in str(caught[0].message)


def test_missing_nvcc_warns(cuda_visible, monkeypatch, tmp_path):
    monkeypatch.setattr(custom_ops, '_find_nvcc', lambda: None)
    monkeypatch.setattr(torch.version, 'cuda', '13.0')
    spec = _write(tmp_path, 'kernel.cu', '__global__ void k() {}\n')
    first, _, caught = _load_capturing_warnings('eg3d_test_no_nvcc', **spec)
    assert first is None
    _assert_one_warning(caught, 'eg3d_test_no_nvcc', 'nvcc (the CUDA compiler) was not found')
    assert 'install a CUDA toolkit' in str(caught[0].message)


def test_cuda_version_mismatch_warns(cuda_visible, monkeypatch, tmp_path):
    monkeypatch.setattr(custom_ops, '_find_nvcc', lambda: '/opt/cuda-11.8/bin/nvcc')
    monkeypatch.setattr(custom_ops, '_nvcc_version', lambda nvcc: '11.8')
    monkeypatch.setattr(torch.version, 'cuda', '13.0')
    spec = _write(tmp_path, 'kernel.cu', '__global__ void k() {}\n')
    first, _, caught = _load_capturing_warnings('eg3d_test_mismatch', **spec)
    assert first is None
    _assert_one_warning(caught, 'eg3d_test_mismatch', 'CUDA version mismatch')
    assert 'major version matches this PyTorch build (CUDA 13.0)' in str(caught[0].message)


def test_no_cuda_device_warns(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    spec = _write(tmp_path, 'kernel.cu', '__global__ void k() {}\n')
    first, _, caught = _load_capturing_warnings('eg3d_test_no_device', **spec)
    assert first is None
    _assert_one_warning(caught, 'eg3d_test_no_device', 'no CUDA device')


@pytest.mark.parametrize('op', [bias_act, upfirdn2d], ids=['bias_act', 'upfirdn2d'])
def test_env_cuda_makes_the_fallback_an_error(op, cuda_visible, monkeypatch, tmp_path):
    """EG3D_OPS_IMPL=cuda: a plugin that cannot be built stops the op (every time) instead of warning."""
    monkeypatch.setenv(custom_ops.IMPL_ENV, 'cuda')
    name = f'eg3d_test_strict_{op.__name__.rsplit(".", 1)[-1]}'
    monkeypatch.setattr(op, '_PLUGIN_SPEC', dict(module_name=name, **_write(tmp_path, 'broken.cpp', _BROKEN_SOURCE)))
    for _ in range(2):  # the remembered failure raises too
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            expected = f'{name}.*EG3D_OPS_IMPL=cuda forbids.*compiler failed'
            with pytest.raises(custom_ops.PluginUnavailable, match=expected):
                op._cuda_available()
    assert 'the compiler failed' in custom_ops.unavailable_plugins()[name]


def test_unavailable_plugins_lists_each_fallback_with_its_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert custom_ops.unavailable_plugins() == {}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        custom_ops.load_plugin('eg3d_test_listed', **_write(tmp_path, 'kernel.cu', '__global__ void k() {}\n'))
    assert list(custom_ops.unavailable_plugins()) == ['eg3d_test_listed']
    assert 'no CUDA device' in custom_ops.unavailable_plugins()['eg3d_test_listed']


def test_successful_build_is_cached(tmp_path):
    spec = _write(tmp_path, 'tiny.cpp', _PYBIND_SOURCE)
    module = custom_ops.get_plugin('eg3d_test_tiny_plugin', **spec)
    assert module.answer() == 42
    assert custom_ops.get_plugin('eg3d_test_tiny_plugin', **spec) is module
    build_dirs = list((tmp_path / 'cache').glob('eg3d_test_tiny_plugin-*'))
    assert len(build_dirs) == 1 and (build_dirs[0] / 'tiny.cpp').read_text() == _PYBIND_SOURCE


def test_build_key_follows_sources_and_options(tmp_path):
    path = tmp_path / 'a.cpp'
    path.write_text('int a;\n')
    key = custom_ops._build_key([str(path)], None, {})
    assert key == custom_ops._build_key([str(path)], None, {})
    assert key != custom_ops._build_key([str(path)], None, {'extra_cflags': ['-O3']})
    assert key != custom_ops._build_key([str(path)], '13.0', {})
    path.write_text('int b;\n')
    assert key != custom_ops._build_key([str(path)], None, {})


@pytest.mark.parametrize('op', [bias_act, upfirdn2d], ids=['bias_act', 'upfirdn2d'])
def test_op_with_broken_plugin_falls_back_to_reference(op, cuda_visible, monkeypatch, tmp_path):
    spec = dict(module_name=f'eg3d_test_broken_{op.__name__.rsplit(".", 1)[-1]}', **_write(tmp_path, 'broken.cpp',
                                                                                           _BROKEN_SOURCE))
    monkeypatch.setattr(op, '_PLUGIN_SPEC', spec)
    with pytest.warns(custom_ops.PluginUnavailableWarning, match='the compiler failed'):
        assert not op._cuda_available()
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # warned once only
        assert not op._cuda_available()
    _assert_reference_result(op)


@pytest.mark.parametrize('op', [bias_act, upfirdn2d], ids=['bias_act', 'upfirdn2d'])
def test_env_ref_forces_reference(op, monkeypatch):
    monkeypatch.setenv(custom_ops.IMPL_ENV, 'ref')

    def plugin_must_not_load():
        raise AssertionError('plugin requested although EG3D_OPS_IMPL=ref')

    monkeypatch.setattr(op, '_plugin', plugin_must_not_load)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert not op._cuda_available()
        _assert_reference_result(op)


def _assert_reference_result(op):
    """impl='cuda' returns the reference result (on the GPU when there is one)."""
    device = 'cuda' if torch.cuda.device_count() > 0 else 'cpu'  # is_available() may be patched
    x = torch.randn(2, 3, 8, 8, device=device)
    if op is bias_act:
        b = torch.randn(3, device=device)
        out, ref = (bias_act.bias_act(x, b, act='lrelu', impl=impl) for impl in ('cuda', 'ref'))
    else:
        f = upfirdn2d.setup_filter([1, 3, 3, 1], device=device)
        out, ref = (upfirdn2d.upsample2d(x, f, impl=impl) for impl in ('cuda', 'ref'))
    assert torch.equal(out, ref)
