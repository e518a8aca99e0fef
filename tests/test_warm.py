"""--warm with real processes: ranks forked from one interpreter that imported torch behave as
cold ones (their parent, session, argv, environment, __main__, atexit, pickling across a spawn
context, tracebacks, exit codes, restarts, signals, stack reports, kill -9), and the refusals
start cold.

Each warm launch imports torch once (about 2 s here): the first test checks as much as one
launch with a restart can show.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_cli import processes_with_token, run_cli, wait_until, write_script

from ddplaunch.devices import DeviceMap
from ddplaunch.plan import PlanInputs, Program, build_plan
from ddplaunch.proctitle import ROOM_VARIABLE
from ddplaunch.snapshot import STACK_SIGNAL
from ddplaunch.warm import start_warm
from ddplaunch.watchdog import Watchdog

FACTS = """
    import atexit, json, multiprocessing, os, sys, time
    from pathlib import Path

    class Point:  # pickled by reference to __main__: the spawned child must find it
        def __init__(self, x):
            self.x = x

    def double(point):
        return Point(point.x * 2)

    def wait_for(path):
        deadline = time.monotonic() + 20
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)

    if __name__ == "__main__":
        out = Path(sys.argv[1])
        rank, attempt = os.environ["RANK"], os.environ["TORCHELASTIC_RESTART_COUNT"]
        facts = {
            "pid": os.getpid(), "ppid": os.getppid(), "sid": os.getsid(0), "pgid": os.getpgid(0),
            "argv": sys.argv, "file": sys.modules["__main__"].__file__, "local": os.environ["LOCAL_RANK"],
            "torch_warm": "torch" in sys.modules, "stdin": sys.stdin.read(),
            "caught": int(open("/proc/self/status").read().split("SigCgt:")[1].split()[0], 16),
            "stacks_variable": "DDPLAUNCH_STACKS" in os.environ,
            "seed": __import__("torch").initial_seed(), "authkey": multiprocessing.current_process().authkey.hex(),
            "numpy_draw": __import__("numpy.random").random.random(),  # its module was imported warm
        }
        if attempt == "1":
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                facts["spawned"] = pool.apply(double, (Point(21),)).x
        (out / f"facts-{attempt}-{rank}.json").write_text(json.dumps(facts))
        atexit.register(lambda: (out / f"atexit-{attempt}-{rank}").write_text("ran"))
        if attempt == "0" and rank == "1":
            raise ValueError("rank one fails on purpose")
        if attempt == "1" and rank == "1":
            wait_for(out / "atexit-1-0")  # rank 0 ends first, so it is not stopped
            sys.exit(3)
