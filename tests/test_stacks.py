"""Stack capture: the workers' bootstrap and the launcher's capture of one node, with real
processes and real signals (the supervisor is not involved: the tests start the workers)."""

from __future__ import annotations

import json
import os
import select
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_cli import interpreter

from ddplaunch import procfs
from ddplaunch.snapshot import BOOTSTRAP_DIR, STACK_SIGNAL, STACKS_VARIABLE, ProcessStacks, StackFrame, stacks_variable
from ddplaunch.stackparse import parse_faulthandler, parse_py_spy, parse_frame, unescape
from ddplaunch.stacks import (
    PY_SPY_VARIABLE, DumpFile, Target, capture_now, find_py_spy, prepare_bootstrap, read_dump_file, with_bootstrap,
)

READY_TIMEOUT_S = 60  # a worker that imports torch on a loaded machine is slow to start
HAS_PY_SPY = find_py_spy({})[0] is not None

# Prints "ready" once the main thread is inside `name`. Nothing signals that a thread has
# entered a call, so a helper thread looks at the main thread's frames until it has; the
# test's deadline on the line bounds the wait.
ANNOUNCE = """
import sys, threading, time

def announce_when_in(name):
    main = threading.main_thread().ident
    def watch():
        while True:
            frame = sys._current_frames().get(main)
            while frame is not None and frame.f_code.co_name != name:
                frame = frame.f_back
            if frame is not None:
                print("ready", flush=True)
                return
            time.sleep(0.001)
    threading.Thread(target=watch, daemon=True).start()
"""


class Worker:
    """A started process in its own session; its stdout read line by line under a deadline."""

    def __init__(self, argv: list[str], env: dict[str, str], err_path: Path) -> None:
        with open(err_path, "wb") as err:
            self.process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=err, start_new_session=True)
        self._err_path = err_path
        self._pending = b""

    @property
    def pid(self) -> int:
        return self.process.pid

    def line(self, timeout: float = READY_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            readable, _, _ = select.select([fd], [], [], max(0.0, left))
            chunk = os.read(fd, 65536) if readable else b""
            if not chunk:
                raise AssertionError(f"no line from {self.pid} in {timeout} s; stderr:\n{self._err_path.read_text()}")
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode()

    def wait_ready(self) -> None:
        assert self.line() == "ready"

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)  # its own session: the group is its pid
            except ProcessLookupError:
                pass
        self.process.wait(timeout=10)


class Workers:
    """The workers one test starts, with the bootstrap set up over their stack directory."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.stack_dir = str(tmp_path / "stacks")
        os.mkdir(self.stack_dir)
        self.started: list[Worker] = []

    def script(self, name: str, body: str) -> str:
        path = self.tmp_path / name
        path.write_text(ANNOUNCE + textwrap.dedent(body))
        return str(path)

    def start(self, argv: list[str], env: dict[str, str] | None = None) -> Worker:
        env = with_bootstrap(os.environ, self.stack_dir) if env is None else env
        worker = Worker(argv, env, self.tmp_path / f"worker{len(self.started)}.err")
        self.started.append(worker)
        return worker

    def python(self, script: str, *args: str, env: dict[str, str] | None = None) -> Worker:
        return self.start([sys.executable, script, *args], env)

    def targets(self, *workers: Worker, python: bool = True) -> list[Target]:
        return [Target("localhost", rank, rank, w.pid, None, python=python) for rank, w in enumerate(workers)]


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    prepare_bootstrap()
    started = Workers(tmp_path)
    yield started
    for worker in started.started:
        worker.stop()


def user_frames(stacks: ProcessStacks, script: str) -> list[str]:
    """The main thread's functions in `script`, innermost first."""
    main = stacks.main_thread
    assert main is not None, stacks
    return [f.function for f in main.frames if f.file == script]


def thread_functions(stacks: ProcessStacks) -> list[list[str]]:
    return [[f.function for f in t.frames] for t in stacks.threads]


