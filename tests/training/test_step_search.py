"""The step search: the parabola's minimum, the rescaled step on a quadratic loss, its recipe field, and a
training run with it (the factor is recorded, and resume equals the uninterrupted run)."""
import dataclasses
import json

import pytest
import torch

from training import recipe as recipes
from training.step_search import quadratic_minimum, rescale_step, rescale_step_per_slot

SEARCH_RECIPE = recipes.Recipe('search', lr=0.02, betas=(0.9, 0.99), warmup=0.25, decay='cosine', final_lr=0.0,
                               b_lr_ratio=4.0, ema_half_life=0.05, ema_rampup=0.5, step_search=2.0)


@pytest.mark.parametrize('a, b, c', [(1.0, -2.0, 0.5), (0.3, 0.5, 2.0), (2.0, -0.1, 0.01)])
def test_on_a_parabola_the_minimum_is_exact_or_clamped(a, b, c):
    def loss(t):
        return c + b * t + a * t * t
    expected = min(max(-b / (2 * a), 0.0), 1.5)
    assert quadratic_minimum(loss(0), b, loss(1), max_factor=1.5) == pytest.approx(expected)


def test_without_curvature_it_goes_to_the_lower_end():
    assert quadratic_minimum(1.0, -1.0, 0.0, max_factor=3.0) == 3.0    # linear and falling: as far as allowed
    assert quadratic_minimum(1.0, -1.0, -0.5, max_factor=3.0) == 3.0   # concave and falling
    assert quadratic_minimum(1.0, 1.0, 2.0, max_factor=3.0) == 0.0     # rising: no step
    assert quadratic_minimum(1.0, 0.5, 1.2, max_factor=3.0) == 0.0     # concave, but uphill at the start


