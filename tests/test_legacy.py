"""legacy.load_network_pkl / save_network_pkl: safe loading of official and own snapshots."""
import copy
import inspect
import io
import os
import pickle
import sys

import pytest
import torch

import legacy
from torch_utils import persistence

OFFICIAL_PKL = 'official_tiny128_nosrc.pkl'


@pytest.fixture(scope='module')
def golden_g(golden_dir):
    return torch.load(golden_dir / 'tiny128.pt', weights_only=False)


@pytest.fixture(scope='module')
def golden_d(golden_dir):
    return torch.load(golden_dir / 'tiny128_D.pt', weights_only=False)


@pytest.fixture(scope='module')
def official(golden_dir):
    return legacy.load_network_pkl(golden_dir / OFFICIAL_PKL)


def _render(G, golden):
    torch.manual_seed(3)
    with torch.no_grad():
        return G.synthesis(golden['outputs']['ws'], golden['inputs']['c'], neural_rendering_resolution=32,
                           noise_mode='const')


def _build_G(golden_g, label_std=None):
    from training.triplane import TriPlaneGenerator
    G = TriPlaneGenerator(**golden_g['init_kwargs']).eval().requires_grad_(False)
    G.load_state_dict(golden_g['state_dict'])
    if label_std is not None:
        G.register_buffer('dataset_label_std', label_std.clone())
    return G


def _build_D(golden_d):
    from training.dual_discriminator import DualDiscriminator
    D = DualDiscriminator(**golden_d['init_kwargs']).eval().requires_grad_(False)
    D.load_state_dict(golden_d['state_dict'])
    return D


def _pickle_bytes(obj):
    buf = io.BytesIO()
    pickle.dump(obj, buf, protocol=4)
    return buf.getvalue()

# ----------------------------------------------------------------------------
# Official snapshot (module sources stripped: any exec path would fail).


def test_official_pickle_loads_safely_with_exact_weights(official, golden_g, golden_d):
    assert list(official) == ['training_set_kwargs', 'G', 'D', 'G_ema', 'augment_pipe']
    assert type(official['G']).__name__ == type(official['G_ema']).__name__ == 'TriPlaneGenerator'
    assert type(official['D']).__name__ == 'DualDiscriminator'
    assert type(official['G']).__module__ == 'training.triplane'
    assert official['augment_pipe'] is None
    assert official['training_set_kwargs']['class_name'] == 'training.dataset.ImageFolderDataset'
    assert official['G'] is not official['G_ema']

    for key in ('G', 'G_ema'):
        sd = official[key].state_dict()
        assert list(sd) == ['dataset_label_std'] + list(golden_g['state_dict'])
        for name, ref in golden_g['state_dict'].items():
            assert sd[name].dtype == ref.dtype and torch.equal(sd[name], ref), name
        assert torch.equal(sd['dataset_label_std'], golden_g['inputs']['c'].std(dim=0))
    sd = official['D'].state_dict()
    assert list(sd) == list(golden_d['state_dict'])
    for name, ref in golden_d['state_dict'].items():
        assert torch.equal(sd[name], ref), name

    for key in ('G', 'G_ema', 'D'):
        assert all(not m.training for m in official[key].modules())
        assert all(not p.requires_grad for p in official[key].parameters())
    G = official['G_ema']
    assert G.init_kwargs == golden_g['init_kwargs'] and G.neural_rendering_resolution == 32
    assert type(G.backbone).__module__ == 'training.networks_stylegan2'
    assert G.backbone.init_args == (64, 25, 512)


def test_official_G_ema_renders_golden_images(official, golden_g):
    out = _render(official['G_ema'], golden_g)
    for key in ('image', 'image_raw', 'image_depth'):
        assert (out[key] - golden_g['outputs'][key]).abs().max().item() < 1e-4, key


def test_official_D_gives_golden_logits(official, golden_d):
    with torch.no_grad():
        logits = official['D'](golden_d['inputs']['img'], golden_d['inputs']['c'])
    assert (logits - golden_d['outputs']['logits']).abs().max().item() < 1e-4


def test_loading_keeps_the_callers_rng_streams(golden_dir):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    legacy.load_network_pkl(golden_dir / OFFICIAL_PKL)
    assert torch.equal(torch.rand(3), expected)