# -- the bootstrap -----------------------------------------------------------------------------

ENVIRONMENT_VIEW = """
import json, os, sys
print(json.dumps({"PYTHONPATH": os.environ.get("PYTHONPATH"), "variable": os.environ.get("DDPLAUNCH_STACKS"),
                  "path": sys.path[1:], "ident": f"{__import__('threading').get_ident():#018x}"}), flush=True)
"""


@pytest.mark.parametrize("pythonpath", [None, "", "/opt/a:/opt/b"])
def test_the_script_sees_the_environment_and_path_it_would_have_without_the_bootstrap(
    workers: Workers, pythonpath: str | None
) -> None:
    script = workers.script("view.py", ENVIRONMENT_VIEW)
    plain = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", STACKS_VARIABLE)}
    if pythonpath is not None:
        plain["PYTHONPATH"] = pythonpath
    front = BOOTSTRAP_DIR + (os.pathsep + pythonpath if pythonpath else "")
    variable = stacks_variable(STACK_SIGNAL, pythonpath is not None, workers.stack_dir)
    booted = workers.python(script, env={**plain, "PYTHONPATH": front, STACKS_VARIABLE: variable})
    without = workers.python(script, env=plain)
    seen, expected = json.loads(booted.line()), json.loads(without.line())
    assert seen["PYTHONPATH"] == pythonpath
    assert seen["variable"] is None
    assert seen["path"] == expected["path"]
    dump = read_dump_file(os.path.join(workers.stack_dir, str(booted.pid)))
    assert dump is not None and dump.main_ident == seen["ident"] and dump.released is None


def test_bootstrap_start_up_cost(workers: Workers) -> None:
    """Prints the median cost of the bootstrap on `python -c pass` (not asserted: machines vary)."""
    plain = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", STACKS_VARIABLE)}
    booted = with_bootstrap(plain, workers.stack_dir)

    def once(env: dict[str, str]) -> float:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], env=env, check=True, timeout=30)
        return time.perf_counter() - started

    runs = 40
    pairs = [(once(plain), once(booted)) for _ in range(runs)]
    cost_ms = (statistics.median(b for _, b in pairs) - statistics.median(p for p, _ in pairs)) * 1000
    print(f"\nbootstrap start-up cost: {cost_ms:.2f} ms (median of {runs} runs of `python -c pass`)")
    assert len(os.listdir(workers.stack_dir)) == runs  # every booted run did arm itself


