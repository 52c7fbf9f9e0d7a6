"""inject / select / parameter_table / merge on the golden tiny TriPlaneGenerator (and FFHQ-512 counts)."""
import copy

import pytest
import torch

from adapter_testlib import assert_renders_equal, randomize_adapters, render
from training import adapters, configs
from training.adapters import AdapterConfig
from training.adapters.layers import AdapterLayer
from training.networks_stylegan2 import FullyConnectedLayer, SynthesisLayer, ToRGBLayer
from training.triplane import TriPlaneGenerator

ALL = ('mapping', 'synthesis', 'superresolution', 'decoder')


def full_forward(G, golden, seed=3):
    """Mapping + synthesis (exercises the mapping and decoder adapters too)."""
    z = golden['inputs']['z']
    c = golden['inputs']['c']
    torch.manual_seed(seed)
    with torch.no_grad():
        return G(z, c, truncation_psi=0.7, neural_rendering_resolution=32, noise_mode='const')


@pytest.fixture(scope='module')
def base_outputs(tiny_golden, tiny_base):
    """Renders of the plain generator, computed once per mode: {(training, kind): outputs}."""
    cache = {}

    def get(training, kind='full'):
        if (training, kind) not in cache:
            base = copy.deepcopy(tiny_base).train(training)
            cache[(training, kind)] = full_forward(base, tiny_golden) if kind == 'full' else \
                render(base, tiny_golden, noise_mode='random')
        return cache[(training, kind)]
    return get


@pytest.mark.parametrize('cfg,K,sel', [
    (AdapterConfig(), 1, 0),
    (AdapterConfig(r=2, extras='my3dgen', targets=ALL), 1, 0),
    (AdapterConfig(r=1, conv_factorization='standard', targets=ALL), 3, 1),
    (AdapterConfig(adalora=True, init_r=2, extras='my3dgen', targets=ALL), 2, 'per-sample'),
], ids=['default', 'my3dgen-extras-all', 'standard-K3', 'adalora-per-sample'])
@pytest.mark.parametrize('training,conv_path', [(False, 'auto'), (True, 'auto'), (True, 'branch')],
                         ids=['eval-fused', 'train-nonfused', 'train-nonfused-branch'])
def test_injected_generator_renders_exactly_like_the_base(tiny_golden, tiny_base, base_outputs, cfg, K, sel, training,
                                                         conv_path, monkeypatch):
    """At init every adapted layer adds exactly nothing, on both training paths of the convolutions (the
    tiny config's narrow layers take the merged weight by default; 'branch' forces FFHQ 512's path)."""
    monkeypatch.setenv('EG3D_ADAPTER_CONV_PATH', conv_path)
    G = copy.deepcopy(tiny_base).train(training)
    adapters.inject(G, cfg, num_adapters=K)
    adapters.select(G, torch.tensor([1, 0]) if sel == 'per-sample' else sel)
    assert_renders_equal(full_forward(G, tiny_golden), base_outputs(training))
    if cfg.extras == 'my3dgen':  # random noise goes through the noise-strength deltas
        assert_renders_equal(render(G, tiny_golden, noise_mode='random'), base_outputs(training, 'random'))


def test_inject_wraps_every_targeted_layer_and_freezes_the_base(tiny_G):
    n_fc = sum(isinstance(m, FullyConnectedLayer) for m in tiny_G.modules())
    n_mod = sum(isinstance(m, (SynthesisLayer, ToRGBLayer)) for m in tiny_G.modules())
    base_params = list(tiny_G.parameters())
    adapters.inject(tiny_G, AdapterConfig(targets=ALL))
    wrappers = [m for m in tiny_G.modules() if isinstance(m, AdapterLayer)]
    assert len(wrappers) == n_fc + n_mod  # every FC (mapping, affines, decoder) and every modulated conv
    assert all(not p.requires_grad for p in base_params)
    assert all(not b.requires_grad for b in tiny_G.buffers())
    trainable = [p for p in tiny_G.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in adapters.trainable_parameters(tiny_G)}
    assert adapters.is_injected(tiny_G) and adapters.get_config(tiny_G) == AdapterConfig(targets=ALL)


