#!/usr/bin/env python3
"""Soak: many real launches of `ddplaunch --nproc 2` in five ways, and nothing left after any.

Scenarios, taken in turn: success; a failing rank (exit 3); Ctrl-C (SIGINT to the launcher
once both workers run); a worker SIGKILLed; the launcher SIGKILLed (its guard,
launcher/watchdog.py, then stops the workers). The workers are a small script without torch
that tells this script its pid through a FIFO, so every step waits on an event, each wait
bounded.

Every launch has its own TMPDIR under the soak directory and a unique SOAK_MARKER=... in its
environment, which the launcher, its guard and the workers all inherit. After each launch:
no live process carries the marker (/proc/*/environ), none of the launch's processes is a
zombie, the TMPDIR is empty, and the launcher's peak RSS (os.wait4's ru_maxrss: the launcher
is this script's child) is recorded; at the end the first and last runs of each scenario
are compared. A `ddplaunch-<pid>-*` left in TMPDIR by a SIGKILLed launcher is counted on its
own (the launcher that made it ran no code to remove it: its guard must), and fails the soak
like any other left dir.

    scripts/soak.py                # 200 launches
    scripts/soak.py --runs 10      # two of each, a few seconds
Exit code 0 when every launch ended as expected and nothing was left; 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARKER = "SOAK_MARKER"
EVENT_TIMEOUT_S = 20.0  # a worker's hello, a launcher's exit: generous on a loaded 2-core box
GONE_TIMEOUT_S = 10.0  # after a launch: its guard's grace is 1 s, its reaping a moment more
REAP_TIMEOUT_S = 5.0  # for init to reap what a SIGKILLed launcher's guard stopped
RSS_WINDOW = 20  # the first and the last this many runs of a scenario are compared
RSS_GROWTH = 1.10  # more than 10% higher at the end than at the start: a leak to look at

# Each worker says "RANK PID" on the FIFO (one write, under PIPE_BUF: never interleaved),
# then ends as the scenario asks; a worker left waiting ends by itself after a minute.
WORKER = """\
import os, sys, time
rank = int(os.environ["RANK"])
with open(os.environ["SOAK_FIFO"], "w") as fifo:
    fifo.write(f"{rank} {os.getpid()}\\n")
print(f"rank {rank} up", flush=True)
mode = os.environ["SOAK_MODE"]
if mode == "success" or (mode == "fail" and rank == 1):
    sys.exit(3 if mode == "fail" else 0)
