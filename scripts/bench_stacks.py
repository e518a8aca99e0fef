"""The stack-report rows of scripts/bench.py (issue 9): what asking for every rank's stack costs.

scripts/bench.py runs these rows when selected (all are, by default; `--only stacks` runs
only them); the helpers they share with the other row modules live in benchlib.py.

  sigquit    ddplaunch with 4 and with 32 (`--force`) plain Python workers (no torch) that
             print "ready" and sleep. Once every rank's "ready" has arrived on the launcher's
             stdout (the pipe is read, nothing is polled), the launcher gets SIGQUIT; measured:
             from just before the kill to the arrival on its stderr of the rule that closes
             the report (`━━ Where the ranks are: ...` ... a line of `━`). REPORTS_PER_LAUNCH
             reports one after the other per launch (the first, then later ones), then SIGINT
             and the launcher must exit. torchrun has no such report (SIGQUIT stops it): n/a,
             and the row is judged by its median against the absolute target.
                                             target <= 0.5 s (4 ranks), <= 1.5 s (32 ranks)
  nobootstrap  `launch, nproc 4` as in bench_local.py, with `--no-stack-bootstrap`, against
             torchrun (target ratio <= 0.08, as for the launch rows, which run with the
             bootstrap on, the default). Each rep also launches ddplaunch with the bootstrap
             on, so the notes compare on and off from the same alternation. Then, once, the
             bootstrap's own cost per worker start: BOOTSTRAP_PAIRS pairs of `python -c pass`
             with and without the bootstrap's environment (PYTHONPATH and DDPLAUNCH_STACKS as
             the launcher sets them, ddplaunch.stacks.with_bootstrap), which one goes first
             alternating, each timed from posix_spawn to waitpid.   target < 3 ms a start

The failure-teardown row of bench_local.py already includes the capture of the other
ranks' stacks: its other ranks are Python workers that get the bootstrap.
"""

from __future__ import annotations

import os
import re
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from benchlib import (
    SeriesRow,
    secs,
    Bench,
    Timeout,
    attempt,
    draw_rows,
    finish,
    log,
    median_of,
    ok_mark,
    run_launch,
    wait_exit,
)
from ddplaunch.snapshot import prepare_bootstrap
from ddplaunch.stacks import with_bootstrap

STACK_KEYS = ("sigquit", "nobootstrap")
REPORT_RANKS = {4: 0.5, 32: 1.5}  # ranks -> target seconds from SIGQUIT to the printed report
REPORTS_PER_LAUNCH = 3
BOOTSTRAP_PAIRS = 50
BOOTSTRAP_TARGET_MS = 3.0
NO_BOOTSTRAP = "--no-stack-bootstrap"
ON, OFF, TORCHRUN = "ddplaunch", f"ddplaunch {NO_BOOTSTRAP}", "torchrun"

WORKERS = {
    "ready_sleep.py": """\
import time
print("ready", flush=True)
try:
    time.sleep(120)
except KeyboardInterrupt:
    pass
""",
}

READY = re.compile(rb"^ *(\d+) \| ready$")
# A group's title naming the worker's sleep: "ranks 0-2, 5 · <module> at ready_sleep.py:4"
AT_SLEEP = re.compile(rb"^ +ranks? ([\d, -]+) .*<module> at ready_sleep\.py:\d+$")
ANSI = re.compile(rb"\x1b\[[0-9;]*m")
REPORT_OPENS = "━━ Where the ranks are:".encode()
RULE = "━".encode()


# -- the launcher's two pipes, read together --------------------------------------------------


