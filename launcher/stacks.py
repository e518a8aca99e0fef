"""Capture where one node's ranks are: each rank's process tree, its /proc facts and its stacks.

A process whose bootstrap (launcher/bootstrap/sitecustomize.py) registered faulthandler is sent
STACK_SIGNAL and dumps every thread into its file in the stack directory. Any other Python
process, and one that did not answer in time, is read by `py-spy dump`, if py-spy is there.
Anything else gets its state, CPU time and memory, and a line that says why there is no stack.

StackCapture never blocks: the supervisor's loop calls poll() when due_in() says, so the
launcher keeps printing and reaping while ranks dump. capture_now() is the blocking form.
"""

from __future__ import annotations

import enum
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Literal

from ddplaunch import procfs
from ddplaunch.snapshot import prepare_bootstrap as prepare_bootstrap  # re-exported for the tests
from ddplaunch.snapshot import (
    HEADER_WORD, STACK_SIGNAL, STACKS_VARIABLE, ProcessStacks, ProcessState,
    RankSnapshot, ThreadStack, bootstrap_dir, stacks_variable,
)
from ddplaunch.stackparse import parse_faulthandler, parse_py_spy

DEFAULT_TIMEOUT_S = 1.0  # for the dumps; a dump takes milliseconds unless the process cannot run
PER_PROCESS_S = 0.01  # more time when more processes dump at once
PY_SPY_TIMEOUT_S = 3.0  # each py-spy run; it may wait for a process that is slow to pause
MAX_PY_SPY_RUNS = 8  # at once
POLL_S = 0.005
PY_SPY_VARIABLE = "DDPLAUNCH_PY_SPY"  # "0": never use py-spy; a path: that py-spy
_DUMP_STARTED = b"thread 0x"  # in faulthandler's first line of a dump, lower-cased


@dataclass(frozen=True)
class Target:
    """One rank to capture, with what the supervisor knows of it."""

    host: str
    rank: int
    local_rank: int
    pid: int
    since_output_s: float | None
    python: bool = True  # False for --no-python workers (no bootstrap expected)
    isolated_why: str | None = None  # why its bootstrap cannot run, e.g. "started with -I"


def with_bootstrap(environ: Mapping[str, str], stack_dir: str, signum: int = STACK_SIGNAL) -> dict[str, str]:
    """A worker's environment with the bootstrap first on PYTHONPATH (the contract in snapshot.py)."""
    old = environ.get("PYTHONPATH")
    path = bootstrap_dir() if not old else bootstrap_dir() + os.pathsep + old
    return {**environ, "PYTHONPATH": path, STACKS_VARIABLE: stacks_variable(signum, old is not None, stack_dir)}


def find_py_spy(environ: Mapping[str, str] = os.environ) -> tuple[str | None, str]:
    """py-spy's path (DDPLAUNCH_PY_SPY, PATH, or beside this Python), or None and why not."""
    chosen = environ.get(PY_SPY_VARIABLE)
    if chosen == "0":
        return None, f"py-spy is off ({PY_SPY_VARIABLE}=0)"
    if chosen:
        return chosen, ""
    beside = os.path.join(os.path.dirname(sys.executable), "py-spy")
    found = _on_path("py-spy", environ) or (beside if os.access(beside, os.X_OK) else None)
    return found, "" if found else "py-spy is not installed (pip install py-spy)"


def _on_path(name: str, environ: Mapping[str, str]) -> str | None:
    """shutil.which, without importing shutil on a failure's way to its report."""
    for folder in environ.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.join(folder or ".", name)
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    return None


@dataclass(frozen=True)
class DumpFile:
    """What the bootstrap wrote into DIR/<pid> before any dump: its header, maybe a release."""

    main_ident: str
    released: str | None  # why it let go of the signal; None while it holds it