# ----------------------------------------------------------------------------
# Malicious pickles are refused and nothing from them runs.


class _SystemCall:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _touch_cmd(marker):
    return f'touch {marker}'


def _persistent_carrier(meta):
    class Carrier:
        def __reduce__(self):
            return (persistence._reconstruct_persistent_obj, (meta,))
    return Carrier()


def _malicious_cases(marker):
    touch = _touch_cmd(marker).encode()
    return {
        # os.system written under its real module name (posix/nt) by pickle itself ...
        'os.system via __reduce__': (_pickle_bytes({'G': _SystemCall(_touch_cmd(marker))}), os.system.__module__ + '.system'),
        # ... and hand-written protocol-0 globals.
        'os.system': (b'cos\nsystem\n(S\'' + touch + b'\'\ntR.', 'os.system'),
        'builtins.eval': (b'cbuiltins\neval\n(S\'__import__("os").system("' + touch + b'")\'\ntR.', 'builtins.eval'),
        'subprocess.Popen': (b'csubprocess\nPopen\n((S\'touch\'\nS\'' + str(marker).encode() + b'\'\nltR.', 'subprocess.Popen'),
        'unknown global': (b'csome_package.module\nThing\n)R.', 'some_package.module.Thing'),
        'unknown persistent class': (_pickle_bytes({'G': _persistent_carrier(dict(
            type='class', version=6, class_name='EvilNet', state={'_init_args': (), '_init_kwargs': {}},
            module_src=f'import pathlib\npathlib.Path({str(marker)!r}).touch()\nclass EvilNet: pass\n'))}), 'EvilNet'),
    }


@pytest.mark.parametrize('case', ['os.system via __reduce__', 'os.system', 'builtins.eval', 'subprocess.Popen',
                                  'unknown global', 'unknown persistent class'])
def test_malicious_pickles_are_refused(tmp_path, case):
    marker = tmp_path / 'pwned'
    data, global_name = _malicious_cases(marker)[case]
    path = tmp_path / 'evil.pkl'
    path.write_bytes(data)
    with pytest.raises(legacy.UnsafePickleError) as info:
        legacy.load_network_pkl(path)
    message = str(info.value)
    assert global_name in message and str(path) in message
    assert 'allow_unsafe=True' in message and '--trust-pickle' in message
    assert isinstance(info.value, pickle.UnpicklingError)
    assert not marker.exists()
    # From a file object without a name, too.
    with pytest.raises(legacy.UnsafePickleError, match=global_name.replace('.', r'\.')):
        legacy.load_network_pkl(io.BytesIO(data))
    assert not marker.exists()


_CALLS = []


def _fake_superresolution(**kwargs):
    _CALLS.append(kwargs)
    raise AssertionError('must never be called')


def test_pickled_init_kwargs_cannot_name_arbitrary_callables(golden_g, tmp_path):
    # TriPlaneGenerator builds `rendering_kwargs['superresolution_module']` by name; a pickle
    # must not be able to point that at any callable it likes.
    G = _build_G(golden_g)
    G._init_kwargs = copy.deepcopy(G._init_kwargs)
    G._init_kwargs['rendering_kwargs']['superresolution_module'] = f'{__name__}._fake_superresolution'
    with pytest.raises(legacy.UnsafePickleError, match='_fake_superresolution'):
        legacy.load_network_pkl(io.BytesIO(_pickle_bytes({'G': G, 'G_ema': G})))
    assert _CALLS == []


def test_tensorflow_pickles_are_refused_clearly():
    data = b'(cdnnlib.tflib.network\nNetwork\n)Rp0\ntp1\n.'
    with pytest.raises(ValueError, match='TensorFlow'):
        legacy.load_network_pkl(io.BytesIO(data))

# ----------------------------------------------------------------------------
# Our own snapshots.


