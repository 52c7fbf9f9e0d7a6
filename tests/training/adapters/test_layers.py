"""Adapter wrappers, one layer at a time: shapes, exact identity at init, math, per-sample adapters, grads."""
import copy

import pytest
import torch

from training import adapters
from training.adapters import AdapterConfig
from training.adapters.inject import adapter_layers, fold_adapter
from training.adapters.layers import (LoraConv2dLayer, LoraFullyConnectedLayer, LoraSynthesisLayer,
                                      LoraToRGBLayer)
from adapter_testlib import FAMILIES, W_DIM, Holder, injected, layer_inputs, make_layers, run_layer

WRAPPER_TYPES = {'fc': LoraFullyConnectedLayer, 'conv': LoraConv2dLayer, 'syn': LoraSynthesisLayer,
                 'torgb': LoraToRGBLayer}

# ----------------------------------------------------------------------------


@pytest.mark.parametrize('factorization', ['my3dgen', 'standard'])
@pytest.mark.parametrize('adalora', [False, True])
def test_adapter_shapes_for_every_layer_family(factorization, adalora):
    r, K = 2, 3
    cfg = AdapterConfig(r=r, init_r=r, adalora=adalora, conv_factorization=factorization, targets=('synthesis',))
    H = injected(cfg, K)
    for name in FAMILIES:
        layer = H.synthesis[name]
        assert isinstance(layer, WRAPPER_TYPES[name.split('_')[0]])
        base = layer.base_layer
        if name.startswith('fc'):
            out, fan_in, k = base.out_features, base.in_features, 1
        else:
            out, cin, k, _ = base.weight.shape
            fan_in = cin * k * k
        R = r * k if factorization == 'my3dgen' else r
        assert layer.lora_A.shape == (K, R, fan_in)
        assert layer.lora_B.shape == (K, out, R)
        if adalora:
            assert layer.lora_E.shape == (K, R, 1)
            assert layer.rank_mask.shape == (K, R)
        else:
            assert 'lora_E' not in layer._parameters
        if name.startswith('syn') or name == 'torgb':  # the style affine is wrapped too
            aff = base.affine
            assert isinstance(aff, LoraFullyConnectedLayer)
            assert aff.lora_A.shape == (K, r, W_DIM) and aff.lora_B.shape == (K, base.in_channels, r)


def test_my3dgen_extras_shapes():
    H = injected(AdapterConfig(r=1, extras='my3dgen', targets=('synthesis',)), K=2)
    syn = H.synthesis['syn']
    assert syn.bias_delta.shape == (2, 5) and syn.noise_strength_delta.shape == (2,)
    assert syn.base_layer.affine.bias_delta.shape == (2, 4)
    assert H.synthesis['torgb'].bias_delta.shape == (2, 3)
    assert 'bias_delta' not in H.synthesis['conv_1x1']._parameters  # base has no bias
    assert 'const_delta' not in syn._parameters  # only a block's first layer gets the constant


@pytest.mark.parametrize('cfg', [
    AdapterConfig(r=2, targets=('synthesis',)),
    AdapterConfig(r=1, conv_factorization='standard', extras='my3dgen', targets=('synthesis',)),
    AdapterConfig(adalora=True, init_r=3, extras='my3dgen', targets=('synthesis',)),
], ids=['lora', 'standard-extras', 'adalora-extras'])
@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('selection', ['int', 'per-sample'])
def test_identity_at_init_is_bit_exact(cfg, fused, selection, conv_path, implementation):
    base = make_layers()
    expected = {name: run_layer(name, base[name], fused) for name in FAMILIES}
    H = injected(cfg, K=3)
    adapters.select(H, 2 if selection == 'int' else torch.tensor([2, 0, 1]))
    for name in FAMILIES:
        got = run_layer(name, H.synthesis[name], fused)
        assert torch.equal(got, expected[name]), name


