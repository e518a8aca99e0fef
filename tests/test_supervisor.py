"""Supervision with real processes and real signals: exit codes, teardown, nothing left behind."""

from __future__ import annotations

import shlex
import signal
import subprocess
import time
from pathlib import Path

from helpers_cli import (
    kill_token, launcher_argv, processes_with_token, run_cli, wait_until, without_warm_interpreters, write_script,
)

# Each worker prints "ready <rank>" once its own children are up, so tests wait on that line.
TREE_WORKER = """
import os, signal, subprocess, sys, time
rank = int(os.environ["RANK"])
STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('x', flush=True); time.sleep(300)"
kids = [
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"]),
    subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE),
    # a daemon-like grandchild: its own session, out of the worker's process group
    subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE, start_new_session=True),
]
for kid in kids[1:]:
    kid.stdout.readline()  # the SIGTERM-ignoring grandchildren have set their handlers
print(f"ready {rank}")
time.sleep(300)
"""


def test_success_exits_zero_and_leaves_nothing(start, tmp_path: Path, token: str) -> None:
    script = write_script(tmp_path / "ok.py", "import os; print('hi', os.environ['RANK'])\n")
    run = start("--nproc", "3", script)
    assert run.wait() == 0
    assert sorted(run.seen["out"]) == ["0 | hi 0", "1 | hi 1", "2 | hi 2"]
    assert processes_with_token(token) == []


def test_first_failure_sets_exit_code_and_stops_the_others_within_a_second(start, tmp_path: Path, token: str) -> None:
    script = write_script(
        tmp_path / "fail.py",
        """
import os, sys, time
rank = int(os.environ["RANK"])
print(f"ready {rank}")
if rank == 2:
    time.sleep(0.5)
    print(f"dying at {time.time()}")
    os._exit(7)
time.sleep(300)
""",
    )
    run = start("--nproc", "4", script)
    run.wait_lines("ready", 4)
    code = run.wait(timeout=30)
    ended = time.time()
    died_at = _died_at(run.out)
    assert code == 7
    assert ended - died_at < 1.0, f"launcher took {ended - died_at:.2f}s after the failure"
    assert processes_with_token(token) == []
    assert "Root cause (first observed failure): rank 2" in run.err
    assert "exit code 7" in run.err
    assert run.err.count("terminated by ddplaunch (SIGTERM)") == 3


def _died_at(out: str) -> float:
    return float(next(line for line in out.splitlines() if "dying at" in line).split()[-1])


def test_worker_killed_by_signal_reports_128_plus_n_and_out_of_memory_hint(start, tmp_path: Path) -> None:
    script = write_script(
        tmp_path / "oom.py",
        "import os, signal\nif os.environ['RANK'] == '1':\n    os.kill(os.getpid(), signal.SIGKILL)\n",
    )
    run = start("--nproc", "2", script)
    assert run.wait() == 128 + signal.SIGKILL
    assert "killed, possibly out of memory (SIGKILL)" in run.err


def _start_tree(start, tmp_path: Path, *extra: str):
    script = write_script(tmp_path / "tree.py", TREE_WORKER)
    run = start("--nproc", "2", *extra, script)
    run.wait_lines("ready", 2)
    return run


def test_sigint_forwards_stops_the_whole_tree_and_exits_130(start, tmp_path: Path, token: str) -> None:
    run = _start_tree(start, tmp_path, "--grace", "1")
    assert len(without_warm_interpreters(processes_with_token(token))) == 10  # launcher, guard, 2 workers, 6 grandchildren
    run.signal(signal.SIGINT)
    assert run.wait() == 130
    wait_until(lambda: processes_with_token(token) == [], 2, "the job's processes to end")
    assert "stopped by SIGINT" in run.err


def test_sigterm_exits_143_and_leaves_nothing(start, tmp_path: Path, token: str) -> None:
    run = _start_tree(start, tmp_path, "--grace", "1")
    run.signal(signal.SIGTERM)
    assert run.wait() == 143
    wait_until(lambda: processes_with_token(token) == [], 2, "the job's processes to end")


def test_sigkill_of_the_launcher_leaves_nothing_after_two_seconds(start, tmp_path: Path, token: str) -> None:
    run = _start_tree(start, tmp_path)
    assert len(without_warm_interpreters(processes_with_token(token))) == 10
    run.signal(signal.SIGKILL)
    run.wait()
    wait_until(lambda: processes_with_token(token) == [], 2.0, "workers and grandchildren to die")


def test_second_ctrl_c_kills_at_once(start, tmp_path: Path, token: str) -> None:
    script = write_script(
        tmp_path / "stubborn.py",
        """
import os, signal, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print(f"ready {os.environ['RANK']}")
time.sleep(300)
""",
    )
    run = start("--nproc", "2", "--grace", "60", script)
    run.wait_lines("ready", 2)
    run.signal(signal.SIGINT)
    run.wait_line("stopping all workers", stream="err")
    assert run.proc.poll() is None  # the stubborn workers hold it in the graceful stop
    second = time.monotonic()
    run.signal(signal.SIGINT)
    assert run.wait() == 130
    assert time.monotonic() - second < 2.0
    wait_until(lambda: processes_with_token(token) == [], 2, "the workers to die")


