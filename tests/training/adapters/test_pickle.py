"""Adapter-wrapped generators in snapshot pickles: safe reload, identical pixels, small overhead."""
import ast
import copy
import io
import pickle
from pathlib import Path

import pytest
import torch

import legacy
from adapter_testlib import assert_renders_equal, randomize_adapters, render
from training import adapters
from training.adapters import AdapterConfig
from training.adapters import layers as adapter_layers_module
from training.adapters.inject import adapter_layers
from training.adapters.layers import AdapterLayer

ALL = ('mapping', 'synthesis', 'superresolution', 'decoder')


def snapshot_bytes(G: torch.nn.Module) -> bytes:
    return pickle.dumps({'G': G, 'G_ema': G, 'D': None, 'training_set_kwargs': None, 'augment_pipe': None})


@pytest.mark.parametrize('cfg', [AdapterConfig(r=2, extras='my3dgen', targets=ALL),
                                 AdapterConfig(adalora=True, init_r=2, targets=('synthesis', 'superresolution'))],
                         ids=['lora-extras', 'adalora'])
def test_snapshot_reloads_with_the_safe_loader_and_renders_identical_pixels(tmp_path, tiny_golden, tiny_base, cfg):
    G = copy.deepcopy(tiny_base)
    adapters.inject(G, cfg, num_adapters=2)
    randomize_adapters(G, std=0.1)
    if cfg.adalora:
        with torch.no_grad():
            for _, layer in adapter_layers(G):
                layer.rank_mask[1, 0] = 0
                layer.lora_E[1, 0] = 0
    path = tmp_path / 'network-snapshot.pkl'
    legacy.save_network_pkl({'G': G, 'G_ema': G, 'D': None}, path)
    data = legacy.load_network_pkl(path)
    G2 = data['G_ema']
    assert adapters.is_injected(G2) and adapters.get_config(G2) == cfg
    assert all(type(a) is type(b) for (_, a), (_, b) in zip(adapter_layers(G), adapter_layers(G2)))
    assert list(G2.state_dict()) == list(G.state_dict())
    for (_, a), (_, b) in zip(adapter_layers(G), adapter_layers(G2)):
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)
        if cfg.adalora:
            assert torch.equal(a.rank_mask, b.rank_mask)
    adapters.select(G, torch.tensor([1, 0]))  # both adapter slots in one render
    adapters.select(G2, torch.tensor([1, 0]))
    assert_renders_equal(render(G2, tiny_golden), render(G, tiny_golden))
    # The reloaded generator keeps working as an adapter model: save an adapter file from it.
    adapters.save(G2, tmp_path / 'from_snapshot.safetensors', index=1)
    assert adapters.read_config(tmp_path / 'from_snapshot.safetensors') == cfg


@pytest.mark.parametrize('cfg,K', [(AdapterConfig(), 1), (AdapterConfig(r=4, extras='my3dgen', targets=ALL), 3)],
                         ids=['default', 'all-targets-K3'])
def test_pickle_size_is_base_plus_adapter_tensors(tiny_base, cfg, K):
    base_size = len(pickle.dumps(tiny_base))
    G = copy.deepcopy(tiny_base)
    adapters.inject(G, cfg, num_adapters=K)
    adapter_bytes = sum(p.numel() * p.element_size() for p in adapters.trainable_parameters(G))
    adapter_bytes += sum(b.numel() * b.element_size() for _, layer in adapter_layers(G) for b in layer.buffers(recurse=False))
    size = len(pickle.dumps(G))
    assert size > base_size + adapter_bytes  # everything is there...
    assert size <= 1.02 * base_size + adapter_bytes, (size, base_size, adapter_bytes)  # ...and no base copy


def test_selection_is_not_persistent(tiny_base):
    G = copy.deepcopy(tiny_base)
    adapters.inject(G, AdapterConfig(), num_adapters=2)
    adapters.select(G, torch.tensor([1, 0]))
    assert all('adapter_index' not in n for n in G.state_dict())
    reloaded = legacy.load_network_pkl(io.BytesIO(snapshot_bytes(G)))['G']
    copied = copy.deepcopy(G)
    for model in (reloaded, copied):
        assert all(layer.adapter_index == 0 for _, layer in adapter_layers(model))
    assert all(isinstance(layer.adapter_index, torch.Tensor) for _, layer in adapter_layers(G))


def test_trusted_unpickling_and_deepcopy_work_too(tiny_golden, tiny_base):
    G = copy.deepcopy(tiny_base)
    adapters.inject(G, AdapterConfig(r=1, targets=ALL))
    randomize_adapters(G, std=0.05)
    want = render(G, tiny_golden)
    for other in (pickle.loads(pickle.dumps(G)), copy.deepcopy(G)):
        assert any(isinstance(m, AdapterLayer) for m in other.modules())
        assert_renders_equal(render(other, tiny_golden), want)


def test_wrapper_init_arguments_are_plain_data(tiny_base):
    G = copy.deepcopy(tiny_base)
    adapters.inject(G, AdapterConfig(adalora=True, init_r=2, extras='my3dgen'))
    for _, layer in adapter_layers(G):
        for value in list(layer.init_args) + list(layer.init_kwargs.values()):
            assert isinstance(value, (int, float, bool, str, list, type(None))), value
        assert 'base_layer' in layer._modules


def test_layers_module_imports_only_official_eg3d_names():
    """layers.py is embedded in pickles and executed by official EG3D code: it may import nothing of ours
    (the kernels module is looked up by name at run time, `layers.fast_kernels`)."""
    allowed = {'importlib', 'math', 'os', 'numpy', 'torch', 'torch_utils', 'torch_utils.misc', 'torch_utils.persistence',
               'torch_utils.ops', 'torch_utils.ops.bias_act', 'torch_utils.ops.conv2d_resample', 'torch_utils.ops.fma',
               'torch_utils.ops.upfirdn2d', 'training.networks_stylegan2'}
    tree = ast.parse(Path(adapter_layers_module.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.update(f'{node.module}.{alias.name}' if node.module == 'torch_utils.ops' or
                            node.module == 'torch_utils' else node.module for alias in node.names)
    assert imported and imported <= allowed, imported - allowed
