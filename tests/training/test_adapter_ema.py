"""EMA of the adapter weights: its half-life and ramp-up, the swap, and what the run's files hold with it."""
import json

import pytest
import torch

import legacy
from training import adapter_ema
from training import recipe as recipes

EMA_RECIPE = recipes.Recipe('ema', lr=0.01, betas=(0.9, 0.99), ema_half_life=0.25, ema_rampup=0.5)


def test_half_life_is_a_fraction_of_the_run_and_ramps_up_with_the_images_seen():
    ema = adapter_ema.AdapterEMA([torch.nn.Parameter(torch.zeros(3))], EMA_RECIPE)
    # 400 images: half-life 100 images; after 1000 images seen the ramp-up (500) no longer binds.
    assert ema.beta(1000, 4, 400) == pytest.approx(0.5 ** (4 / 100))
    assert ema.beta(40, 4, 400) == pytest.approx(0.5 ** (4 / 20))  # ramp-up: half-life 0.5 * 40 images
    no_rampup = adapter_ema.AdapterEMA([torch.nn.Parameter(torch.zeros(3))],
                                       recipes.Recipe('e', lr=0.01, betas=(0.9, 0.99), ema_half_life=0.25))
    assert no_rampup.beta(40, 4, 400) == pytest.approx(0.5 ** (4 / 100))


def test_average_follows_the_weights_and_the_swap_restores_them_even_on_errors():
    p = torch.nn.Parameter(torch.zeros(4))
    ema = adapter_ema.AdapterEMA([p], recipes.Recipe('e', lr=0.01, betas=(0.9, 0.99), ema_half_life=0.5))
    with torch.no_grad():
        p.fill_(1.0)
    ema.update(cur_nimg=2, batch_size=2, total_nimg=4)  # half-life 2 images, one step of 2: beta 0.5
    assert torch.allclose(ema.average[0], torch.full([4], 0.5))
    with ema.swapped_in():
        assert torch.equal(p.detach(), torch.full([4], 0.5))
    assert torch.equal(p.detach(), torch.ones(4)) and torch.equal(ema.average[0], torch.full([4], 0.5))
    with pytest.raises(RuntimeError, match='boom'):
        with adapter_ema.applied(ema):
            raise RuntimeError('boom')
    assert torch.equal(p.detach(), torch.ones(4))
    with adapter_ema.applied(None):  # no EMA: nothing changes
        assert torch.equal(p.detach(), torch.ones(4))


def test_state_restores_the_raw_weights_and_the_average_and_refuses_another_layout():
    p = torch.nn.Parameter(torch.ones(2))
    ema = adapter_ema.AdapterEMA([p], EMA_RECIPE)
    state = ema.state_dict()
    with torch.no_grad():
        p.fill_(7.0)
        ema.average[0].fill_(3.0)
    ema.load_state_dict(state)
    assert torch.equal(p.detach(), torch.ones(2)) and torch.equal(ema.average[0], torch.ones(2))
    other = adapter_ema.AdapterEMA([p, torch.nn.Parameter(torch.ones(1))], EMA_RECIPE)
    with pytest.raises(ValueError, match='the saved EMA holds 1 tensors, this run trains 2'):
        other.load_state_dict(state)
    assert adapter_ema.make_ema([p], recipes.get_recipe('my3dgen')) is None


EMA_RUN_RECIPE = dict(EMA_RECIPE.to_dict(), lr=0.03)


@pytest.fixture(scope='module')
def ema_run(train_tiny, tmp_path_factory):
    """Four one-step ticks with an EMA, a snapshot every tick."""
    run = tmp_path_factory.mktemp('ema-run')
    return run, train_tiny(run, EMA_RUN_RECIPE)


def test_files_hold_the_average_and_the_best_file_is_what_validation_scored(ema_run, identity8):
    from training import adapters, validation
    from training.dataset import IdentitySet
    from training.loss import PersonalizationLoss
    run, result = ema_run
    state = torch.load(run / 'training-state-000000.004.pt', weights_only=True)['ema']
    base = legacy.load_network_pkl(identity8.base_pkl)['G']
    G_last = adapters.load(base, str(run / 'adapter-000000.004.safetensors'))
    in_file = [p.detach() for p in adapters.trainable_parameters(G_last)]
    assert all(torch.equal(f, a) for f, a in zip(in_file, state['average']))   # the file holds the average
    assert any(not torch.equal(r, a) for r, a in zip(state['raw'], state['average']))  # which lags the weights
    assert all(torch.equal(r, p.detach()) for r, p in zip(state['raw'], adapters.trainable_parameters(result['G'])))

    stats = [json.loads(line) for line in open(run / 'stats.jsonl')]
    best = min(stats, key=lambda s: s['val/loss'])
    G = adapters.load(legacy.load_network_pkl(identity8.base_pkl)['G'], str(run / 'adapter-best.safetensors'))
    _, views = validation.split_heldout(IdentitySet(identity8.train), 1)
    score = validation.score_views(G, views, PersonalizationLoss(torch.device('cpu'), lpips_net='none'), 32, seed=0,
                                   device=torch.device('cpu'))['run']['loss']
    assert score == pytest.approx(best['val/loss'], rel=1e-5)


def test_resume_with_an_ema_equals_the_uninterrupted_run(ema_run, resume_halfway):
    run, _ = ema_run
    resumed = resume_halfway(run, EMA_RUN_RECIPE)
    state_a = torch.load(run / 'training-state-000000.004.pt', weights_only=True)['ema']
    state_b = torch.load(resumed / 'training-state-000000.004.pt', weights_only=True)['ema']
    tensors_a, tensors_b = state_a['raw'] + state_a['average'], state_b['raw'] + state_b['average']
    assert len(tensors_a) == len(tensors_b) > 0 and all(torch.equal(x, y) for x, y in zip(tensors_a, tensors_b))
