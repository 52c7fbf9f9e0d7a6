"""torch_utils.training_stats: report / Collector statistics, single process and gloo multi-process."""
import math
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from torch_utils import training_stats


def test_collector_mean_std_num_between_updates():
    c = training_stats.Collector(regex='ts_basic/.*')
    assert training_stats.report('ts_basic/a', [1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]
    training_stats.report('ts_basic/a', torch.tensor(4.0))
    training_stats.report('ts_basic/a', [])  # empty reports are allowed
    training_stats.report('ts_other/b', 1.0)
    c.update()
    assert c.num('ts_basic/a') == 4
    assert c.mean('ts_basic/a') == pytest.approx(2.5)
    assert c.std('ts_basic/a') == pytest.approx(np.std([1, 2, 3, 4]))
    assert c['ts_basic/a'] == pytest.approx(2.5)
    assert c.names() == ['ts_basic/a']
    assert c.as_dict() == {'ts_basic/a': {'num': 4, 'mean': pytest.approx(2.5), 'std': pytest.approx(np.std([1, 2, 3, 4]))}}

    # Next round: only new reports count; keep_previous keeps the last averages when nothing came.
    training_stats.report('ts_basic/a', 10.0)
    c.update()
    assert c.num('ts_basic/a') == 1 and c.mean('ts_basic/a') == 10.0 and c.std('ts_basic/a') == 0.0
    c.update()
    assert c.mean('ts_basic/a') == 10.0


def test_collector_without_keep_previous_and_report0():
    c = training_stats.Collector(regex='ts_nokeep/.*', keep_previous=False)
    training_stats.report0('ts_nokeep/x', [2.0, 4.0])  # rank 0 in a single process
    c.update()
    assert c.mean('ts_nokeep/x') == 3.0
    c.update()
    assert c.num('ts_nokeep/x') == 0 and math.isnan(c.mean('ts_nokeep/x')) and math.isnan(c.std('ts_nokeep/x'))


def test_collector_only_sees_reports_after_its_creation():
    training_stats.report('ts_late/x', 100.0)
    c = training_stats.Collector(regex='ts_late/.*')
    training_stats.report('ts_late/x', 1.0)
    c.update()
    assert c.num('ts_late/x') == 1 and c.mean('ts_late/x') == 1.0


def _worker(rank, init_file, result_dir):
    torch.distributed.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    try:
        training_stats.init_multiprocessing(rank=rank, sync_device=torch.device('cpu'))
        c = training_stats.Collector(regex='mp/.*')
        training_stats.report('mp/loss', [1.0, 2.0] if rank == 0 else [3.0, 4.0, 5.0])
        training_stats.report0('mp/only_rank0', 7.0 if rank == 0 else 100.0)
        c.update()
        with open(os.path.join(result_dir, f'rank{rank}.txt'), 'w') as f:
            f.write(f"{c.num('mp/loss')} {c.mean('mp/loss')} {c.std('mp/loss')} "
                    f"{c.num('mp/only_rank0')} {c.mean('mp/only_rank0')}")
    finally:
        torch.distributed.destroy_process_group()


def test_statistics_are_summed_across_gloo_processes(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / 'init'), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        num, mean, std, num0, mean0 = (tmp_path / f'rank{rank}.txt').read_text().split()
        assert int(num) == 5 and float(mean) == pytest.approx(3.0)
        assert float(std) == pytest.approx(np.std([1, 2, 3, 4, 5]))
        assert int(num0) == 1 and float(mean0) == 7.0


def test_init_multiprocessing_after_sync_is_an_error():
    # Earlier tests in this process already called Collector.update().
    c = training_stats.Collector(regex='ts_sync/.*')
    training_stats.report('ts_sync/x', 1.0)
    c.update()
    with pytest.raises(RuntimeError):
        training_stats.init_multiprocessing(rank=0, sync_device=None)