class Pipes:
    """A launcher's stdout and stderr, read as lines as they arrive, both at once: leaving one
    unread would let it fill and stall the launcher. Each line goes to `on_line` with the
    time.perf_counter() of the read that completed it."""

    def __init__(self, proc: subprocess.Popen[bytes], on_line: Callable[[str, bytes, float], None]) -> None:
        assert proc.stdout is not None and proc.stderr is not None
        self.open = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}
        self.partial = {name: b"" for name in self.open.values()}
        self.on_line = on_line

    def read_until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        """Read until done() (checked after every read) or both pipes are closed; Timeout otherwise."""
        deadline = time.monotonic() + timeout
        while not done():
            if not self.open:
                raise RuntimeError(f"the launcher closed its output before {what}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout(what)
            ready, _, _ = select.select(list(self.open), [], [], left)
            for fd in ready:
                self._read(fd)

    def _read(self, fd: int) -> None:
        chunk = os.read(fd, 65536)
        now = time.perf_counter()
        name = self.open[fd]
        if not chunk:
            del self.open[fd]
            if self.partial[name]:
                self.on_line(name, self.partial[name], now)
            return
        *lines, self.partial[name] = (self.partial[name] + chunk).split(b"\n")
        for line in lines:
            self.on_line(name, line, now)


@dataclass
class ReportWatch:
    """What the launcher has printed so far that the sigquit row waits for."""

    ready: set[int] = field(default_factory=set)
    in_report: bool = False
    closed_at: list[float] = field(default_factory=list)  # perf_counter of each report's closing rule
    at_sleep: list[int] = field(default_factory=list)  # each report's ranks shown in the worker's sleep

    def on_line(self, stream: str, line: bytes, now: float) -> None:
        line = ANSI.sub(b"", line).rstrip()
        if stream == "stdout":
            found = READY.match(line)
            if found:
                self.ready.add(int(found.group(1)))
        elif line.startswith(REPORT_OPENS):
            self.in_report = True
            self.at_sleep.append(0)
        elif self.in_report and line and not line.replace(RULE, b""):
            self.in_report = False
            self.closed_at.append(now)
        elif self.in_report and (group := AT_SLEEP.match(line)):
            self.at_sleep[-1] += count_ranks(group.group(1).decode())


def count_ranks(compact: str) -> int:
    """How many ranks "0-2, 5" names."""
    count = 0
    for part in compact.split(","):
        first, _, last = part.strip().partition("-")
        count += int(last or first) - int(first) + 1
    return count


def run_sigquit(bench: Bench, nproc: int) -> list[float]:
    """One launch: REPORTS_PER_LAUNCH times SIGQUIT -> the report's closing rule, in seconds."""
    argv = bench.argv("ddplaunch", nproc, "ready_sleep.py", tool_opts=("--force",))
    proc, token = bench.start(argv, subprocess.PIPE, subprocess.PIPE, f"sigquit ddplaunch n{nproc}")
    watch = ReportWatch()
    pipes = Pipes(proc, watch.on_line)
    try:
        pipes.read_until(lambda: len(watch.ready) == nproc, 120, f"all {nproc} ranks ready")
        took = []
        for n in range(REPORTS_PER_LAUNCH):
            sent = time.perf_counter()
            os.kill(proc.pid, signal.SIGQUIT)
            pipes.read_until(lambda: len(watch.closed_at) > n, 30, f"report {n + 1} after SIGQUIT")
            took.append(watch.closed_at[n] - sent)
            if watch.at_sleep[n] != nproc:  # a fast report that lacks stacks would be no answer
                raise RuntimeError(f"report {n + 1} shows {watch.at_sleep[n]} of {nproc} ranks in their sleep")
            if proc.poll() is not None:
                raise RuntimeError(f"the job did not go on after report {n + 1}: exit {proc.returncode}")
        os.kill(proc.pid, signal.SIGINT)
        pipes.read_until(lambda: not pipes.open, 60, "the launcher's exit after SIGINT")
        if wait_exit(proc, timeout=30) is None:
            raise Timeout("the launcher's exit after SIGINT")
        return took
    finally:
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        finish(proc, token)


# -- the bootstrap's cost per worker start ----------------------------------------------------


def spawn_wait(argv: list[str], env: dict[str, str], devnull: int) -> float:
    """Seconds from posix_spawn to the reaped exit of one process."""
    actions = [(os.POSIX_SPAWN_DUP2, devnull, fd) for fd in (0, 1, 2)]
    t0 = time.perf_counter()
    pid = os.posix_spawn(argv[0], argv, env, file_actions=actions)
    _, status = os.waitpid(pid, 0)
    elapsed = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{argv} exited {os.waitstatus_to_exitcode(status)}")
    return elapsed


def bootstrap_cost(bench: Bench, pairs: int) -> dict[str, list[float]]:
    """`python -c pass` with the bootstrap's environment and without, `pairs` times each, in ms."""
    prepare_bootstrap()  # as the launcher does once per job: the workers find its bytecode
    argv = [sys.executable, "-c", "pass"]
    off = dict(os.environ, BENCH_TOKEN=bench.new_token())
    with tempfile.TemporaryDirectory(prefix="stacks-", dir=bench.workdir) as stack_dir:
        on = with_bootstrap(off, stack_dir)
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            spawn_wait(argv, on, devnull)  # untimed: the page cache
            times: dict[str, list[float]] = {"on": [], "off": []}
            for n in range(pairs):
                order = ("on", "off") if n % 2 == 0 else ("off", "on")
                for which in order:
                    times[which].append(1000 * spawn_wait(argv, on if which == "on" else off, devnull))
        finally:
            os.close(devnull)
        if len(os.listdir(stack_dir)) < pairs:  # each bootstrapped start leaves its DIR/<pid>
            raise RuntimeError(f"the bootstrap did not run: {len(os.listdir(stack_dir))} dump files for {pairs} starts")
    return times


# -- the rows ---------------------------------------------------------------------------------


class StackRow(SeriesRow):
    """One stack-report row, shown as ddplaunch, torchrun and ratio cells."""

    def cells(self) -> tuple[str, str, str]:
        """ddplaunch, torchrun, ratio."""
        raise NotImplementedError


class SigquitRow(StackRow):
    """Series "ddplaunch": every report's time; extra "first"/"later": the same, split."""

    def __init__(self, nproc: int) -> None:
        super().__init__(f"sigquit_{nproc}", f"SIGQUIT to stack report, nproc {nproc}", {ON: []},
                         {"first": [], "later": []})
        self.nproc = nproc

    def target(self) -> str:
        return f"<= {REPORT_RANKS[self.nproc]:g} s"

    def ok(self) -> bool | None:
        value = self.median(ON)
        return None if value is None else value <= REPORT_RANKS[self.nproc] and not self.errors

    def cells(self) -> tuple[str, str, str]:
        return secs(self.median(ON)), "n/a (no stack report)", "n/a"


class NoBootstrapRow(StackRow):
    """Series OFF, TORCHRUN and ON (the same launch with the bootstrap, for the notes)."""

    def __init__(self) -> None:
        super().__init__("launch_4_no_bootstrap", f"launch, nproc 4, {NO_BOOTSTRAP}", {OFF: [], TORCHRUN: [], ON: []})

    def ratio(self) -> float | None:
        off, torch = self.median(OFF), self.median(TORCHRUN)
        return off / torch if off is not None and torch else None

    def target(self) -> str:
        return "<= 0.08"

    def ok(self) -> bool | None:
        ratio = self.ratio()
        return None if ratio is None else ratio <= 0.08

    def cells(self) -> tuple[str, str, str]:
        ratio = self.ratio()
        return secs(self.median(OFF)), secs(self.median(TORCHRUN)), "n/a" if ratio is None else f"{ratio:.3f}"


def measure_sigquit(bench: Bench, reps: int, nproc: int) -> StackRow:
    row = SigquitRow(nproc)
    log(f"SIGQUIT to stack report, nproc {nproc}: {REPORTS_PER_LAUNCH} reports per launch")
    for rep in range(reps):
        took = attempt(row.errors, rep, "ddplaunch", run_sigquit, bench, nproc)
        if took is None:
            row.series[ON].append(None)
            continue
        row.series[ON].extend(took)
        row.extra["first"].append(took[0])
        row.extra["later"].extend(took[1:])
        log(f"    rep {rep + 1}/{reps} ddplaunch " + ", ".join(f"{t:.4g}" for t in took) + " s")
    return row


def measure_no_bootstrap(bench: Bench, reps: int) -> StackRow:
    row = NoBootstrapRow()
    log(f"launch, nproc 4, {NO_BOOTSTRAP} (and with the bootstrap, for the notes)")
    runs: dict[str, tuple[str, tuple[str, ...]]] = {OFF: ("ddplaunch", (NO_BOOTSTRAP,)), TORCHRUN: ("torchrun", ()),
                                                    ON: ("ddplaunch", ())}
    for rep in range(reps):
        for name, (tool, opts) in runs.items():
            value = attempt(row.errors, rep, name, run_launch, bench, tool, 4, opts)
            row.series[name].append(value)
            log(f"    rep {rep + 1}/{reps} {name:<31} {'-' if value is None else f'{value:.4g}'} s")
    log(f"bootstrap cost per worker start: {BOOTSTRAP_PAIRS} pairs of `python -c pass`")
    cost = attempt(row.errors, 0, "bootstrap cost", bootstrap_cost, bench, BOOTSTRAP_PAIRS)
    if cost is not None:
        row.extra["start_ms"] = cost
    return row


def measure_stacks(bench: Bench, reps: int, only: set[str]) -> list[StackRow]:
    rows: list[StackRow] = []
    if not only or "sigquit" in only:
        rows.extend(measure_sigquit(bench, reps, nproc) for nproc in REPORT_RANKS)
    if not only or "nobootstrap" in only:
        rows.append(measure_no_bootstrap(bench, reps))
    return rows


# -- the report -------------------------------------------------------------------------------


def render_stacks(rows: Sequence[StackRow]) -> list[str]:
    header = ("stack reports (issue 9)", "ddplaunch (median)", "torchrun (median)", "ratio", "target", "ok?")
    return draw_rows(header, rows, [note for row in rows for note in row_notes(row)])


def row_notes(row: StackRow) -> list[str]:
    if isinstance(row, SigquitRow):
        every = [v for v in row.series[ON] if v is not None]
        if not every:
            return []
        return [f"SIGQUIT to report, nproc {row.nproc}: first report of a launch {secs(median_of(row.extra['first']))}"
                f" median, later ones {secs(median_of(row.extra['later']))}; slowest of {len(every)} "
                f"{secs(max(every))}"]
    if isinstance(row, NoBootstrapRow):
        on, off, torch = row.median(ON), row.median(OFF), row.median(TORCHRUN)
        lines = []
        if on is not None and off is not None:
            lines.append(f"launch, nproc 4, the same reps with the bootstrap on: {secs(on)}"
                         + (f" (ratio {on / torch:.3f})" if torch else "")
                         + f"; on - off {1000 * (on - off):+.0f} ms (medians; noise included)")
        cost = row.extra.get("start_ms")
        if cost:
            deltas = [a - b for a, b in zip(cost["on"], cost["off"])]
            lines.append(f"bootstrap cost per worker start ({len(deltas)} paired runs of `python -c pass`): "
                         f"{statistics.median(cost['on']):.1f} ms with, {statistics.median(cost['off']):.1f} ms "
                         f"without; paired difference {statistics.median(deltas):+.2f} ms median "
                         f"(target < {BOOTSTRAP_TARGET_MS:g} ms: "
                         f"{ok_mark(statistics.median(deltas) < BOOTSTRAP_TARGET_MS)})")
        return lines
    return []
