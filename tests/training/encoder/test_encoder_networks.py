"""training/encoder/networks.py: the camera-aware W+ encoder."""
import pytest
import torch

from encoder_testlib import NUM_WS, W_DIM, tiny_config, tiny_encoder
from training.encoder import EncoderConfig, W3DEncoder
from training.encoder.data import sample_cameras
from training.synthetic_identity import build_tiny_generator


@pytest.fixture(scope='module')
def cameras():
    return sample_cameras(build_tiny_generator(0), 2, seed=3)


def test_output_is_one_residual_per_w_plus_layer(cameras):
    encoder = tiny_encoder()
    photo = torch.rand(1, 3, 128, 128) * 2 - 1
    out = encoder(photo, torch.zeros_like(photo), cameras[:1])
    assert out.shape == (1, NUM_WS, W_DIM)
    assert len(encoder.heads) == NUM_WS
    assert all(isinstance(head.convs[0], torch.nn.Conv2d) and head.convs[0].kernel_size == (1, 1)
               for head in encoder.heads)  # the extra 1x1 convolution of each map2style head


def test_camera_changes_the_output(cameras):
    encoder = tiny_encoder()
    photo = torch.rand(1, 3, 64, 64) * 2 - 1
    a = encoder(photo, photo, cameras[:1])
    b = encoder(photo, photo, cameras[1:2])
    assert not torch.allclose(a, b)
    assert torch.equal(a, encoder(photo, photo, cameras[:1]))


def test_reconstruction_input_changes_the_output(cameras):
    encoder = tiny_encoder()
    photo = torch.rand(1, 3, 32, 32) * 2 - 1
    assert not torch.allclose(encoder(photo, photo, cameras[:1]), encoder(photo, -photo, cameras[:1]))


def test_untrained_encoder_adds_nothing(cameras):
    encoder = W3DEncoder(tiny_config())
    photo = torch.rand(2, 3, 32, 32)
    assert torch.count_nonzero(encoder(photo, photo, cameras)) == 0


def test_presets_and_config_round_trip():
    small = EncoderConfig.for_generator(14, 512, 128)
    ffhq = EncoderConfig.for_generator(14, 512, 512)
    assert small.input_resolution == 64 and ffhq.input_resolution == 256
    assert small.confidence_channels > 0 and ffhq.confidence_channels > 0  # new encoders train with the map
    assert EncoderConfig.from_json(ffhq.to_json()) == ffhq
    with pytest.raises(ValueError, match='power of two'):
        EncoderConfig(input_resolution=100)
    with pytest.raises(ValueError, match='confidence_channels'):
        EncoderConfig(confidence_channels=-1)


def test_confidence_head_predicts_a_positive_sigma_per_fine_map_pixel(cameras):
    encoder = tiny_encoder(confidence_channels=8)
    photo = torch.rand(2, 3, 64, 64) * 2 - 1
    residual, sigma = encoder.forward_with_confidence(photo, torch.zeros_like(photo), cameras)
    assert torch.equal(residual, encoder(photo, torch.zeros_like(photo), cameras))
    assert sigma.shape == (2, 1, 32 // 4, 32 // 4)  # the fine map of the 32 px input
    assert bool((sigma > 0).all())
    assert torch.allclose(sigma, sigma.flatten()[0])  # untrained: one sigma everywhere, so equal weights
    with torch.no_grad():
        encoder.confidence.convs[-1].bias.fill_(-1e4)  # far below any error: sigma stays positive
    assert bool((encoder.forward_with_confidence(photo, photo, cameras)[1] > 0).all())


def test_inference_never_runs_the_confidence_head(cameras):
    encoder = tiny_encoder(confidence_channels=8)
    calls = []
    encoder.confidence.register_forward_hook(lambda module, inputs, output: calls.append(1))
    photo = torch.rand(1, 3, 32, 32)
    encoder(photo, photo, cameras[:1])
    assert calls == []
    with pytest.raises(ValueError, match='no confidence head'):
        tiny_encoder().forward_with_confidence(photo, photo, cameras[:1])
