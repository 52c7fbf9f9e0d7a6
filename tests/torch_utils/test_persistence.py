"""torch_utils.persistence: init-arg recording, the official pickle layout, trusted reconstruction."""
import copy
import inspect
import pickle
import sys
import textwrap

import pytest
import torch

import dnnlib
from torch_utils import persistence


@persistence.persistent_class
class TinyNet(torch.nn.Module):
    def __init__(self, in_features, out_features, hidden=4, cfg=None):
        super().__init__()
        self.cfg = cfg
        self.fc = TinyLayer(in_features, hidden)
        self.out = torch.nn.Linear(hidden, out_features)
        self.register_buffer('scale', torch.ones([out_features]))

    def forward(self, x):
        return self.out(torch.relu(self.fc(x))) * self.scale


@persistence.persistent_class
class TinyLayer(torch.nn.Module):
    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn([out_features, in_features]))

    def forward(self, x):
        return x @ self.weight.t()


def test_records_init_args_and_kwargs_as_deep_copies():
    cfg = {'a': [1, 2]}
    net = TinyNet(3, 2, hidden=5, cfg=cfg)
    cfg['a'].append(3)  # later changes by the caller are not recorded
    assert net.__dict__['_init_args'] == (3, 2)
    assert net.__dict__['_init_kwargs'] == {'hidden': 5, 'cfg': {'a': [1, 2]}}
    assert net.init_args == (3, 2)
    kwargs = net.init_kwargs
    assert isinstance(kwargs, dnnlib.EasyDict) and kwargs.hidden == 5
    kwargs.cfg['a'].append(99)  # the properties hand out copies
    assert net.init_kwargs.cfg == {'a': [1, 2]}
    assert net.fc.init_args == (3, 5) and net.fc.init_kwargs == {}


def test_module_init_argument_is_refused_with_clear_error():
    with pytest.raises(TypeError, match=r"TinyNet: constructor argument 'cfg'\['layer'\] is a torch.nn.Module"):
        TinyNet(3, 2, cfg={'layer': torch.nn.Linear(2, 2)})
    with pytest.raises(TypeError, match=r'args\[0\] is a torch.nn.Module'):
        TinyLayer(torch.nn.Identity(), 2)


def test_decorated_class_keeps_name_and_is_persistent():
    assert TinyNet.__name__ == 'TinyNet' and TinyNet.__module__ == __name__
    assert persistence.is_persistent(TinyNet) and persistence.is_persistent(TinyNet(1, 1))
    assert not persistence.is_persistent(torch.nn.Linear) and not persistence.is_persistent(torch.nn.Linear(1, 1))
    assert not persistence.is_persistent([])  # unhashable objects are fine
    assert persistence.persistent_class(TinyNet) is TinyNet


def test_reduce_produces_the_official_meta_layout():
    net = TinyNet(3, 2, cfg='x')
    func, args = net.__reduce__()
    assert func is persistence._reconstruct_persistent_obj
    (meta,) = args
    assert list(meta.keys()) == ['type', 'version', 'module_src', 'class_name', 'state']
    assert meta['type'] == 'class' and meta['version'] == 6
    assert meta['class_name'] == 'TinyNet'
    assert meta['module_src'] == inspect.getsource(sys.modules[__name__])
    state = meta['state']
    assert state is not net.__dict__ and state == net.__dict__  # a copy of __dict__
    assert list(state)[-2:] == ['_init_args', '_init_kwargs']
    assert state['_modules']['fc'] is net.fc and state['cfg'] == 'x'


def test_plain_pickle_round_trip_uses_the_live_module_without_exec():
    net = TinyNet(3, 2).eval()
    x = torch.randn(4, 3)
    loaded = pickle.loads(pickle.dumps(net))
    assert type(loaded) is TinyNet and type(loaded.fc) is TinyLayer
    assert loaded.training is False and loaded.init_args == (3, 2)
    assert torch.equal(loaded(x), net(x))
    clone = copy.deepcopy(net)
    assert type(clone) is TinyNet and clone.fc.weight is not net.fc.weight
    assert torch.equal(clone(x), net(x))