time.sleep(60)
"""


@dataclass(frozen=True)
class Scenario:
    name: str
    worker_mode: str  # what the workers do: success, fail, wait
    expected_exit: int | None  # the launcher's; None when it is SIGKILLed


SCENARIOS = (
    Scenario("success", "success", 0),
    Scenario("failing rank", "fail", 3),
    Scenario("ctrl-c", "wait", 128 + signal.SIGINT),
    Scenario("worker kill -9", "wait", 128 + signal.SIGKILL),  # the root cause's code
    Scenario("launcher kill -9", "wait", None),
)


@dataclass
class Outcome:
    """What one launch did and left."""

    ok: bool
    detail: str
    left_processes: int
    zombies: int
    left_dirs: int
    kill9_dirs: int
    max_rss_kib: int


@dataclass
class Tally:
    """One scenario's outcomes."""

    outcomes: list[Outcome] = field(default_factory=list)

    def total(self, name: str) -> int:
        return sum(getattr(o, name) for o in self.outcomes)

    @property
    def failures(self) -> int:
        return sum(not o.ok for o in self.outcomes)

    def rss_ends(self) -> tuple[float, float]:
        """Mean peak RSS (MiB) of the first and of the last runs (a window of up to
        RSS_WINDOW, at most half of them each)."""
        rss = [o.max_rss_kib / 1024 for o in self.outcomes]
        window = max(1, min(RSS_WINDOW, len(rss) // 2))
        return sum(rss[:window]) / window, sum(rss[-window:]) / window

    def rss_grew(self) -> bool:
        first, last = self.rss_ends()
        return len(self.outcomes) >= 2 and last > first * RSS_GROWTH


# -- waiting on events ------------------------------------------------------------------------


class Hellos:
    """The FIFO the workers announce themselves on. This script holds a write end too, so the
    read end never sees end-of-file between two workers."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path, 0o600)
        self._read = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self._keep = os.open(path, os.O_WRONLY)
        self._pending = b""
        self.pids: dict[int, int] = {}

    def wait_for(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while len(self.pids) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._read], [], [], remaining)[0]:
                return False
            self._pending += os.read(self._read, 4096)
            *lines, self._pending = self._pending.split(b"\n")
            for line in lines:
                rank, pid = line.split()
                self.pids[int(rank)] = int(pid)
        return True

    def close(self) -> None:
        os.close(self._read)
        os.close(self._keep)


def wait_exit(pid: int, timeout: float) -> tuple[int | None, int]:
    """The child's exit code (shell convention) and peak RSS in KiB; None on timeout (then it
    is killed and reaped, so no run leaves a zombie of ours behind)."""
    pidfd = os.pidfd_open(pid)
    try:
        ended = bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)
    if not ended:
        os.kill(pid, signal.SIGKILL)
    _, status, usage = os.wait4(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return (None if not ended else (128 - code if code < 0 else code)), usage.ru_maxrss


def marked_processes(marker: bytes) -> list[int]:
    """Live processes whose environment holds the exact `SOAK_MARKER=value` entry."""
    needle = b"\0" + marker + b"\0"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as env_file:
                if needle in b"\0" + env_file.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def wait_gone(pids: Sequence[int], timeout: float) -> None:
    """Until these processes (not ours: no SIGCHLD) end, or the timeout: one pidfd each."""
    fds = []
    for pid in pids:
        try:
            fds.append(os.pidfd_open(pid))
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    try:
        while fds and (remaining := deadline - time.monotonic()) > 0:
            for fd in select.select(fds, [], [], remaining)[0]:
                fds.remove(fd)
                os.close(fd)
    finally:
        for fd in fds:
            os.close(fd)


def state_of(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0].decode()
    except OSError:
        return None


def wait_reaped(pids: Sequence[int], timeout: float) -> list[int]:
    """The zombies among `pids` still unreaped after `timeout`. Workers orphaned by a SIGKILLed
    launcher are init's to reap, and nothing tells us when it has: polled, bounded."""
    deadline = time.monotonic() + timeout
    while (zombies := [pid for pid in pids if state_of(pid) == "Z"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    return zombies


def zombie_children() -> list[int]:
    me = str(os.getpid())
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as stat:
                    fields = stat.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if fields[0] == b"Z" and fields[1].decode() == me:
                found.append(int(entry))
    return found


# -- one launch -------------------------------------------------------------------------------


def launch(scenario: Scenario, run_dir: Path, worker: Path, ddplaunch: str) -> Outcome:
    tmp = run_dir / "tmp"
    tmp.mkdir(parents=True)
    marker = f"{MARKER}={uuid.uuid4().hex}"
    hellos = Hellos(run_dir / "hello")
    env = {
        **os.environ, "TMPDIR": str(tmp), MARKER: marker.partition("=")[2], "SOAK_FIFO": str(run_dir / "hello"),
        "SOAK_MODE": scenario.worker_mode, "DDPLAUNCH_CLUSTER": "none",
    }
    argv = [ddplaunch, "--nproc", "2", "--grace", "5", "--no-color", str(worker)]
    with open(run_dir / "output", "wb") as output:
        launcher = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=output,
                                    start_new_session=True)
    try:
        detail = act(scenario, launcher.pid, hellos)
        code, max_rss = wait_exit(launcher.pid, EVENT_TIMEOUT_S)
        launcher.returncode = code if code is not None else -9  # reaped here: Popen must not wait again
        hellos.wait_for(2, 1.0)  # every worker said hello before it ended: their pids, for the zombie check
    finally:
        hellos.close()
    if not detail:
        detail = expectation_missed(scenario, code)
    return check_left(scenario, launcher.pid, tmp, marker.encode(), list(hellos.pids.values()), detail, max_rss)


def act(scenario: Scenario, launcher: int, hellos: Hellos) -> str:
    """Do to the launch what the scenario says, once its workers run; '' when all went well."""
    if scenario.worker_mode != "wait":
        return ""
    if not hellos.wait_for(2, EVENT_TIMEOUT_S):
        return f"only {len(hellos.pids)} of 2 workers said hello within {EVENT_TIMEOUT_S:g}s"
    if scenario.name == "ctrl-c":
        os.kill(launcher, signal.SIGINT)
    elif scenario.name == "worker kill -9":
        os.kill(hellos.pids[1], signal.SIGKILL)
    else:
        os.kill(launcher, signal.SIGKILL)
    return ""


def expectation_missed(scenario: Scenario, code: int | None) -> str:
    if code is None:
        return f"the launcher had not exited {EVENT_TIMEOUT_S:g}s later"
    expected = scenario.expected_exit if scenario.expected_exit is not None else 128 + signal.SIGKILL
    return "" if code == expected else f"exit code {code}, expected {expected}"


def check_left(
    scenario: Scenario, launcher: int, tmp: Path, marker: bytes, workers: list[int], detail: str, max_rss: int,
) -> Outcome:
    wait_gone(marked_processes(marker), GONE_TIMEOUT_S)
    left = marked_processes(marker)
    zombies = wait_reaped((launcher, *workers), REAP_TIMEOUT_S) + zombie_children()
    names = sorted(entry.name for entry in tmp.iterdir())
    kill9 = [n for n in names if scenario.expected_exit is None and n.startswith(f"ddplaunch-{launcher}-")]
    if left:
        detail = detail or f"left processes {left}"
    if zombies:
        detail = detail or f"zombies {zombies}"
    others = [n for n in names if n not in kill9]
    if others:
        detail = detail or f"left in TMPDIR: {others}"
    ok = not detail
    return Outcome(ok, detail, len(left), len(zombies), len(others), len(kill9), max_rss)


# -- the whole soak ---------------------------------------------------------------------------


def soak(runs: int, root: Path, ddplaunch: str, keep: bool, progress: bool) -> dict[str, Tally]:
    worker = root / "worker.py"
    worker.write_text(WORKER)
    tallies = {s.name: Tally() for s in SCENARIOS}
    for index in range(runs):
        scenario = SCENARIOS[index % len(SCENARIOS)]
        run_dir = root / f"run-{index:04d}"
        outcome = launch(scenario, run_dir, worker, ddplaunch)
        tallies[scenario.name].outcomes.append(outcome)
        if not outcome.ok:
            print(f"run {index} ({scenario.name}): {outcome.detail}; its output: {run_dir / 'output'}", file=sys.stderr)
        elif not keep:
            shutil.rmtree(run_dir)
        if progress and (index + 1) % 20 == 0:
            print(f"... {index + 1} of {runs}", file=sys.stderr, flush=True)
    return tallies


def table(tallies: dict[str, Tally]) -> str:
    head = ("scenario", "runs", "failures", "left procs", "left dirs", "kill -9 dirs", "zombies", "RSS MiB first/last")
    rows = [head]
    for name, tally in tallies.items():
        if not tally.outcomes:
            continue
        first, last = tally.rss_ends()
        grew = " GREW" if tally.rss_grew() else ""
        rows.append((
            name, str(len(tally.outcomes)), str(tally.failures), str(tally.total("left_processes")),
            str(tally.total("left_dirs")), str(tally.total("kill9_dirs")), str(tally.total("zombies")),
            f"{first:.1f}/{last:.1f}{grew}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def verdict(tallies: dict[str, Tally]) -> bool:
    every = [t for t in tallies.values()]
    left = ("left_processes", "left_dirs", "kill9_dirs", "zombies")
    if any(t.failures or any(t.total(what) for what in left) for t in every):
        return False
    return not any(t.rss_grew() for t in every if len(t.outcomes) >= 2 * RSS_WINDOW)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="launches in all, the scenarios in turn (default 200)")
    parser.add_argument("--dir", type=Path, help="the soak directory (default: a new one under $TMPDIR, removed)")
    parser.add_argument("--ddplaunch", default=str(Path(sys.executable).with_name("ddplaunch")),
                        help="the launcher to soak (default: the one beside this Python)")
    parser.add_argument("--keep", action="store_true", help="keep every run's directory, not only failed ones'")
    args = parser.parse_args(argv)
    root = args.dir or Path(tempfile.mkdtemp(prefix="ddplaunch-soak-"))
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    tallies = soak(args.runs, root, args.ddplaunch, args.keep, progress=args.runs >= 50)
    good = verdict(tallies)
    print(table(tallies))
    print(f"{args.runs} launches in {time.monotonic() - started:.1f}s; {'nothing left' if good else 'FAILED'}")
    if args.dir is None and good and not args.keep:
        shutil.rmtree(root)
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
