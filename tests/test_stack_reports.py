"""Every rank's stack through the command line, on one node: on SIGQUIT (the job goes on), on a
stall (report, or stop with exit code 124), and at a failure (where the others were).

Three ranks: two grouped in one place and one alone is all a grouped report needs. Tests whose
subject is the report, not how a rank starts, run --warm (torch imported once, not per rank);
each feature keeps one cold test here, named in its comment, and test_stacks.py's tests of the
cold stack bootstrap start every worker cold. Ranks that only need to be alive import no torch.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

from helpers_cli import processes_with_token, wait_until, write_script

# Ranks 0-1 block in an all_reduce that the last rank (2) never joins; it waits in wait_elsewhere.
# Until then each rank prints a beat, so importing torch on a busy machine is no stall.
HANG = """
import os, sys, threading, time
ready = threading.Event()
def beat():
    while not ready.wait(0.5):
        print("importing", flush=True)
threading.Thread(target=beat, daemon=True).start()
import torch, torch.distributed as dist

def wait_elsewhere():
    time.sleep(600)

def step():
    value = torch.ones(1)
    dist.all_reduce(value)

dist.init_process_group("gloo")
ready.set()
print("ready", flush=True)
if dist.get_rank() == dist.get_world_size() - 1:
    wait_elsewhere()
else:
    step()
"""

# Ranks that only wait, without torch: for the tests whose subject is the launcher's answer to
# a signal, or a report that cannot read any rank, not where in torch a rank waits.
WAITS = """
import time
print("ready", flush=True)
time.sleep(600)
"""

# Rank 1 dies once every rank is computing; the others spin in compute().
DIES_WHILE_OTHERS_COMPUTE = """
import os, time
import torch.distributed as dist

def compute():
    while True: pass  # one line: a rank caught anywhere in the loop is at the same frame

dist.init_process_group("gloo")
dist.barrier()
if dist.get_rank() == 1:
    time.sleep(0.5)
    raise RuntimeError("rank 1 ran out of data")
compute()
"""

# Ranks 1 and 2 raise at the same moment, right after a barrier.
TWO_RAISE = """
import os, time
import torch.distributed as dist

dist.init_process_group("gloo")
dist.barrier()
rank = dist.get_rank()
if rank in (1, 2):
    raise ValueError(f"bad batch on rank {rank}")
