"""Schedule-free Adam: the paper's update on a toy problem, the average swap, the state, and a run with it."""
import copy
import math

import pytest
import torch

import legacy
from training import adapters
from training import recipe as recipes
from training.schedule_free import ScheduleFreeAdam

SF_RECIPE = recipes.Recipe('sf', lr=0.03, betas=(0.9, 0.99), warmup=0.25, b_lr_ratio=4.0, optimizer='schedulefree')


def _paper_trajectory(w0, target, rates, beta1, beta2, eps):
    """Algorithm 1 of "The Road Less Scheduled" (no weight decay) on f(w) = sum (w - target)^2 / 2, in plain
    floats, one coordinate at a time: returns the (y, x) after each step."""
    z, x, v = list(w0), list(w0), [0.0] * len(w0)
    weight_sum, out = 0.0, []
    for t, lr in enumerate(rates, start=1):
        y = [(1 - beta1) * zi + beta1 * xi for zi, xi in zip(z, x)]
        g = [yi - ti for yi, ti in zip(y, target)]
        v = [beta2 * vi + (1 - beta2) * gi * gi for vi, gi in zip(v, g)]
        gamma = lr * math.sqrt(1 - beta2 ** t)
        z = [zi - gamma * gi / (math.sqrt(vi) + eps) for zi, gi, vi in zip(z, g, v)]
        weight_sum += gamma ** 2
        c = gamma ** 2 / weight_sum
        x = [(1 - c) * xi + c * zi for xi, zi in zip(x, z)]
        out.append(([(1 - beta1) * zi + beta1 * xi for zi, xi in zip(z, x)], x))
    return out


def _toy_steps(optimizer, w, target, rates):
    ys, xs = [], []
    for lr in rates:
        optimizer.param_groups[0]['lr'] = lr
        optimizer.zero_grad()
        (0.5 * (w - target).square().sum()).backward()
        optimizer.step()
        ys.append(w.detach().clone())
        with optimizer.averaged():
            xs.append(w.detach().clone())
    return ys, xs


def test_first_step_is_a_sign_step_of_the_rate_and_the_average_jumps_to_it():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    optimizer = ScheduleFreeAdam([w], lr=0.1, betas=(0.9, 0.99), eps=0.0)
    (0.5 * w.square().sum()).backward()  # gradient (1, -2)
    optimizer.step()
    # v_1 = 0.01 g^2, gamma_1 = 0.1 sqrt(0.01): z moves by 0.1 against the gradient's sign; c_2 = 1, so x = y = z.
    assert w.detach().tolist() == pytest.approx([0.9, -1.9])
    with optimizer.averaged():
        assert w.detach().tolist() == pytest.approx([0.9, -1.9])


def test_matches_the_papers_update_with_a_warm_up():
    w0, target, rates = [1.0, -2.0, 0.5], [0.3, 0.1, -0.4], [0.02, 0.04, 0.06, 0.06, 0.06, 0.06]
    w = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    optimizer = ScheduleFreeAdam([w], lr=rates[0], betas=(0.9, 0.95), eps=1e-8)
    ys, xs = _toy_steps(optimizer, w, torch.tensor(target, dtype=torch.float64), rates)
    expected = _paper_trajectory(w0, target, rates, 0.9, 0.95, 1e-8)
    for t, ((y_ref, x_ref), y, x) in enumerate(zip(expected, ys, xs)):
        assert y.tolist() == pytest.approx(y_ref, rel=1e-12, abs=1e-12), f'y after step {t + 1}'
        assert x.tolist() == pytest.approx(x_ref, rel=1e-12, abs=1e-12), f'x after step {t + 1}'
    assert not torch.allclose(ys[-1], xs[-1])  # the gradient point is not the average


