"""AdaLoRA: the rank allocator against PEFT's, orthogonal regularisation, and pruning on a toy regression."""
import pytest
import torch

from training import adapters
from training.adapters import AdapterConfig, RankAllocator
from training.adapters.inject import adapter_layers
from training.networks_stylegan2 import FullyConnectedLayer


class Toy(torch.nn.Module):
    """A 'generator' whose mapping component is a few independent linear layers (outputs concatenated)."""

    def __init__(self, dims, chain=False):
        super().__init__()
        torch.manual_seed(0)
        if chain:
            self.mapping = torch.nn.Sequential(*[FullyConnectedLayer(dims[i], dims[i + 1]) for i in range(len(dims) - 1)])
        else:
            self.mapping = torch.nn.ModuleList([FullyConnectedLayer(dims[0], d) for d in dims[1:]])
        self.chain = chain

    def forward(self, x):
        return self.mapping(x) if self.chain else torch.cat([fc(x) for fc in self.mapping], dim=1)


@pytest.fixture
def single_thread():
    """Tiny matrices: one thread avoids oversubscription overhead on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_rank_allocator_matches_peft(single_thread):
    """Same budgets, masks and Lambda values as PEFT's RankAllocator at every step, given the same gradients."""
    pytest.importorskip('peft')
    from peft import AdaLoraConfig, get_peft_model

    dims, T = [16, 12, 10, 8], 30
    torch.manual_seed(0)
    base = torch.nn.Sequential(*[torch.nn.Linear(dims[i], dims[i + 1]) for i in range(3)])
    peft_cfg = AdaLoraConfig(init_r=4, target_r=2, tinit=3, tfinal=5, deltaT=2, beta1=0.85, beta2=0.7, total_step=T,
                             target_modules=['0', '1', '2'], lora_alpha=1)
    peft_model = get_peft_model(base, peft_cfg)
    peft_params = dict(peft_model.named_parameters())

    toy = Toy(dims, chain=True)
    adapters.inject(toy, AdapterConfig(adalora=True, init_r=4, target_r=2, tinit=3, tfinal=5, delta_t=2, beta1=0.85,
                                       beta2=0.7, total_step=T, targets=('mapping',)))
    ours = RankAllocator(toy)
    layers = {name.split('.')[-1]: layer for name, layer in adapter_layers(toy)}
    assert (ours.init_bgt, ours.target_bgt) == (12, 6)

    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    gen = torch.Generator().manual_seed(1)
    masked_steps = 0
    for step in range(T + 3):
        x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 8, generator=gen)
        ((peft_model(x) - y) ** 2).mean().backward()
        opt.step()
        with torch.no_grad():  # our adapters take PEFT's current values and gradients
            for i, layer in layers.items():
                for factor in ('lora_A', 'lora_E', 'lora_B'):
                    src = peft_params[f'base_model.model.{i}.{factor}.default']
                    layer._parameters[factor].copy_(src.unsqueeze(0))
                    layer._parameters[factor].grad = src.grad.unsqueeze(0).clone()
        peft_model.base_model.update_and_allocate(step)
        budget, threshold = ours.update_and_mask(toy, step)

        assert budget == peft_model.base_model.rankallocator.budget_schedule(step)[0], step
        for i, layer in layers.items():
            assert torch.equal(layer.lora_E[0], peft_params[f'base_model.model.{i}.lora_E.default']), (step, i)
        peft_pattern = peft_model.peft_config['default'].rank_pattern
        if peft_pattern:
            ours_pattern = ours.rank_pattern(toy)
            for i in layers:
                assert ours_pattern[f'mapping.{i}.lora_E'] == peft_pattern[f'{i}.lora_E.default'], (step, i)
        masked_steps += threshold is not None
        opt.zero_grad()
    assert masked_steps >= 5
    assert sum(int(layer.rank_mask.sum()) for layer in layers.values()) == ours.target_bgt


def test_budget_schedule_is_cubic():
    toy = Toy([8, 8, 8])
    cfg = AdapterConfig(adalora=True, init_r=6, target_r=2, tinit=10, tfinal=20, delta_t=4, total_step=100,
                        targets=('mapping',))
    adapters.inject(toy, cfg)
    alloc = RankAllocator(toy)
    assert (alloc.init_bgt, alloc.target_bgt) == (12, 4)
    assert alloc.budget_schedule(10) == (12, False)
    assert alloc.budget_schedule(81) == (4, True)
    for step in (11, 40, 44, 79, 80):
        frac = 1 - (step - 10) / (100 - 20 - 10)
        assert alloc.budget_schedule(step) == (int(8 * frac ** 3 + 4), step % 4 == 0)
    budgets = [alloc.budget_schedule(s)[0] for s in range(101)]
    assert budgets == sorted(budgets, reverse=True)


def test_allocator_errors():
    toy = Toy([8, 8])
    adapters.inject(toy, AdapterConfig(targets=('mapping',)))
    with pytest.raises(ValueError, match='AdaLoRA'):
        RankAllocator(toy)
    toy = Toy([8, 8])
    adapters.inject(toy, AdapterConfig(adalora=True, targets=('mapping',)))
    with pytest.raises(ValueError, match='total_step'):
        RankAllocator(toy)
    with pytest.raises(ValueError, match='tinit'):
        RankAllocator(toy, AdapterConfig(adalora=True, total_step=10, tinit=8, tfinal=2, targets=('mapping',)))