"""


def test_warm_ranks_behave_as_cold_ones_across_a_restart(start, tmp_path: Path) -> None:
    script = write_script(tmp_path / "facts.py", FACTS)
    run = start("--nproc", "2", "--warm", "--warm-modules", "torch,numpy.random", "--max-restarts", "1", "--stdin", "none",
                script, str(tmp_path), "x")
    assert run.wait(60) == 3
    launcher = run.proc.pid
    facts = {(a, r): json.loads((tmp_path / f"facts-{a}-{r}.json").read_text()) for a in "01" for r in "01"}
    for (attempt, rank), fact in facts.items():
        assert fact["ppid"] == launcher, (attempt, rank)  # reaped by the launcher, as a cold worker
        assert fact["sid"] == fact["pid"] == fact["pgid"]  # its own session and process group
        assert fact["argv"] == [script, str(tmp_path), "x"]
        assert fact["file"] == script and fact["local"] == rank and fact["stdin"] == ""
        assert fact["torch_warm"]  # imported before the fork: the point of --warm
        # the stack bootstrap ran as in a cold worker: its signal caught, its variable gone
        assert fact["caught"] >> (STACK_SIGNAL - 1) & 1 and not fact["stacks_variable"]
    assert facts["1", "0"]["spawned"] == facts["1", "1"]["spawned"] == 42
    assert len({f["pid"] for f in facts.values()}) == 4  # the restart forked again
    # what a fresh interpreter draws at random is each rank's own, as cold
    assert len({f["seed"] for f in facts.values()}) == len({f["authkey"] for f in facts.values()}) == 4
    assert len({f["numpy_draw"] for f in facts.values()}) == 4
    assert (tmp_path / "atexit-1-0").read_text() == "ran"  # the interpreter finalised as usual
    assert (tmp_path / "atexit-1-1").read_text() == "ran"  # sys.exit(3) too
    err = run.err
    assert "ValueError: rank one fails on purpose" in err
    assert 'File "' + script + '", line' in err and "zygote" not in err  # only the script's frames
    assert "restarting all workers (restart 1 of 1)" in err
    assert "Root cause (first observed failure): rank 1" in err and "exit code 3" in err
    assert err.count("--warm: torch, numpy.random imported once in ") == 1  # it started warm, once for both attempts
    assert "starting the workers cold" not in err


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_or_killed_warm_launcher_leaves_nothing(start, tmp_path: Path, token: str, stop: int) -> None:
    script = write_script(tmp_path / "wait.py", "import os, time\nprint('ready', os.getppid(), flush=True)\ntime.sleep(300)\n")
    run = start("--nproc", "2", "--warm", script)
    run.wait_lines("ready", 2, timeout=30)
    carriers = [p for p in processes_with_token(token) if p.name() != "ddplaunch-guard"]
    assert len(carriers) == 4, carriers  # the launcher, the warm interpreter, two ranks
    # ps and psutil show each rank's cold command line and environment, and the warm
    # interpreter's title (the guard and processes_with_token found them all by it)
    shown = [(p.cmdline(), p.environ()) for p in carriers]
    ranks = [env for argv, env in shown if argv == [sys.executable, "-u", script]]
    assert sorted(env.get("RANK", "") for env in ranks) == ["0", "1"], shown
    assert not any(ROOM_VARIABLE in env for env in ranks), shown
    assert sum(" ".join(argv).startswith("ddplaunch --warm: torch (job ") for argv, _env in shown) == 1, shown
    if stop == signal.SIGTERM:  # the stack bootstrap runs in a warm rank as in a cold one
        run.signal(signal.SIGQUIT)
        run.wait_line("ranks 0-1 · <module> at wait.py:3", timeout=20, stream="err")
    run.signal(stop)
    assert run.wait() == (143 if stop == signal.SIGTERM else -signal.SIGKILL)
    if stop == signal.SIGTERM:  # the report's frames are the script's, as cold: none of the zygote's
        assert 'wait.py", line 3, in <module>' in run.err, run.err
        assert "zygote" not in run.err and '"<string>"' not in run.err, run.err
    # kill -9: the guard stops the ranks' groups and the warm interpreter's
    wait_until(lambda: not processes_with_token(token), 10, "every rank and the warm interpreter to end")


def test_a_module_that_starts_a_thread_at_import_is_noted_once_and_the_job_runs_cold(
    job_env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "threaded.py").write_text("import threading, time\nthreading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n")
    script = write_script(tmp_path / "s.py", "import sys\nprint('warm' if 'threaded' in sys.modules else 'cold')\n")
    env = dict(job_env, PYTHONPATH=str(tmp_path))
    done = run_cli(["--nproc", "2", "--warm", "--warm-modules", "threaded", script], env, cwd=tmp_path)
    assert done.code == 0, done.output
    assert done.stderr.count("--warm: after importing threaded it runs 2 threads") == 1, done.stderr
    assert "starting the workers cold" in done.stderr
    assert done.stdout.count("cold") == 2 and "warm" not in done.stdout


def test_no_python_with_warm_is_noted_and_runs_cold(job_env: dict[str, str], tmp_path: Path) -> None:
    done = run_cli(["--nproc", "1", "--warm", "--no-python", "true"], job_env, cwd=tmp_path)
    assert done.code == 0, done.output
    assert done.stderr.count("--warm: --no-python runs an executable, not Python; starting the workers cold") == 1


KILLS_ITS_ZYGOTE = """
    import os, sys, time
    import psutil

    if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        # the launcher's one child besides this rank is the warm interpreter (the guard is not its child)
        zygote, = [p for p in psutil.Process(os.getppid()).children() if p.pid != os.getpid()]
        print("warm" if "warmmark" in sys.modules else "cold", zygote.pid, flush=True)
        zygote.kill()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # dead, not yet reaped: the launcher learns how it died
            try:
                if zygote.status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.01)
        sys.exit(1)
    print("warm" if "warmmark" in sys.modules else "cold", flush=True)