def test_grace_then_sigkill_for_a_worker_that_ignores_sigterm(start, tmp_path: Path, token: str) -> None:
    script = write_script(
        tmp_path / "ignore.py",
        """
import os, signal, time
rank = os.environ["RANK"]
if rank == "0":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("ready 0")
    time.sleep(300)
print("ready 1")
time.sleep(0.3)
raise SystemExit(3)
""",
    )
    run = start("--nproc", "2", "--grace", "0.5", script)
    run.wait_lines("ready", 2)
    assert run.wait() == 3
    assert "sending SIGKILL" in run.err
    assert "terminated by ddplaunch (SIGKILL)" in run.err
    assert processes_with_token(token) == []


def test_two_jobs_side_by_side_leave_each_other_alone(start, tmp_path: Path, job_env, token: str) -> None:
    survivor = write_script(tmp_path / "survivor.py", "import os, time\nprint('ready', os.environ['RANK'])\ntime.sleep(300)\n")
    failing = write_script(tmp_path / "failing.py", "raise SystemExit(5)\n")
    other_env = dict(job_env, DDPLAUNCH_TEST_TOKEN=token + "-other")
    try:
        first = start("--nproc", "2", survivor, env=other_env)
        first.wait_lines("ready", 2)
        second = start("--nproc", "2", failing)
        assert second.wait() == 5
        assert first.proc.poll() is None
        assert len(without_warm_interpreters(processes_with_token(token + "-other"))) == 4  # launcher, guard, 2 workers
        first.signal(signal.SIGTERM)
        assert first.wait() == 143
    finally:
        kill_token(token + "-other")


def test_restarts_start_every_worker_again_with_the_restart_count(start, tmp_path: Path) -> None:
    script = write_script(
        tmp_path / "flaky.py",
        """
import os
count = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
print(f"attempt {count} rank {os.environ['RANK']} port {os.environ['MASTER_PORT']}")
if count < 2 and os.environ["RANK"] == "1":
    raise SystemExit(4)
""",
    )
    run = start("--nproc", "2", "--max-restarts", "2", script)
    assert run.wait() == 0
    assert "restart 2 of 2" in run.err
    assert any("attempt 2 rank 0" in line for line in run.seen["out"])
    run = start("--nproc", "2", "--max-restarts", "1", script)
    assert run.wait() == 4
    assert "Root cause" in run.err


def test_leftover_daemon_after_success_is_stopped(start, tmp_path: Path, token: str) -> None:
    script = write_script(
        tmp_path / "daemon.py",
        """
import subprocess, sys
# start_new_session: it leaves the worker's process group, as a daemon would
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
print("spawned")
""",
    )
    run = start("--nproc", "1", "--grace", "1", script)
    assert run.wait() == 0
    wait_until(lambda: processes_with_token(token) == [], 2, "the daemon to be stopped")


def test_sigusr1_is_relayed_to_workers_without_stopping_them(start, tmp_path: Path) -> None:
    script = write_script(
        tmp_path / "usr1.py",
        """
import os, signal, threading
got = threading.Event()
signal.signal(signal.SIGUSR1, lambda *a: got.set())
print(f"ready {os.environ['RANK']}")
got.wait(30)
print("checkpointing on SIGUSR1" if got.is_set() else "no signal")
""",
    )
    run = start("--nproc", "2", script)
    run.wait_lines("ready", 2)
    run.signal(signal.SIGUSR1)
    assert run.wait() == 0
    assert run.out.count("checkpointing on SIGUSR1") == 2


def test_log_dir_holds_rank_files_and_launcher_events(start, tmp_path: Path) -> None:
    script = write_script(tmp_path / "log.py", "import os\nprint('line from', os.environ['RANK'])\n")
    log_dir = tmp_path / "logs"
    run = start("--nproc", "2", "--log-dir", str(log_dir), script)
    assert run.wait() == 0
    assert (log_dir / "rank1.log").read_text() == "line from 1\n"
    events = (log_dir / "launcher.log").read_text()
    assert "started rank 0" in events and "rank 1 pid" in events


def test_module_no_python_and_local_rank_arg(start, tmp_path: Path) -> None:
    (tmp_path / "mymod.py").write_text("import sys\nprint('args', sys.argv[1:])\n")
    run = start("-m", "--local-rank-arg", "mymod", "--lr", "0.1")
    assert run.wait() == 0
    assert "0 | args ['--local-rank=0', '--lr', '0.1']" in run.out
    run = start("--nproc", "2", "--no-python", "sh", "-c", 'echo "shell rank $RANK"')
    assert run.wait() == 0
    assert sorted(run.seen["out"]) == ["0 | shell rank 0", "1 | shell rank 1"]


