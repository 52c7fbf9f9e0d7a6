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


def _group_lr(optimizer, param):
    return next(g['lr'] for g in optimizer.param_groups if any(p is param for p in g['params']))


def test_fan_in_exponents_give_each_layers_factors_their_own_rate(adapted):
    G, trainable = adapted
    recipe = recipes.Recipe('test', lr=0.01, betas=(0.9, 0.99), warmup=0.5, b_lr_ratio=4.0, a_fan_in_exponent=0.5,
                            b_fan_in_exponent=-0.5)
    optimizer = recipes.make_optimizer(G, trainable, recipe)
    layers = dict(G.named_modules())
    wide = layers['superresolution.block0.conv1']      # 128 channels x 3x3: fan-in 1152
    narrow = layers['backbone.synthesis.b256.torgb']    # 8 channels x 1x1: fan-in 8
    style = layers['superresolution.block0.conv1.base_layer.affine']  # w_dim: fan-in 512, the reference
    assert (wide.fan_in, narrow.fan_in, style.fan_in) == (1152, 8, 512)
    factor = recipes.lr_factor(recipe, 10, 100)  # mid warm-up: every group follows the same schedule
    recipes.set_learning_rate(optimizer, recipe, 10, 100)
    assert _group_lr(optimizer, wide.lora_A) == pytest.approx(0.01 * factor / 1.5)       # (1152/512)^-1/2 = 1/1.5
    assert _group_lr(optimizer, wide.lora_B) == pytest.approx(0.04 * factor * 1.5)
    assert _group_lr(optimizer, narrow.lora_A) == pytest.approx(0.01 * factor * 8)       # (8/512)^-1/2 = 8
    assert _group_lr(optimizer, narrow.lora_B) == pytest.approx(0.04 * factor / 8)
    assert _group_lr(optimizer, style.lora_A) == pytest.approx(0.01 * factor)
    assert _group_lr(optimizer, style.lora_B) == pytest.approx(0.04 * factor)
    grouped = [p for g in optimizer.param_groups for p in g['params']]
    assert len(grouped) == len(trainable) and {id(p) for p in grouped} == {id(p) for p in trainable}
    assert len({g['lr_scale'] for g in optimizer.param_groups}) == len(optimizer.param_groups)  # one group per rate


def test_without_fan_in_exponents_the_groups_are_unchanged(adapted):
    G, trainable = adapted
    recipe = recipes.get_recipe(recipes.DEFAULT_RECIPE)
    assert recipe.a_fan_in_exponent == recipe.b_fan_in_exponent == 0
    optimizer = recipes.make_optimizer(G, trainable, recipe)
    assert [g['lr_scale'] for g in optimizer.param_groups] == [1.0, recipe.b_lr_ratio]


def test_fan_in_exponents_are_refused_for_full_fine_tuning():
    G = si.build_tiny_generator(0)
    trainable = [p for name, p in G.named_parameters() if name.startswith('superresolution.')]
    recipe = recipes.Recipe('test', lr=0.01, betas=(0.9, 0.99), a_fan_in_exponent=0.5)
    with pytest.raises(ValueError, match="recipe 'test': a fan-in exponent .* full fine-tuning"):
        recipes.make_optimizer(G, trainable, recipe)


def test_adalora_singular_values_keep_the_base_rate_under_fan_in_exponents():
    G = si.build_tiny_generator(0)
    adapters.inject(G, adapters.AdapterConfig(adalora=True, init_r=2))
    trainable = adapters.trainable_parameters(G)
    recipe = recipes.Recipe('test', lr=0.01, betas=(0.9, 0.99), a_fan_in_exponent=0.5)
    optimizer = recipes.make_optimizer(G, trainable, recipe)
    narrow = dict(G.named_modules())['backbone.synthesis.b256.torgb']
    assert _group_lr(optimizer, narrow.lora_E) == pytest.approx(0.01)
    assert _group_lr(optimizer, narrow.lora_A) == pytest.approx(0.08)


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
    (dict(a_fan_in_exponent=float('nan')), 'a_fan_in_exponent'), (dict(b_fan_in_exponent=3.0), 'b_fan_in_exponent'),
    (dict(a_fan_in_exponent='0.5'), 'a_fan_in_exponent'),
])
def test_bad_recipes_are_refused_with_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        recipes.Recipe.from_dict(dict(recipes.get_recipe('my3dgen').to_dict(), **changes))


def test_overrides_and_round_trip():
    recipe = recipes.get_recipe(recipes.DEFAULT_RECIPE).with_overrides(lr=0.5, betas=[0.5, 0.9])
    assert recipe.lr == 0.5 and recipe.betas == (0.5, 0.9)
    assert recipes.Recipe.from_dict(recipe.to_dict()) == recipe
    scaled = recipes.Recipe('scaled', lr=0.01, betas=(0.9, 0.99), a_fan_in_exponent=0.5, b_fan_in_exponent=-0.25)
    assert recipes.Recipe.from_dict(scaled.to_dict()) == scaled
    recorded = {k: v for k, v in scaled.to_dict().items() if not k.endswith('fan_in_exponent')}  # a state saved before
    assert recipes.Recipe.from_dict(recorded).a_fan_in_exponent == 0.0                          # these fields
    with pytest.raises(ValueError, match='unknown recipe'):
        recipes.get_recipe('fast')
