"""training/encoder/files.py: encoder files (safetensors + config + base fingerprint)."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as serialize_safetensors

from encoder_testlib import NUM_WS, W_DIM, tiny_encoder
from training.encoder import EncoderFileError, load, save
from training.synthetic_identity import build_tiny_generator


@pytest.fixture(scope='module')
def generators():
    return build_tiny_generator(0), build_tiny_generator(1)


def test_save_load_round_trip(generators, tmp_path):
    G, _ = generators
    encoder, w_avg = tiny_encoder(seed=2), torch.randn(NUM_WS, W_DIM)
    path = tmp_path / 'encoder-000001.safetensors'
    save(str(path), encoder, w_avg, G, training={'iters': 4, 'cur_nimg': 1000})
    loaded, loaded_w_avg, info = load(str(path), G)
    assert loaded.config == encoder.config
    assert torch.equal(loaded_w_avg, w_avg) and info['iters'] == 4
    photo, c = torch.rand(1, 3, 32, 32), torch.randn(1, 25)
    assert torch.equal(loaded(photo, photo, c), encoder(photo, photo, c))
    assert not any(p.requires_grad for p in loaded.parameters())
    assert not list(tmp_path.glob('*.tmp*'))  # written through a temp file, then renamed


def test_the_confidence_head_round_trips(generators, tmp_path):
    G, _ = generators
    encoder = tiny_encoder(seed=3, confidence_channels=8)
    with torch.no_grad():
        encoder.confidence.convs[-1].weight.normal_(0, 0.1)  # a trained head: not the zero start
    path = tmp_path / 'encoder.safetensors'
    save(str(path), encoder, torch.randn(NUM_WS, W_DIM), G)
    loaded, _, _ = load(str(path), G)
    assert loaded.config == encoder.config and loaded.config.confidence_channels == 8
    photo, c = torch.rand(1, 3, 32, 32), torch.randn(1, 25)
    loaded_outputs = loaded.forward_with_confidence(photo, photo, c)
    for got, want in zip(loaded_outputs, encoder.forward_with_confidence(photo, photo, c)):
        assert torch.equal(got, want)


def test_a_file_written_before_the_confidence_head_loads_without_it(generators, tmp_path):
    """Files from before the head have no `confidence_channels` in their config and no head tensors."""
    G, _ = generators
    encoder = tiny_encoder(seed=4)
    new = tmp_path / 'new.safetensors'
    save(str(new), encoder, torch.randn(NUM_WS, W_DIM), G)
    with safe_open(str(new), framework='pt') as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(metadata['encoder_config'])
    del config['confidence_channels']
    metadata['encoder_config'] = json.dumps(config, sort_keys=True)
    assert not any('confidence' in key for key in tensors)
    old = tmp_path / 'old.safetensors'
    old.write_bytes(serialize_safetensors(tensors, metadata=metadata))
    loaded, _, _ = load(str(old), G)
    assert loaded.confidence is None and loaded.config.confidence_channels == 0
    photo, c = torch.rand(1, 3, 32, 32), torch.randn(1, 25)
    assert torch.equal(loaded(photo, photo, c), encoder(photo, photo, c))


def test_a_different_base_is_refused(generators, tmp_path):
    G, other = generators
    path = tmp_path / 'encoder.safetensors'
    save(str(path), tiny_encoder(), torch.zeros(NUM_WS, W_DIM), G)
    with pytest.raises(EncoderFileError, match='trained on a different generator') as err:
        load(str(path), other)
    assert str(path) in str(err.value)


def test_a_file_that_is_not_an_encoder_is_named(tmp_path):
    path = tmp_path / 'notes.safetensors'
    path.write_bytes(b'not safetensors')
    with pytest.raises(EncoderFileError, match='notes.safetensors'):
        load(str(path), build_tiny_generator(0))
