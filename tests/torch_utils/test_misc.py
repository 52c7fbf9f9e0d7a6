"""torch_utils.misc: constants, shape asserts, sampler, parameter copying, DDP checks, module summary."""
import os
import re
import warnings

import pytest
import torch
import torch.multiprocessing as mp

from torch_utils import misc


def test_constant_is_cached_and_broadcast():
    a = misc.constant([1, 2, 3])
    assert a is misc.constant([1, 2, 3]) and a.dtype == torch.get_default_dtype()
    assert misc.constant([1, 2, 3], dtype=torch.int64) is not a
    b = misc.constant(0.5, shape=[2, 3])
    assert b.shape == (2, 3) and torch.all(b == 0.5) and b.is_contiguous()


def test_assert_shape():
    x = torch.zeros(2, 3, 4)
    misc.assert_shape(x, [2, None, 4])
    with pytest.raises(AssertionError, match='expected 2 dimensions'):
        misc.assert_shape(x, [2, 3])
    with pytest.raises(AssertionError, match='dimension 1 has size 3, expected 5'):
        misc.assert_shape(x, [2, 5, 4])


def test_suppress_tracer_warnings_filter_is_scoped():
    before = list(warnings.filters)
    with misc.suppress_tracer_warnings():
        assert warnings.filters[0][2] is torch.jit.TracerWarning
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn('x', torch.jit.TracerWarning)
        assert caught == []  # suppressed inside the context
    assert warnings.filters == before


def test_profiled_function_keeps_name_and_result():
    @misc.profiled_function
    def add(a, b=1):
        return a + b
    assert add.__name__ == 'add' and add(2, b=3) == 5


class _Net(torch.nn.Module):
    def __init__(self, n=3):
        super().__init__()
        self.fc = torch.nn.Linear(n, 2)
        self.register_buffer('stat', torch.zeros(2))


def test_params_and_buffers_listing():
    net = _Net()
    names = [name for name, _ in misc.named_params_and_buffers(net)]
    assert names == ['fc.weight', 'fc.bias', 'stat']
    assert [t.shape for t in misc.params_and_buffers(net)] == [(2, 3), (2,), (2,)]


def test_copy_params_and_buffers():
    src, dst = _Net(), _Net()
    src.stat.fill_(7)
    dst.fc.weight.requires_grad_(False)
    misc.copy_params_and_buffers(src, dst, require_all=True)
    for (_, a), (_, b) in zip(misc.named_params_and_buffers(src), misc.named_params_and_buffers(dst)):
        assert torch.equal(a, b)
    assert dst.fc.weight.requires_grad is False and dst.fc.bias.requires_grad is True

    partial = torch.nn.Module()
    partial.fc = torch.nn.Linear(3, 2)
    misc.copy_params_and_buffers(partial, _Net())  # missing 'stat' is only a warning
    with pytest.raises(KeyError, match='stat'):
        misc.copy_params_and_buffers(partial, _Net(), require_all=True)
    with pytest.raises(ValueError, match=r'fc.weight.*\[2, 4\].*\[2, 3\]'):
        misc.copy_params_and_buffers(_Net(4), _Net(3))


def test_print_module_summary_prints_table_and_returns_outputs(capsys):
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    x = torch.randn(5, 3)
    out = misc.print_module_summary(net, [x])
    assert torch.equal(out, net(x))
    lines = capsys.readouterr().out.splitlines()
    rows = {cells[0]: cells for cells in (re.split(r'\s{2,}', line.strip()) for line in lines if line.strip())}
    assert rows['0'][1:] == ['16', '-', '[5, 4]', 'float32']
    assert rows['2'][1:] == ['10', '-', '[5, 2]', 'float32']
    assert rows['Total'][1:3] == ['26', '0']


def _ddp_worker(rank, init_file, result_dir):
    torch.distributed.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        net = _Net()
        misc.check_ddp_consistency(net)  # identical on both ranks
        if rank == 1:
            net.stat.fill_(1.0)
        outcome = 'ok'
        try:
            misc.check_ddp_consistency(net)
        except AssertionError as e:
            outcome = str(e)
        misc.check_ddp_consistency(net, ignore_regex=r'.*\.stat')
        with open(os.path.join(result_dir, f'rank{rank}.txt'), 'w') as f:
            f.write(outcome)
    finally:
        torch.distributed.destroy_process_group()


def test_check_ddp_consistency_with_gloo(tmp_path):
    mp.spawn(_ddp_worker, args=(str(tmp_path / 'init'), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / 'rank0.txt').read_text() == 'ok'  # rank 0 compares with itself
    assert re.search(r'_Net\.stat', (tmp_path / 'rank1.txt').read_text())