@pytest.mark.parametrize('adalora', [False, True])
@pytest.mark.parametrize('fused', [True, False])
def test_adapted_forward_equals_base_with_merged_weights(adalora, fused):
    H = injected(AdapterConfig(r=2, init_r=2, adalora=adalora, extras='my3dgen', targets=('synthesis',)), K=2)
    from adapter_testlib import randomize_adapters
    randomize_adapters(H, std=0.3)
    adapters.select(H, 1)
    merged = copy.deepcopy(H)
    for name, layer in reversed(adapter_layers(merged)):
        parent_name, _, child = name.rpartition('.')
        parent = merged.get_submodule(parent_name)
        setattr(parent, child, fold_adapter(layer, 1, parent))
    for name in FAMILIES:
        got = run_layer(name, H.synthesis[name], fused)
        want = run_layer(name, merged.synthesis[name], fused)
        base = run_layer(name, make_layers()[name], fused)
        assert not torch.allclose(got, base, atol=1e-3), f'{name}: adapter has no effect'
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize('fused', [True, False])
def test_per_sample_adapters_equal_one_adapter_per_call(fused):
    H = injected(AdapterConfig(r=2, adalora=False, extras='my3dgen', targets=('synthesis',)), K=3)
    from adapter_testlib import randomize_adapters
    randomize_adapters(H, std=0.3)
    idx = torch.tensor([2, 0, 2])
    for name in FAMILIES:
        layer = H.synthesis[name]
        adapters.select(H, idx)
        together = run_layer(name, layer, fused)
        separate = []
        for i, k in enumerate(idx.tolist()):
            adapters.select(H, k)
            separate.append(run_layer(name, layer, fused)[i])
        torch.testing.assert_close(together, torch.stack(separate), atol=1e-5, rtol=1e-5, msg=name)


def test_dense_layer_per_sample_rows():
    """Decoder FCs see N * M rows (M points per sample); sample i's rows use adapter idx[i]."""
    H = injected(AdapterConfig(r=2, targets=('synthesis',)), K=2)
    from adapter_testlib import randomize_adapters
    randomize_adapters(H, std=0.3)
    fc = H.synthesis['fc']
    x = torch.randn(2 * 5, 8)
    adapters.select(H, torch.tensor([1, 0]))
    together = fc(x)
    adapters.select(H, 1)
    first = fc(x[:5])
    adapters.select(H, 0)
    second = fc(x[5:])
    torch.testing.assert_close(together, torch.cat([first, second]), atol=1e-6, rtol=1e-6)
    adapters.select(H, torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match='select'):
        fc(torch.randn(10, 8))


@pytest.mark.parametrize('extras', ['none', 'my3dgen'])
@pytest.mark.parametrize('fused', [True, False])
def test_gradients_reach_only_adapter_tensors(extras, fused, conv_path):
    H = injected(AdapterConfig(r=1, extras=extras, targets=('synthesis',)))
    H.train()
    loss = sum(run_layer(name, H.synthesis[name], fused).square().sum() for name in FAMILIES)
    loss.backward()
    adapter_ids = {id(p) for p in adapters.trainable_parameters(H)}
    for name, p in H.named_parameters():
        if id(p) in adapter_ids:
            assert p.requires_grad
            if name.endswith('lora_B') or name.endswith('_delta'):  # A's grad is B^T (...) = 0 at init
                assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    names = {n.rsplit('.', 1)[-1] for n, p in H.named_parameters() if id(p) in adapter_ids}
    assert ('bias_delta' in names) == (extras == 'my3dgen')


def test_dropout_only_in_training():
    cfg = AdapterConfig(r=2, dropout=0.5, targets=('synthesis',))
    H = injected(cfg)
    from adapter_testlib import randomize_adapters
    randomize_adapters(H, std=0.3)
    for name in ('fc', 'conv', 'syn', 'torgb'):
        layer = H.synthesis[name]
        H.eval()
        a, b = run_layer(name, layer, fused=True), run_layer(name, layer, fused=False)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        H.train()
        torch.manual_seed(0)
        c = run_layer(name, layer, fused=True)
        torch.manual_seed(1)
        d = run_layer(name, layer, fused=True)
        assert not torch.allclose(c, d), f'{name}: dropout had no effect in training'