def test_a_sitecustomize_the_bootstrap_shadows_still_runs(workers: Workers, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import os\nprint('the shadowed sitecustomize ran', flush=True)\n")
    script = workers.script("which.py", "import sitecustomize\nprint(sitecustomize.__file__, flush=True)\n")
    worker = workers.python(script, env=with_bootstrap({**os.environ, "PYTHONPATH": str(other)}, workers.stack_dir))
    assert worker.line() == "the shadowed sitecustomize ran"
    assert worker.line() == str(other / "sitecustomize.py")
    assert read_dump_file(os.path.join(workers.stack_dir, str(worker.pid))) is not None


@pytest.mark.parametrize("variable", [f"{STACK_SIGNAL}:0:/nonexistent/dir", "garbage", f"{STACK_SIGNAL}:1"])
def test_a_bootstrap_that_cannot_arm_leaves_the_script_alone(workers: Workers, variable: str) -> None:
    env = {**os.environ, "PYTHONPATH": BOOTSTRAP_DIR, STACKS_VARIABLE: variable}
    code = f"import os, sys; print(os.environ.get('DDPLAUNCH_STACKS'), {BOOTSTRAP_DIR!r} in sys.path)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout, done.stderr) == (0, "None False\n", "")


@pytest.mark.parametrize("minor", [10, 11, 12, 13])
def test_the_bootstrap_works_on_each_python(workers: Workers, minor: int) -> None:
    python = interpreter(minor)
    if python is None and not os.environ.get("CI"):  # CI's machine has them all (pyenv): never skip there
        pytest.skip(f"no python3.{minor} here")
    assert python is not None, f"no python3.{minor} on this machine"
    script = workers.script("each.py", """
        import os, threading
        def wait_here():
            threading.Event().wait()
        print(os.environ.get("DDPLAUNCH_STACKS"), os.environ.get("PYTHONPATH"), flush=True)
        announce_when_in("wait_here")
        wait_here()
    """)
    worker = workers.start([python, script])
    assert worker.line() == "None None"
    worker.wait_ready()
    [snapshot] = capture_now(workers.targets(worker), workers.stack_dir, py_spy=None)
    assert snapshot.main.source == "faulthandler", snapshot.main.why_not
    assert user_frames(snapshot.main, script) == ["wait_here", "<module>"]


# -- capturing ranks ---------------------------------------------------------------------------

GLOO_JOB = """
import threading
import torch, torch.distributed as dist

def reduce_gradients(grad):
    dist.all_reduce(grad)

def wait_elsewhere():
    threading.Event().wait()

dist.init_process_group("gloo")
if dist.get_rank() == 3:
    announce_when_in("wait_elsewhere")
    wait_elsewhere()
else:
    announce_when_in("all_reduce")
    reduce_gradients(torch.ones(4))
"""


def test_four_gloo_ranks_three_in_all_reduce_one_elsewhere(workers: Workers) -> None:
    script = workers.script("gloo.py", GLOO_JOB)
    port = str(__import__("ddplaunch.ports", fromlist=["pick_free_port"]).pick_free_port())
    base = with_bootstrap(os.environ, workers.stack_dir)
    ranks = [
        workers.python(script, env={**base, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank),
                                    "WORLD_SIZE": "4", "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"})
        for rank in range(4)
    ]
    for rank in ranks:
        rank.wait_ready()
    started = time.monotonic()
    snapshots = capture_now(workers.targets(*ranks), workers.stack_dir)
    print(f"\ncapture of 4 gloo ranks: {(time.monotonic() - started) * 1000:.0f} ms")
    for snapshot in snapshots:
        assert snapshot.main.source == "faulthandler", snapshot.main.why_not
        assert snapshot.rss_bytes > 10_000_000 and snapshot.cpu_s > 0
    innermost = [user_frames(s.main, script)[0] for s in snapshots]
    assert innermost == ["reduce_gradients"] * 3 + ["wait_elsewhere"]
    assert [s.main_frames[0].function for s in snapshots[:3] if s.main_frames] == ["all_reduce"] * 3
    assert all(rank.alive() for rank in ranks)  # the job goes on


def test_a_thread_holding_the_gil_and_a_waiting_main_thread_are_both_read(workers: Workers) -> None:
    script = workers.script("gil.py", """
        import threading
        started = threading.Event()

        def hold_the_gil():
            started.wait()
            print("ready", flush=True)
            sum(range(10**13))  # one C call: the GIL is not let go until it returns

        def wait_main():
            started.set()
            threading.Event().wait()

        threading.Thread(target=hold_the_gil, daemon=True).start()
        wait_main()
    """)
    worker = workers.python(script)
    worker.wait_ready()
    [snapshot] = capture_now(workers.targets(worker), workers.stack_dir, py_spy=None)
    assert snapshot.main.source == "faulthandler", snapshot.main.why_not
    assert user_frames(snapshot.main, script) == ["wait_main", "<module>"]
    others = [t for t in snapshot.main.threads if not t.is_main]
    assert [t.frames[0].function for t in others] == ["hold_the_gil"]


