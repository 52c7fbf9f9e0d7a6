"""Adapter files: save/load round trips, PEFT-style metadata, pruned AdaLoRA, clear errors naming the file."""
import copy
import json
import os

import pytest
import torch
from safetensors import safe_open

from adapter_testlib import assert_renders_equal, randomize_adapters, render
from training import adapters
from training.adapters import AdapterConfig
from training.adapters.inject import adapter_layers, base_name


@pytest.fixture(scope='module')
def trained(tiny_base):
    """An injected tiny G (K=2, extras) with random adapters, as after training."""
    G = copy.deepcopy(tiny_base)
    adapters.inject(G, AdapterConfig(r=2, extras='my3dgen', targets=('synthesis', 'superresolution', 'decoder')),
                    num_adapters=2)
    randomize_adapters(G, std=0.05, seed=1)
    return G


def test_save_load_round_trip_onto_plain_base(tmp_path, tiny_golden, tiny_base, trained):
    path = tmp_path / 'identity1.safetensors'
    adapters.save(trained, path, index=1)
    adapters.select(trained, 1)
    want = render(trained, tiny_golden)
    G = copy.deepcopy(tiny_base)
    assert adapters.load(G, path) is G
    assert adapters.is_injected(G) and adapters.get_config(G) == adapters.get_config(trained)
    assert_renders_equal(render(G, tiny_golden), want)
    assert [os.path.basename(p) for p in os.listdir(tmp_path)] == ['identity1.safetensors']  # no temp files left


def test_load_into_a_slot_of_an_injected_generator(tmp_path, tiny_golden, tiny_base, trained):
    path = tmp_path / 'a.safetensors'
    adapters.save(trained, path, index=0)
    G = copy.deepcopy(tiny_base)
    adapters.inject(G, adapters.get_config(trained), num_adapters=3)
    adapters.load(G, path, index=2)
    adapters.select(G, 2)
    adapters.select(trained, 0)
    assert_renders_equal(render(G, tiny_golden), render(trained, tiny_golden))
    with pytest.raises(IndexError, match='a.safetensors'):
        adapters.load(G, path, index=3)


def test_file_layout_follows_peft_conventions(tmp_path, trained):
    path = tmp_path / 'a.safetensors'
    adapters.save(trained, path, index=1)
    meta = adapters.read_metadata(path)
    assert meta['peft_type'] == 'LORA' and meta['r'] == '2' and float(meta['lora_alpha']) == 1.0
    names = [base_name(n) for n, _ in adapter_layers(trained)]
    assert meta['target_modules'] == names
    assert 'backbone.synthesis.b4.conv1' in names and 'backbone.synthesis.b4.conv1.affine' in names
    assert meta['base_fingerprint'] == adapters.fingerprint(trained)
    assert adapters.read_config(path) == adapters.get_config(trained)
    with safe_open(str(path), framework='pt') as f:
        keys = set(f.keys())
        A = f.get_tensor('backbone.synthesis.b8.conv0.lora_A')
    layer = trained.backbone.synthesis.b8.conv0
    assert torch.equal(A, layer.lora_A[1])  # adapter 1, without the K dim
    assert 'backbone.synthesis.b4.conv1.const_delta' in keys and 'decoder.net.0.bias_delta' in keys
    assert all(not k.endswith('.weight') for k in keys)  # adapter tensors only, never the base


def test_fingerprint_identifies_the_base(tiny_base, trained):
    fp = adapters.fingerprint(tiny_base)
    assert fp == adapters.fingerprint(trained)  # adapters are left out, names are the plain ones
    assert fp['class_name'] == 'TriPlaneGenerator' and fp['num_params'] == 1540456
    other = copy.deepcopy(tiny_base)
    with torch.no_grad():
        other.decoder.net[0].weight[0, 0] += 1e-3
    assert adapters.fingerprint(other)['weights_sha256'] != fp['weights_sha256']


def test_saving_k_adapters_and_loading_them_hashes_the_base_once(tmp_path, tiny_base, count_hashes):
    G = copy.deepcopy(tiny_base)
    adapters.inject(G, AdapterConfig(r=1, targets=('synthesis',)), num_adapters=4)
    for k in range(4):
        adapters.save(G, tmp_path / f'{k}.safetensors', index=k)
    with torch.no_grad():  # training the adapters changes no base weight
        for _, layer in adapter_layers(G):
            layer.lora_B.add_(0.01)
    for k in range(4):
        adapters.load(G, tmp_path / f'{k}.safetensors', index=3 - k)
    assert len(count_hashes) == 1


def test_fingerprint_is_recomputed_when_a_base_weight_changes(tiny_base, count_hashes):
    G = copy.deepcopy(tiny_base)
    first = adapters.fingerprint(G)['weights_sha256']
    weight = G.backbone.synthesis.b4.conv1.weight
    with torch.no_grad():
        weight.mul_(1.01)  # in place
    second = adapters.fingerprint(G)['weights_sha256']
    G.decoder.net[0].weight = torch.nn.Parameter(G.decoder.net[0].weight.detach() + 1e-3)  # replaced
    third = adapters.fingerprint(G)['weights_sha256']
    G.decoder.net[0].weight.data.add_(1e-3)  # through .data: invisible to the version counter
    assert adapters.fingerprint(G)['weights_sha256'] == third
    adapters.forget_fingerprint(G)
    fourth = adapters.fingerprint(G)['weights_sha256']
    assert len({first, second, third, fourth}) == 4 and len(count_hashes) == 4
    with torch.no_grad():
        weight.div_(1.01)
    assert adapters.fingerprint(G) != adapters.fingerprint(tiny_base)  # the decoder still differs