def test_own_snapshot_round_trip_renders_identical_pixels(golden_g, tmp_path):
    G = _build_G(golden_g)
    G_ema = copy.deepcopy(G)
    path = tmp_path / 'network-snapshot-000000.pkl'
    legacy.save_network_pkl({'G': G, 'G_ema': G_ema, 'adapter_config': '{"r": 1}'}, path)
    data = legacy.load_network_pkl(path)
    assert data['adapter_config'] == '{"r": 1}'
    assert data['D'] is None and data['augment_pipe'] is None and data['training_set_kwargs'] is None
    ref, out = _render(G_ema, golden_g), _render(data['G_ema'], golden_g)
    for key in ('image', 'image_raw', 'image_depth'):
        assert torch.equal(out[key], ref[key]), key
    unsafe = legacy.load_network_pkl(path, allow_unsafe=True)
    out = _render(unsafe['G_ema'], golden_g)
    for key in ('image', 'image_raw', 'image_depth'):
        assert torch.equal(out[key], ref[key]), key


def test_official_layout_built_with_our_classes_loads(golden_g, golden_d):
    label_std = golden_g['inputs']['c'].std(dim=0)
    G = _build_G(golden_g, label_std=label_std)
    snapshot = dict(training_set_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path='x.zip'),
                    G=G, D=_build_D(golden_d), G_ema=copy.deepcopy(G), augment_pipe=None)
    data = legacy.load_network_pkl(io.BytesIO(_pickle_bytes(snapshot)))
    assert list(data) == ['training_set_kwargs', 'G', 'D', 'G_ema', 'augment_pipe']
    for key in ('G', 'G_ema'):
        assert torch.equal(data[key].dataset_label_std, label_std)
    with torch.no_grad():
        logits = data['D'](golden_d['inputs']['img'], golden_d['inputs']['c'])
    assert torch.equal(logits, snapshot['D'](golden_d['inputs']['img'], golden_d['inputs']['c']))



def test_official_ada_augment_pipe_is_dropped_with_a_warning(golden_g, golden_d, tmp_path):
    # Official AFHQ snapshots carry an ADA AugmentPipe; personalization never augments, so the
    # safe loader drops it (with a warning) and never runs its embedded source.
    marker = tmp_path / 'pwned'
    pipe = _persistent_carrier(dict(type='class', version=6, class_name='AugmentPipe',
                                    state={'_init_args': (), '_init_kwargs': {'xflip': 1}},
                                    module_src=f'import pathlib\npathlib.Path({str(marker)!r}).touch()\n'))
    G = _build_G(golden_g)
    snapshot = dict(training_set_kwargs=None, G=G, D=_build_D(golden_d), G_ema=G, augment_pipe=pipe)
    with pytest.warns(UserWarning, match='AugmentPipe'):
        data = legacy.load_network_pkl(io.BytesIO(_pickle_bytes(snapshot)))
    assert data['augment_pipe'] is None and isinstance(data['G_ema'], torch.nn.Module)
    assert not marker.exists()
    # Anywhere else than under "augment_pipe" it is refused.
    with pytest.raises(legacy.UnsafePickleError):
        legacy.load_network_pkl(io.BytesIO(_pickle_bytes(dict(G=G, G_ema=G, extra={'x': pipe}))))

class _MetaRecorder(pickle.Unpickler):
    """Reads a pickle, turning each persistent object into its raw meta dict (for inspection)."""

    def __init__(self, file):
        super().__init__(file)
        self.metas = []

    def find_class(self, module, name):
        if (module, name) == ('torch_utils.persistence', '_reconstruct_persistent_obj'):
            return lambda meta: self.metas.append(meta) or meta
        return super().find_class(module, name)


def test_own_pickle_uses_the_official_meta_layout(golden_g):
    G = _build_G(golden_g)
    recorder = _MetaRecorder(io.BytesIO(_pickle_bytes({'G': G})))
    recorder.load()
    assert len(recorder.metas) == sum(1 for m in G.modules() if persistence.is_persistent(m))
    for meta in recorder.metas:
        assert list(meta) == ['type', 'version', 'module_src', 'class_name', 'state']
        assert meta['type'] == 'class' and meta['version'] == 6 and '.' not in meta['class_name']
        cls = persistence.find_safe_class(meta['class_name'])
        assert meta['module_src'] == inspect.getsource(sys.modules[cls.__module__])
        assert list(meta['state'])[-2:] == ['_init_args', '_init_kwargs']
    top = recorder.metas[-1]
    assert top['class_name'] == 'TriPlaneGenerator' and top['state']['_init_kwargs'] == golden_g['init_kwargs']


