"""Validation: the held-out split (deterministic, spread over poses, mirrors out too), scores, best keeping."""
import numpy as np
import pytest
import torch

from training import adapters
from training import synthetic_identity as si
from training import validation
from training.dataset import DatasetError, IdentitySet
from training.loss import PersonalizationLoss


@pytest.fixture(scope='module')
def person(tmp_path_factory):
    return si.ensure_identity(str(tmp_path_factory.getbasetemp() / 'synthetic-identity-val'), views=16, heldout=2,
                              strength=0.3)


def test_default_count_is_one_in_eight_at_most_eight():
    assert [validation.default_val_views(n) for n in (4, 7, 8, 24, 50, 64, 200)] == [0, 0, 1, 3, 6, 8, 8]


def test_heldout_views_sit_at_the_yaw_quantiles():
    cameras = si.camera_labels(24, seed=5)
    chosen = validation.heldout_indices(cameras, 3)
    assert np.array_equal(chosen, validation.heldout_indices(cameras.copy(), 3))  # a function of the cameras
    yaw = validation.camera_yaw(cameras)
    ranks = np.argsort(np.argsort(yaw))
    assert sorted(ranks[chosen].tolist()) == [4, 12, 20]  # (j + 0.5) * 24 / 3
    assert validation.heldout_indices(cameras, 0).size == 0


def test_split_is_deterministic_and_the_heldout_views_and_mirrors_leave_training(person):
    full = IdentitySet(person.train, xflip=True)
    part, views = validation.split_heldout(full, 2)
    again, views_again = validation.split_heldout(IdentitySet(person.train, xflip=True), 2)
    assert views.names == views_again.names and part.names == again.names
    assert len(views) == 2 and len(part) == len(full) - 4 and part.sizes == [len(full) - 4]
    stems = [name.rsplit('.', 1)[0] for name in views.names]
    assert not any(name.startswith(stem + '.') or name.startswith(stem + '_mirror') for stem in stems for name in part.names)
    trained = {part.images[i].tobytes() for i in range(len(part))}
    assert not any(views.images[i].tobytes() in trained for i in range(len(views)))
    assert not any(views.images[i][:, :, ::-1].tobytes() in trained for i in range(len(views)))
    assert len(full) == 32 and len(full.images) == 32  # the source set is unchanged
    batches = np.concatenate([part.batch_indices(4, step, 0) for step in range(20)])
    assert batches.max() < len(part)


def test_too_many_heldout_views_is_an_error_naming_the_identity(person):
    with pytest.raises(DatasetError, match='--val-views=16 would leave none for training'):
        validation.split_heldout(IdentitySet(person.train), 16)


def test_scores_match_a_direct_computation_and_do_not_touch_the_rng(person):
    base = si.build_tiny_generator(0)
    adapters.inject(base, adapters.AdapterConfig(r=1))
    views = validation.read_validation_folder(person.heldout, ['heldout'], 128, base.backbone.num_ws, base.w_dim)
    loss_fn = PersonalizationLoss(torch.device('cpu'), lpips_net='alex-random')
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    scores = validation.score_views(base, views, loss_fn, 32, seed=0, device=torch.device('cpu'))
    assert torch.equal(torch.rand(1), expected_next)
    run = scores[validation.RUN]
    assert scores['heldout'] == run
    assert set(run) == {'mse', 'mse_raw', 'psnr', 'psnr_raw', 'lpips', 'lpips_raw', 'loss'}
    assert run['loss'] == pytest.approx(run['mse'] + run['mse_raw'] + run['lpips'] + run['lpips_raw'])
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        out = base.eval().synthesis(torch.from_numpy(views.latents), torch.from_numpy(views.cameras),
                                    neural_rendering_resolution=32, noise_mode='const')['image']
    real = torch.from_numpy(views.images).float() / 127.5 - 1
    mse = (out - real).square().flatten(1).mean(1)
    assert run['mse'] == pytest.approx(float(mse.mean()), rel=1e-5)
    assert run['psnr'] == pytest.approx(float((10 * torch.log10(4 / mse)).mean()), rel=1e-5)
    assert scores == validation.score_views(base, views, loss_fn, 32, seed=0, device=torch.device('cpu'))


def test_validation_folder_must_name_the_training_identities(person):
    with pytest.raises(DatasetError, match='one validation folder per training identity'):
        validation.read_validation_folder(person.heldout, ['alice', 'bob'], 128, 14, 512)


def test_best_keeper_counts_stale_validations_and_round_trips():
    keeper = validation.BestKeeper([validation.RUN, 'a', 'b'])
    scores = lambda run, a, b: {validation.RUN: dict(loss=run), 'a': dict(loss=a), 'b': dict(loss=b)}
    assert keeper.update(scores(3, 2, 4), 0, 0) == [validation.RUN, 'a', 'b']
    assert keeper.update(scores(3.5, 1, 6), 10, 1) == ['a'] and keeper.stale == 0
    assert keeper.update(scores(4, 2, 6), 20, 2) == [] and keeper.stale == 1
    assert not keeper.should_stop(2) and not keeper.should_stop(None)
    assert keeper.update(scores(3, 2, 4), 30, 3) == [] and keeper.should_stop(2)  # equal is not better
    restored = validation.BestKeeper([validation.RUN, 'a', 'b'])
    restored.load_state_dict(keeper.state_dict())
    assert restored.best == keeper.best and restored.stale == 2
    assert keeper.best['a'] == dict(loss=1, kimg=0.01, step=1, scores=dict(loss=1))
    with pytest.raises(ValueError, match='covers'):
        validation.BestKeeper([validation.RUN]).load_state_dict(keeper.state_dict())
