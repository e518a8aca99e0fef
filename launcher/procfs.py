"""What Linux's /proc says about a process: its state, CPU time, memory, signals and children.

Every reader returns None (or an empty answer) when the process is gone: any process may
exit between two reads, and that is an answer, not an error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ddplaunch.snapshot import ProcessState

_STATES: dict[str, ProcessState] = {
    "R": "running", "S": "sleeping", "D": "uninterruptible", "T": "stopped", "t": "stopped",
    "Z": "zombie", "X": "gone",
}
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Interpreter options after which Python ignores PYTHONPATH or never imports site, and so
# never runs the bootstrap, with what each means.
_NO_BOOTSTRAP = {"I": "isolated mode", "E": "PYTHONPATH ignored", "S": "no site module"}


@dataclass(frozen=True)
class ProcStat:
    """The facts /proc/<pid>/stat gives: state, parent and CPU time (user + system)."""

    state: ProcessState
    ppid: int
    cpu_s: float


def read_stat(pid: int) -> ProcStat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    # The command in parentheses may itself hold spaces and parentheses: split after the last.
    fields = text.rpartition(")")[2].split()
    return ProcStat(_STATES.get(fields[0], "other"), int(fields[1]), (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS)


@dataclass(frozen=True)
class KernelWait:
    """Where a process that would not die sits: its state as /proc/<pid>/status words it
    ("D (disk sleep)") and the kernel function it sleeps in ("__refrigerator"), if any."""

    state: str
    wchan: str | None


def read_kernel_wait(pid: int) -> KernelWait | None:
    status = read_status(pid)
    if status is None:
        return None
    try:
        with open(f"/proc/{pid}/wchan", "rb") as f:
            wchan = f.read().decode(errors="replace").strip()
    except OSError:
        wchan = ""
    return KernelWait(status.get("State", "?"), None if wchan in ("", "0") else wchan)  # "0": running


def read_status(pid: int, tid: int | None = None) -> dict[str, str] | None:
    """/proc/<pid>/status (or one thread's) as a dict: "SigCgt" -> "0000000000004a02", ..."""
    path = f"/proc/{pid}/status" if tid is None else f"/proc/{pid}/task/{tid}/status"
    try:
        with open(path, "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    return dict(_field(line) for line in text.splitlines() if ":" in line)


def _field(line: str) -> tuple[str, str]:
    name, _, value = line.partition(":")
    return name, value.strip()


def has_signal(status: dict[str, str], field: str, signum: int) -> bool:
    """Whether the signal mask `field` (SigCgt, SigBlk, SigPnd, ShdPnd) holds `signum`."""
    return bool(int(status.get(field, "0"), 16) >> (signum - 1) & 1)


def rss_bytes(status: dict[str, str]) -> int:
    """VmRSS; 0 for a zombie, which has no memory left to count."""
    value = status.get("VmRSS", "0 kB").split()
    return int(value[0]) * 1024 if value and value[0].isdecimal() else 0


def read_comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().decode(errors="replace").strip()
    except OSError:
        return "?"


def thread_ids(pid: int) -> list[int]:
    try:
        return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def children_map() -> dict[int, list[int]]:
    """Every process's children, by parent pid: one pass over /proc for a whole capture."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdecimal():
            stat = read_stat(int(entry))
            if stat is not None:
                children.setdefault(stat.ppid, []).append(int(entry))
    return children


def descendants(pid: int, children: dict[int, list[int]]) -> list[int]:
    """Children, then grandchildren, and so on (breadth first, each level by pid)."""
    found: list[int] = []
    level = [pid]
    while level:
        level = sorted(child for parent in level for child in children.get(parent, ()))
        found.extend(level)
    return found


def is_python(pid: int) -> bool:
    """Its executable is named python* or pypy*, or it has libpython mapped (an embedding)."""
    try:
        name = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return False
    if name.startswith(("python", "pypy")):
        return True
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            return b"/libpython" in f.read()
    except OSError:
        return False


def read_cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [arg.decode(errors="replace") for arg in f.read().split(b"\0")[:-1]]
    except OSError:
        return []


def bootstrap_disabled_by(argv: list[str]) -> str | None:
    """"-I (isolated mode)" when Python's own options in `argv` keep the bootstrap from running."""
    for option in _interpreter_options(argv[1:]):
        if option in _NO_BOOTSTRAP:
            return f"-{option} ({_NO_BOOTSTRAP[option]})"
    return None


def _interpreter_options(args: list[str]) -> list[str]:
    """The one-letter options before the script, -c or -m: ["-X", "dev", "-IS", "x.py"] -> X I S."""
    letters: list[str] = []
    skip_next = False
    for arg in args:
        if skip_next:
            skip_next = False
            continue
        if arg == "-" or arg == "--" or not arg.startswith("-"):
            break
        if arg.startswith("--"):  # --check-hash-based-pycs MODE is the one long option with a value
            skip_next = arg == "--check-hash-based-pycs"
            continue
        for i, letter in enumerate(arg[1:]):
            letters.append(letter)
            if letter in "cm":
                return letters
            if letter in "XW":  # -X opt, -Wopt: the rest of this word, or the next word, is its value
                skip_next = i == len(arg) - 2
                break
    return letters
