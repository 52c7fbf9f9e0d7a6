"""Gradient-aligned adapter init (training/gradient_init.py): the power iteration finds the top singular vectors of
the weight gradient, without changing the generator's output or its base, per identity, on both kernel paths; in
the training loop it runs once, before the first step, and a resumed run equals the uninterrupted one."""
import copy
import json
import os

import pytest
import torch

from training import adapters
from safetensors.torch import load_file

from training import gradient_init
from training import recipe as recipes
from training import synthetic_identity as si
from training import training_loop as tl
from training.adapters.inject import adapter_layers
from training.adapters.layers import LoraFullyConnectedLayer
from training.networks_stylegan2 import FullyConnectedLayer


def _known_gradient(out_features: int, in_features: int, singular_values: list) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    U = torch.linalg.qr(torch.randn(out_features, len(singular_values), generator=gen))[0]
    V = torch.linalg.qr(torch.randn(in_features, len(singular_values), generator=gen))[0]
    return U @ torch.diag(torch.tensor(singular_values)) @ V.T


def _toy_layer(out_features: int, in_features: int, rank: int) -> torch.nn.Module:
    """A LoRA-wrapped dense layer (weight gain 1 / sqrt(in)) inside a container, as inject leaves it."""
    torch.manual_seed(0)
    base = FullyConnectedLayer(in_features, out_features).requires_grad_(False)
    wrapper = LoraFullyConnectedLayer(in_features, out_features, rank)
    wrapper.base_layer = base
    return torch.nn.Sequential(wrapper)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


