"""training/encoder/loss.py: the encoder's objective, the mirrored-image loss in particular."""
import numpy as np
import pytest
import torch

from encoder_testlib import NUM_WS, W_DIM, fake_render, tiny_encoder
from training.dataset import mirror_camera
from training.encoder import start_latent
from training.encoder.data import Batch, mirror_cameras, sample_cameras
from training.encoder.loss import (EncoderLoss, LossWeights, confidence_weighted_error, converged_loss, latent_loss,
                                   mirrored_loss)
from training.synthetic_identity import build_tiny_generator


class RecordingEncoder(torch.nn.Module):
    def __init__(self, residual: torch.Tensor):
        super().__init__()
        self.residual = torch.nn.Parameter(residual)
        self.calls = []

    def forward(self, photo, reconstruction, c):
        self.calls.append((photo.clone(), reconstruction.clone(), c.clone()))
        return self.residual.expand(photo.shape[0], -1, -1)


def test_mirror_cameras_match_the_dataset_mirroring():
    c = sample_cameras(build_tiny_generator(0), 3, seed=5)
    expected = np.stack([mirror_camera(row) for row in c.numpy()])
    assert np.allclose(mirror_cameras(c).numpy(), expected, atol=1e-6)
    assert torch.allclose(mirror_cameras(mirror_cameras(c)), c)


def test_mirrored_loss_inverts_the_flipped_photo_with_the_mirrored_camera():
    w_avg = torch.randn(NUM_WS, W_DIM) * 0.1
    residual = torch.randn(1, NUM_WS, W_DIM) * 0.1
    encoder = RecordingEncoder(residual.clone())
    photo = torch.rand(2, 3, 32, 32) * 2 - 1
    c = torch.randn(2, 25)
    w_start = start_latent(w_avg, 2)
    terms = mirrored_loss(encoder, fake_render, photo, c, w_start)
    assert set(terms) == {'mirror'}  # no confidence head: the plain mean squared error
    loss = terms['mirror']
    (given_photo, given_recon, given_c), = encoder.calls
    assert torch.equal(given_photo, photo.flip(3))
    assert torch.allclose(given_c, mirror_cameras(c))
    assert torch.allclose(given_recon, fake_render(w_start, mirror_cameras(c)))
    expected = (fake_render(w_start + residual, mirror_cameras(c)).flip(3) - photo).square().mean(dim=[1, 2, 3])
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.mean().backward()
    assert encoder.residual.grad is not None and encoder.residual.grad.abs().sum() > 0


def test_mirrored_loss_is_zero_for_a_perfect_inversion_of_a_symmetric_scene():
    """A renderer that mirrors with the camera: the exact latent of the photo inverts its mirror too."""
    def symmetric_render(ws, c):
        image = fake_render(ws, c.abs())
        return image.flip(3) if bool((c[:, 1] < 0).all()) else image
    c = torch.ones(1, 25)  # entry 1 positive; its mirror has entry 1 negative
    w_true = torch.randn(1, NUM_WS, W_DIM)
    photo = symmetric_render(w_true, c)
    w_avg = torch.zeros(NUM_WS, W_DIM)
    perfect = RecordingEncoder((w_true - w_avg).clone())
    w_start = start_latent(w_avg, 1)
    assert float(mirrored_loss(perfect, symmetric_render, photo, c, w_start)['mirror'].detach().max()) < 1e-10
    wrong = RecordingEncoder(torch.zeros(1, NUM_WS, W_DIM))
    assert float(mirrored_loss(wrong, symmetric_render, photo, c, w_start)['mirror'].detach().max()) > 1e-4


class ConfidenceEncoder(RecordingEncoder):
    """A RecordingEncoder with a confidence head that predicts a fixed sigma map (in the mirrored frame)."""

    def __init__(self, residual: torch.Tensor, sigma: torch.Tensor):
        super().__init__(residual)
        self.confidence = torch.nn.Identity()
        self.sigma = torch.nn.Parameter(sigma)

    def forward_with_confidence(self, photo, reconstruction, c):
        return self.forward(photo, reconstruction, c), self.sigma.expand(photo.shape[0], -1, -1, -1)


