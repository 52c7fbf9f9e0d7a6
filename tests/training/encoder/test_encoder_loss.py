"""training/encoder/loss.py: the encoder's objective, the mirrored-image loss in particular."""
import numpy as np
import pytest
import torch

from encoder_testlib import NUM_WS, W_DIM, fake_render, tiny_encoder
from training.dataset import mirror_camera
from training.encoder import start_latent
from training.encoder.data import Batch, mirror_cameras, sample_cameras
from training.encoder.loss import EncoderLoss, LossWeights, converged_loss, latent_loss, mirrored_loss
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
    loss = mirrored_loss(encoder, fake_render, photo, c, w_start)
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
    assert float(mirrored_loss(perfect, symmetric_render, photo, c, start_latent(w_avg, 1)).detach().max()) < 1e-10
    wrong = RecordingEncoder(torch.zeros(1, NUM_WS, W_DIM))
    assert float(mirrored_loss(wrong, symmetric_render, photo, c, start_latent(w_avg, 1)).detach().max()) > 1e-4


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
    assert float(converged_loss(RecordingEncoder(torch.zeros(1, NUM_WS, W_DIM)), photo, c).max()) == 0


def test_converged_term_teaches_the_encoder_to_stop_at_the_photo():
    """A few Adam steps on the term shrink the residual an encoder adds when its render is already right."""
    encoder = tiny_encoder()
    photo, c = torch.rand(4, 3, 32, 32) * 2 - 1, torch.randn(4, 25)
    before = float(converged_loss(encoder, photo, c).mean())
    optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-2)
    for _ in range(20):
        optimizer.zero_grad()
        converged_loss(encoder, photo, c).mean().backward()
        optimizer.step()
    assert float(converged_loss(encoder, photo, c).mean()) < 0.1 * before


def test_encoder_loss_runs_every_iteration_and_reports_each_term():
    encoder = tiny_encoder()
    photo, c = torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(2, 25)
    batch = Batch(photo, c, torch.randn(2, NUM_WS, W_DIM), torch.tensor([True, False]))
    terms, states = EncoderLoss(LossWeights())(encoder, fake_render, batch, start_latent(torch.zeros(NUM_WS, W_DIM), 2),
                                               iters=3)
    assert set(terms) == {'image', 'latent', 'mirror', 'converged'}  # no LPIPS network, no face embedding
    assert len(states) == 4
    assert encoder.heads[0].linear.weight.grad.abs().sum() > 0


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
