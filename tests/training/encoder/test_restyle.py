"""training/encoder/restyle.py: ReStyle iterations (photo ++ current render -> residual added to the current W+)."""
import pytest
import torch

from encoder_testlib import NUM_WS, W_DIM, fake_render, tiny_encoder
from training.encoder import image_error, refine, refine_guarded, start_latent


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


def line_toy(step_factor: float, photos: int = 1):
    """A photo rendered from w_true, and an encoder that always proposes `step_factor` times the way from w_0 to
    w_true: along that line the error falls up to w_true and rises past it (the toy's render is monotone)."""
    torch.manual_seed(0)
    w_start = torch.zeros(photos, NUM_WS, W_DIM)
    w_true = torch.randn(photos, NUM_WS, W_DIM)
    c = torch.randn(photos, 25) * 0.1
    photo = fake_render(w_true, c)
    return RecordingEncoder(step_factor * (w_true - w_start)), photo, c, w_start


def errors(states, photo):
    return torch.stack([image_error(s.image, photo) for s in states])  # [iters + 1, N]


def test_guard_keeps_the_error_from_rising_where_the_raw_step_overshoots():
    encoder, photo, c, w_start = line_toy(step_factor=1.5)
    raw = errors(refine(encoder, fake_render, photo, c, w_start, iters=5), photo)[:, 0]
    assert (raw[1:] > raw[:-1]).any()                                 # the toy overshoots without the guard
    encoder.calls.clear()
    guarded = errors(refine_guarded(encoder, fake_render, photo, c, w_start, iters=5), photo)[:, 0]
    assert (guarded[1:] <= guarded[:-1]).all()
    assert guarded[-1] < 0.5 * guarded[0]                             # a halved step still helps
    assert guarded[-1] < raw[-1]
    assert len(encoder.calls) < 5                                     # a stalled photo stops asking the encoder


def test_guard_changes_nothing_while_every_raw_step_helps():
    encoder, photo, c, w_start = line_toy(step_factor=0.15)
    renders = []

    def counting_render(ws, cams):
        renders.append(ws)
        return fake_render(ws, cams)
    raw = refine(encoder, fake_render, photo, c, w_start, iters=5)
    guarded = refine_guarded(encoder, counting_render, photo, c, w_start, iters=5)
    for a, b in zip(raw, guarded):
        assert torch.equal(a.ws, b.ws) and torch.equal(a.image, b.image)
    assert len(renders) == 6                                          # no extra render: y_0 and y_1..y_5


def test_guard_treats_each_photo_of_a_batch_on_its_own():
    encoder = tiny_encoder().eval()
    torch.manual_seed(1)
    photo, c = torch.rand(3, 3, 32, 32) * 2 - 1, torch.randn(3, 25)
    w_start = torch.zeros(3, NUM_WS, W_DIM)
    batch = refine_guarded(encoder, fake_render, photo, c, w_start, iters=4)
    assert (errors(batch, photo).diff(dim=0) <= 0).all()
    for n in range(3):
        alone = refine_guarded(encoder, fake_render, photo[n:n + 1], c[n:n + 1], w_start[n:n + 1], iters=4)
        for a, b in zip(alone, batch):
            assert torch.allclose(a.ws[0], b.ws[n], atol=1e-5)


def test_guard_refuses_bad_settings():
    encoder, photo, c, w_start = line_toy(step_factor=1.0)
    with pytest.raises(ValueError, match='iters'):
        refine_guarded(encoder, fake_render, photo, c, w_start, iters=0)
    with pytest.raises(ValueError, match='max_halvings'):
        refine_guarded(encoder, fake_render, photo, c, w_start, iters=1, max_halvings=-1)