def test_forked_dataloader_workers_are_captured_as_the_rank_s_children(workers: Workers) -> None:
    script = workers.script("loader.py", """
        import os, threading
        import torch
        from torch.utils.data import DataLoader, Dataset

        def load_sample(index):
            os.write(1, f"loading {os.getpid()}\\n".encode())  # one write: two loaders print at once
            threading.Event().wait()

        class Samples(Dataset):
            def __len__(self):
                return 100
            def __getitem__(self, index):
                return load_sample(index)

        def next_batch(batches):
            return next(batches)

        loader = DataLoader(Samples(), num_workers=2, multiprocessing_context="fork")
        announce_when_in("next_batch")
        next_batch(iter(loader))
    """)
    worker = workers.python(script)
    lines = sorted(worker.line() for _ in range(3))  # the two loaders and the rank, in any order
    assert [line.split()[0] for line in lines] == ["loading", "loading", "ready"], lines
    loading = {int(line.split()[1]) for line in lines[:2]}
    [snapshot] = capture_now(workers.targets(worker), workers.stack_dir, py_spy=None)
    assert snapshot.main.source == "faulthandler", snapshot.main.why_not
    assert user_frames(snapshot.main, script)[0] == "next_batch"
    children = {c.pid: c for c in snapshot.children}
    assert set(children) == loading
    for child in children.values():
        assert child.source == "faulthandler", child.why_not
        assert user_frames(child, script)[:2] == ["load_sample", "__getitem__"]


def test_a_script_with_its_own_handler_is_never_sent_the_signal(workers: Workers, tmp_path: Path) -> None:
    marker = tmp_path / "handler-ran"
    script = workers.script("own.py", """
        import signal, sys, threading

        def on_signal(signum, frame):
            open(sys.argv[1], "w").close()

        def wait_here():
            threading.Event().wait()

        signal.signal(signal.SIGRTMAX - 3, on_signal)
        announce_when_in("wait_here")
        wait_here()
    """)
    worker = workers.python(script, str(marker))
    worker.wait_ready()
    dump = read_dump_file(os.path.join(workers.stack_dir, str(worker.pid)))
    assert dump is not None and dump.released == f"the script set its own handler for signal {STACK_SIGNAL}"
    [without_spy] = capture_now(workers.targets(worker), workers.stack_dir, timeout_s=0.3, py_spy=None)
    assert without_spy.main.why_not == (
        f"its bootstrap let go of the signal: the script set its own handler for signal {STACK_SIGNAL}; "
        "py-spy is not used here"
    )
    if HAS_PY_SPY:
        [snapshot] = capture_now(workers.targets(worker), workers.stack_dir, timeout_s=0.3)
        assert snapshot.main.source == "py-spy", snapshot.main.why_not
        assert user_frames(snapshot.main, script) == ["wait_here", "<module>"]
    assert not marker.exists()
    assert worker.alive()


SLEEPER = """
import threading
def wait_here():
    threading.Event().wait()
announce_when_in("wait_here")
wait_here()
"""


# In CI (which installs the dev extras, py-spy among them) this must run, never skip.
@pytest.mark.skipif(not HAS_PY_SPY and not os.environ.get("CI"), reason="py-spy is not installed")
def test_python_dash_i_is_read_by_py_spy(workers: Workers) -> None:
    script = workers.script("isolated.py", SLEEPER)
    worker = workers.start([sys.executable, "-I", script])
    worker.wait_ready()
    [snapshot] = capture_now(workers.targets(worker), workers.stack_dir)
    assert snapshot.main.source == "py-spy", snapshot.main.why_not
    assert user_frames(snapshot.main, script) == ["wait_here", "<module>"]
    assert os.listdir(workers.stack_dir) == []  # the bootstrap never ran


def test_python_dash_i_without_py_spy_says_why(workers: Workers, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PY_SPY_VARIABLE, "0")
    worker = workers.start([sys.executable, "-I", workers.script("isolated.py", SLEEPER)])
    worker.wait_ready()
    [snapshot] = capture_now(workers.targets(worker), workers.stack_dir)
    assert snapshot.main.threads == ()
    assert snapshot.main.why_not == "no bootstrap: started with -I (isolated mode); py-spy is off (DDPLAUNCH_PY_SPY=0)"
    assert snapshot.state == "sleeping"


