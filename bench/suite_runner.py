"""Run a list of checks as subprocesses under a time budget; keep summary.json / summary.md current.

Each step runs its commands in order, in their own process group, under a timeout (the step's own, cut to
what is left of the budget). A failing, crashing or timed-out step is recorded and the suite goes on; a
step that no longer fits in the budget is skipped with that reason. The summary is rewritten atomically
before the first step and after every step (the step about to run is marked 'running'), so a suite
killed from outside still leaves every finished result; on SIGTERM or Ctrl-C the running step's
processes are killed and it is recorded as stopped. All output goes to one log, `steps.log`.
"""

import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional, Sequence, Union

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'eg3d'))

from dnnlib.util import atomic_write_path  # noqa: E402  (needs the path above)

Command = Union[Sequence[str], Callable[[], Sequence[str]]]  # a callable is evaluated just before it runs
MIN_STEP_S = 15  # a step that would get less than this is skipped: it could not finish anyway
TAIL_CHARS = 3000


@dataclasses.dataclass
class Verdict:
    """What a step showed: status 'pass' or 'fail', the measured figure, and whether the target was met
    (None: the step has no numeric target, or it cannot be judged here, e.g. a benchmark in a dry run)."""
    status: str
    figure: str
    target_met: Optional[bool] = None
    reason: str = ''
    details: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class StepOutput:
    """What the step's commands did: exit status of the last command run, its whole output, a timeout flag."""
    returncode: int
    output: str
    timed_out: bool
    seconds: float


@dataclasses.dataclass
class Step:
    name: str
    title: str
    target: str
    commands: List[Command]
    timeout_s: float
    judge: Callable[[StepOutput], Verdict]
    skip_reason: Optional[str] = None  # set: the step is not run (e.g. CUDA only, in a dry run)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


def write_summary(out_dir: str, summary: dict) -> None:
    """summary.json and summary.md, each replaced atomically."""
    with atomic_write_path(os.path.join(out_dir, 'summary.json')) as tmp:
        with open(tmp, 'w') as f:
            json.dump(summary, f, indent=2, default=str)  # details may hold numpy scalars
    with atomic_write_path(os.path.join(out_dir, 'summary.md')) as tmp:
        with open(tmp, 'w') as f:
            f.write(summary_markdown(summary))


def summary_markdown(summary: dict) -> str:
    env = summary['environment']
    lines = [f"# GPU suite: {summary['mode']}", '',
             f"Device: {env.get('device')}; torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, "
             f"Python {env.get('python')}; commit {env.get('commit')}.",
             f"Started {summary['started']}, updated {summary['updated']}, {summary['elapsed_s']:.0f} s of a "
             f"{summary['budget_s']:.0f} s budget{'' if summary['finished'] else ' (not finished)'}.", '']
    lines += [f'- {k}: {v}' for k, v in env.items() if k not in ('device', 'torch', 'cuda', 'cudnn', 'python', 'commit')]
    lines += ['', '| check | status | figure | target | target met | seconds |', '|---|---|---|---|---|---:|']
    for c in summary['checks']:
        met = {True: 'yes', False: 'no', None: '-'}[c['target_met']]
        lines.append(f"| {c['name']}: {c['title']} | {c['status']} | {c['figure']} | {c['target']} | {met} | "
                     f"{c['seconds']:.0f} |")
    notes = [c for c in summary['checks'] if c['reason']]
    if notes:
        lines += ['', '## Notes', '']
        lines += [f"- {c['name']} ({c['status']}): {c['reason']}" for c in notes]
    failed = [c for c in summary['checks'] if c['status'] == 'fail' and c['output_tail']]
    for c in failed:
        lines += ['', f"## {c['name']}: end of its output", '', '```', c['output_tail'].rstrip(), '```']
    return '\n'.join(lines) + '\n'


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _raise_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _run_command(argv: Sequence[str], log, timeout_s: float, env: Dict[str, str], cwd: str) -> tuple:
    """(returncode, timed_out); the command's process group is killed when it runs out of time."""
    log.write(f"\n$ {' '.join(argv)}\n")
    log.flush()
    t0 = time.perf_counter()
    # Its own process group (not session), so that what it starts can be killed with it, and still
    # ends with the session of whoever runs the suite.
    proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, process_group=0)
    try:
        returncode, timed_out = proc.wait(timeout=max(timeout_s, 0.1)), False
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        returncode, timed_out = proc.wait(), True
    except BaseException:  # the suite itself is being stopped (SIGTERM, Ctrl-C): the step goes with it
        _kill_group(proc)
        raise
    log.write(f"[{'killed: out of time' if timed_out else f'exit status {returncode}'} after "
              f"{time.perf_counter() - t0:.1f} s]\n")
    log.flush()
    return returncode, timed_out


