"""training/encoder/restyle.py: ReStyle iterations (photo ++ current render -> residual added to the current W+)."""
import torch

from encoder_testlib import NUM_WS, W_DIM, fake_render, tiny_encoder
from training.encoder import refine, start_latent


class RecordingEncoder(torch.nn.Module):
    """Returns a fixed residual and records what it was given."""

    def __init__(self, residual: torch.Tensor):
        super().__init__()
        self.residual = residual
        self.calls = []

    def forward(self, photo, reconstruction, c):
        self.calls.append((photo.clone(), reconstruction.clone(), c.clone()))
        return self.residual.expand(photo.shape[0], -1, -1)


def test_first_iteration_starts_at_w_avg_and_residuals_accumulate():
    w_avg = torch.randn(NUM_WS, W_DIM)
    residual = torch.randn(1, NUM_WS, W_DIM) * 0.1
    encoder = RecordingEncoder(residual)
    photo, c = torch.rand(2, 3, 32, 32), torch.randn(2, 25)
    states = refine(encoder, fake_render, photo, c, start_latent(w_avg, 2), iters=3)
    assert len(states) == 4
    assert torch.equal(states[0].ws, w_avg.expand(2, -1, -1))
    assert torch.equal(encoder.calls[0][1], fake_render(w_avg.expand(2, -1, -1), c))  # y_0 = G(w_avg, c)
    for i in range(1, 4):
        assert torch.allclose(states[i].ws, w_avg + i * residual, atol=1e-6)
        assert torch.equal(encoder.calls[i - 1][0], photo)
        assert torch.equal(encoder.calls[i - 1][2], c)
    assert torch.allclose(encoder.calls[2][1], fake_render(states[2].ws, c))  # y_{i-1} feeds iteration i


def test_start_can_be_a_given_latent():
    w_avg, w_init = torch.zeros(NUM_WS, W_DIM), torch.randn(1, NUM_WS, W_DIM)
    states = refine(RecordingEncoder(torch.zeros(1, NUM_WS, W_DIM)), fake_render, torch.rand(1, 3, 32, 32),
                    torch.randn(1, 25), start_latent(w_avg, 1, w_init), iters=1)
    assert torch.equal(states[0].ws, w_init) and torch.equal(states[1].ws, w_init)


def test_each_iteration_backpropagates_only_into_its_own_residual():
    encoder = tiny_encoder()
    photo, c = torch.rand(1, 3, 32, 32), torch.randn(1, 25)
    seen = []

    def on_iteration(i, it):
        seen.append(it.ws.requires_grad)
        it.image.square().mean().backward()

    refine(encoder, fake_render, photo, c, start_latent(torch.zeros(NUM_WS, W_DIM), 1), iters=2,
           on_iteration=on_iteration)
    assert seen == [True, True]
    assert encoder.heads[0].linear.weight.grad is not None


def test_last_render_can_be_skipped():
    renders = []

    def counting_render(ws, c):
        renders.append(ws.detach().clone())
        return fake_render(ws, c)
    encoder = RecordingEncoder(torch.randn(1, NUM_WS, W_DIM) * 0.1)
    states = refine(encoder, counting_render, torch.rand(1, 3, 32, 32), torch.randn(1, 25),
                    start_latent(torch.zeros(NUM_WS, W_DIM), 1), iters=3, render_last=False)
    assert len(renders) == 3  # y_0, y_1, y_2: the inputs of iterations 1..3
    assert states[3].image is None and states[2].image is not None
    assert torch.equal(renders[-1], states[2].ws)