def test_fully_pruned_layer_is_the_base():
    base = make_layers()
    H = Holder()
    ranks = {f'synthesis.{n}': 0 for n in FAMILIES}
    ranks.update({f'synthesis.{n}.affine': 0 for n in ('syn', 'syn_up', 'torgb')})
    adapters.inject(H, AdapterConfig(adalora=True, init_r=2, targets=('synthesis',)), ranks=ranks)
    for name in FAMILIES:
        assert H.synthesis[name].lora_A.shape[1] == 0
        for fused in (True, False):
            assert torch.equal(run_layer(name, H.synthesis[name], fused), run_layer(name, base[name], fused)), name


def test_wrapper_reads_base_attributes():
    H = injected(AdapterConfig(targets=('synthesis',)))
    syn = H.synthesis['syn']
    assert syn.resolution == 8 and syn.in_channels == 4 and syn.weight is syn.base_layer.weight
    assert syn.affine is syn.base_layer.affine
    with pytest.raises(AttributeError):
        syn.no_such_attribute  # pylint: disable=pointless-statement


@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('demodulate', [True, False])
def test_modulated_conv_with_zero_delta_matches_official_arithmetic_in_float16(fused, demodulate, implementation):
    """The float16 pre-normalisation path (CUDA blocks) gives the base's bits when the delta is zero."""
    from training.adapters.layers import modulated_conv2d_lora
    from training.networks_stylegan2 import modulated_conv2d
    gen = torch.Generator().manual_seed(0)
    x = torch.randn([2, 4, 8, 8], generator=gen).half()
    weight = torch.randn([5, 4, 3, 3], generator=gen)
    styles = torch.randn([2, 4], generator=gen)
    noise = torch.randn([2, 1, 8, 8], generator=gen)
    A = torch.randn([3, 4 * 9], generator=gen)
    B = torch.zeros([5, 3])
    try:
        want = modulated_conv2d(x, weight, styles, noise=noise, padding=1, demodulate=demodulate, fused_modconv=fused)
    except RuntimeError as e:  # some CPU builds lack float16 convolutions
        pytest.skip(f'float16 convolution unavailable: {e}')
    got = modulated_conv2d_lora(x, weight, styles, A, B, noise=noise, padding=1, demodulate=demodulate,
                                fused_modconv=fused)
    assert got.dtype == torch.float16 and torch.equal(got, want)


def _to_float64(module: torch.nn.Module) -> None:
    """Parameters to float64 in place; buffers (resampling filters must stay float32) keep their dtype."""
    for p in module.parameters():
        p.data = p.data.double()


@pytest.mark.parametrize('fused', [False, True])
@pytest.mark.parametrize('selection', ['int', 'per-sample'])
@pytest.mark.parametrize('factorization', ['my3dgen', 'standard'])
def test_training_gradients_equal_merged_weight_gradients(fused, selection, factorization, conv_path, implementation):
    """The cheap training path (no base weight gradients, low-rank branch as matmuls) gives the
    gradients of the merged weight W + B @ A: for the factors of the layer and its style affine,
    and for the input; with per-sample adapters, sample i through the weights of adapter idx[i]."""
    H = injected(AdapterConfig(r=2, conv_factorization=factorization, targets=('synthesis',)), K=2)
    from adapter_testlib import randomize_adapters
    randomize_adapters(H, std=0.3)
    _to_float64(H)
    H.train()
    idx = [1, 1, 1] if selection == 'int' else [1, 0, 1]
    adapters.select(H, 1 if selection == 'int' else torch.tensor(idx))
    plain = make_layers()
    _to_float64(plain)
    for name in FAMILIES:
        layer = H.synthesis[name]
        args, kwargs = layer_inputs(name, layer)
        args = tuple(a.double() for a in args)
        if name.startswith('syn') or name == 'torgb':
            kwargs['fused_modconv'] = fused
        x = args[0].requires_grad_(True)
        wrappers = [layer] + ([layer.base_layer.affine] if hasattr(layer.base_layer, 'affine') else [])
        factors = [p for m in wrappers for p in (m.lora_A, m.lora_B)]
        out = layer(*args, **kwargs)
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
        got = torch.autograd.grad((out * probe).sum(), [x] + factors)

        want_out = []
        for i, k in enumerate(idx):
            merged = {'weight': layer.base_layer.weight + layer.delta_weight(k)}
            if len(wrappers) == 2:
                aff = wrappers[1]
                merged['affine.weight'] = aff.base_layer.weight + aff.delta_weight(k)
            sample_args = tuple(a[i:i + 1] for a in args)
            want_out.append(torch.func.functional_call(plain[name], merged, sample_args, kwargs))
        want_out = torch.cat(want_out)
        want = torch.autograd.grad((want_out * probe).sum(), [x] + factors)
        torch.testing.assert_close(out, want_out, rtol=1e-9, atol=1e-9, msg=name)
        for label, g, w in zip(['x', 'A', 'B', 'affine A', 'affine B'], got, want):
            assert g.abs().sum() > 0, f'{name}: zero gradient for {label}'
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9, msg=f'{name}: gradient of {label}')