def test_rescaled_adam_step_lands_on_the_lines_minimum_of_a_quadratic_loss():
    torch.manual_seed(0)
    M, y = torch.randn(12, 5, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    p = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    optimizer = torch.optim.Adam([p], lr=0.3)

    def loss():
        return ((M @ p - y) ** 2).sum()
    for _ in range(3):
        optimizer.zero_grad()
        start_loss = loss()
        start_loss.backward()
        before, grads = [p.detach().clone()], [p.grad.clone()]
        optimizer.step()
        step = p.detach() - before[0]
        factor = rescale_step([p], before, grads, float(start_loss.detach()), lambda: float(loss()), max_factor=100.0)
        assert torch.allclose(p.detach(), before[0] + factor * step)
        with torch.no_grad():  # the loss's derivative along the step is zero where the parameters landed
            assert float(2 * (M @ p - y) @ (M @ step)) == pytest.approx(0.0, abs=1e-9)
        assert factor != pytest.approx(1.0)


def test_the_named_search_recipe_is_adapter_with_the_search_and_nothing_else():
    default = recipes.get_recipe('adapter')
    assert default.step_search is None
    assert recipes.get_recipe('adapter-search') == dataclasses.replace(default, name='adapter-search', step_search=2.0)


def test_the_recipe_field_is_checked_and_kept():
    assert recipes.Recipe.from_dict(SEARCH_RECIPE.to_dict()) == SEARCH_RECIPE
    base = dict(SEARCH_RECIPE.to_dict(), ema_half_life=None, ema_rampup=None, decay='constant')
    with pytest.raises(ValueError, match='step_search scales the step.*needs optimizer=adam'):
        recipes.Recipe.from_dict(dict(base, optimizer='schedulefree'))
    for bad in (0.0, -1.0, float('inf'), '2'):
        with pytest.raises(ValueError, match='step_search must be a number'):
            recipes.Recipe.from_dict(dict(SEARCH_RECIPE.to_dict(), step_search=bad))
    recorded = {k: v for k, v in SEARCH_RECIPE.to_dict().items() if k != 'step_search'}  # a state saved before it
    assert recipes.Recipe.from_dict(recorded).step_search is None


@pytest.fixture(scope='module')
def search_run(train_tiny, tmp_path_factory):
    run = tmp_path_factory.mktemp('search-run')
    return run, train_tiny(run, SEARCH_RECIPE.to_dict())


def test_a_run_records_the_factor_of_every_tick_within_its_bounds(search_run):
    run, _ = search_run
    factors = [json.loads(line).get('loss/step_factor') for line in open(run / 'stats.jsonl')]
    factors = [f for f in factors if f is not None]
    assert len(factors) == 4 and all(0 <= f <= 2.0 for f in factors)
    assert len(set(factors)) > 1  # chosen per step, not a constant


def test_resume_with_the_search_equals_the_uninterrupted_run(search_run, resume_halfway):
    run, _ = search_run
    resume_halfway(run, SEARCH_RECIPE.to_dict())


def _recording_start_losses(search, records: list):
    """`search` (rescale_step or rescale_step_per_slot) that first records (its loss function evaluated at the
    step's start, the loss it was given for the start)."""
    def recording(params, before, grads, loss_at_start, loss_after, max_factor):
        with torch.no_grad():
            stepped = [p.detach().clone() for p in params]
            for p, b in zip(params, before):
                p.copy_(b)
            again = loss_after()
            records.append((again.clone() if torch.is_tensor(again) else again,
                            loss_at_start.clone() if torch.is_tensor(loss_at_start) else loss_at_start))
            for p, s in zip(params, stepped):
                p.copy_(s)
        return search(params, before, grads, loss_at_start, loss_after, max_factor)
    return recording


ADALORA = dict(r=1, alpha=1.0, adalora=True, init_r=2, target_r=1, total_step=4, tinit=0, tfinal=0, delta_t=1)


@pytest.mark.parametrize('adapter_config', [dict(r=1, alpha=1.0), ADALORA], ids=['lora', 'adalora'])
def test_the_second_forward_pass_reproduces_the_steps_loss_at_the_start(train_tiny, tmp_path, monkeypatch,
                                                                        adapter_config):
    """Evaluated at the parameters the step started from, the search's loss is the step's own loss: the same
    images, rays and noise, and (AdaLoRA) the orthogonality term."""
    checked = []
    monkeypatch.setattr('training.step_search.rescale_step', _recording_start_losses(rescale_step, checked))
    train_tiny(tmp_path, SEARCH_RECIPE.to_dict(), adapter_config=adapter_config)
    assert len(checked) == 4
    for again, start in checked:
        assert again == pytest.approx(start, rel=1e-5)


def test_each_slot_lands_on_its_own_lines_minimum():
    """Two adapters in one tensor (slots along the first dimension), each with its own quadratic loss: the
    per-slot search puts each at the minimum of its own loss along its step, which one shared factor cannot."""
    torch.manual_seed(1)
    M = torch.randn(2, 12, 5, dtype=torch.float64) * torch.tensor([1.0, 3.0], dtype=torch.float64).reshape(2, 1, 1)
    y = torch.randn(2, 12, dtype=torch.float64)
    p = torch.nn.Parameter(torch.randn(2, 5, dtype=torch.float64))
    optimizer = torch.optim.Adam([p], lr=0.3)

    def losses():
        return ((torch.einsum('kij,kj->ki', M, p) - y) ** 2).sum(1)
    optimizer.zero_grad()
    start = losses()
    start.sum().backward()
    before, grads = [p.detach().clone()], [p.grad.clone()]
    optimizer.step()
    step = p.detach() - before[0]
    factors = rescale_step_per_slot([p], before, grads, start.detach(), lambda: losses().detach(), max_factor=100.0)
    assert torch.allclose(p.detach(), before[0] + factors.reshape(2, 1) * step)
    with torch.no_grad():  # each slot's loss has zero derivative along its own step where it landed
        residual = torch.einsum('kij,kj->ki', M, p) - y
        for k in range(2):
            assert float(2 * residual[k] @ (M[k] @ step[k])) == pytest.approx(0.0, abs=1e-9)
    assert abs(float(factors[0] - factors[1])) > 0.05


def test_with_two_identities_each_adapter_gets_its_own_search(tmp_path, tmp_path_factory, monkeypatch):
    """A two-identity run of the default recipe searches per identity: each identity's loss, evaluated again at
    the step's start, is the one its step began with, and the shared search is never used."""
    from training import synthetic_identity as si
    from training import training_loop as tl
    people = si.ensure_identity(str(tmp_path_factory.getbasetemp() / 'search-people-2'), count=2, views=4,
                                heldout=0, strength=0.3)
    calls = []
    monkeypatch.setattr('training.step_search.rescale_step_per_slot',
                        _recording_start_losses(rescale_step_per_slot, calls))
    monkeypatch.setattr('training.step_search.rescale_step', lambda *args: pytest.fail('shared search used'))
    tl.training_loop(run_dir=str(tmp_path), training_set_kwargs=dict(path=people.people), resume_pkl=people.base_pkl,
                     cfg='resume', neural_rendering_resolution=32, batch_size=4, batch_gpu=4, total_kimg=0.008,
                     kimg_per_tick=0.004, network_snapshot_ticks=1, device='cpu', grid_rows=0, progress_bar=False,
                     loss_kwargs=dict(lpips_net='none'), adapter_config=dict(r=1, alpha=1.0), val_views=0,
                     recipe=recipes.get_recipe(recipes.DEFAULT_RECIPE).to_dict())
    assert len(calls) == 4  # 8 images in steps of one image of each identity
    for again, start in calls:
        assert start.shape == (2,) and torch.allclose(again, start, rtol=1e-5, atol=0)
        assert float(start[0]) != pytest.approx(float(start[1]))  # two people, two losses