@pytest.mark.parametrize('passes', [1, 2, 3, 8])
def test_power_iteration_finds_the_top_singular_vector_of_a_known_gradient(passes):
    # loss = sum(layer(I) * T): dL/dW = gain * T^T, the known G (the same at every pass).
    O, I = 6, 10
    G_true = _known_gradient(O, I, [4.0, 1.0, 0.5])
    model = _toy_layer(O, I, rank=1)
    layer = model[0]
    random_a = layer.lora_A.detach()[0, 0].clone()

    def loss_gradients():
        for p in layer.adapter_parameters():
            p.grad = None
        (model(torch.eye(I)) * G_true.T).sum().backward()

    gradient_init.align_adapters(model, loss_gradients, passes, torch.Generator().manual_seed(0))
    a = layer.lora_A.detach()[0, 0]
    # k passes weight direction i by sigma_i^k: an odd chain starts from a random B (the generator's draw),
    # an even one from the random A.
    random_b = torch.randn([1, O, 1], generator=torch.Generator().manual_seed(0))[0, :, 0]
    start = random_b @ G_true if passes % 2 else random_a
    expected = start @ torch.linalg.matrix_power(G_true.T @ G_true, passes // 2)
    assert abs(float(_unit(a) @ _unit(expected))) > 1 - 1e-5
    v1 = torch.linalg.svd(G_true)[2][0]
    if passes == 8:  # the error shrinks as (sigma_2 / sigma_1)^8 = 4^-8 of the start's
        assert abs(float(_unit(a) @ v1)) > 1 - 1e-6
    assert float(a.norm()) == pytest.approx(float(random_a.norm()), rel=1e-5)  # the random init's scale
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
    assert all(p.grad is None for p in layer.adapter_parameters())


def test_rank_r_takes_the_top_r_subspace_ordered_by_singular_value():
    O, I = 8, 12
    G_true = _known_gradient(O, I, [5.0, 3.0, 0.3, 0.1])
    model = _toy_layer(O, I, rank=2)
    layer = model[0]

    def loss_gradients():
        for p in layer.adapter_parameters():
            p.grad = None
        (model(torch.eye(I)) * G_true.T).sum().backward()

    gradient_init.align_adapters(model, loss_gradients, 8, torch.Generator().manual_seed(0))
    Vh = torch.linalg.svd(G_true)[2]
    A = layer.lora_A.detach()[0]
    rows = A / A.norm(dim=1, keepdim=True)
    assert torch.allclose((rows @ Vh[:2].T).abs(), torch.eye(2), atol=1e-4)


def _batch(G: torch.nn.Module, count: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ws = G.mapping(torch.randn([count, G.z_dim], generator=gen), torch.zeros([count, G.c_dim]))
    c = torch.from_numpy(si.camera_labels(count, seed=seed))
    target = torch.rand([count, 3, G.img_resolution, G.img_resolution], generator=gen) * 2 - 1
    return ws, c, target


def _render(G, ws, c):
    torch.manual_seed(0)  # the renderer's depth jitter
    return G.synthesis(ws, c, neural_rendering_resolution=32, noise_mode='const')['image']


def _aligned(G, ws, c, target, identity, passes=3):
    """G's adapters aligned on one batch; sample i uses adapter identity[i]."""
    def loss_gradients():
        G.zero_grad(set_to_none=True)
        adapters.select(G, torch.tensor(identity))
        ((_render(G, ws, c) - target) ** 2).mean().backward()
    gradient_init.align_adapters(G, loss_gradients, passes, torch.Generator().manual_seed(1))
    return G


@pytest.fixture(scope='module')
def tiny():
    G = si.build_tiny_generator(0)
    with torch.no_grad():
        ws, c, target = _batch(G, 2, seed=4)
    return G, ws, c, target


def test_output_at_step_0_and_the_base_are_unchanged_and_a_moved(tiny):
    base, ws, c, target = tiny
    G = copy.deepcopy(base)
    adapters.inject(G, adapters.AdapterConfig(r=1))
    random_A = {name: layer.lora_A.detach().clone() for name, layer in adapter_layers(G)}
    _aligned(G, ws, c, target, [0, 0])
    with torch.no_grad():
        adapters.select(G, 0)
        assert torch.equal(_render(G, ws, c), _render(base, ws, c))
    merged = adapters.merge(copy.deepcopy(G))
    assert all(torch.equal(p, q) for p, q in zip(merged.state_dict().values(), base.state_dict().values()))
    moved = [name for name, layer in adapter_layers(G) if not torch.allclose(layer.lora_A, random_A[name])]
    assert len(moved) == len(random_A)


def test_a_matches_the_explicit_weight_gradient_on_both_kernel_paths(tiny, monkeypatch):
    """The oracle: dL/dW of a conv weight formed by autograd on the base (its weight made trainable); two passes
    from the random A give A0 @ G^T G."""
    base, ws, c, target = tiny
    layer_name = 'backbone.synthesis.b8.conv0'
    explicit = copy.deepcopy(base)
    weight = explicit.get_submodule(layer_name).weight.requires_grad_(True)
    ((_render(explicit, ws, c) - target) ** 2).mean().backward()
    G_explicit = weight.grad.reshape(weight.shape[0], -1).double()
    found = {}
    for path in ('reference', 'fast'):
        monkeypatch.setenv('EG3D_ADAPTER_KERNELS', path)
        monkeypatch.setenv('EG3D_ADAPTER_CONV_PATH', 'branch')
        G = copy.deepcopy(base)
        torch.manual_seed(0)
        adapters.inject(G, adapters.AdapterConfig(r=1, conv_factorization='standard'))
        random_a = dict(adapter_layers(G))[layer_name].lora_A.detach()[0, 0].clone()
        _aligned(G, ws, c, target, [0, 0], passes=2)
        found[path] = dict(adapter_layers(G))[layer_name].lora_A.detach()[0, 0]
    expected = (random_a.double() @ G_explicit.T @ G_explicit).float()
    assert abs(float(_unit(found['reference']) @ _unit(expected))) > 1 - 1e-4
    assert torch.allclose(found['fast'], found['reference'], atol=1e-5)


def test_each_identity_is_aligned_on_its_own_samples(tiny):
    base, ws, c, target = tiny
    config = adapters.AdapterConfig(r=1, conv_factorization='standard')  # the top direction (the renderer's jitter
    G2 = copy.deepcopy(base)
    adapters.inject(G2, config, num_adapters=2)
    _aligned(G2, ws, c, target, [0, 1])
    for k in (0, 1):
        G1 = copy.deepcopy(base)
        adapters.inject(G1, config)
        _aligned(G1, ws[k:k + 1], c[k:k + 1], target[k:k + 1], [0])
        for (name, multi), (_, single) in zip(adapter_layers(G2), adapter_layers(G1)):  # differs with the batch)
            a, b = multi.lora_A.detach()[k], single.lora_A.detach()[0]
            cosine = (a * b).sum(dim=1).abs() / (a.norm(dim=1) * b.norm(dim=1))
            assert bool((cosine > 0.999).all()), (name, k)


def test_adalora_full_finetuning_and_trained_adapters_are_refused(tiny):
    base = tiny[0]
    with pytest.raises(ValueError, match='AdaLoRA'):
        G = copy.deepcopy(base)
        adapters.inject(G, adapters.AdapterConfig(adalora=True, init_r=2, target_r=1))
        gradient_init.check_supported(G)
    with pytest.raises(ValueError, match='trains the whole generator'):
        gradient_init.check_supported(copy.deepcopy(base))
    G = copy.deepcopy(base)
    adapters.inject(G, adapters.AdapterConfig(r=1))
    with torch.no_grad():
        adapter_layers(G)[3][1].lora_B.fill_(0.1)
    with pytest.raises(ValueError, match='already hold a trained delta'):
        gradient_init.check_supported(G)


@pytest.fixture(scope='module')
def identity8(tmp_path_factory):
    return si.ensure_identity(str(tmp_path_factory.getbasetemp() / 'synthetic-identity-8'), views=8, heldout=0,
                              strength=0.3)


GRADIENT_RECIPE = dict(recipes.get_recipe('adapter').to_dict(), name='gradient-init', init='gradient', init_passes=2)


def _run(run_dir, identity8, resume_pkl=None, **overrides):
    os.makedirs(run_dir, exist_ok=True)
    opts = dict(run_dir=str(run_dir), training_set_kwargs=dict(path=identity8.train),
                resume_pkl=resume_pkl or identity8.base_pkl, cfg='resume', neural_rendering_resolution=32,
                batch_size=2, batch_gpu=1, total_kimg=0.006, kimg_per_tick=0.002, network_snapshot_ticks=1,
                density_reg_every=2, device='cpu', grid_rows=0, progress_bar=False, loss_kwargs=dict(lpips_net='none'),
                adapter_config=dict(r=1, alpha=1.0), recipe=GRADIENT_RECIPE)
    opts.update(overrides)
    return tl.training_loop(**opts)


def _stats(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, 'stats.jsonl'))]