@pytest.mark.parametrize('name', ['conv', 'conv_up', 'syn', 'syn_up', 'torgb'])
def test_unfrozen_base_weight_still_gets_its_gradient(name, conv_path, implementation):
    """The cheap path assumes a frozen base; if a user unfreezes a base weight, its gradient is the merged weight's."""
    H = injected(AdapterConfig(r=2, targets=('synthesis',)))
    from adapter_testlib import randomize_adapters
    randomize_adapters(H, std=0.3)
    H.train()
    layer = H.synthesis[name]
    weight = layer.base_layer.weight.requires_grad_(True)
    args, kwargs = layer_inputs(name, layer)
    if name != 'conv' and name != 'conv_up':
        kwargs['fused_modconv'] = False
    got = torch.autograd.grad(layer(*args, **kwargs).square().sum(), weight)[0]
    merged = {'weight': (weight + layer.delta_weight(0)).detach().requires_grad_(True)}
    if hasattr(layer.base_layer, 'affine'):
        aff = layer.base_layer.affine
        merged['affine.weight'] = (aff.base_layer.weight + aff.delta_weight(0)).detach()
    out = torch.func.functional_call(make_layers()[name], merged, args, kwargs)
    want = torch.autograd.grad(out.square().sum(), merged['weight'])[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('geometry', [dict(up=1, flip_weight=True), dict(up=1, flip_weight=False),
                                      dict(up=2, flip_weight=False), dict(down=2, flip_weight=True)],
                         ids=['stride1', 'stride1-flipped', 'up2', 'down2'])
@pytest.mark.parametrize('per_sample', [False, True])
@pytest.mark.parametrize('in_channels', [8, 32])
def test_modulated_conv_gradients_equal_merged_weight_gradients(geometry, per_sample, in_channels, conv_path,
                                                                 implementation):
    """Wide layers (more than R*k*k = 27 input channels) take the tap-matmul thin branch, narrow ones
    the thin convolution; either way the values and gradients are those of the official modulated
    convolution with the merged weight."""
    from torch_utils.ops import upfirdn2d
    from training.adapters.layers import modulated_conv2d_lora
    from training.networks_stylegan2 import modulated_conv2d
    gen = torch.Generator().manual_seed(0)
    N, I, O, k, R = 2, in_channels, 6, 3, 3
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    x, styles, noise_res = rand(N, I, 8, 8).requires_grad_(True), rand(N, I).requires_grad_(True), 8
    noise_res = noise_res * geometry.get('up', 1) // geometry.get('down', 1)
    weight, noise = rand(O, I, k, k), rand(N, 1, noise_res, noise_res)
    lead = [N] if per_sample else []
    A, B = rand(*lead, R, I * k * k).requires_grad_(True), rand(*lead, O, R).requires_grad_(True)
    kwargs = dict(noise=noise, padding=1, resample_filter=upfirdn2d.setup_filter([1, 3, 3, 1]), fused_modconv=False,
                  **geometry)
    got = modulated_conv2d_lora(x, weight, styles, A, B, **kwargs)
    merged = weight + torch.matmul(B, A).reshape(*lead, O, I, k, k)
    if per_sample:
        want = torch.cat([modulated_conv2d(x[i:i + 1], merged[i], styles[i:i + 1], **dict(kwargs, noise=noise[i:i + 1]))
                          for i in range(N)])
    else:
        want = modulated_conv2d(x, merged, styles, **kwargs)
    probe = rand(*got.shape)
    grads = torch.autograd.grad((got * probe).sum(), [x, styles, A, B])
    wants = torch.autograd.grad((want * probe).sum(), [x, styles, A, B])
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    for label, g, w in zip(['x', 'styles', 'A', 'B'], grads, wants):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9, msg=label)