"""


def test_a_killed_warm_interpreter_is_said_once_and_the_restart_starts_cold(job_env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "warmmark.py").write_text("")  # a module that costs nothing to import warm
    script = write_script(tmp_path / "kills.py", KILLS_ITS_ZYGOTE)
    done = run_cli(["--nproc", "1", "--warm", "--warm-modules", "warmmark", "--max-restarts", "1", script], job_env, cwd=tmp_path)
    assert done.code == 0, done.output
    first, second = (line.removeprefix("0 | ") for line in done.stdout.splitlines())
    assert first.startswith("warm ") and second == "cold", done.stdout  # attempt 0 forked, attempt 1 posix_spawned
    zygote = first.split()[1]
    said = f"--warm: the warm interpreter (pid {zygote}) exited (signal SIGKILL); the ranks start cold from now on"
    assert done.stderr.count(said) == 1, done.stderr
    assert "restarting all workers (restart 1 of 1)" in done.stderr


class RecordingWatchdog(Watchdog):
    """What the guard would be told, without a guard."""

    def __init__(self) -> None:
        super().__init__(-1)
        self.told: list[str] = []

    def watch(self, pgid: int) -> None:
        self.told.append(f"+{pgid}")

    def unwatch(self, pgid: int) -> None:
        self.told.append(f"-{pgid}")


def test_the_guard_is_told_the_warm_interpreter_and_a_dead_one_is_replaced_by_a_cold_start(tmp_path: Path) -> None:
    """Without the launcher: the EOF of its socket would end a zygote whose launcher was
    killed anyway, and the guard finds it by the job id too, so only this shows that the
    guard is told its group. Then SIGKILL it: the next rank is posix_spawned, as the note says
    (found by the failed request here, not by a reaper)."""
    script = write_script(tmp_path / "ok.py", "import sys\nsys.exit(7)\n")
    inputs = PlanInputs(program=Program("script", script), nproc=1, master_addr="127.0.0.1", master_port=29500,
                        run_id="r", python=sys.executable, hostname="h", cpu_count=1, devices=DeviceMap(None, ()))
    plan, watchdog, said = build_plan(inputs), RecordingWatchdog(), []
    zygote = start_warm(plan, (), watchdog, said.append, lambda: False)
    assert zygote is not None and watchdog.told == [f"+{zygote.pid}"], said
    os.kill(zygote.pid, signal.SIGKILL)
    os.waitid(os.P_PID, zygote.pid, os.WEXITED | os.WNOWAIT)  # dead, not reaped: as the OOM killer leaves it
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        rank = zygote.spawn(plan.workers[0].argv, dict(os.environ), [(os.POSIX_SPAWN_DUP2, devnull, fd) for fd in (0, 1, 2)], None)
    finally:
        os.close(devnull)
    assert os.waitstatus_to_exitcode(os.waitpid(rank, 0)[1]) == 7  # the script ran, cold
    assert said[-1] == f"--warm: the warm interpreter (pid {zygote.pid}) exited (signal SIGKILL); the ranks start cold from now on"
    assert os.waitpid(zygote.pid, 0)[0] == zygote.pid  # left for the reaper (WNOWAIT)
    zygote.close()
    assert watchdog.told == [f"+{zygote.pid}", f"-{zygote.pid}"]


def test_a_script_that_sets_an_import_time_variable_before_its_import_starts_cold(
    job_env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "warmmark.py").write_text("import os\nREAD = os.environ.get('OMP_NUM_THREADS')\n")
    script = write_script(tmp_path / "train.py", """
        import os, sys
        os.environ["OMP_NUM_THREADS"] = "4"
        warm = "warmmark" in sys.modules
        import warmmark
        print("warm" if warm else "cold", warmmark.READ)
    """)
    done = run_cli(["--nproc", "1", "--warm", "--warm-modules", "warmmark", script], job_env, cwd=tmp_path)
    assert done.code == 0, done.output
    assert done.stdout.strip().removeprefix("0 | ") == "cold 4"  # the import read the script's value
    said = "--warm: train.py sets OMP_NUM_THREADS (line 3) before importing warmmark, which reads it at import; starting the workers cold"
    assert done.stderr.count(said) == 1, done.stderr
    assert "imported once" not in done.stderr  # decided before any warm interpreter started
def test_a_keyboard_interrupt_ends_a_warm_rank_as_a_cold_one(job_env: dict[str, str], tmp_path: Path) -> None:
    script = write_script(tmp_path / "interrupted.py", """
        import atexit
        print("globals", sorted(name for name in globals() if name.startswith("__")))
        atexit.register(lambda: print("atexit ran", flush=True))

        def stop():
            raise KeyboardInterrupt("stopped on purpose")

        stop()
    """)
    cold = subprocess.run([sys.executable, "-u", script], capture_output=True, text=True, timeout=30)
    assert cold.returncode == -signal.SIGINT and cold.stdout.endswith("atexit ran\n"), cold
    done = run_cli(["--nproc", "1", "--warm", script], job_env, cwd=tmp_path)
    assert done.code == 130, done.output
    assert "0 | " + cold.stdout.splitlines()[0] in done.stdout.splitlines()  # __main__'s names, as cold
    assert "--warm: torch imported once in " in done.stderr
    # CPython finalised it (atexit ran), then killed itself with SIGINT, as after a cold script
    assert "0 | atexit ran" in done.stdout
    assert "rank 0 failed (signal SIGINT, exit code 130)" in done.stderr, done.stderr
    assert "KeyboardInterrupt: stopped on purpose" in done.stderr
    traceback = done.stderr.split("Traceback (most recent call last):", 1)[1].split("KeyboardInterrupt")[0]
    assert traceback.count("File ") == 2 and traceback.count(f'File "{script}"') == 2, traceback  # <module>, stop
    assert traceback.replace("0 ! ", "") in cold.stderr