def test_strict_tensor_check_names_class_entry_and_shapes(golden_g):
    G = _build_G(golden_g)
    G.decoder.net[0]._parameters['weight'] = torch.nn.Parameter(torch.zeros(64, 7), requires_grad=False)
    with pytest.raises(ValueError, match=r'FullyConnectedLayer: parameter "weight" has shape \[64, 7\] in the pickle but \[64, 32\]'):
        legacy.load_network_pkl(io.BytesIO(_pickle_bytes({'G': G, 'G_ema': G})))

    G = _build_G(golden_g)
    del G.decoder.net[0]._parameters['bias']
    with pytest.raises(ValueError, match=r'FullyConnectedLayer: parameter "bias" \(shape \[64\]\) is missing'):
        legacy.load_network_pkl(io.BytesIO(_pickle_bytes({'G': G, 'G_ema': G})))

    G = _build_G(golden_g)
    G.decoder.net[0].register_parameter('extra', torch.nn.Parameter(torch.zeros(2)))
    with pytest.raises(ValueError, match=r'FullyConnectedLayer: the pickle has parameter "extra"'):
        legacy.load_network_pkl(io.BytesIO(_pickle_bytes({'G': G, 'G_ema': G})))


@persistence.persistent_class
class ScaleWrapper(torch.nn.Module):
    """Stand-in for an adapter layer: built from plain kwargs, base layer attached afterwards."""

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(float(scale)))

    def forward(self, x, *args, **kwargs):
        return self.base(x, *args, **kwargs) * self.scale


def test_children_replaced_after_construction_survive(golden_g):
    persistence.register_safe_class(ScaleWrapper)
    try:
        G = _build_G(golden_g)
        wrapper = ScaleWrapper(scale=1.0).requires_grad_(False)
        wrapper.base = G.decoder.net[0]
        G.decoder.net[0] = wrapper
        G.backbone.synthesis.b8.conv0.affine = ScaleWrapper(scale=1.0)
        G.backbone.synthesis.b8.conv0.affine.base = _build_G(golden_g).backbone.synthesis.b8.conv0.affine
        data = legacy.load_network_pkl(io.BytesIO(_pickle_bytes({'G': G, 'G_ema': G})))
    finally:
        persistence._safe_registry.pop('ScaleWrapper', None)
    loaded = data['G_ema']
    assert type(loaded.decoder.net[0]) is ScaleWrapper
    assert type(loaded.decoder.net[0].base).__name__ == 'FullyConnectedLayer'
    assert type(loaded.backbone.synthesis.b8.conv0.affine) is ScaleWrapper
    for key, value in G.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    ref, out = _render(G, golden_g), _render(loaded, golden_g)
    assert torch.equal(out['image'], ref['image'])


def test_adapter_injected_generator_survives_safe_loading(golden_g):
    from training import adapters
    from training.adapters import AdapterConfig
    G = adapters.inject(_build_G(golden_g), AdapterConfig(r=2, targets=('synthesis', 'superresolution')),
                        num_adapters=2)
    with torch.no_grad():
        for p in adapters.trainable_parameters(G):
            p.add_(0.01 * torch.randn_like(p))
    loaded = legacy.load_network_pkl(io.BytesIO(_pickle_bytes({'G': G, 'G_ema': G})))['G_ema']
    assert adapters.is_injected(loaded)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in G.modules()]
    sd = loaded.state_dict()
    assert list(sd) == list(G.state_dict())
    assert all(torch.equal(sd[k], v) for k, v in G.state_dict().items())
    adapters.select(G, 1)
    adapters.select(loaded, 1)
    assert torch.equal(_render(loaded, golden_g)['image'], _render(G, golden_g)['image'])

    # force_fp16 rebuilds networks from their init arguments, which would drop the adapters: refused clearly.
    with pytest.raises(ValueError, match='carries adapters'):
        legacy.load_network_pkl(io.BytesIO(_pickle_bytes({'G': G, 'G_ema': G})), force_fp16=True)


def test_force_fp16_rebuilds_networks(official, golden_dir):
    data = legacy.load_network_pkl(golden_dir / OFFICIAL_PKL, force_fp16=True)
    for key in ('G', 'G_ema', 'D'):
        assert data[key].init_kwargs.num_fp16_res == 4 and data[key].init_kwargs.conv_clamp == 256
        ref = official[key].state_dict()
        for name, value in data[key].state_dict().items():
            assert torch.equal(value, ref[name]), name
    assert 'dataset_label_std' in dict(data['G_ema'].named_buffers())