def test_targets_select_components(tiny_G):
    adapters.inject(tiny_G, AdapterConfig(targets=('superresolution',)))
    wrapped = [n for n, m in tiny_G.named_modules() if isinstance(m, AdapterLayer)]
    assert wrapped and all(n.startswith('superresolution.') for n in wrapped)
    table = adapters.parameter_table(tiny_G)
    assert table['synthesis'] == table['mapping'] == table['decoder'] == 0 and table['superresolution'] > 0


def test_inject_errors(tiny_G):
    adapters.inject(tiny_G, AdapterConfig())
    with pytest.raises(ValueError, match='already'):
        adapters.inject(tiny_G, AdapterConfig())
    with pytest.raises(ValueError, match='superresolution'):
        adapters.inject(torch.nn.Module(), AdapterConfig())
    with pytest.raises(ValueError, match='targets'):
        AdapterConfig(targets=('synthesis', 'renderer'))
    with pytest.raises(IndexError):
        adapters.select(tiny_G, 1)
    with pytest.raises(ValueError, match='integer'):
        adapters.select(tiny_G, torch.tensor([0.5]))


def test_gradients_reach_only_adapters_through_the_whole_generator(tiny_golden, tiny_G):
    adapters.inject(tiny_G, AdapterConfig(r=1, extras='my3dgen', targets=ALL))
    tiny_G.train()
    torch.manual_seed(3)
    out = tiny_G(tiny_golden['inputs']['z'], tiny_golden['inputs']['c'], neural_rendering_resolution=32,
                 noise_mode='const')
    (out['image'].square().mean() + out['image_raw'].square().mean()).backward()
    adapter_ids = {id(p) for p in adapters.trainable_parameters(tiny_G)}
    for name, p in tiny_G.named_parameters():
        if id(p) not in adapter_ids:
            assert p.grad is None, name
    grads = {n.rsplit('.', 1)[-1]: 0 for n, _ in tiny_G.named_parameters()}
    for n, p in tiny_G.named_parameters():
        if id(p) in adapter_ids and p.grad is not None:
            grads[n.rsplit('.', 1)[-1]] += int(p.grad.abs().sum() > 0)
    for kind in ('lora_B', 'bias_delta', 'noise_strength_delta', 'const_delta'):
        assert grads[kind] > 0, kind


def test_per_sample_selection_renders_each_identity(tiny_golden, tiny_G):
    adapters.inject(tiny_G, AdapterConfig(r=1, targets=ALL), num_adapters=3)
    randomize_adapters(tiny_G, std=0.05)
    adapters.select(tiny_G, torch.tensor([2, 1]))
    mixed = render(tiny_G, tiny_golden)
    adapters.select(tiny_G, 2)
    first = render(tiny_G, tiny_golden)
    adapters.select(tiny_G, 1)
    second = render(tiny_G, tiny_golden)
    torch.testing.assert_close(mixed['image'][0], first['image'][0], atol=1e-4, rtol=0)
    torch.testing.assert_close(mixed['image'][1], second['image'][1], atol=1e-4, rtol=0)
    assert not torch.allclose(first['image'][1], second['image'][1], atol=1e-3)


def expected_counts(G_plain, cfg):
    """Adapter parameter count of a plain G, from the layer shapes and the factorization rules."""
    from training.adapters.inject import component_roots
    counts = {}
    for comp, root in component_roots(G_plain).items():
        n = 0
        if comp in cfg.targets:
            for m in root.modules():
                if isinstance(m, FullyConnectedLayer):
                    n += cfg.r * (m.in_features + m.out_features)
                    n += m.out_features if cfg.extras == 'my3dgen' else 0
                elif isinstance(m, (SynthesisLayer, ToRGBLayer)):
                    O, I, k, _ = m.weight.shape
                    R = cfg.r * k if cfg.conv_factorization == 'my3dgen' else cfg.r
                    n += R * (I * k * k + O)
                    if cfg.extras == 'my3dgen':
                        n += O + int(getattr(m, 'use_noise', False))
            if cfg.extras == 'my3dgen':
                n += sum(m.const.numel() for m in root.modules() if 'const' in m._parameters)
        counts[comp] = n
    return counts