_FOREIGN_SRC = textwrap.dedent('''
    import torch
    from torch_utils import persistence

    @persistence.persistent_class
    class ForeignNet(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.w = torch.nn.Parameter(torch.full([n], 2.0))

        def forward(self, x):
            return x * self.w + MARKER
    MARKER = 1.0
''')


def _foreign_pickle(module_src, class_name='ForeignNet', n=3):
    """A pickle in the official layout whose class exists only in its embedded source."""
    state = torch.nn.Linear(1, 1).__getstate__()
    state.update(_parameters={'w': torch.nn.Parameter(torch.full([n], 2.0))}, _buffers={}, _modules={},
                 _init_args=(n,), _init_kwargs={})
    meta = dict(type='class', version=6, module_src=module_src, class_name=class_name, state=state)

    class Carrier:
        def __reduce__(self):
            return (persistence._reconstruct_persistent_obj, (meta,))
    return pickle.dumps(Carrier())


def test_trusted_reconstruction_executes_embedded_source_like_official():
    obj = pickle.loads(_foreign_pickle(_FOREIGN_SRC))
    assert type(obj).__name__ == 'ForeignNet'
    assert type(obj).__module__.startswith('_imported_module_')
    assert persistence.is_persistent(obj) and obj.init_args == (3,)
    assert torch.equal(obj(torch.ones(3)), torch.full([3], 3.0))
    # Same source again: the cached module is reused.
    obj2 = pickle.loads(_foreign_pickle(_FOREIGN_SRC))
    assert type(obj2) is type(obj)


def test_import_hook_can_patch_meta_before_reconstruction():
    def hook(meta):
        assert isinstance(meta, dnnlib.EasyDict) and meta.class_name == 'ForeignNet'
        meta.module_src = meta.module_src.replace('MARKER = 1.0', 'MARKER = 5.0')
        return meta

    persistence.import_hook(hook)
    try:
        obj = pickle.loads(_foreign_pickle(_FOREIGN_SRC + '\n# hook test\n'))
    finally:
        persistence._import_hooks.remove(hook)
    assert torch.equal(obj(torch.ones(3)), torch.full([3], 7.0))


def test_empty_module_source_needs_a_registered_class():
    with pytest.raises(ValueError, match='carries no module source'):
        pickle.loads(_foreign_pickle('', class_name='NoSuchClassAnywhere'))


def test_training_classes_register_for_the_safe_loader():
    import training.networks_stylegan2 as sg2
    import training.superresolution as sr
    assert persistence.find_safe_class('FullyConnectedLayer') is sg2.FullyConnectedLayer
    assert persistence.find_safe_class('SuperresolutionHybrid2X') is sr.SuperresolutionHybrid2X
    # Classes outside training.* (like this test's) are not registered automatically.
    with pytest.raises(KeyError, match='TinyNet'):
        persistence.find_safe_class('TinyNet')


def test_name_collisions_prefer_stylegan2_and_otherwise_are_ambiguous():
    import training.networks_stylegan2 as sg2

    @persistence.persistent_class
    class Generator(torch.nn.Module):  # same bare name as the StyleGAN2 generator
        pass

    @persistence.persistent_class
    class TinyLayer(torch.nn.Module):  # same bare name as this module's TinyLayer  # noqa: F811
        pass

    try:
        persistence.register_safe_class(Generator)
        assert persistence.find_safe_class('Generator') is sg2.Generator
        persistence.register_safe_class(globals()['TinyLayer'])
        assert persistence.find_safe_class('TinyLayer') is globals()['TinyLayer']
        Generator.__module__ = TinyLayer.__module__ = 'other_module_for_test'
        persistence.register_safe_class(TinyLayer)
        with pytest.raises(KeyError, match='ambiguous'):
            persistence.find_safe_class('TinyLayer')
    finally:
        persistence._safe_registry['Generator'].pop(__name__, None)
        persistence._safe_registry.pop('TinyLayer', None)
    with pytest.raises(TypeError):
        persistence.register_safe_class(torch.nn.Linear)