# ----------------------------------------------------------------------------
# Atomic save.


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / 'snapshot.pkl'
    legacy.save_network_pkl({'G': 1, 'G_ema': 2}, path)
    original = path.read_bytes()

    def failing_dump(obj, file, protocol=None):
        file.write(b'half a pickle')
        raise OSError('disk full')

    monkeypatch.setattr(legacy.pickle, 'dump', failing_dump)
    with pytest.raises(OSError, match='disk full'):
        legacy.save_network_pkl({'G': 3, 'G_ema': 4}, path)
    assert path.read_bytes() == original
    assert os.listdir(tmp_path) == ['snapshot.pkl']

# ----------------------------------------------------------------------------
# Constructor corner cases, with small registered test classes.


@persistence.persistent_class
class DataHolder(torch.nn.Module):
    """Init kwargs with the plain data types a snapshot may hold; a constructor that computes
    with its random draws (so the fast construction path has to fall back)."""

    def __init__(self, n, opts=None, use_random_value=False, keep_table=True):
        super().__init__()
        self.opts = opts
        self.weight = torch.nn.Parameter(torch.randn([n, n]))
        self.register_buffer('noise', torch.randn([n]) + torch.ones([n]))
        if use_random_value:
            self.first = float(self.weight.detach()[0, 0])  # needs a real value
        if keep_table:
            self.table = torch.randn([n])  # plain tensor attribute, not a buffer


@pytest.fixture
def registered_data_holder():
    persistence.register_safe_class(DataHolder)
    yield DataHolder
    persistence._safe_registry.pop('DataHolder', None)


def test_plain_data_init_kwargs_round_trip(registered_data_holder):
    import dnnlib
    import numpy as np
    opts = dnnlib.EasyDict(scale=np.float64(0.5), arr=np.arange(4, dtype=np.float32), names={'a', 'b'},
                           frozen=frozenset([1]), pair=(1, 2.5), nested=[{'x': None}], flag=True, dtype=torch.float16)
    net = DataHolder(3, opts=opts).eval()
    net.table.fill_(4.0)
    data = legacy.load_network_pkl(io.BytesIO(_pickle_bytes({'G': net, 'G_ema': net})))
    loaded = data['G']
    assert type(loaded) is DataHolder and loaded.training is False
    assert isinstance(loaded.opts, dnnlib.EasyDict) and loaded.opts.names == {'a', 'b'}
    assert loaded.opts.scale == 0.5 and isinstance(loaded.opts.scale, np.float64)
    assert np.array_equal(loaded.opts.arr, opts.arr) and loaded.opts.dtype is torch.float16
    assert list(loaded.init_kwargs.opts) == list(opts) and loaded.init_args == (3,)
    assert torch.equal(loaded.weight, net.weight) and torch.equal(loaded.noise, net.noise)
    assert torch.equal(loaded.table, torch.full([3], 4.0))


def test_constructor_needing_real_random_values_still_loads(registered_data_holder):
    net = DataHolder(3, use_random_value=True)
    loaded = legacy.load_network_pkl(io.BytesIO(_pickle_bytes({'G': net, 'G_ema': net})))['G']
    assert loaded.first == float(net.weight.detach()[0, 0]) and torch.equal(loaded.weight, net.weight)


def test_no_meta_tensor_survives_when_pickle_lacks_an_attribute(registered_data_holder):
    net = DataHolder(3)
    del net.table  # as if written by an older version of the class
    loaded = legacy.load_network_pkl(io.BytesIO(_pickle_bytes({'G': net, 'G_ema': net})))['G']
    assert not loaded.table.is_meta and loaded.table.shape == (3,)
    assert all(not t.is_meta for t in loaded.state_dict().values())


def test_refuses_modules_of_unlisted_plain_classes(registered_data_holder):
    net = DataHolder(3)
    net.extra = torch.nn.Linear(2, 2)
    with pytest.raises(legacy.UnsafePickleError, match=r'torch\.nn\.modules\.linear\.Linear'):
        legacy.load_network_pkl(io.BytesIO(_pickle_bytes({'G': net, 'G_ema': net})))