def read_dump_file(path: str) -> DumpFile | None:
    """The last header in the file (a reused pid appends its own) and any release after it."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    found: DumpFile | None = None
    for line in text.splitlines():
        words = line.split(" ", 2)
        if len(words) == 3 and words[0] == HEADER_WORD:
            if words[1] == "1":
                found = DumpFile(words[2], None)
            elif words[1] == "released" and found is not None:
                found = DumpFile(found.main_ident, words[2])
    return found


class _PySpyRun:
    """One `py-spy dump --json` run; its output goes to unnamed files, so no pipe fills and blocks it."""

    def __init__(self, py_spy: str, pid: int, nonblocking: bool, now: float) -> None:
        import subprocess  # here, not at the top: most captures need no py-spy
        import tempfile

        self.pid = pid
        self.started = now
        self._out: IO[bytes] = tempfile.TemporaryFile()
        self._err: IO[bytes] = tempfile.TemporaryFile()
        argv = [py_spy, "dump", "--json", "--pid", str(pid), *(["--nonblocking"] if nonblocking else [])]
        # Its own session: a Ctrl-C at the terminal is the launcher's to handle, not py-spy's.
        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err, start_new_session=True,
        )

    def outcome(self) -> tuple[ThreadStack, ...] | str | None:
        """None while it runs; then the threads it read, or its error's first line."""
        code = self.process.poll()
        if code is None:
            return None
        self._out.seek(0)
        self._err.seek(0)
        out, err = self._out.read(), self._err.read().decode(errors="replace")
        self.close()
        if code != 0:
            return _py_spy_error(err, code)
        import json

        try:
            return parse_py_spy(json.loads(out), self.pid)
        except (ValueError, KeyError, TypeError) as error:
            return f"py-spy's output could not be read ({error})"

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.close()

    def close(self) -> None:
        self._out.close()
        self._err.close()


def _py_spy_error(stderr: str, code: int) -> str:
    first = next((line.strip() for line in stderr.splitlines() if line.strip()), f"exit status {code}")
    hint = ""
    if "Permission denied" in stderr or "Operation not permitted" in stderr:
        hint = " (py-spy needs ptrace: the same user and kernel.yama.ptrace_scope=0, or CAP_SYS_PTRACE;" \
               " in a container, --cap-add SYS_PTRACE)"
    return f"py-spy failed: {first}{hint}"


Phase = Literal["signalled", "queued", "spying", "done"]


@dataclass
class _Probe:
    """One process's capture in progress: the way it is being read, and what came of it."""

    pid: int
    command: str
    phase: Phase = "done"
    dump_path: str = ""
    offset: int = 0  # the dump file's size before the signal: the dump is what comes after
    main_ident: str | None = None
    quiet_threads: frozenset[int] = frozenset()  # blocked the signal before it was sent
    why: str = ""  # why the signal was not used, or failed: py-spy's turn
    nonblocking: bool = False  # read by py-spy without pausing it: it cannot be paused (D, T)
    spy: _PySpyRun | None = None
    result: ProcessStacks | None = None

    def finish(self, why_not: str) -> None:
        """No stack: only why not."""
        self.result = ProcessStacks(self.pid, self.command, (), "none", why_not)
        self.phase = "done"


@dataclass
class _Tree:
    """A target's processes, the rank's own first, and the rank's facts at the start."""

    target: Target
    state: ProcessState
    cpu_s: float
    rss_bytes: int
    probes: list[_Probe] = field(default_factory=list)


class _Default(enum.Enum):
    FIND = "find"


FIND_PY_SPY = _Default.FIND  # StackCapture's default: find_py_spy() when it is made


