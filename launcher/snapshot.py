"""Where a rank was at one moment: the data a stack report is made of (pure: no I/O).

A `RankSnapshot` is what one node's launcher learned about one rank (ddplaunch.stacks reads
it from /proc, from the dump the rank's bootstrap wrote, or from py-spy); it travels between
nodes as JSON (over SSH in a frame, between static nodes in the store) and
ddplaunch.stackreport turns a job's snapshots into the grouped report.

The contract with the workers' bootstrap (launcher/bootstrap/sitecustomize.py, run inside
every Python worker before the user's code): the launcher puts bootstrap_dir() first on
PYTHONPATH and sets STACKS_VARIABLE to "SIGNUM:HAD_PYTHONPATH:DIR". The bootstrap takes both
out of the worker's environment again (so the script sees torchrun's environment), opens
DIR/<pid> for appending, writes a header line `ddplaunch-stacks 1 <main thread ident>` and
registers faulthandler on SIGNUM to dump every thread into that file. A forked child does
the same for its own pid. If the script installs its own handler on SIGNUM, the bootstrap
lets go of the signal and appends `ddplaunch-stacks released <why>`: the launcher then
never sends it that signal.

An agent shipped as a zip (ddplaunch.ship) runs this code from inside the zip, where a folder
is no PYTHONPATH entry a worker can rely on: prepare_bootstrap then writes the bootstrap
out into the job's private directory, and bootstrap_dir() names that copy.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from typing import Any, Literal

STACKS_VARIABLE = "DDPLAUNCH_STACKS"
BOOTSTRAP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bootstrap")  # as installed
BOOTSTRAP_FILE = "sitecustomize.py"
HEADER_WORD = "ddplaunch-stacks"
# A real-time signal: SIGUSR1/2 belong to Slurm and Lightning, and nothing common uses this one.
# Its default action kills, so it is sent only to a process whose bootstrap caught it.
STACK_SIGNAL = signal.SIGRTMAX - 3

ProcessState = Literal["running", "sleeping", "uninterruptible", "stopped", "zombie", "gone", "other"]
StackSource = Literal["faulthandler", "py-spy", "none"]


@dataclass(frozen=True)
class StackFrame:
    """One frame: the file, the line and the function, as Python names them."""

    file: str
    line: int
    function: str

    def to_json(self) -> list[Any]:
        return [self.file, self.line, self.function]

    @staticmethod
    def from_json(data: Any) -> StackFrame:
        file, line, function = data
        return StackFrame(str(file), int(line), str(function))


@dataclass(frozen=True)
class ThreadStack:
    """One thread's frames, innermost first (as faulthandler and py-spy list them)."""

    ident: str  # faulthandler's "0x7f..." or py-spy's thread id, as text
    name: str  # py-spy's thread name; "" when unknown (faulthandler names none)
    is_main: bool
    frames: tuple[StackFrame, ...]

    def to_json(self) -> dict[str, Any]:
        return {"ident": self.ident, "name": self.name, "main": self.is_main,
                "frames": [f.to_json() for f in self.frames]}

    @staticmethod
    def from_json(data: Any) -> ThreadStack:
        return ThreadStack(
            str(data["ident"]), str(data["name"]), bool(data["main"]),
            tuple(StackFrame.from_json(f) for f in data["frames"]),
        )


@dataclass(frozen=True)
class ProcessStacks:
    """A process of a rank's tree (the rank itself, or a child such as a DataLoader worker)."""

    pid: int
    command: str  # its name, as /proc/<pid>/comm says
    threads: tuple[ThreadStack, ...]  # empty when no way could read it
    source: StackSource
    why_not: str | None = None  # why no stack, when threads is empty: shown in the report

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "command": self.command, "threads": [t.to_json() for t in self.threads],
                "source": self.source, "why_not": self.why_not}

    @staticmethod
    def from_json(data: Any) -> ProcessStacks:
        return ProcessStacks(
            int(data["pid"]), str(data["command"]), tuple(ThreadStack.from_json(t) for t in data["threads"]),
            data["source"], data["why_not"],
        )

    @property
    def main_thread(self) -> ThreadStack | None:
        return next((t for t in self.threads if t.is_main), None)


