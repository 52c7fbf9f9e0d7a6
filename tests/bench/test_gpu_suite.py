"""bench/gpu_suite.py: the step runner's resilience and the whole suite as a CPU dry run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / 'bench'
sys.path.insert(0, str(BENCH_DIR))

import gpu_suite  # noqa: E402
import suite_runner  # noqa: E402
from suite_runner import Step, Verdict  # noqa: E402

CHECKS = ['cuda_ops_tests', 'golden_on_cuda', 'fp16_adapters', 'train_and_render', 'ops_speed', 'adapters_speed',
          'train_step_memory', 'multi_identity_speed', 'encoder_speed', 'per_image_steps']
BENCHMARKS = ['ops_speed', 'adapters_speed', 'train_step_memory', 'multi_identity_speed', 'encoder_speed',
              'per_image_steps']


def python(code: str) -> list:
    return [sys.executable, '-c', code]


def passes(result) -> Verdict:
    """Pass, with the step's last printed line (not the runner's '$ command' and '[exit status]' lines) as figure."""
    printed = [line for line in result.output.splitlines() if line and not line.startswith(('$ ', '['))]
    return Verdict('pass', printed[-1])


def process_alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent's reaper counts as ended)."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except FileNotFoundError:
        return False


def test_runner_records_failures_and_goes_on(tmp_path):
    pid_file = tmp_path / 'grandchild.pid'
    seen_on_disk = {}

    def judge_after_reading_summary(result):
        summary = json.loads((tmp_path / 'out' / 'summary.json').read_text())
        seen_on_disk.update({c['name']: c['status'] for c in summary['checks']})
        return passes(result)

    def missing_snapshot():
        raise FileNotFoundError('no snapshot')

    hang = ('import subprocess, sys; p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]); '
            f'open({str(pid_file)!r}, "w").write(str(p.pid)); p.wait()')
    steps = [
        Step('crashes', 'exits with 3', '-', [python('print("partial"); raise SystemExit(3)')], 30,
             lambda r: gpu_suite.command_failed(r) or passes(r)),
        Step('hangs', 'never ends', '-', [python(hang)], 2, passes),
        Step('bad_output', 'output the judge cannot read', '-', [python('print("no table")')], 30,
             lambda r: Verdict('pass', gpu_suite.find_row(r.output, 'K', lambda k: True)['speed-up'])),
        Step('second_command_unbuildable', 'a command built from a missing file', '-',
             [python('print(1)'), missing_snapshot], 30, lambda r: gpu_suite.command_failed(r) or passes(r)),
        Step('cuda_only', 'skipped', '-', [python('raise SystemExit(1)')], 30, passes, skip_reason='needs CUDA'),
        Step('works', 'prints ok', '-', [python('print("first")'), python('print("ok")')], 30,
             judge_after_reading_summary),
    ]
    t0 = time.perf_counter()
    summary = suite_runner.run_suite(steps, str(tmp_path / 'out'), budget_s=120, environment=dict(device='test'),
                                     mode='test')
    assert time.perf_counter() - t0 < 60
    checks = {c['name']: c for c in summary['checks']}
    assert [c['name'] for c in summary['checks']] == [s.name for s in steps]
    assert checks['crashes']['status'] == 'fail' and checks['crashes']['reason'] == 'exit status 3'
    assert 'partial' in checks['crashes']['output_tail']
    assert checks['hangs']['status'] == 'fail' and 'timed out' in checks['hangs']['reason']
    assert 1.5 < checks['hangs']['seconds'] < 20
    deadline = time.time() + 5
    while process_alive(int(pid_file.read_text())) and time.time() < deadline:
        time.sleep(0.1)
    assert not process_alive(int(pid_file.read_text())), 'the timed-out step left its child process running'
    assert checks['bad_output']['status'] == 'fail' and 'could not judge' in checks['bad_output']['reason']
    assert checks['second_command_unbuildable']['status'] == 'fail'
    assert checks['cuda_only']['status'] == 'skipped' and checks['cuda_only']['reason'] == 'needs CUDA'
    assert checks['works']['status'] == 'pass' and checks['works']['figure'] == 'ok'
    # The summary was on disk, with every earlier result, before the last step was judged.
    assert seen_on_disk == {'crashes': 'fail', 'hangs': 'fail', 'bad_output': 'fail',
                            'second_command_unbuildable': 'fail', 'cuda_only': 'skipped', 'works': 'running'}
    on_disk = json.loads((tmp_path / 'out' / 'summary.json').read_text())
    assert on_disk['finished'] and [c['status'] for c in on_disk['checks']] == [c['status'] for c in summary['checks']]
    markdown = (tmp_path / 'out' / 'summary.md').read_text()
    assert '| crashes: exits with 3 | fail |' in markdown and 'could not build the next command' in markdown
    assert 'partial' in (tmp_path / 'out' / 'steps.log').read_text()


def test_runner_skips_what_no_longer_fits_the_budget(tmp_path):
    steps = [Step('late', 'would run', '-', [python('print(1)')], 30, passes)]
    summary = suite_runner.run_suite(steps, str(tmp_path), budget_s=suite_runner.MIN_STEP_S - 1,
                                     environment={}, mode='test')
    assert summary['checks'][0]['status'] == 'skipped' and 'budget exhausted' in summary['checks'][0]['reason']


def test_stopped_suite_kills_the_running_step_and_leaves_its_summary(tmp_path):
    """SIGTERM (what a timeout sends first) during a step: its processes die with the suite, the summary says so."""
    pid_file, out = tmp_path / 'grandchild.pid', tmp_path / 'out'
    hang = ('import subprocess, sys; p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]); '
            f'open({str(pid_file)!r}, "w").write(str(p.pid)); p.wait()')
    script = (f'import sys; sys.path.insert(0, {str(BENCH_DIR)!r}); import suite_runner as r\n'
              f'ok = lambda res: r.Verdict("pass", "ok")\n'
              f'steps = [r.Step("done", "-", "-", [[sys.executable, "-c", "pass"]], 30, ok),\n'
              f'         r.Step("hangs", "-", "-", [[sys.executable, "-c", {hang!r}]], 60, ok),\n'
              f'         r.Step("never", "-", "-", [[sys.executable, "-c", "pass"]], 30, ok)]\n'
              f'r.run_suite(steps, {str(out)!r}, 120, {{}}, "test")\n')
    suite = subprocess.Popen([sys.executable, '-c', script])
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    suite.send_signal(signal.SIGTERM)
    assert suite.wait(timeout=30) == 128 + signal.SIGTERM
    grandchild = int(pid_file.read_text())
    deadline = time.time() + 5
    while process_alive(grandchild) and time.time() < deadline:
        time.sleep(0.1)
    assert not process_alive(grandchild)
    checks = json.loads((out / 'summary.json').read_text())['checks']
    assert [(c['name'], c['status']) for c in checks] == [('done', 'pass'), ('hangs', 'fail'), ('never', 'pending')]
    assert checks[1]['reason'] == 'the suite was stopped during this step'


def test_gpu_judges_compare_figures_with_targets(tmp_path):
    """On a GPU a benchmark passes only when its target is met (outputs in the scripts' formats)."""
    def verdict(step, output):
        return suite_runner.judge_output(step, suite_runner.StepOutput(0, output, False, 1.0))

    def ops_output(speedup):
        return ('| benchmark | ref (ms) | cuda (ms) | speed-up |\n|---|---|---|---|\n'
                '| bias_act lrelu+bias+clamp, fp32 [4, 256, 256, 256] | 3.00 | 1.00 | 3.00x |\n'
                f'| TriPlaneGenerator FFHQ-512 synthesis fwd+bwd, batch 4 | 300.00 | 100.00 | {speedup} |\n')

    ops = gpu_suite.ops_step(dry_run=False)
    assert (verdict(ops, ops_output('2.50x')).status, verdict(ops, ops_output('2.50x')).target_met) == ('pass', True)
    missed = verdict(ops, ops_output('1.20x'))
    assert (missed.status, missed.target_met) == ('fail', False) and 'at least 2' in missed.reason

    def train_step_output(lora_bytes):
        rows = [dict(mode='lora', peak_bytes=lora_bytes, sec_per_step=0.2, device='cuda'),
                dict(mode='full', peak_bytes=10 * 2**30, sec_per_step=0.3, device='cuda')]
        return 'table\n' + '\n'.join(json.dumps(r) for r in rows) + '\n'

    memory = gpu_suite.train_step_step(dry_run=False, lpips='none')
    assert verdict(memory, train_step_output(5 * 2**30)).target_met is True
    assert verdict(memory, train_step_output(7 * 2**30)).status == 'fail'
    assert 'peak CUDA memory: LoRA 5,120 MiB vs full 10,240 MiB (50%)' in verdict(memory, train_step_output(5 * 2**30)).figure

    multi = gpu_suite.multi_identity_step(dry_run=False, lpips='none')
    table = ('| K | one run (s) | K sequential runs (s) | speed-up |\n|---:|---:|---:|---:|\n| 16 | 20.0 | {} | {} |\n\n'
             '| K | batch | ratio |\n|---:|---:|---:|\n| 16 | 16 | 0.42x |\n')
    assert verdict(multi, table.format('80.0', '4.00x')).target_met is True
    assert verdict(multi, table.format('40.0', '2.00x')).status == 'fail'
    assert verdict(multi, 'Traceback: CUDA out of memory').status == 'fail'
    crashed = suite_runner.judge_output(multi, suite_runner.StepOutput(1, 'CUDA out of memory', False, 1.0))
    assert (crashed.status, crashed.reason) == ('fail', 'exit status 1')

    encoder = gpu_suite.encoder_speed_step(dry_run=False)
    table = ('| measurement | images/s | ms per image |\n|---|---:|---:|\n| encoder network, batch 1 | 310.00 | 3.2 |\n'
             '| encoder network, batch 8 | 900.00 | 1.1 |\n'
             '| 5-iteration inversion with its renders, raw, batch 1 | 4.10 | 243.9 |\n'
             '| 5-iteration inversion with its renders, guarded, batch 1 | 2.05 | 487.8 |\n')
    reported = verdict(encoder, table)
    assert (reported.status, reported.target_met) == ('pass', None)
    assert reported.figure == 'encoder network 310.00 images/s; 5-iteration inversion 4.10 images/s raw, 2.05 guarded (batch 1)'
    assert verdict(encoder, 'Traceback: CUDA out of memory').status == 'fail'


def test_rows_are_read_from_the_table_with_the_asked_columns():
    text = ('Training:\n\n| K | one run (s) | speed-up |\n|---:|---:|---:|\n| 1 | 2.0 | 0.97x |\n| 16 | 40.4 | 3.05x |\n\n'
            'Rendering:\n\n| K | batch | ratio |\n|---:|---:|---:|\n| 16 | 16 | 0.42x |\n')
    assert gpu_suite.find_row(text, 'K', lambda k: k == '16')['ratio'] == '0.42x'
    row = gpu_suite.find_row(text, 'K', lambda k: k == '16', 'speed-up')
    assert gpu_suite.number(row['speed-up']) == 3.05
    assert gpu_suite.number('1,540,456') == 1540456
    with pytest.raises(ValueError, match='no table row'):
        gpu_suite.find_row(text, 'K', lambda k: k == '4', 'speed-up')


def test_cli_refuses_bad_arguments_before_running(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gpu_suite.main(['--out', str(tmp_path), '--dry-run', '--only', 'ops_speed,warp_drive'])
    assert 'unknown check(s) warp_drive' in capsys.readouterr().err
    if not gpu_suite.torch.cuda.is_available():
        with pytest.raises(SystemExit):
            gpu_suite.main(['--out', str(tmp_path)])
        assert 'no CUDA device' in capsys.readouterr().err
    assert not (tmp_path / 'summary.json').exists()


def test_dry_run_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    out = tmp_path / 'out'
    status = gpu_suite.main(['--out', str(out), '--dry-run', '--work', str(tmp_path / 'work')])
    summary = json.loads((out / 'summary.json').read_text())
    checks = {c['name']: c for c in summary['checks']}
    failures = {n: (c['reason'], c['output_tail'][-1500:]) for n, c in checks.items() if c['status'] != 'pass'
                and n != 'cuda_ops_tests'}
    assert not failures and status == 0
    assert [c['name'] for c in summary['checks']] == CHECKS
    assert summary['finished'] and summary['mode'].startswith('dry run')
    assert summary['environment']['torch'] and summary['environment']['device'].startswith('CPU')
    assert checks['cuda_ops_tests']['status'] == 'skipped' and 'CUDA' in checks['cuda_ops_tests']['reason']
    assert checks['golden_on_cuda']['figure'] == '2 passed, 0 failed, 0 skipped'
    assert checks['fp16_adapters']['target_met'] is True
    assert checks['train_and_render']['target_met'] is True and (out / 'samples.png').stat().st_size > 0
    for name in BENCHMARKS:
        assert checks[name]['target_met'] is None and 'target not judged' in checks[name]['reason']
        assert any(ch.isdigit() for ch in checks[name]['figure'])
    assert 'LoRA' in checks['train_step_memory']['figure'] and 'K=2' in checks['multi_identity_speed']['figure']
    assert 'ms per image in steps of 1 vs' in checks['per_image_steps']['figure']
    markdown = (out / 'summary.md').read_text()
    assert all(f'| {name}: ' in markdown for name in CHECKS)
    assert sorted(os.listdir(out)) == ['samples.png', 'steps.log', 'summary.json', 'summary.md']
