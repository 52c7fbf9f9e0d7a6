"""training/encoder/replay.py: the replay buffer of ReStyle states, with each photo's converged example."""
import torch

from encoder_testlib import NUM_WS, W_DIM, fake_render, tiny_encoder
from training.encoder.replay import ReplayBuffer, draws_per_example
from training.encoder.restyle import Iteration


def states_of(ws_list, c):
    return [Iteration(ws=ws, image=fake_render(ws, c)) for ws in ws_list]


def test_add_keeps_every_iteration_input_and_the_converged_example_of_known_rows():
    c = torch.randn(3, 25)
    photos = torch.rand(3, 3, 32, 32) * 2 - 1
    targets = torch.randn(3, NUM_WS, W_DIM)
    known = torch.tensor([True, False, True])
    states = states_of([torch.randn(3, NUM_WS, W_DIM) for _ in range(4)], c)  # start + 3 iterations
    buffer = ReplayBuffer(capacity=100, input_resolution=32)
    buffer.add(photos, c, states, targets, known)
    assert len(buffer) == 2 * 4  # 3 iteration inputs (states 0..2) + 1 converged example, for 2 known rows
    for k, state in enumerate(states[:3]):
        rows = slice(2 * k, 2 * k + 2)
        assert torch.equal(buffer.data['ws'][rows], state.ws[known])
        assert torch.allclose(buffer.data['inputs'][rows, 3:].float(), state.image[known], atol=1e-2)
    converged = buffer.data['inputs'][6:].float()
    assert torch.equal(converged[:, :3], converged[:, 3:])
    assert torch.allclose(converged[:, :3], photos[known], atol=1e-2)
    assert torch.equal(buffer.data['ws'][6:], targets[known])
    assert torch.equal(buffer.data['targets'], targets[known].repeat(4, 1, 1))


def test_capacity_keeps_the_latest_examples():
    c = torch.randn(1, 25)
    buffer = ReplayBuffer(capacity=3, input_resolution=32)
    for value in range(3):
        targets = torch.full((1, NUM_WS, W_DIM), float(value))
        buffer.add(torch.zeros(1, 3, 32, 32), c, states_of([torch.zeros(1, NUM_WS, W_DIM)] * 3, c), targets,
                   torch.tensor([True]))
    assert len(buffer) == 3
    assert torch.equal(buffer.data['targets'][:, 0, 0], torch.tensor([2.0, 2.0, 2.0]))


def test_update_trains_the_latent_residual_of_stored_examples():
    c = torch.randn(2, 25)
    photos = torch.rand(2, 3, 32, 32) * 2 - 1
    targets = torch.randn(2, NUM_WS, W_DIM) * 0.1
    buffer = ReplayBuffer(capacity=100, input_resolution=32)
    buffer.add(photos, c, states_of([torch.zeros(2, NUM_WS, W_DIM)] * 2, c), targets, torch.tensor([True, True]))
    encoder = tiny_encoder()
    optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-2)
    losses = []
    for step in range(15):
        optimizer.zero_grad()
        loss = buffer.update(encoder, 4, seed=step, device=torch.device('cpu'))
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


class DrawCounter(torch.nn.Module):
    """A stand-in encoder that predicts no residual and counts the examples it is shown, by the id each example
    carries in its camera's first entry."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.draws = {}

    def forward(self, photo, reconstruction, c):
        for example in c[:, 0].tolist():
            self.draws[int(example)] = self.draws.get(int(example), 0) + 1
        return self.anchor * torch.zeros(len(c), NUM_WS, W_DIM)


def test_draws_per_example_is_what_a_full_buffer_draws():
    iters, replay, photos_per_step = 2, 6, 2
    buffer = ReplayBuffer(capacity=30, input_resolution=8)
    counter, next_id, dropped = DrawCounter(), 0, []
    for step in range(200):
        ids = torch.arange(next_id, next_id + photos_per_step, dtype=torch.float32)
        next_id += photos_per_step
        c = torch.zeros(photos_per_step, 25)
        c[:, 0] = ids  # every example of this photo (its iterations and its converged one) carries the photo's id
        before = set(buffer.data['cameras'][:, 0].tolist()) if len(buffer) else set()
        buffer.add(torch.zeros(photos_per_step, 3, 8, 8), c, states_of([torch.zeros(photos_per_step, NUM_WS, W_DIM)]
                   * (iters + 1), c), torch.zeros(photos_per_step, NUM_WS, W_DIM), torch.ones(photos_per_step, dtype=bool))
        dropped += [int(i) for i in before - set(buffer.data['cameras'][:, 0].tolist())]
        for r in range(replay):
            buffer.update(counter, photos_per_step, seed=step * replay + r, device=torch.device('cpu'))
    late = [i for i in dropped if i >= 40]  # photos added once the buffer was full, and dropped since
    per_example = sum(counter.draws.get(i, 0) for i in late) / (len(late) * (iters + 1))
    assert len(late) > 300
    assert abs(per_example - draws_per_example(replay, iters)) < 0.1 * draws_per_example(replay, iters)
