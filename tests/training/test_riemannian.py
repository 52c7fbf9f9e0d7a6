"""Riemannian-preconditioned LoRA: the preconditioned gradients by hand, the step's independence of the
factorisation, the recipe field that builds it, and a run with it that resumes exactly."""
import pytest
import torch
from safetensors.torch import load_file

from training import adapters
from training import recipe as recipes
from training import riemannian
from training import synthetic_identity as si


def test_rank_one_gradients_are_divided_by_the_other_factors_squared_norm():
    A = torch.nn.Parameter(torch.tensor([[[1.0, 2.0, 2.0]]]))      # [K=1, R=1, fan_in=3], |A|^2 = 9
    B = torch.nn.Parameter(torch.tensor([[[3.0], [4.0]]]))         # [K=1, fan_out=2, R=1], |B|^2 = 25
    A.grad, B.grad = torch.full_like(A, 2.0), torch.full_like(B, 3.0)
    riemannian.precondition_gradients([(A, B)], reg=1.0)
    assert torch.allclose(A.grad, torch.full_like(A, 2.0 / 26))
    assert torch.allclose(B.grad, torch.full_like(B, 3.0 / 10))


def _first_order_change(A, B, target, reg=None):
    """d(B A) of a gradient step of unit rate on 0.5 |B A - target|^2: preconditioned with damping `reg`, or
    (reg None) plain."""
    A, B = A.clone().requires_grad_(), B.clone().requires_grad_()
    (0.5 * (B @ A - target).square().sum()).backward()
    pa, pb = torch.nn.Parameter(A.detach()), torch.nn.Parameter(B.detach())
    pa.grad, pb.grad = A.grad.clone(), B.grad.clone()
    if reg is not None:
        riemannian.precondition_gradients([(pa, pb)], reg)
    return -(pb.grad @ A.detach() + B.detach() @ pa.grad)


def test_the_preconditioned_step_moves_the_product_the_same_for_every_factorisation():
    gen = torch.Generator().manual_seed(0)
    A, B = torch.randn([1, 2, 5], generator=gen), torch.randn([1, 4, 2], generator=gen)
    target = torch.randn([1, 4, 5], generator=gen)
    M = torch.tensor([[[2.0, 1.0], [0.5, 1.0]]])                   # another factorisation: (B M, M^-1 A)
    A2, B2 = torch.linalg.inv(M) @ A, B @ M
    assert torch.allclose(B2 @ A2, B @ A, atol=1e-5)
    assert torch.allclose(_first_order_change(A, B, target, 1e-9), _first_order_change(A2, B2, target, 1e-9),
                          rtol=1e-3, atol=1e-4)
    assert not torch.allclose(_first_order_change(A, B, target), _first_order_change(A2, B2, target), rtol=1e-2)


def test_the_recipe_field_builds_the_preconditioned_adam_over_every_lora_pair():
    G = si.build_tiny_generator(0)
    adapters.inject(G, adapters.AdapterConfig(r=1))
    trainable = adapters.trainable_parameters(G)
    recipe = recipes.Recipe('riem', lr=0.01, betas=(0.9, 0.99), b_lr_ratio=4.0, riemannian_reg=0.01)
    optimizer = recipes.make_optimizer(G, trainable, recipe)
    assert isinstance(optimizer, riemannian.RiemannianAdam) and optimizer.reg == 0.01
    assert recipe.optimizer_class == 'training.riemannian.RiemannianAdam'  # what training_options.json records
    assert recipes.get_recipe('adapter').optimizer_class == 'torch.optim.Adam'
    assert len(optimizer.pairs) * 2 == len(trainable) == sum(len(g['params']) for g in optimizer.param_groups)
    assert [g['lr_scale'] for g in optimizer.param_groups] == [1.0, 4.0]
    A, B = next((A, B) for A, B in optimizer.pairs if A.shape[1] == 1)  # one row: a scalar preconditioner
    for p in trainable:
        p.grad = torch.ones_like(p)
    B.data.fill_(0.5)
    expected_a_grad = 1 / (0.25 * B.shape[1] + 0.01)                     # 1 / (|B|^2 + reg)
    optimizer.step()
    assert torch.allclose(A.grad, torch.full_like(A, expected_a_grad))
    assert recipes.Recipe.from_dict(recipe.to_dict()) == recipe


def test_adalora_and_full_fine_tuning_are_refused():
    G = si.build_tiny_generator(0)
    adapters.inject(G, adapters.AdapterConfig(adalora=True, init_r=2))
    recipe = recipes.Recipe('riem', lr=0.01, betas=(0.9, 0.99), riemannian_reg=0.01)
    with pytest.raises(ValueError, match="recipe 'riem': riemannian_reg .* AdaLoRA"):
        recipes.make_optimizer(G, adapters.trainable_parameters(G), recipe)
    full = si.build_tiny_generator(0)
    with pytest.raises(ValueError, match='full fine-tuning'):
        recipes.make_optimizer(full, list(full.superresolution.parameters()), recipe)


@pytest.mark.parametrize('changes, message', [
    (dict(riemannian_reg=0.0), 'riemannian_reg must be > 0'),
    (dict(riemannian_reg=0.01, optimizer='schedulefree'), 'needs optimizer=adam'),
])
def test_bad_settings_are_refused_with_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        recipes.Recipe('riem', lr=0.01, betas=(0.9, 0.99), **changes)


def test_a_run_with_the_preconditioner_and_fan_in_rates_resumes_exactly(train_tiny, resume_halfway, tmp_path):
    recipe = recipes.Recipe('riem-fan-in', lr=0.02, betas=(0.9, 0.99), warmup=0.25, decay='cosine', final_lr=0.0,
                            b_lr_ratio=4.0, a_fan_in_exponent=0.5, riemannian_reg=0.1).to_dict()
    run = tmp_path / 'run'
    train_tiny(run, recipe)
    trained = load_file(str(run / 'adapter-000000.004.safetensors'))
    assert any(k.endswith('lora_B') and v.abs().max() > 0 for k, v in trained.items())  # it trained
    resume_halfway(run, recipe)  # the groups and the preconditioned Adam state come back as they were