def test_a_shell_worker_gets_its_state_and_why_there_is_no_stack(workers: Workers) -> None:
    worker = workers.start(["bash", "-c", "sleep 30 & echo ready; wait"])
    worker.wait_ready()
    [snapshot] = capture_now(workers.targets(worker, python=False), workers.stack_dir)
    assert snapshot.state in ("sleeping", "running") and snapshot.rss_bytes > 0  # bash is on its way to `wait`
    assert snapshot.main.why_not == "not a Python process (bash)"
    [child] = snapshot.children
    assert child.why_not is not None and child.why_not.startswith("not a Python process (")


def test_a_process_that_does_not_answer_is_given_up_at_the_deadline(workers: Workers) -> None:
    script = workers.script("blocked.py", """
        import signal, threading
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGRTMAX - 3})  # every thread after inherits it
        def wait_here():
            threading.Event().wait()
        announce_when_in("wait_here")
        wait_here()
    """)
    worker = workers.python(script)
    worker.wait_ready()
    started = time.monotonic()
    [snapshot] = capture_now(workers.targets(worker), workers.stack_dir, timeout_s=0.3, py_spy=None)
    assert 0.3 <= time.monotonic() - started < 2
    assert snapshot.main.why_not == "did not answer in 0.3 s (state: sleeping); py-spy is not used here"
    if HAS_PY_SPY:
        [snapshot] = capture_now(workers.targets(worker), workers.stack_dir, timeout_s=0.3)
        assert snapshot.main.source == "py-spy", snapshot.main.why_not
        assert user_frames(snapshot.main, script) == ["wait_here", "<module>"]
    assert worker.alive()


def test_a_stopped_process_is_not_signalled(workers: Workers) -> None:
    script = workers.script("stopped.py", SLEEPER)
    worker = workers.python(script)
    worker.wait_ready()
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        os.waitpid(worker.pid, os.WUNTRACED)  # returns once it has stopped (it is our child)
        [snapshot] = capture_now(workers.targets(worker), workers.stack_dir, py_spy=None)
        status = procfs.read_status(worker.pid)
        assert status is not None and not procfs.has_signal(status, "ShdPnd", STACK_SIGNAL)
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    assert snapshot.state == "stopped"
    assert snapshot.main.why_not == "it is stopped (SIGSTOP or a debugger); py-spy is not used here"


def test_every_thread_of_a_long_dump_is_read_whole(workers: Workers) -> None:
    """A dump of 41 threads, 60 frames each, takes tens of milliseconds: the capture waits for
    its end, as the kernel shows it, not for the first bytes."""
    script = workers.script("deep.py", """
        import threading
        forever = threading.Event()
        def deep(n):
            return deep(n - 1) if n else forever.wait()
        for _ in range(40):
            threading.Thread(target=deep, args=(59,), daemon=True).start()
        announce_when_in("deep")
        deep(59)
    """)
    worker = workers.python(script)
    worker.wait_ready()
    [snapshot] = capture_now(workers.targets(worker), workers.stack_dir, py_spy=None)
    assert snapshot.main.source == "faulthandler", snapshot.main.why_not
    # announce_when_in's watcher may not have returned yet after its "ready" (a loaded machine)
    threads = [t for t in snapshot.main.threads if not any(f.function == "watch" for f in t.frames)]
    deep_counts = [sum(f.function == "deep" for f in t.frames) for t in threads]
    assert deep_counts == [60] * 41