def test_the_swap_restores_the_gradient_point_even_on_errors():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer = ScheduleFreeAdam([w], lr=0.1, betas=(0.9, 0.99))
    with optimizer.averaged():  # before any step the average is the start, which w holds
        assert w.tolist() == [1.0, -2.0]
    _toy_steps(optimizer, w, torch.zeros(2), [0.1, 0.1])
    y = w.detach().clone()
    with pytest.raises(RuntimeError, match='inside'):
        with optimizer.averaged():
            assert not torch.equal(w, y)
            raise RuntimeError('inside')
    assert torch.equal(w, y)


def test_a_loaded_state_continues_exactly_even_from_the_average():
    target, rates = torch.tensor([0.3, -0.7]), [0.05] * 6
    w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    optimizer = ScheduleFreeAdam([w], lr=0.05, betas=(0.9, 0.99))
    _toy_steps(optimizer, w, target, rates[:3])
    state = copy.deepcopy(optimizer.state_dict())  # the state dict refers to the live tensors
    with optimizer.averaged():
        saved_weights = w.detach().clone()  # a snapshot's weights hold x
    ys, _ = _toy_steps(optimizer, w, target, rates[3:])

    w2 = torch.nn.Parameter(saved_weights)
    resumed = ScheduleFreeAdam([w2], lr=0.05, betas=(0.9, 0.99))
    resumed.load_state_dict(state)
    ys2, _ = _toy_steps(resumed, w2, target, rates[3:])
    assert all(torch.equal(a, b) for a, b in zip(ys, ys2))


def test_schedule_free_recipes_build_it_with_lora_plus_groups_and_refuse_a_decay_or_an_ema():
    from training import synthetic_identity as si
    G = si.build_tiny_generator(0)
    adapters.inject(G, adapters.AdapterConfig(r=1))
    optimizer = recipes.make_optimizer(G, adapters.trainable_parameters(G), SF_RECIPE)
    assert isinstance(optimizer, ScheduleFreeAdam) and len(optimizer.param_groups) == 2
    recipes.set_learning_rate(optimizer, SF_RECIPE, 1000, 1000)
    assert [g['lr'] for g in optimizer.param_groups] == pytest.approx([0.03, 0.12])
    for changes in (dict(decay='cosine', final_lr=0.0), dict(ema_half_life=0.05)):
        with pytest.raises(ValueError, match='schedulefree averages the iterates itself'):
            recipes.Recipe.from_dict(dict(SF_RECIPE.to_dict(), **changes))
    with pytest.raises(ValueError, match='optimizer must be one of'):
        recipes.Recipe.from_dict(dict(SF_RECIPE.to_dict(), optimizer='sgd'))


@pytest.fixture(scope='module')
def sf_run(train_tiny, tmp_path_factory):
    """Four one-step ticks with schedule-free Adam, a snapshot every tick."""
    run = tmp_path_factory.mktemp('sf-run')
    return run, train_tiny(run, SF_RECIPE.to_dict())


def _in_optimizer_order(G):
    b_ids = {id(p) for name, p in G.named_parameters() if name.endswith('.lora_B')}
    trainable = adapters.trainable_parameters(G)
    return [p for p in trainable if id(p) not in b_ids] + [p for p in trainable if id(p) in b_ids]


def test_files_hold_the_average_and_the_run_trains_at_the_gradient_point(sf_run, identity8):
    run, result = sf_run
    state = torch.load(run / 'training-state-000000.004.pt', weights_only=True)['optimizer']
    G_file = adapters.load(legacy.load_network_pkl(identity8.base_pkl)['G'], str(run / 'adapter-000000.004.safetensors'))
    in_file, in_run = _in_optimizer_order(G_file), _in_optimizer_order(result['G'])  # LoRA+: A group, then B
    averages = [state['state'][i]['x'] for i in range(len(in_run))]
    assert all(torch.equal(f.detach(), x) for f, x in zip(in_file, averages))  # the file holds x
    assert any(not torch.equal(p.detach(), x) for p, x in zip(in_run, averages))  # the run ends at y


def test_resume_with_schedule_free_equals_the_uninterrupted_run(sf_run, resume_halfway):
    run, _ = sf_run
    resume_halfway(run, SF_RECIPE.to_dict())