@pytest.mark.parametrize('cfg', [AdapterConfig(r=2, targets=ALL), AdapterConfig(r=3, extras='my3dgen', targets=ALL),
                                 AdapterConfig(r=1, conv_factorization='standard')])
def test_parameter_table_matches_layer_shapes(tiny_G, cfg):
    want = expected_counts(tiny_G, cfg)
    base_total = sum(p.numel() for p in tiny_G.parameters())
    adapters.inject(tiny_G, cfg)
    table = adapters.parameter_table(tiny_G)
    for comp in ALL:
        assert table[comp] == want.get(comp, 0), comp
    assert table['adapter_total'] == table['trainable_total'] == sum(want.values())
    assert table['base_total'] == base_total
    text = adapters.format_parameter_table(tiny_G)
    assert f"{table['adapter_total']:,}" in text and f'{base_total:,}' in text


@pytest.fixture(scope='module')
def ffhq512_plain():
    torch.manual_seed(0)
    return TriPlaneGenerator(**configs.generator_kwargs('ffhq', 512))


@pytest.mark.parametrize('extras,synthesis,superresolution', [('none', 194208, 24966), ('my3dgen', 217165, 26800)])
def test_ffhq512_rank1_counts_match_my3dgen(ffhq512_plain, extras, synthesis, superresolution):
    """My3DGen's counts at FFHQ 512, rank 1: 219,174 (factors only) and 243,965 (with extras)."""
    G = copy.deepcopy(ffhq512_plain)
    adapters.inject(G, AdapterConfig(r=1, extras=extras, conv_factorization='my3dgen'))
    table = adapters.parameter_table(G)
    assert (table['synthesis'], table['superresolution']) == (synthesis, superresolution)
    assert table['mapping'] == table['decoder'] == 0
    assert table['adapter_total'] == {'none': 219174, 'my3dgen': 243965}[extras]
    torgb = sum(p.numel() for n, m in G.named_modules() if n.endswith('torgb') for p in m.adapter_parameters())
    if extras == 'none':
        assert torgb == 4006  # the to-RGB conv factors of synthesis + superresolution


@pytest.mark.parametrize('cfg', [AdapterConfig(r=2, extras='my3dgen', targets=ALL),
                                 AdapterConfig(adalora=True, init_r=3, targets=ALL)], ids=['lora', 'adalora'])
@pytest.mark.parametrize('training', [False, True], ids=['eval', 'train'])
def test_merge_matches_adapter_forward(tiny_golden, tiny_base, base_outputs, cfg, training):
    G = copy.deepcopy(tiny_base)
    adapters.inject(G, cfg, num_adapters=2)
    randomize_adapters(G, std=0.3 if cfg.adalora else 0.05)
    adapters.select(G, 1)
    M = adapters.merge(G, index=1)
    assert not adapters.is_injected(M) and not any(isinstance(m, AdapterLayer) for m in M.modules())
    assert list(M.state_dict().keys()) == list(tiny_base.state_dict().keys())
    assert all(p.requires_grad for p in M.parameters())
    G.train(training)
    M.train(training)
    adapted, merged, base = full_forward(G, tiny_golden), full_forward(M, tiny_golden), base_outputs(training)
    for key in adapted:
        assert (adapted[key] - base[key]).abs().max() > 1e-3, f'{key}: adapters have no effect'
        torch.testing.assert_close(merged[key], adapted[key], atol=1e-5, rtol=0, msg=key)
    assert adapters.is_injected(G)  # merge works on a copy