time.sleep(600)
"""


def _ready(run, count: int) -> None:
    run.wait_lines("ready", count, timeout=60)


RULE = re.compile(r"^━+$")


def next_report(run, timeout: float = 20.0) -> str:
    """Ask for a report with SIGQUIT; its text once its closing rule has arrived."""
    run.signal(signal.SIGQUIT)
    start = run.wait_line("━━ Where the ranks are", stream="err", timeout=timeout)
    lines = [start]
    while not RULE.match(lines[-1]):
        lines.append(run.wait_line("", stream="err", timeout=timeout))
    return "\n".join(lines)


def report_showing(run, *wanted: str, tries: int = 5) -> str:
    """Reports until one shows all of `wanted`: on a busy machine a rank may not have reached
    its collective, or the last one its wait_elsewhere, at the first one."""
    for _ in range(tries):
        report = next_report(run)
        if all(text in report for text in wanted):
            return report
    raise AssertionError(f"no report showed {wanted!r} in {tries} tries; the last:\n{report}")


def test_sigquit_prints_every_ranks_stack_grouped_and_the_job_goes_on(start, tmp_path: Path, token: str) -> None:
    # Cold: the SIGQUIT report's test on the default path.
    run = start("--nproc", "3", write_script(tmp_path / "hang.py", HANG))
    _ready(run, 3)
    assert re.search(rf"every rank's stack: Ctrl-\\ or kill -QUIT {run.proc.pid}", run.err), run.err
    report = report_showing(run, "ranks 0-1 · step at hang.py", "rank 2 · wait_elsewhere at hang.py")
    assert report.index("rank 2 ·") < report.index("ranks 0-1 ·")  # the smallest group first
    assert len(processes_with_token(token)) >= 3  # the job goes on
    run.signal(signal.SIGINT)
    assert run.wait(timeout=60) == 130, run.err
    assert processes_with_token(token) == []


def test_the_report_saves_every_threads_stack_to_a_file(start, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    # Warm: the file holds the answers the cold SIGQUIT test above reads.
    run = start("--warm", "--nproc", "3", "--log-dir", str(logs), write_script(tmp_path / "hang.py", HANG))
    _ready(run, 3)
    run.signal(signal.SIGQUIT)
    wait_until(lambda: list((logs / "stacks").glob("stacks-*.txt")), timeout=20, what="the full-stacks file")
    run.wait_line("wait_elsewhere", stream="err", timeout=20)
    saved = next((logs / "stacks").glob("stacks-*.txt"))
    assert str(saved) in run.err
    text = saved.read_text()
    assert "wait_elsewhere" in text and "all_reduce" in text
    run.signal(signal.SIGINT)
    assert run.wait(timeout=60) == 130


def test_a_stall_is_reported_unasked_and_the_job_goes_on(start, tmp_path: Path, token: str) -> None:
    # Warm: the report, not the start, is the subject; the cold stall test is the next one.
    run = start("--warm", "--nproc", "3", "--stall-timeout", "2", write_script(tmp_path / "hang.py", HANG))
    _ready(run, 3)
    run.wait_line("no rank wrote a line for", stream="err", timeout=30)
    run.wait_line("wait_elsewhere", stream="err", timeout=20)
    assert "stuck" in run.err
    assert len(processes_with_token(token)) >= 3
    run.signal(signal.SIGINT)
    assert run.wait(timeout=60) == 130


def test_stall_action_stop_ends_the_job_with_exit_code_124(start, tmp_path: Path, token: str) -> None:
    # Cold: the stall report's (and --stall-action stop's) test on the default path. Two ranks:
    # one in the all_reduce, one elsewhere; grouping is the SIGQUIT test's.
    run = start("--nproc", "2", "--stall-timeout", "2", "--stall-action", "stop", "--grace", "5",
                write_script(tmp_path / "hang.py", HANG))
    assert run.wait(timeout=60) == 124, run.err
    assert "wait_elsewhere" in run.err
    assert "root cause: the job stalled (no rank wrote a line for 2 s)" in run.err
    assert "exit code 124" in run.err
    assert processes_with_token(token) == []


def test_a_failure_report_says_where_the_others_were(start, tmp_path: Path, token: str) -> None:
    # Warm: the failure report's cold test is the next one.
    run = start("--warm", "--nproc", "3", write_script(tmp_path / "dies.py", DIES_WHILE_OTHERS_COMPUTE))
    assert run.wait(timeout=90) == 1, run.err
    assert "RuntimeError: rank 1 ran out of data" in run.err
    where = run.err.split("where the other ranks were", 1)
    assert len(where) == 2, run.err
    assert "compute" in where[1] and "ranks 0, 2" in where[1]
    assert processes_with_token(token) == []


def test_two_ranks_that_raise_at_once_are_both_reported_as_failed(start, tmp_path: Path) -> None:
    # Cold: the failure report's test on the default path.
    run = start("--nproc", "3", write_script(tmp_path / "two.py", TWO_RAISE))
    assert run.wait(timeout=90) == 1, run.err
    cause = re.search(r"Root cause \(first observed failure\): rank (\d)", run.err)
    assert cause is not None and cause.group(1) in ("1", "2"), run.err
    other = "2" if cause.group(1) == "1" else "1"
    assert re.search(rf"rank {other} \(local rank {other}, pid \d+\): failed too, raising ValueError: bad batch on rank {other}", run.err), run.err
    assert re.search(r"rank 0 \(local rank 0, pid \d+\): terminated by ddplaunch", run.err), run.err


def test_sigquit_listed_in_signals_to_handle_stops_the_job_as_under_torchrun(start, tmp_path: Path, token: str) -> None:
    run = start("--nproc", "3", "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT",
                write_script(tmp_path / "waits.py", WAITS))
    _ready(run, 3)
    assert "kill -QUIT" not in run.err
    run.signal(signal.SIGQUIT)
    assert run.wait(timeout=60) == 128 + signal.SIGQUIT, run.err
    assert processes_with_token(token) == []


def test_without_the_bootstrap_and_without_py_spy_the_report_says_why(start, tmp_path: Path, job_env) -> None:
    run = start("--nproc", "3", "--no-stack-bootstrap", write_script(tmp_path / "waits.py", WAITS),
                env={**job_env, "DDPLAUNCH_PY_SPY": "0"})
    _ready(run, 3)
    run.signal(signal.SIGQUIT)
    run.wait_line("py-spy", stream="err", timeout=20)
    assert "ranks 0-2" in run.err
    run.signal(signal.SIGINT)
    assert run.wait(timeout=60) == 130


def test_the_workers_environment_does_not_show_the_bootstrap(start, tmp_path: Path, job_env) -> None:
    script = write_script(
        tmp_path / "env.py",
        """
import os, sys
print("PYTHONPATH" in os.environ, os.environ.get("DDPLAUNCH_STACKS"), any("bootstrap" in p for p in sys.path))
""",
    )
    run = start("--nproc", "1", script, env={k: v for k, v in job_env.items() if k != "PYTHONPATH"})
    assert run.wait(timeout=60) == 0, run.err
    assert "0 | False None False" in run.out