@dataclass(frozen=True)
class RankSnapshot:
    """One rank at one moment, with the facts the report shows beside its stack."""

    host: str
    rank: int
    local_rank: int
    pid: int
    state: ProcessState
    cpu_s: float  # CPU seconds the rank's own process used since it started
    rss_bytes: int
    since_output_s: float | None  # seconds since its last line; None: it printed none yet
    taken_at: float  # the launcher's monotonic clock when this was read (differences only)
    main: ProcessStacks  # the rank's process
    children: tuple[ProcessStacks, ...] = ()  # its descendants, for the full-stacks file

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host, "rank": self.rank, "local_rank": self.local_rank, "pid": self.pid,
            "state": self.state, "cpu_s": self.cpu_s, "rss_bytes": self.rss_bytes,
            "since_output_s": self.since_output_s, "taken_at": self.taken_at,
            "main": self.main.to_json(), "children": [c.to_json() for c in self.children],
        }

    @staticmethod
    def from_json(data: Any) -> RankSnapshot:
        since = data["since_output_s"]
        return RankSnapshot(
            str(data["host"]), int(data["rank"]), int(data["local_rank"]), int(data["pid"]), data["state"],
            float(data["cpu_s"]), int(data["rss_bytes"]), None if since is None else float(since),
            float(data["taken_at"]), ProcessStacks.from_json(data["main"]),
            tuple(ProcessStacks.from_json(c) for c in data["children"]),
        )

    @property
    def main_frames(self) -> tuple[StackFrame, ...] | None:
        """The main thread's frames, innermost first; None when its stack could not be read."""
        thread = self.main.main_thread
        return None if thread is None else thread.frames


def stacks_variable(signum: int, had_pythonpath: bool, directory: str) -> str:
    """STACKS_VARIABLE's value (see the module's docstring)."""
    return f"{signum}:{int(had_pythonpath)}:{directory}"


_written_out: str | None = None  # this process's copy of the bootstrap, when it runs from a zip


def bootstrap_dir() -> str:
    """The folder the workers put first on PYTHONPATH: the package's own, or the copy that
    prepare_bootstrap wrote out when this code runs from a zip."""
    return _written_out or BOOTSTRAP_DIR


def prepare_bootstrap(private_dir: str | None = None) -> None:
    """Make the bootstrap ready for the workers: compiled once, here, when installed; written
    out into `private_dir` (the job's own, 0700) when this code runs from a zip."""
    if not os.path.isdir(BOOTSTRAP_DIR) and private_dir is not None:
        _write_out(private_dir)
    else:
        _compile()


def _write_out(private_dir: str) -> None:
    import pkgutil

    global _written_out
    data = pkgutil.get_data("ddplaunch", f"bootstrap/{BOOTSTRAP_FILE}")
    if data is None:
        return  # no loader that reads data: the workers go without (the reports fall back to py-spy)
    folder = os.path.join(private_dir, "bootstrap")
    os.makedirs(folder, 0o700, exist_ok=True)
    with open(os.path.join(folder, BOOTSTRAP_FILE), "wb") as out:
        out.write(data)
    _written_out = folder


def _compile() -> None:
    """A worker that compiles the bootstrap (PYTHONDONTWRITEBYTECODE, a read-only install)
    spends ~3 ms of its start-up on that, against under 1 ms with bytecode."""
    source = os.path.join(BOOTSTRAP_DIR, BOOTSTRAP_FILE)
    # importlib.util.cache_from_source's answer, without its ~5 ms import on the launch path
    cached = os.path.join(BOOTSTRAP_DIR, "__pycache__", f"sitecustomize.{sys.implementation.cache_tag}.pyc")
    try:
        if os.stat(cached).st_mtime >= os.stat(source).st_mtime:
            return  # compiled by an earlier launch
    except OSError:
        pass
    import py_compile

    try:
        py_compile.compile(source, doraise=True)
    except (OSError, py_compile.PyCompileError):
        pass  # the workers compile it themselves, a little slower