def test_merged_weight_only_for_narrow_layers():
    """The path choice at the FFHQ 512 shapes: every synthesis and superresolution convolution keeps
    the low-rank branch, only the 3-channel superresolution torgb layers train through the merged
    weight; the 8- to 32-channel layers of small configs take the merged weight."""
    from training.adapters.layers import merged_weight_is_cheaper
    for in_ch, out_ch in [(512, 512), (512, 256), (256, 128), (128, 128), (32, 256), (256, 256)]:
        assert not merged_weight_is_cheaper(in_ch, out_ch, rank_rows=3, taps=9), (in_ch, out_ch)
    for in_ch in [512, 256, 128]:
        assert not merged_weight_is_cheaper(in_ch, 96, rank_rows=1, taps=1)
    for in_ch in [256, 128]:
        assert merged_weight_is_cheaper(in_ch, 3, rank_rows=1, taps=1)
    for ch in [8, 16, 32]:
        assert merged_weight_is_cheaper(ch, ch, rank_rows=3, taps=9)


@pytest.mark.parametrize('choice,branch_calls', [(None, 0), ('auto', 0), ('branch', 3), ('merged', 0)])
def test_conv_path_variable_forces_the_path(monkeypatch, choice, branch_calls):
    """EG3D_ADAPTER_CONV_PATH=branch sends the narrow stride-1 test layers (conv, conv_1x1, syn) through
    the low-rank branch that FFHQ 512 layers take; by default ('auto') they take the merged weight."""
    from training.adapters import kernels
    monkeypatch.delenv('EG3D_ADAPTER_KERNELS', raising=False)  # the fast path, which has the stride-1 kernel
    if choice is None:
        monkeypatch.delenv('EG3D_ADAPTER_CONV_PATH', raising=False)
    else:
        monkeypatch.setenv('EG3D_ADAPTER_CONV_PATH', choice)
    calls = []
    real = kernels.stride_one_adapted_conv
    monkeypatch.setattr(kernels, 'stride_one_adapted_conv', lambda *a: calls.append(1) or real(*a))
    H = injected(AdapterConfig(r=1, targets=('synthesis',)))
    for name in ['conv', 'conv_up', 'conv_down', 'conv_1x1', 'syn', 'syn_up']:
        run_layer(name, H.synthesis[name], fused=False)
    assert len(calls) == branch_calls
    monkeypatch.setenv('EG3D_ADAPTER_CONV_PATH', 'fast')
    with pytest.raises(ValueError, match='EG3D_ADAPTER_CONV_PATH=.fast.: use auto, branch or merged'):
        run_layer('conv', H.synthesis['conv'], fused=False)