def test_loading_onto_a_different_base_names_the_file(tmp_path, tiny_base, trained):
    path = tmp_path / 'for_other_base.safetensors'
    adapters.save(trained, path)
    other = copy.deepcopy(tiny_base)
    with torch.no_grad():
        other.backbone.synthesis.b4.conv1.weight.mul_(1.01)
    with pytest.raises(ValueError, match='for_other_base.safetensors.*different base generator.*weights'):
        adapters.load(other, path)
    assert not adapters.is_injected(other)  # checked before anything changed
    adapters.load(other, path, check_base=False)  # explicit opt-out
    assert adapters.is_injected(other)


def test_shape_mismatch_names_the_file(tmp_path, tiny_base, trained):
    path = tmp_path / 'rank2.safetensors'
    adapters.save(trained, path)
    G = copy.deepcopy(tiny_base)
    adapters.inject(G, AdapterConfig(r=1, extras='my3dgen', targets=('synthesis', 'superresolution', 'decoder')))
    with pytest.raises(ValueError, match=r'rank2\.safetensors.*shape mismatch.*lora_A'):
        adapters.load(G, path)
    G = copy.deepcopy(tiny_base)
    adapters.inject(G, AdapterConfig(r=2, targets=('synthesis', 'superresolution', 'decoder')))
    with pytest.raises(ValueError, match=r'rank2\.safetensors.*extras'):
        adapters.load(G, path)
    G = copy.deepcopy(tiny_base)
    adapters.inject(G, AdapterConfig(r=2, extras='my3dgen', targets=('synthesis',)))
    with pytest.raises(ValueError, match=r'rank2\.safetensors.*adapted layers differ'):
        adapters.load(G, path)


def test_bad_files_name_the_file(tmp_path, tiny_base):
    G = copy.deepcopy(tiny_base)
    with pytest.raises(FileNotFoundError, match='missing.safetensors'):
        adapters.load(G, tmp_path / 'missing.safetensors')
    junk = tmp_path / 'junk.safetensors'
    junk.write_bytes(b'not a safetensors file')
    with pytest.raises(ValueError, match='junk.safetensors'):
        adapters.read_config(junk)
    from safetensors.torch import save_file
    plain = tmp_path / 'plain.safetensors'
    save_file({'x': torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match='plain.safetensors.*not an EG3D adapter file'):
        adapters.load(G, plain)


def test_failed_save_keeps_the_existing_file(tmp_path, tiny_base, trained):
    path = tmp_path / 'keep.safetensors'
    adapters.save(trained, path)
    before = path.read_bytes()
    with pytest.raises(ValueError):
        adapters.save(copy.deepcopy(tiny_base), path)  # no adapters: fails before writing
    with pytest.raises(IndexError):
        adapters.save(trained, path, index=5)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ['keep.safetensors']


def test_pruned_adalora_file_keeps_only_the_kept_ranks(tmp_path, tiny_golden, tiny_base):
    G = copy.deepcopy(tiny_base)
    adapters.inject(G, AdapterConfig(adalora=True, init_r=3, target_r=1, total_step=10, tinit=1, targets=('synthesis',)))
    randomize_adapters(G, std=0.3, seed=2)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a rank pattern as the allocator leaves it: pruned triplets have Lambda = 0
        for _, layer in adapter_layers(G):
            keep = (torch.rand(layer.rank_mask.shape, generator=gen) < 0.5).float()
            layer.rank_mask.copy_(keep)
            layer.lora_E.mul_(keep.unsqueeze(-1))
    path = tmp_path / 'ada.safetensors'
    adapters.save(G, path)
    meta = adapters.read_metadata(path)
    assert meta['peft_type'] == 'ADALORA'
    pattern = meta['rank_pattern']
    loaded = copy.deepcopy(tiny_base)
    adapters.load(loaded, path)
    for name, layer in adapter_layers(loaded):
        kept = sum(pattern[f'{base_name(name)}.lora_E'])
        assert layer.rank == kept and layer.lora_A.shape[1] == kept  # only the kept ranks are built
    want = render(G, tiny_golden)
    # Same delta; only the summation order of the shorter rank dimension differs.
    torch.testing.assert_close(render(loaded, tiny_golden)['image'], want['image'], atol=1e-5, rtol=0)
    # Into a full-rank injected G (e.g. to continue training): kept triplets go back to their positions.
    full = copy.deepcopy(tiny_base)
    adapters.inject(full, adapters.get_config(G))
    adapters.load(full, path)
    for (_, a), (_, b) in zip(adapter_layers(full), adapter_layers(G)):
        assert torch.equal(a.rank_mask, b.rank_mask) and torch.equal(a.lora_E, b.lora_E)
    assert_renders_equal(render(full, tiny_golden), want)


def test_save_writes_json_config_round_trip():
    cfg = AdapterConfig(r=4, alpha=8.0, dropout=0.1, targets=['mapping', 'decoder'], extras='my3dgen',
                        conv_factorization='standard', adalora=True, init_r=6, target_r=2, tinit=5, tfinal=7,
                        delta_t=3, beta1=0.8, beta2=0.9, orth_reg_weight=0.1, total_step=100)
    assert AdapterConfig.from_json(cfg.to_json()) == cfg
    assert AdapterConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert cfg.targets == ('mapping', 'decoder')
    assert set(AdapterConfig.help()) == set(cfg.to_dict()) and all(AdapterConfig.help().values())
    with pytest.raises(ValueError, match='Unknown'):
        AdapterConfig.from_dict({'rank': 3})
    with pytest.raises(ValueError, match='extras'):
        AdapterConfig(extras='all')