def test_confidence_weighted_error_is_the_formula_on_a_hand_made_case():
    error = torch.tensor([[[0.04, 0.01], [0.00, 0.09]]])
    sigma = torch.tensor([[[0.02, 0.01], [0.50, 0.10]]], requires_grad=True)
    weighted, nll = confidence_weighted_error(error, sigma)
    # weights 1/sigma = 50, 100, 2, 10 (sum 162); e/sigma = 2, 1, 0, 0.9 (sum 3.9)
    assert float(weighted) == pytest.approx(3.9 / 162, rel=1e-6)
    log_sigma_sum = np.log(0.02) + np.log(0.01) + np.log(0.5) + np.log(0.1)
    assert float(nll.detach()) == pytest.approx((3.9 + log_sigma_sum) / 4, rel=1e-6)
    assert float(confidence_weighted_error(error, torch.full_like(error, 0.3))[0]) == pytest.approx(0.035)  # plain mean
    assert not weighted.requires_grad  # the weights are detached: the weighted error trains the encoder only
    nll.backward()
    at_the_error = torch.tensor([[[0.04, 0.01]]], requires_grad=True)
    confidence_weighted_error(torch.tensor([[[0.04, 0.01]]]), at_the_error)[1].backward()
    assert float(at_the_error.grad.abs().max()) < 1e-4  # the NLL is lowest at sigma = e


def test_mirrored_loss_with_a_confidence_map_weights_each_pixel_by_its_sigma_flipped_back():
    w_avg, residual = torch.randn(NUM_WS, W_DIM) * 0.1, torch.randn(1, NUM_WS, W_DIM) * 0.1
    photo, c = torch.rand(1, 3, 32, 32) * 2 - 1, torch.randn(1, 25)
    sigma_mirrored = torch.rand(1, 1, 32, 32) + 0.01  # at the render's resolution: no resampling
    terms = mirrored_loss(ConfidenceEncoder(residual, sigma_mirrored), fake_render, photo, c, start_latent(w_avg, 1))
    assert set(terms) == {'mirror', 'confidence'}
    error = (fake_render(w_avg + residual, mirror_cameras(c)).flip(3) - photo).square().mean(dim=1)
    sigma = sigma_mirrored.flip(3)[:, 0]
    assert torch.allclose(terms['mirror'], (error / sigma).sum() / (1 / sigma).sum(), rtol=1e-5)
    assert torch.allclose(terms['confidence'], (error / sigma + sigma.log()).mean(), rtol=1e-5)


def test_confidence_head_gives_a_low_weight_where_the_mirror_does_not_fit():
    """A photo that is symmetric but for one patch: after a few Adam steps on the mirrored terms, the patch's
    pixels (large mirror error) weigh less than the rest (the head started with equal weights)."""
    encoder = tiny_encoder(confidence_channels=8)
    w_start = start_latent(torch.zeros(NUM_WS, W_DIM), 2)
    c = torch.randn(2, 25)
    photo = fake_render(w_start, c).detach().clone()  # fake_render is left-right symmetric
    photo[:, :, 8:24, 0:10] = 1.0  # a patch on the left only
    patch = torch.zeros(32, 32, dtype=torch.bool)
    patch[8:24, 0:10] = True

    def weights():
        _, sigma = encoder.forward_with_confidence(photo.flip(3), fake_render(w_start, mirror_cameras(c)),
                                                   mirror_cameras(c))
        sigma = torch.nn.functional.interpolate(sigma.flip(3), size=(32, 32), mode='bilinear', align_corners=False)
        return 1 / sigma[:, 0].detach()
    assert torch.allclose(weights()[:, patch].mean(), weights()[:, ~patch].mean())
    optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-2)
    for _ in range(30):
        optimizer.zero_grad()
        terms = mirrored_loss(encoder, fake_render, photo, c, w_start)
        (terms['mirror'] + terms['confidence']).mean().backward()
        optimizer.step()
    w = weights()
    assert float(w[:, patch].mean()) < 0.5 * float(w[:, ~patch].mean())