def test_orthogonal_regularization_is_the_mean_frobenius_deviation():
    toy = Toy([8, 6, 5])
    adapters.inject(toy, AdapterConfig(adalora=True, init_r=3, targets=('mapping',)), num_adapters=2)
    terms = []
    for _, layer in adapter_layers(toy):
        for k in range(2):
            P, Q = layer.lora_A[k].detach(), layer.lora_B[k].detach()
            terms.append(torch.linalg.norm(P @ P.T - torch.eye(3)))
            terms.append(torch.linalg.norm(Q.T @ Q - torch.eye(3)))
    reg = adapters.orthogonal_regularization(toy)
    torch.testing.assert_close(reg, torch.stack(terms).mean())
    reg.backward()
    assert all(layer.lora_A.grad is not None for _, layer in adapter_layers(toy))
    with torch.no_grad():  # orthonormal singular vectors: zero penalty
        for _, layer in adapter_layers(toy):
            for k in range(2):
                layer.lora_A[k].copy_(torch.linalg.qr(torch.randn(layer.fan_in, 3))[0].T)
                layer.lora_B[k].copy_(torch.linalg.qr(torch.randn(layer.fan_out, 3))[0])
    assert adapters.orthogonal_regularization(toy).item() < 1e-5


def test_each_adapter_index_gets_its_own_budget(single_thread):
    toy = Toy([8, 8, 8, 8])
    cfg = AdapterConfig(adalora=True, init_r=4, target_r=1, tinit=0, tfinal=0, delta_t=1, total_step=6,
                        targets=('mapping',))
    adapters.inject(toy, cfg, num_adapters=2)
    alloc = RankAllocator(toy)
    opt = torch.optim.Adam(adapters.trainable_parameters(toy), lr=0.05)
    x, y = torch.randn(16, 8), torch.randn(16, 24)
    for step in range(7):
        adapters.select(toy, torch.tensor([0] * 8 + [1] * 8))
        ((toy(x) - y) ** 2).mean().backward()
        opt.step()
        budget, thresholds = alloc.update_and_mask(toy, step)
        assert thresholds is None or len(thresholds) == 2
        for k in range(2):
            kept = sum(int(layer.rank_mask[k].sum()) for _, layer in adapter_layers(toy))
            if thresholds is not None:
                assert kept == budget, (step, k)
        opt.zero_grad()
    assert budget == alloc.target_bgt == 3
    state = alloc.state_dict()
    fresh = RankAllocator(toy)
    fresh.load_state_dict(state)
    assert fresh.exp_avg_ipt.keys() == alloc.exp_avg_ipt.keys()


def test_adalora_finds_where_the_rank_is_needed(single_thread):
    """Toy regression with a known target: rank 0 on one layer, rank 2k on the other (k on average).

    AdaLoRA (init_r = 2k, target_r = k) must end with exactly its budget of 2k triplets and a loss no
    worse than LoRA at rank k, which cannot fit the rank-2k change.
    """
    D, k, steps = 16, 2, 300
    target_ranks = [0, 2 * k]
    torch.manual_seed(2)
    target = Toy([D, D, D])
    with torch.no_grad():
        for fc, r in zip(target.mapping, target_ranks):
            if r:
                U, V = torch.linalg.qr(torch.randn(D, r))[0], torch.linalg.qr(torch.randn(D, r))[0]
                fc.weight += U @ V.T * D ** 0.5
    X = torch.randn(256, D)
    with torch.no_grad():
        Y = target(X)

    def train(cfg):
        model = Toy([D, D, D])
        torch.manual_seed(12)
        adapters.inject(model, cfg)
        alloc = RankAllocator(model) if cfg.adalora else None
        opt = torch.optim.Adam(adapters.trainable_parameters(model), lr=0.05)
        for step in range(steps):
            batch = torch.randint(0, X.shape[0], (32,))
            loss = ((model(X[batch]) - Y[batch]) ** 2).mean()
            if cfg.adalora:
                loss = loss + cfg.orth_reg_weight * adapters.orthogonal_regularization(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if alloc is not None:
                alloc.update_and_mask(model, step)
        with torch.no_grad():
            return model, ((model(X) - Y) ** 2).mean().item(), alloc

    _, lora_loss, _ = train(AdapterConfig(r=k, alpha=4.0 * k, targets=('mapping',)))
    model, ada_loss, alloc = train(AdapterConfig(adalora=True, init_r=2 * k, target_r=k, tinit=30, tfinal=100,
                                                 delta_t=5, total_step=steps, alpha=4.0 * 2 * k, orth_reg_weight=0.1,
                                                 targets=('mapping',)))
    kept = [int(layer.rank_mask.sum()) for _, layer in adapter_layers(model)]
    assert sum(kept) == alloc.target_bgt == 2 * k
    assert ada_loss <= lora_loss, (ada_loss, lora_loss, kept)
    for (_, layer), n in zip(adapter_layers(model), kept):  # pruned triplets contribute nothing
        assert int((layer.lora_E[0, :, 0] != 0).sum()) <= n
