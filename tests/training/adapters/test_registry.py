"""AdapterRegistry: identities loaded into and evicted from the slots of one base, by name."""
import copy

import pytest
import torch

from adapter_testlib import randomize_adapters, render
from training import adapters
from training.adapters import AdapterConfig, AdapterRegistry


@pytest.fixture(scope='module')
def adapter_files(tiny_base, tmp_path_factory):
    """Three identities' adapter files (random adapters of one tiny base) and each one's render alone."""
    folder = tmp_path_factory.mktemp('registry')
    G = copy.deepcopy(tiny_base)
    adapters.inject(G, AdapterConfig(r=1, targets=('synthesis', 'superresolution', 'decoder')), num_adapters=3)
    randomize_adapters(G, std=0.05, seed=4)
    paths = {}
    for k, name in enumerate(['ann', 'ben', 'cat']):
        paths[name] = folder / f'{name}.safetensors'
        adapters.save(G, paths[name], index=k)
    return paths


def _alone(tiny_base, path, golden):
    G = adapters.load(copy.deepcopy(tiny_base), path)
    return render(G, golden)['image']


def test_mixed_batch_renders_each_identity_as_alone(tiny_base, tiny_golden, adapter_files):
    registry = AdapterRegistry(copy.deepcopy(tiny_base), capacity=2)
    registry.load('ann', adapter_files['ann'])
    registry.load('ben', adapter_files['ben'])
    registry.select(['ben', 'ann'])
    mixed = render(registry.G, tiny_golden)['image']
    torch.testing.assert_close(mixed[0], _alone(tiny_base, adapter_files['ben'], tiny_golden)[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1], _alone(tiny_base, adapter_files['ann'], tiny_golden)[1], atol=1e-5, rtol=0)


def test_least_recently_used_identity_is_evicted(tiny_base, tiny_golden, adapter_files):
    registry = AdapterRegistry(copy.deepcopy(tiny_base), capacity=2)
    slot_ann = registry.load('ann', adapter_files['ann'])
    slot_ben = registry.load('ben', adapter_files['ben'])
    registry.select(['ann'] * 2)  # ann is now the most recently used
    assert registry.load('cat', adapter_files['cat']) == slot_ben
    assert registry.names == ['ann', 'cat'] and 'ben' not in registry and len(registry) == 2
    assert registry.slot('ann') == slot_ann
    with pytest.raises(KeyError, match="'ben' is not loaded"):
        registry.select(['ben', 'ann'])
    registry.select(['cat', 'cat'])
    torch.testing.assert_close(render(registry.G, tiny_golden)['image'], _alone(tiny_base, adapter_files['cat'], tiny_golden),
                               atol=1e-5, rtol=0)


def test_evicted_slot_renders_the_base(tiny_base, tiny_golden, adapter_files):
    registry = AdapterRegistry(copy.deepcopy(tiny_base), capacity=2)
    registry.load('ann', adapter_files['ann'])
    registry.load('ben', adapter_files['ben'])
    slot = registry.slot('ben')
    registry.evict('ben')
    assert registry.names == ['ann']
    adapters.select(registry.G, slot)
    assert torch.equal(render(registry.G, tiny_golden)['image'], render(tiny_base, tiny_golden)['image'])
    assert registry.load('cat', adapter_files['cat']) == slot  # the free slot is reused, nobody is evicted
    assert registry.names == ['ann', 'cat']


def test_failed_load_names_the_file_and_keeps_the_others(tiny_base, tiny_golden, adapter_files, tmp_path):
    other = copy.deepcopy(tiny_base)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    adapters.inject(other, AdapterConfig(r=1, targets=('synthesis', 'superresolution', 'decoder')))
    foreign = tmp_path / 'foreign.safetensors'
    adapters.save(other, foreign)
    registry = AdapterRegistry(copy.deepcopy(tiny_base), capacity=2)
    registry.load('ann', adapter_files['ann'])
    with pytest.raises(ValueError, match='foreign.safetensors'):
        registry.load('dan', foreign)
    assert registry.names == ['ann']
    registry.select(['ann', 'ann'])
    torch.testing.assert_close(render(registry.G, tiny_golden)['image'], _alone(tiny_base, adapter_files['ann'], tiny_golden),
                               atol=1e-5, rtol=0)


def test_capacity_must_match_an_injected_generator(tiny_base):
    G = adapters.inject(copy.deepcopy(tiny_base), AdapterConfig(r=1), num_adapters=3)
    with pytest.raises(ValueError, match='3 adapter slots'):
        AdapterRegistry(G, capacity=2)
    assert AdapterRegistry(G, capacity=3).capacity == 3


def test_swaps_never_hash_the_base_again(tiny_base, adapter_files, count_hashes):
    registry = AdapterRegistry(copy.deepcopy(tiny_base), capacity=2)
    for name in ['ann', 'ben', 'cat', 'ann', 'ben', 'cat']:  # every load after the second evicts
        registry.load(name, adapter_files[name])
    assert len(count_hashes) == 1


def test_swapping_adapters_keeps_no_memory(tiny_base, adapter_files):
    """Python-level allocations stay flat over 60 swaps (safetensors' get_tensor kept ~5 KB per file read)."""
    import gc
    import tracemalloc
    registry = AdapterRegistry(copy.deepcopy(tiny_base), capacity=2)
    names = ['ann', 'ben', 'cat'] * 20
    for name in names[:6]:  # warm-up: injection, the fingerprint, allocator caches
        registry.load(name, adapter_files[name])
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for name in names:
            registry.load(name, adapter_files[name])
        gc.collect()
        growth = sum(stat.size_diff for stat in tracemalloc.take_snapshot().compare_to(before, 'filename'))
    finally:
        tracemalloc.stop()
    assert growth < 64 * 1024, f'{growth} bytes kept after {len(names)} swaps'