def test_a_process_that_exec_d_another_program_is_not_sent_the_signal(workers: Workers) -> None:
    script = workers.script("execs.py", """
        import os
        os.execv("/bin/sh", ["sh", "-c", "echo ready; exec sleep 30"])
    """)
    worker = workers.python(script)
    worker.wait_ready()
    assert read_dump_file(os.path.join(workers.stack_dir, str(worker.pid))) is not None  # the file stays
    [snapshot] = capture_now(workers.targets(worker), workers.stack_dir, py_spy=None)
    # `sh` until it has exec'd `sleep` after printing "ready"
    assert snapshot.main.why_not in ("not a Python process (sh)", "not a Python process (sleep)")
    assert worker.alive()  # the signal's default action would have killed it


def test_each_of_many_short_dumps_is_read_whole(workers: Workers) -> None:
    """A short dump often ends between two reads of one poll: the text read must be the one
    after the kernel says the dump is over, not the one that showed it had begun."""
    script = workers.script("short.py", SLEEPER)
    worker = workers.python(script)
    worker.wait_ready()
    for _ in range(60):
        [snapshot] = capture_now(workers.targets(worker), workers.stack_dir, py_spy=None)
        assert snapshot.main.source == "faulthandler", snapshot.main.why_not
        assert user_frames(snapshot.main, script) == ["wait_here", "<module>"]


def test_a_rank_that_has_exited_is_gone(workers: Workers) -> None:
    worker = workers.start([sys.executable, "-c", "pass"])
    worker.process.wait(timeout=30)
    [snapshot] = capture_now(workers.targets(worker), workers.stack_dir, py_spy=None)
    assert snapshot.state == "gone" and snapshot.main.why_not == "it exited before the capture"


# -- pure parts --------------------------------------------------------------------------------

DUMP = """\
ddplaunch-stacks 1 0x00007f0000000001
Thread 0x00007f0000000002 (most recent call first):
  File "/usr/lib/python3.11/threading.py", line 327 in wait
  File "/job/train.py", line 7 in worker

Current thread 0x00007f0000000001 (most recent call first):
  Garbage-collecting
  File "/job/train.py", line 12 in h\\xe9llo
  File "/job/train.py", line 30 in <module>

Thread 0x00007f0000000003 (most recent call first):
  <no Python frame>

Thread 0x00007f0000000004 (most recent call first):
  File ???, line ??? in f
  ...
...
"""


@pytest.mark.unit
def test_faulthandler_dump_parses_into_threads() -> None:
    threads = parse_faulthandler(DUMP, "0x00007f0000000001")
    assert [(t.ident, t.is_main) for t in threads] == [
        ("0x00007f0000000002", False), ("0x00007f0000000001", True),
        ("0x00007f0000000003", False), ("0x00007f0000000004", False),
    ]
    assert threads[1].frames == (StackFrame("/job/train.py", 12, "héllo"), StackFrame("/job/train.py", 30, "<module>"))
    assert threads[2].frames == ()
    assert threads[3].frames == (StackFrame("???", 0, "f"),)


@pytest.mark.unit
@pytest.mark.parametrize(("line", "frame"), [
    ('  File "/a/b.py", line 3 in run', StackFrame("/a/b.py", 3, "run")),
    ('  File "/a/odd, line 9 in x.py", line 3 in run', StackFrame("/a/odd, line 9 in x.py", 3, "run")),
    ('  File "/caf\\xe9/\\u4e2d\\U0001f600.py", line 1 in g', StackFrame("/café/中😀.py", 1, "g")),
    ('  File "/a.py", line ??? in f', StackFrame("/a.py", 0, "f")),
    ("  File ???, line 4 in f", StackFrame("???", 4, "f")),
    ('  File "/a.py", line ³ in f', None),  # not what faulthandler writes: no guessing
    ("  <no Python frame>", None),
    ("  ...", None),
    ("ddplaunch-stacks released why", None),
])
def test_faulthandler_frame_lines(line: str, frame: StackFrame | None) -> None:
    assert parse_frame(line) == frame


@pytest.mark.unit
def test_a_dump_without_the_main_ident_has_no_main_thread() -> None:
    assert [t.is_main for t in parse_faulthandler(DUMP, None)] == [False] * 4


