"""training/encoder/files.py: encoder files (safetensors + config + base fingerprint)."""
import pytest
import torch

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