@pytest.fixture(scope='module')
def aligned_run(identity8, tmp_path_factory):
    run = tmp_path_factory.mktemp('gradient-init-run')
    return run, _run(run, identity8)


def test_the_loop_aligns_once_before_the_first_step_and_validation_at_the_start_is_the_bases(aligned_run, identity8,
                                                                                             tmp_path):
    run, _ = aligned_run
    assert open(run / 'log.txt').read().count('Adapters aligned') == 1
    random_start = tmp_path / 'random'
    _run(random_start, identity8, total_kimg=0.002, recipe=dict(GRADIENT_RECIPE, init='random'))
    assert 'Adapters aligned' not in open(random_start / 'log.txt').read()
    assert _stats(run)[0]['val/loss'] == _stats(random_start)[0]['val/loss']  # B = 0: the base's renders
    assert _stats(run)[1]['val/loss'] != _stats(random_start)[1]['val/loss']  # a different start


def test_resume_does_not_realign_and_equals_the_uninterrupted_run(aligned_run, identity8, tmp_path):
    run, _ = aligned_run
    resumed = tmp_path / 'resumed'
    _run(resumed, identity8, resume_pkl=str(run / 'network-snapshot-000000.002.pkl'), adapter_config=None)
    assert 'Adapters aligned' not in open(resumed / 'log.txt').read()
    for name in ('adapter-000000.006.safetensors', 'adapter-best.safetensors'):
        a, b = load_file(str(run / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert [s['loss/total'] for s in _stats(run)[2:]] == [s['loss/total'] for s in _stats(resumed)]


def test_the_loop_refuses_adalora_before_training(identity8, tmp_path):
    adalora = dict(r=1, alpha=1.0, adalora=True, init_r=2, target_r=1, total_step=4)
    with pytest.raises(ValueError, match="init='gradient'.*AdaLoRA"):
        _run(tmp_path, identity8, adapter_config=adalora)
    assert not os.path.exists(tmp_path / 'stats.jsonl')
