"""Recipes: my3dgen is exactly EG3D's optimizer; the default's schedule, LoRA+ groups and clipping."""
import pytest
import torch

from training import adapters
from training import recipe as recipes
from training import synthetic_identity as si


@pytest.fixture(scope='module')
def adapted():
    G = si.build_tiny_generator(0)
    adapters.inject(G, adapters.AdapterConfig(r=1))
    return G, adapters.trainable_parameters(G)


def _settings(optimizer):
    return [{k: v for k, v in group.items() if k not in ('params', 'lr_scale')} for group in optimizer.param_groups]


def test_my3dgen_recipe_is_eg3ds_adam_at_a_constant_rate(adapted):
    G, trainable = adapted
    recipe = recipes.get_recipe('my3dgen')
    optimizer = recipes.make_optimizer(G, trainable, recipe)
    reference = torch.optim.Adam(trainable, lr=0.0025, betas=(0.0, 0.99), eps=1e-8)  # what EG3D / My3DGen build
    assert _settings(optimizer) == _settings(reference)
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]['params'] == trainable
    assert recipe.grad_clip is None and recipes.clip_gradients(trainable, recipe) is None
    assert recipe.init == 'random'  # PEFT's random A and zero B, as My3DGen starts
    for cur_nimg in (0, 1, 100, 399, 400):
        assert recipes.set_learning_rate(optimizer, recipe, cur_nimg, 400) == 0.0025
        assert optimizer.param_groups[0]['lr'] == 0.0025


def test_default_recipe_warms_up_then_decays_to_its_final_rate():
    recipe = recipes.get_recipe(recipes.DEFAULT_RECIPE)
    total = 1000
    factors = [recipes.lr_factor(recipe, n, total) for n in range(0, total + 1, 4)]
    peak = factors.index(max(factors))
    assert recipe.warmup > 0 and 0 < peak * 4 <= recipe.warmup * total + 4
    assert all(a < b for a, b in zip(factors[:peak], factors[1:peak + 1]))  # rising during the warm-up
    assert all(a >= b for a, b in zip(factors[peak:], factors[peak + 1:]))  # then never rising
    assert factors[-1] == pytest.approx(recipe.final_lr, abs=1e-9) and max(factors) <= 1


def test_lora_plus_gives_the_b_factors_their_own_rate(adapted):
    G, trainable = adapted
    recipe = recipes.Recipe('test', lr=0.01, betas=(0.9, 0.99), b_lr_ratio=4.0)
    optimizer = recipes.make_optimizer(G, trainable, recipe)
    b_ids = {id(p) for name, p in G.named_parameters() if name.endswith('lora_B')}
    assert len(optimizer.param_groups) == 2 and sum(len(g['params']) for g in optimizer.param_groups) == len(trainable)
    a_group, b_group = optimizer.param_groups
    assert all(id(p) not in b_ids for p in a_group['params']) and all(id(p) in b_ids for p in b_group['params'])
    recipes.set_learning_rate(optimizer, recipe, 0, 100)
    assert b_group['lr'] == pytest.approx(4 * a_group['lr']) and a_group['lr'] == pytest.approx(0.01)


def test_clipping_bounds_the_global_gradient_norm():
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))]
    params[0].grad, params[1].grad = torch.full([3], 3.0), torch.full([4], 4.0)
    norm = recipes.clip_gradients(params, recipes.Recipe('t', lr=0.1, betas=(0, 0.9), grad_clip=1.0))
    assert norm == pytest.approx((27 + 64) ** 0.5)
    assert torch.cat([p.grad for p in params]).norm() == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize('changes, message', [
    (dict(lr=0), 'lr must be > 0'), (dict(betas=(1.0, 0.99)), 'betas'), (dict(warmup=1.5), 'warmup'),
    (dict(decay='step'), 'decay'), (dict(b_lr_ratio=0), 'b_lr_ratio'), (dict(grad_clip=-1.0), 'grad_clip'),
    (dict(ema_half_life=0.0), 'ema_half_life'), (dict(ema_rampup=-0.5), 'ema_rampup'),
    (dict(init='svd'), 'init must be one of'), (dict(init_passes=0), 'init_passes'),
])
def test_bad_recipes_are_refused_with_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        recipes.Recipe.from_dict(dict(recipes.get_recipe('my3dgen').to_dict(), **changes))


def test_overrides_and_round_trip():
    recipe = recipes.get_recipe(recipes.DEFAULT_RECIPE).with_overrides(lr=0.5, betas=[0.5, 0.9])
    assert recipe.lr == 0.5 and recipe.betas == (0.5, 0.9)
    assert recipes.Recipe.from_dict(recipe.to_dict()) == recipe
    with pytest.raises(ValueError, match='unknown recipe'):
        recipes.get_recipe('fast')