@pytest.mark.unit
def test_unescape_leaves_a_plain_backslash() -> None:
    assert unescape("C:\\temp\\x41") == "C:\\tempA"  # faulthandler writes "\\" raw: \x41 is ambiguous
    assert unescape("a\\b") == "a\\b"


@pytest.mark.unit
def test_py_spy_json_parses_with_the_main_thread_by_tid_and_short_names() -> None:
    data = [
        {"pid": 10, "thread_id": 139, "thread_name": "helper", "os_thread_id": 12, "frames": [
            {"name": "Thread.run", "filename": "/t.py", "line": 982}]},
        {"pid": 10, "thread_id": 140, "thread_name": "MainThread", "os_thread_id": 10, "frames": [
            {"name": "outer.<locals>.wait_here", "filename": "/s.py", "line": 2},
            {"name": "<module>", "filename": "/s.py", "line": 5}]},
    ]
    threads = parse_py_spy(data, 10)
    assert [(t.ident, t.name, t.is_main) for t in threads] == [
        ("0x000000000000008b", "helper", False), ("0x000000000000008c", "MainThread", True),
    ]
    assert threads[1].frames == (StackFrame("/s.py", 2, "wait_here"), StackFrame("/s.py", 5, "<module>"))


@pytest.mark.unit
@pytest.mark.parametrize(("argv", "why"), [
    (["python", "-I", "x.py"], "-I (isolated mode)"),
    (["python", "-X", "dev", "-sE", "x.py"], "-E (PYTHONPATH ignored)"),
    (["python", "-XI", "x.py"], None),  # "I" is -X's value here
    (["python", "-W", "ignore", "-S", "-c", "pass"], "-S (no site module)"),
    (["python", "-c", "-I"], None),
    (["python", "-m", "mod", "-I"], None),
    (["python", "x.py", "-I"], None),
    (["python", "--check-hash-based-pycs", "always", "-I", "x.py"], "-I (isolated mode)"),
])
def test_interpreter_options_that_keep_the_bootstrap_out(argv: list[str], why: str | None) -> None:
    assert procfs.bootstrap_disabled_by(argv) == why


@pytest.mark.unit
def test_the_last_header_in_a_dump_file_counts(tmp_path: Path) -> None:
    path = tmp_path / "123"
    path.write_text("ddplaunch-stacks 1 0x01\nddplaunch-stacks released mine\nddplaunch-stacks 1 0x02\n")
    assert read_dump_file(str(path)) == DumpFile("0x02", None)
    path.write_text("ddplaunch-stacks 1 0x01\nddplaunch-stacks released the script set its own handler\n")
    dump = read_dump_file(str(path))
    assert dump is not None and dump.released == "the script set its own handler"
    assert read_dump_file(str(tmp_path / "absent")) is None


@pytest.mark.unit
def test_with_bootstrap_puts_the_bootstrap_first_and_remembers_pythonpath() -> None:
    assert with_bootstrap({}, "/s")["PYTHONPATH"] == BOOTSTRAP_DIR
    assert with_bootstrap({}, "/s")[STACKS_VARIABLE] == f"{STACK_SIGNAL}:0:/s"
    assert with_bootstrap({"PYTHONPATH": ""}, "/s")[STACKS_VARIABLE] == f"{STACK_SIGNAL}:1:/s"
    assert with_bootstrap({"PYTHONPATH": "/a"}, "/s")["PYTHONPATH"] == BOOTSTRAP_DIR + os.pathsep + "/a"


@pytest.mark.unit
def test_find_py_spy_honours_the_variable() -> None:
    assert find_py_spy({PY_SPY_VARIABLE: "0"}) == (None, "py-spy is off (DDPLAUNCH_PY_SPY=0)")
    assert find_py_spy({PY_SPY_VARIABLE: "/opt/py-spy"}) == ("/opt/py-spy", "")