def test_latent_loss_only_where_the_latent_is_known():
    ws, target = torch.randn(3, NUM_WS, W_DIM), torch.randn(3, NUM_WS, W_DIM)
    loss = latent_loss(ws, target, torch.tensor([True, False, True]))
    assert loss[1] == 0 and loss[0] > 0
    assert torch.allclose(loss[2], (ws[2] - target[2]).square().mean())


def test_converged_loss_is_the_residual_predicted_when_the_render_is_the_photo():
    photo, c = torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(2, 25)
    residual = torch.randn(1, NUM_WS, W_DIM)
    encoder = RecordingEncoder(residual)
    loss = converged_loss(encoder, photo, c)
    assert torch.allclose(loss, residual.square().mean().expand(2))
    given_photo, given_render, given_c = encoder.calls[0]
    assert torch.equal(given_photo, photo) and torch.equal(given_render, photo) and torch.equal(given_c, c)
    assert float(converged_loss(RecordingEncoder(torch.zeros(1, NUM_WS, W_DIM)), photo, c).detach().max()) == 0


def test_converged_term_teaches_the_encoder_to_stop_at_the_photo():
    """A few Adam steps on the term shrink the residual an encoder adds when its render is already right."""
    encoder = tiny_encoder()
    photo, c = torch.rand(4, 3, 32, 32) * 2 - 1, torch.randn(4, 25)
    before = float(converged_loss(encoder, photo, c).detach().mean())
    optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-2)
    for _ in range(20):
        optimizer.zero_grad()
        converged_loss(encoder, photo, c).mean().backward()
        optimizer.step()
    assert float(converged_loss(encoder, photo, c).detach().mean()) < 0.1 * before


def test_encoder_loss_runs_every_iteration_and_reports_each_term():
    encoder = tiny_encoder()
    photo, c = torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(2, 25)
    batch = Batch(photo, c, torch.randn(2, NUM_WS, W_DIM), torch.tensor([True, False]))
    terms, states = EncoderLoss(LossWeights())(encoder, fake_render, batch, start_latent(torch.zeros(NUM_WS, W_DIM), 2),
                                               iters=3)
    assert set(terms) == {'image', 'latent', 'mirror', 'converged'}  # no LPIPS network, no face embedding
    assert len(states) == 4
    assert encoder.heads[0].linear.weight.grad.abs().sum() > 0
    with_head = tiny_encoder(confidence_channels=8)
    terms, _ = EncoderLoss(LossWeights())(with_head, fake_render, batch, start_latent(torch.zeros(NUM_WS, W_DIM), 2),
                                          iters=3)
    assert set(terms) == {'image', 'latent', 'mirror', 'confidence', 'converged'}
    assert with_head.confidence.convs[-1].bias.grad.abs().sum() > 0


def test_latent_only_training_leaves_the_last_iteration_unrendered():
    """Without an image term to train, nothing reads the last render: one generator pass per photo is saved,
    and the logged image error is that of the iterations that were rendered."""
    renders = []

    def counting_render(ws, c):
        renders.append(torch.is_grad_enabled())
        return fake_render(ws, c)
    encoder = tiny_encoder()
    photo, c = torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(2, 25)
    batch = Batch(photo, c, torch.randn(2, NUM_WS, W_DIM), torch.tensor([True, True]))
    weights = LossWeights(image=0, lpips=0, id=0, latent=1, mirror=0)
    terms, states = EncoderLoss(weights)(encoder, counting_render, batch, start_latent(torch.zeros(NUM_WS, W_DIM), 2),
                                         iters=3)
    assert renders == [False, False, False]  # y_0, y_1, y_2; no graph through the generator
    assert states[3].image is None
    expected = np.mean([float((s.image - photo).square().mean()) for s in states[1:3]])
    assert terms['image'] == pytest.approx(expected, rel=1e-5)
    assert encoder.heads[0].linear.weight.grad.abs().sum() > 0