def run_step(step: Step, log_path: str, timeout_s: float, env: Dict[str, str], cwd: str) -> StepOutput:
    """Run the step's commands in order until one fails or time runs out; collect their output from the log."""
    t0 = time.perf_counter()
    with open(log_path, 'a') as log:
        log.write(f'\n===== {step.name}: {step.title} (timeout {timeout_s:.0f} s) =====\n')
        log.flush()
        start = log.tell()
        returncode, timed_out = 0, False
        for command in step.commands:
            try:
                argv = command() if callable(command) else command
            except Exception as e:  # e.g. the file an earlier command should have written is missing
                log.write(f'could not build the next command: {type(e).__name__}: {e}\n')
                returncode = 1
                break
            left = timeout_s - (time.perf_counter() - t0)
            returncode, timed_out = _run_command(argv, log, left, env, cwd)
            if returncode != 0 or timed_out:
                break
    with open(log_path) as log:
        log.seek(start)
        output = log.read()
    return StepOutput(returncode, output, timed_out, time.perf_counter() - t0)


def judge_output(step: Step, result: StepOutput) -> Verdict:
    """The step's verdict; a timeout or an exception in the judge is a failure with its reason."""
    if result.timed_out:
        return Verdict('fail', 'timed out', reason=f'timed out after {result.seconds:.0f} s')
    try:
        return step.judge(result)
    except Exception:
        return Verdict('fail', 'no figure', reason='could not judge the output: ' + traceback.format_exc(limit=3))


def run_suite(steps: List[Step], out_dir: str, budget_s: float, environment: dict, mode: str,
              env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None) -> dict:
    """Run `steps` in order within `budget_s` seconds; returns the final summary (also on disk in out_dir)."""
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(out_dir, 'steps.log')
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED='1')
    t0 = time.perf_counter()
    summary = dict(mode=mode, started=_now(), updated=_now(), elapsed_s=0.0, budget_s=float(budget_s), finished=False,
                   environment=environment,
                   checks=[dict(name=s.name, title=s.title, target=s.target, status='pending', figure='',
                                target_met=None, reason='', seconds=0.0, details={}, output_tail='') for s in steps])

    def save() -> None:
        summary['updated'] = _now()
        summary['elapsed_s'] = time.perf_counter() - t0
        write_summary(out_dir, summary)

    save()
    previous_handler = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        for step, check in zip(steps, summary['checks']):
            left = budget_s - (time.perf_counter() - t0)
            if step.skip_reason is not None:
                check.update(status='skipped', reason=step.skip_reason)
            elif left < MIN_STEP_S:
                check.update(status='skipped', reason=f'budget exhausted ({max(left, 0):.0f} s left of {budget_s:.0f} s)')
            else:
                check['status'] = 'running'
                save()
                try:
                    result = run_step(step, log_path, min(step.timeout_s, left), env, cwd or os.getcwd())
                except BaseException:
                    check.update(status='fail', reason='the suite was stopped during this step')
                    save()
                    raise
                verdict = judge_output(step, result)
                check.update(status=verdict.status, figure=verdict.figure,
                             target_met=None if verdict.target_met is None else bool(verdict.target_met),
                             reason=verdict.reason, details=verdict.details, seconds=round(result.seconds, 1),
                             output_tail=result.output[-TAIL_CHARS:] if verdict.status == 'fail' else '')
            save()
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    summary['finished'] = True
    save()
    return summary