class StackCapture:
    """One capture of one node's ranks. Non-blocking, driven by the caller's event loop:
    start(), then poll() whenever due_in() says, until poll() is True; then snapshots(), close()."""

    def __init__(
        self,
        targets: Sequence[Target],
        stack_dir: str | None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        py_spy: str | None | Literal[_Default.FIND] = FIND_PY_SPY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._targets = list(targets)
        self._stack_dir = stack_dir
        self._timeout_s = timeout_s
        if py_spy is FIND_PY_SPY:
            self._py_spy, self._no_spy_why = find_py_spy()
        else:
            self._py_spy, self._no_spy_why = py_spy, "py-spy is not used here"
        self._clock = clock
        self._signum = STACK_SIGNAL
        self._trees: list[_Tree] = []
        self._started_at = 0.0
        self._deadline = 0.0  # for the dumps; each py-spy run has its own
        self._answer_s = 0.0  # the time the dumps were given

    def start(self) -> None:
        """Read each rank's tree from /proc; signal the processes that can dump; queue py-spy."""
        self._started_at = now = self._clock()
        children = procfs.children_map()
        self._trees = [self._open_tree(target, children) for target in self._targets]
        signalled = sum(p.phase == "signalled" for p in self._probes())
        self._answer_s = self._timeout_s + PER_PROCESS_S * signalled
        self._deadline = now + self._answer_s
        self._start_spies(now)

    def due_in(self) -> float | None:
        """Seconds until poll() should be called again; None when the capture is done."""
        if self.done:
            return None
        return POLL_S if any(p.phase == "signalled" for p in self._probes()) else 2 * POLL_S

    def poll(self) -> bool:
        """Read what has come in and act on what is late; True once every process is read or given up."""
        now = self._clock()
        for probe in self._probes():
            if probe.phase == "signalled":
                self._check_dump(probe, now)
            elif probe.phase == "spying":
                self._check_spy(probe, now)
        self._start_spies(now)
        return self.done

    @property
    def done(self) -> bool:
        return all(p.phase == "done" for p in self._probes())

    def snapshots(self) -> list[RankSnapshot]:
        """One per target, in target order; a process not read by now says the capture was cut short."""
        return [self._snapshot(tree) for tree in self._trees]

    def close(self) -> None:
        """Stop and reap any py-spy still running. Safe to call twice."""
        for probe in self._probes():
            if probe.spy is not None:
                probe.spy.kill()
                probe.spy = None
            if probe.phase != "done":
                probe.finish(why_not="the capture was cut short")

    # -- start: what each process is, and how to read it -----------------------------------

    def _probes(self) -> list[_Probe]:
        return [probe for tree in self._trees for probe in tree.probes]

    def _open_tree(self, target: Target, children: dict[int, list[int]]) -> _Tree:
        stat = procfs.read_stat(target.pid)
        status = procfs.read_status(target.pid) or {}
        if stat is None:
            tree = _Tree(target, "gone", 0.0, 0)
        else:
            tree = _Tree(target, stat.state, stat.cpu_s, procfs.rss_bytes(status))
        pids = [target.pid, *(procfs.descendants(target.pid, children) if stat is not None else [])]
        tree.probes = [self._begin(pid, target) for pid in pids]
        return tree

    def _begin(self, pid: int, target: Target) -> _Probe:
        probe = _Probe(pid, procfs.read_comm(pid))
        stat = procfs.read_stat(pid)
        dump = None if self._stack_dir is None else read_dump_file(self._dump_path(pid))
        if stat is None or stat.state == "gone":
            probe.finish(why_not="it exited before the capture")
        elif stat.state == "zombie":
            probe.finish(why_not="it has exited (a zombie until its parent reaps it)")
        elif dump is None and not procfs.is_python(pid):
            probe.finish(why_not=f"not a Python process ({probe.command})")
        elif stat.state == "stopped":
            # A stopped process runs no handler, and a py-spy that pauses it fails: it is paused.
            self._to_py_spy(probe, "it is stopped (SIGSTOP or a debugger)", nonblocking=True)
        elif dump is None:
            self._to_py_spy(probe, self._why_no_bootstrap(pid, target))
        elif dump.released is not None:
            self._to_py_spy(probe, f"its bootstrap let go of the signal: {dump.released}")
        else:
            self._signal(probe, dump)
        return probe

    def _dump_path(self, pid: int) -> str:
        assert self._stack_dir is not None
        return os.path.join(self._stack_dir, str(pid))

    def _why_no_bootstrap(self, pid: int, target: Target) -> str:
        if self._stack_dir is None:
            return "no bootstrap (the launcher set up no stack directory)"
        if pid == target.pid and target.isolated_why is not None:
            return f"no bootstrap: {target.isolated_why}"
        flag = procfs.bootstrap_disabled_by(procfs.read_cmdline(pid))
        if flag is not None:
            return f"no bootstrap: started with {flag}"
        if pid == target.pid:
            return "no bootstrap (--no-python)" if not target.python else "its bootstrap has not run (still starting?)"
        return "no bootstrap: a Python started afresh (exec), not forked from the rank"

    def _signal(self, probe: _Probe, dump: DumpFile) -> None:
        """Send the signal if its handler is faulthandler's and nothing keeps it from running."""
        probe.dump_path = self._dump_path(probe.pid)
        probe.main_ident = dump.main_ident
        try:
            pidfd = _hold(probe.pid)
        except ProcessLookupError:
            probe.finish(why_not="it exited before the capture")
            return
        try:
            self._signal_held(probe, pidfd)
        except ProcessLookupError:
            probe.finish(why_not="it exited before the capture")
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def _signal_held(self, probe: _Probe, pidfd: int | None) -> None:
        status = procfs.read_status(probe.pid)
        if status is None:
            raise ProcessLookupError(probe.pid)
        if not procfs.has_signal(status, "SigCgt", self._signum):
            # Its default action kills: never send it to a process that does not catch it. The
            # file stays when a process execs, and so does its pid.
            if procfs.is_python(probe.pid):
                self._to_py_spy(probe, f"signal {self._signum} is no longer caught in it (did it exec?)")
            else:
                probe.finish(why_not=f"not a Python process ({procfs.read_comm(probe.pid)})")
            return
        probe.quiet_threads = self._threads_blocking(probe.pid)
        probe.offset = os.path.getsize(probe.dump_path)
        probe.phase = "signalled"
        if not procfs.has_signal(status, "ShdPnd", self._signum):  # else one sent earlier is still due
            _send(pidfd, probe.pid, self._signum)

    def _threads_blocking(self, pid: int) -> frozenset[int]:
        """Threads that block the signal already: they cannot be the one that dumps."""
        blocking = set()
        for tid in procfs.thread_ids(pid):
            status = procfs.read_status(pid, tid)
            if status is not None and procfs.has_signal(status, "SigBlk", self._signum):
                blocking.add(tid)
        return frozenset(blocking)

    # -- poll: the dumps, then py-spy --------------------------------------------------------

    def _check_dump(self, probe: _Probe, now: float) -> None:
        # Read before the kernel's word that the dump is over, the text shows that it began;
        # read after, it is the whole dump.
        began = _DUMP_STARTED in self._appended(probe).lower()
        if began and dump_finished(probe.pid, self._signum, probe.quiet_threads):
            threads = parse_faulthandler(self._appended(probe).decode(errors="replace"), probe.main_ident)
            probe.result = ProcessStacks(
                probe.pid, probe.command, threads, "faulthandler", None if threads else "its dump named no thread",
            )
            probe.phase = "done"
        elif now >= self._deadline:
            stat = procfs.read_stat(probe.pid)
            if stat is None or stat.state in ("zombie", "gone"):
                probe.finish(why_not="it exited during the capture")
                return
            late = f"did not answer in {self._answer_s:.1f} s (state: {stat.state})"
            self._to_py_spy(probe, late, nonblocking=stat.state in ("uninterruptible", "stopped"))

    def _appended(self, probe: _Probe) -> bytes:
        try:
            with open(probe.dump_path, "rb") as f:
                f.seek(probe.offset)
                return f.read()
        except OSError:
            return b""

    def _to_py_spy(self, probe: _Probe, why: str, nonblocking: bool = False) -> None:
        if self._py_spy is None:
            probe.finish(why_not=f"{why}; {self._no_spy_why}")
            return
        probe.phase, probe.why, probe.nonblocking = "queued", why, nonblocking

    def _start_spies(self, now: float) -> None:
        running = sum(p.phase == "spying" for p in self._probes())
        for probe in self._probes():
            if probe.phase != "queued" or running >= MAX_PY_SPY_RUNS:
                continue
            assert self._py_spy is not None
            try:
                probe.spy = _PySpyRun(self._py_spy, probe.pid, probe.nonblocking, now)
            except OSError as error:
                probe.finish(why_not=f"{probe.why}; py-spy could not start ({error})")
                continue
            probe.phase = "spying"
            running += 1

    def _check_spy(self, probe: _Probe, now: float) -> None:
        assert probe.spy is not None
        outcome = probe.spy.outcome()
        if outcome is None and now - probe.spy.started < PY_SPY_TIMEOUT_S:
            return
        if outcome is None:
            probe.spy.kill()
            outcome = f"py-spy did not finish in {PY_SPY_TIMEOUT_S:.0f} s"
        probe.spy = None
        if isinstance(outcome, str):
            probe.finish(why_not=f"{probe.why}; {outcome}")
        else:
            probe.result = ProcessStacks(probe.pid, probe.command, outcome, "py-spy")
            probe.phase = "done"

    def _snapshot(self, tree: _Tree) -> RankSnapshot:
        stacks = [
            p.result or ProcessStacks(p.pid, p.command, (), "none", "the capture was cut short") for p in tree.probes
        ]
        t = tree.target
        return RankSnapshot(
            t.host, t.rank, t.local_rank, t.pid, tree.state, tree.cpu_s, tree.rss_bytes, t.since_output_s,
            self._started_at, stacks[0], tuple(stacks[1:]),
        )


def dump_finished(pid: int, signum: int, quiet_threads: frozenset[int]) -> bool:
    """Whether the dump that has begun is over: the signal is pending nowhere and blocked by no
    thread but those that blocked it before it was sent.

    faulthandler registers without SA_NODEFER (chain=False), so the kernel blocks the signal
    in the thread that runs the handler, from before its first write until it returns. The
    caller has seen the dump's first line, so the handler had begun: once no thread blocks
    the signal, it has returned. Between taking a signal off the pending set and blocking it
    the kernel holds neither, but no handler has written anything yet then. ShdPnd is read
    before the threads: a signal still shared when read is caught there; one taken after
    that read is blocked by its thread when the threads are read.
    """
    status = procfs.read_status(pid)
    if status is None:
        return True  # it is gone: what it wrote is all there will be
    if procfs.has_signal(status, "ShdPnd", signum):
        return False
    for tid in procfs.thread_ids(pid):
        task = procfs.read_status(pid, tid)
        if task is None:
            continue  # that thread ended
        if procfs.has_signal(task, "SigPnd", signum):
            return False
        if tid not in quiet_threads and procfs.has_signal(task, "SigBlk", signum):
            return False
    return True


def _hold(pid: int) -> int | None:
    """A pidfd for `pid`: a signal through it reaches this process or none, never a reused pid.
    None on a kernel without pidfd_open (before 5.3): then the pid is all there is."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        raise
    except (OSError, AttributeError):
        return None


def _send(pidfd: int | None, pid: int, signum: int) -> None:
    if pidfd is None:
        os.kill(pid, signum)
    else:
        signal.pidfd_send_signal(pidfd, signum)


def capture_now(
    targets: Sequence[Target], stack_dir: str | None, timeout_s: float = DEFAULT_TIMEOUT_S,
    py_spy: str | None | Literal[_Default.FIND] = FIND_PY_SPY,
) -> list[RankSnapshot]:
    """Capture and wait for it: every process's wait has a deadline, so this returns."""
    capture = StackCapture(targets, stack_dir, timeout_s=timeout_s, py_spy=py_spy)
    try:
        capture.start()
        while not capture.poll():
            time.sleep(capture.due_in() or 0.0)
        return capture.snapshots()
    finally:
        capture.close()