def test_launcher_imports_neither_torch_nor_rich_on_one_node(tmp_path: Path, job_env: dict[str, str]) -> None:
    script = write_script(tmp_path / "noop.py", "")
    done = run_cli(["--nproc", "2", script], job_env, cwd=tmp_path, timeout=60, interpreter_options=("-X", "importtime"))
    assert done.code == 0, done.stderr
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if "import time:" in line}
    assert "torch" not in imported
    assert "rich" not in imported
    assert "psutil" not in imported  # only a teardown with stray processes needs it


def test_worker_environment_passes_through_and_env_flag_adds(start, tmp_path: Path, job_env) -> None:
    script = write_script(
        tmp_path / "env.py",
        "import os\nprint(os.environ['MY_SETTING'], os.environ['EXTRA'], os.environ['OMP_NUM_THREADS'])\n",
    )
    env = dict(job_env, MY_SETTING="from shell", OMP_NUM_THREADS="3")
    run = start("--env", "EXTRA=a b=c", script, env=env)
    assert run.wait() == 0
    assert run.out == "0 | from shell a b=c 3"


def test_launcher_exit_is_not_held_by_a_closed_stdout(tmp_path: Path, job_env: dict[str, str]) -> None:
    """`ddplaunch ... | head -n 3`: stdout closes early; the launcher goes on and exits with its workers' 0."""
    script = write_script(tmp_path / "many.py", "for i in range(20000):\n    print(i)\n")  # far more than a pipe holds
    shell = f'{shlex.join(launcher_argv("--nproc", "2", script))} | head -n 3; exit "${{PIPESTATUS[0]}}"'
    done = subprocess.run(["bash", "-c", shell], cwd=tmp_path, env=job_env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr  # the launcher's exit code: PIPESTATUS[0], not head's
    assert len(done.stdout.splitlines()) == 3
    assert "Traceback" not in done.stderr


def test_sigkill_reaches_a_stubborn_daemon_that_left_its_group(start, tmp_path: Path, token: str) -> None:
    script = write_script(
        tmp_path / "stubborn_daemon.py",
        """
import os, signal, subprocess, sys, time
if os.environ["RANK"] == "0":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(300)"],
        start_new_session=True, stdout=subprocess.PIPE)
    child.stdout.readline()
    print("ready 0")
    time.sleep(300)
print("ready 1")
time.sleep(0.3)
raise SystemExit(6)
""",
    )
    run = start("--nproc", "2", "--grace", "0.5", script)
    run.wait_lines("ready", 2)
    assert run.wait(timeout=20) == 6
    wait_until(lambda: processes_with_token(token) == [], 2, "the stubborn daemon to be killed")


def test_report_tells_our_signals_from_a_workers_own_death(start, tmp_path: Path) -> None:
    script = write_script(
        tmp_path / "abort_on_term.py",
        """
import os, signal, time
rank = os.environ["RANK"]
if rank == "0":
    signal.signal(signal.SIGTERM, lambda *_: os.abort())  # dies of SIGABRT, not of our SIGTERM
print(f"ready {rank}")
if rank == "2":
    time.sleep(0.3)
    raise SystemExit(9)
time.sleep(300)
""",
    )
    run = start("--nproc", "3", script)
    run.wait_lines("ready", 3)
    assert run.wait() == 9
    assert "rank 0 (local rank 0, pid" in run.err
    assert "signal SIGABRT, exit code 134 while being stopped" in run.err
    assert "terminated by ddplaunch (SIGABRT)" not in run.err
    assert run.err.count("terminated by ddplaunch (SIGTERM)") == 1  # rank 1


CHECKPOINTER = """
import os, signal, sys, time
rank = int(os.environ["RANK"])

def checkpoint(signum, frame):
    print(f"checkpointing {rank}", flush=True)
    time.sleep(1.5)
    print(f"saved {rank}", flush=True)
    sys.exit(0)

signal.signal(signal.SIGTERM, checkpoint)
print(f"ready {rank}", flush=True)
if rank == 0:
    time.sleep(0.3)
    os._exit(3)
time.sleep(300)
"""


def test_a_stop_signal_during_a_failure_stop_keeps_the_grace(start, tmp_path: Path, token: str) -> None:
    """The head relays its stop to nodes already stopping: that must not skip the checkpoint."""
    script = write_script(tmp_path / "ckpt.py", CHECKPOINTER)
    run = start("--nproc", "2", script)
    run.wait_line("checkpointing 1")
    run.signal(signal.SIGTERM)
    assert run.wait(timeout=30) == 3  # the root cause's code; no restart, no SIGKILL
    assert "1 | saved 1" in run.out
    assert "already stopping all workers" in run.err
    assert processes_with_token(token) == []


def test_a_second_stop_signal_still_kills_at_once(start, tmp_path: Path, token: str) -> None:
    script = write_script(tmp_path / "ckpt.py", CHECKPOINTER)
    run = start("--nproc", "2", script)
    run.wait_line("checkpointing 1")
    run.signal(signal.SIGTERM)
    run.wait_line("already stopping all workers", stream="err")
    run.signal(signal.SIGTERM)
    assert run.wait(timeout=30) == 3
    assert "saved 1" not in run.out
    assert "killing all workers now" in run.err
    assert processes_with_token(token) == []