@pytest.mark.parametrize('activation', ['lrelu', 'linear'])
@pytest.mark.parametrize('clamp', [None, 0.7])
@pytest.mark.parametrize('demodulate', [True, False])
@pytest.mark.parametrize('per_sample_bias', [False, True])
def test_epilogue_equals_bias_act(activation, clamp, demodulate, per_sample_bias, implementation):
    """What follows the non-fused convolution (demodulation, noise, bias, activation, gain, clamp; in place
    on the fast CPU path): with a zero delta its output has the bits of `modulated_conv2d` followed
    by the reference `bias_act`; with a non-zero delta (float64) the values and gradients of every
    input, noise and bias included, are those of the merged weight."""
    from torch_utils.ops import bias_act
    from training.adapters.layers import modulated_conv2d_lora
    from training.networks_stylegan2 import modulated_conv2d
    gen = torch.Generator().manual_seed(0)
    N, I, O = 2, 32, 6
    gain = 1.3
    act = dict(activation=activation, act_gain=gain, act_clamp=clamp)

    def reference(x, weight, styles, noise, bias):
        y = modulated_conv2d(x, weight, styles, noise=noise, padding=1, demodulate=demodulate, fused_modconv=False)
        if bias.ndim == 2:
            return bias_act._bias_act_ref(y + bias[:, :, None, None], None, act=activation, gain=gain, clamp=clamp)
        return bias_act._bias_act_ref(y, bias, act=activation, gain=gain, clamp=clamp)

    for dtype in (torch.float32, torch.float64):
        rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)  # noqa: E731
        x, styles, weight, noise = rand(N, I, 8, 8), rand(N, I), rand(O, I, 3, 3), rand(N, 1, 8, 8)
        bias = rand(N, O) if per_sample_bias else rand(O)
        A, B = rand(3, I * 9), rand(O, 3) * (0 if dtype == torch.float32 else 0.1)
        leaves = [x, styles, A, B, noise, bias]
        for t in leaves:
            t.requires_grad_(True)
        got = modulated_conv2d_lora(x, weight, styles, A, B, noise=noise, padding=1, demodulate=demodulate,
                                    fused_modconv=False, bias=bias, **act)
        want = reference(x, weight + (B @ A).reshape(weight.shape), styles, noise, bias)
        if clamp is not None:
            assert (want.abs() == clamp).any() and (want.abs() < clamp).any()
        if dtype == torch.float32:  # zero delta: the base's bits
            assert torch.equal(got, want)
            continue
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        probe = rand(*got.shape)
        grads = torch.autograd.grad((got * probe).sum(), leaves)
        wants = torch.autograd.grad((want * probe).sum(), leaves)
        for label, g, w in zip(['x', 'styles', 'A', 'B', 'noise', 'bias'], grads, wants):
            assert g.abs().sum() > 0, label
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9, msg=label)


@pytest.mark.parametrize('dtype,tol', [(torch.float16, 5e-3), (torch.bfloat16, 2e-2)], ids=['fp16', 'bf16'])
@pytest.mark.parametrize('geometry,in_channels', [('stride1', 64), ('stride1', 2), ('up2', 8)],
                         ids=['stride1-wide', 'stride1-narrow', 'up2'])
@pytest.mark.parametrize('per_sample', [False, True], ids=['shared', 'per-sample'])
def test_half_precision_layers_accumulate_factor_gradients_in_float32(dtype, tol, geometry, in_channels, per_sample,
                                                                     implementation):
    """In fp16 blocks (no loss scaling) the factor gradients, sums over every pixel, stay finite float32 and
    match a float64 computation on the same half-precision inputs; the fp16 sums overflowed to inf here."""
    from torch_utils.ops import upfirdn2d
    from training.adapters import layers
    g = torch.Generator().manual_seed(0)
    N, O, R, k, res = 2, 6, 3, 3, 16
    lead = [N] if per_sample else []
    x = (torch.randn(N, in_channels, res, res, generator=g) * 4).to(dtype)
    W = torch.randn(O, in_channels, k, k, generator=g)
    A = torch.randn(*lead, R, in_channels * k * k, generator=g) * 0.5
    B = torch.randn(*lead, O, R, generator=g) * 0.5
    styles = torch.rand(N, in_channels, generator=g) + 0.5
    up2 = dict(up=2, padding=1, f=upfirdn2d.setup_filter([1, 3, 3, 1]))
    geometry_kwargs = up2 if geometry == 'up2' else dict(padding=1)
    out_res = 2 * res if geometry == 'up2' else res
    probe = torch.randn(N, O, out_res, out_res, generator=g) * 1e3  # a large upstream gradient

    def factor_grads(x, W, A, B, styles):
        A, B = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
        y = layers.adapted_conv(x, W, A, B, styles=styles, **geometry_kwargs)
        y.backward(probe.to(y.dtype))
        return A.grad, B.grad

    got = factor_grads(x, W, A, B, styles)
    want = factor_grads(x.double(), W.double(), A.double(), B.double(), styles.double())
    for label, a, b in zip(['A', 'B'], got, want):
        assert a.dtype == torch.float32 and torch.isfinite(a).all(), label
        assert (a.double() - b).abs().max() <= tol * b.abs().max(), label
