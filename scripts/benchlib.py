"""What the benchmark's row modules share: launching a tool, bounded waits, clean-up, the line format.

scripts/bench_local.py (the single-node rows), scripts/bench_stacks.py (the stack reports')
and scripts/bench_nodes.py (the multi-node rows) import this module and not each other;
scripts/bench.py, the entry, runs them and prints the report. Every launch carries a
BENCH_TOKEN in its environment, so that `finish` and `kill_token` find all it started,
however it ended.
"""

from __future__ import annotations

import os
import re
import select
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

import psutil

T = TypeVar("T")
TOOLS = ("ddplaunch", "torchrun")

# -- the line format: what the lines workers print, and how each tool prefixes it --------------

PAD = "x" * 40  # "rank R line NNNNNN " is 19 bytes; with the pad and "\n": 60 bytes a line


def lines_script(count: int) -> str:
    """A worker printing `count` lines of the measured format (~60 bytes each)."""
    return f"""\
import os
r = int(os.environ["RANK"])
pad = {PAD!r}
for i in range({count}):
    print(f"rank {{r}} line {{i:06d}} " + pad)
"""


# Group 1: the rank in the tool's prefix (`R | `, `[defaultR]:`); group 2: the rank printed.
DDP_LINE = re.compile(rb"^ *(\d+) \| rank (\d+) line \d{6} x+$", re.MULTILINE)
TORCH_LINE = re.compile(rb"^\[default(\d+)\]:rank (\d+) line \d{6} x+$", re.MULTILINE)


def tally_lines(extra: dict[str, Any], path: Path, pattern: re.Pattern[bytes], ranks: int,
                lines_per_rank: int) -> list[int]:
    """Count each rank's lines in `path` (those whose prefix rank is the rank in the text) and
    note in `extra` the lines lost of ranks x lines_per_rank, and the counts per rank."""
    counts = [0] * ranks
    for prefix_rank, text_rank in pattern.findall(path.read_bytes()):
        if prefix_rank == text_rank and int(prefix_rank) < ranks:
            counts[int(prefix_rank)] += 1
    extra.setdefault("lost", []).append(ranks * lines_per_rank - sum(counts))
    extra.setdefault("per_rank", []).append(counts)
    return counts


# -- running the tools ------------------------------------------------------------------------


@dataclass
class Bench:
    """The tools, the folder of worker scripts, and the tokens of every launch so far."""

    tools: dict[str, str]
    workdir: Path
    run_token: str
    launches: int = 0
    shown: set[str] = field(default_factory=set)

    def argv(self, tool: str, nproc: int, script: str, *extra: str, tool_opts: tuple[str, ...] = ()) -> list[str]:
        path = str(self.workdir / script)
        if tool == "ddplaunch":
            return [self.tools[tool], "--nproc", str(nproc), *tool_opts, path, *extra]
        return [self.tools[tool], "--standalone", "--nproc-per-node", str(nproc), *tool_opts, path, *extra]

    def new_token(self) -> str:
        """A fresh BENCH_TOKEN; main's finally block kills whatever carries any of them."""
        self.launches += 1
        return f"{self.run_token}-{self.launches}"

    def start(self, argv: list[str], stdout: int | IO[Any], stderr: int | IO[Any], label: str, *,
              env: Mapping[str, str] | None = None, token: str | None = None) -> tuple[subprocess.Popen, str]:
        """Start a launcher with a BENCH_TOKEN (a unique one unless given) that all its
        descendants inherit; `env` replaces os.environ as the base environment."""
        token = token or self.new_token()
        env = dict(os.environ if env is None else env, BENCH_TOKEN=token)
        env.pop("NO_COLOR", None)
        if label not in self.shown:
            self.shown.add(label)
            log(f"  {label}: {shlex.join(argv)}")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=env)
        return proc, token


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def wait_exit(proc: subprocess.Popen, timeout: float, on_tick: Callable[[], None] | None = None,
              tick: float = 0.02) -> float | None:
    """Wait for proc to exit; return time.time() at the moment it is seen gone, None on timeout.

    A pidfd wakes us the instant the process exits (Popen.wait(timeout) polls with up to
    50 ms of delay). on_tick, if given, runs every `tick` seconds while we wait.
    """
    deadline = time.monotonic() + timeout
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        while True:
            if on_tick is not None:
                on_tick()
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            step = min(left, tick) if on_tick is not None else min(left, 1.0)
            if pidfd is not None:
                ready, _, _ = select.select([pidfd], [], [], step)
                if ready:
                    now = time.time()
                    proc.wait(timeout=5)
                    return now
            else:
                try:
                    proc.wait(timeout=step)
                    return time.time()
                except subprocess.TimeoutExpired:
                    pass
    finally:
        if pidfd is not None:
            os.close(pidfd)


def token_processes(token: str) -> list[psutil.Process]:
    """Live (non-zombie) processes whose environment carries BENCH_TOKEN=token, or whose
    command line has the argument BENCH_TOKEN=token (an SSH agent's `--env BENCH_TOKEN=...`)."""
    found = []
    me = os.getpid()
    arg = f"BENCH_TOKEN={token}"
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            if proc.environ().get("BENCH_TOKEN") != token and arg not in proc.cmdline():
                continue
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def kill_token(token: str, timeout: float = 5.0) -> int:
    """SIGKILL every process of one launch; wait (bounded) until they are gone."""
    procs = token_processes(token)
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=timeout)
    return len(procs)


def finish(proc: subprocess.Popen, token: str) -> None:
    """finally-block cleanup of one launch: the launcher and everything it started."""
    if proc.poll() is None:
        try:
            proc.kill()
        except OSError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    kill_token(token)


class Timeout(Exception):
    """A bounded wait ran out."""


# The launch rows' worker, an empty file; scripts/bench.py writes it with the row modules' own.
EMPTY_SCRIPT = "empty.py"


def run_launch(bench: Bench, tool: str, nproc: int, tool_opts: tuple[str, ...] = ()) -> float:
    """Wall time of the whole command for `nproc` workers running an empty script."""
    # 32 workers on a 2-CPU machine is past ddplaunch's sanity limit (4 per CPU): say we mean it
    opts = ("--force", *tool_opts) if tool == "ddplaunch" else tool_opts
    argv = bench.argv(tool, nproc, EMPTY_SCRIPT, tool_opts=opts)
    t0 = time.perf_counter()
    label = " ".join(("launch", tool, f"n{nproc}", *tool_opts))
    proc, token = bench.start(argv, subprocess.DEVNULL, subprocess.DEVNULL, label)
    try:
        if wait_exit(proc, timeout=120) is None:
            raise Timeout(label)
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{label} exited {proc.returncode}")
        return elapsed
    finally:
        finish(proc, token)


# -- one sample -------------------------------------------------------------------------------

# What one failed sample raises; the row notes it and goes on with the next.
ERRORS = (Timeout, RuntimeError, subprocess.SubprocessError, OSError)


def attempt(errors: list[str], rep: int, name: str, fn: Callable[..., T], *args: Any) -> T | None:
    """fn(*args), or None with the error noted in `errors` (and logged) if it raised one of ERRORS."""
    try:
        return fn(*args)
    except ERRORS as exc:
        errors.append(f"rep {rep + 1} {name}: {type(exc).__name__}: {exc}")
        log(f"    ! {errors[-1]}")
        return None


# -- the report -------------------------------------------------------------------------------


def median_of(values: Iterable[float | None]) -> float | None:
    """The median of the samples that exist (None: failed or never), None if there are none."""
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def ok_mark(ok: bool | None) -> str:
    return {True: "yes", False: "NO", None: "?"}[ok]


class TableRow(Protocol):
    """What draw_rows reads of a row: its label, its own cells, its target and verdict."""

    label: str

    def cells(self) -> tuple[str, ...]: ...

    def target(self) -> str: ...

    def ok(self) -> bool | None: ...


def draw_rows(header: tuple[str, ...], rows: Sequence[TableRow], notes: Sequence[str] = ()) -> list[str]:
    """A table of rows (label, cells, target, ok?), then the notes after a blank line."""
    lines = draw_table(header, [(row.label, *row.cells(), row.target(), ok_mark(row.ok())) for row in rows])
    return [*lines, "", *notes] if notes else lines


def draw_table(header: tuple[str, ...], body: Sequence[tuple[str, ...]]) -> list[str]:
    """Columns padded to their widest cell, a rule under the header."""
    table = [header, *body]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = []
    for i, r in enumerate(table):
        lines.append(" | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return lines


def result_json(*, label: str, unit: str, samples: Mapping[str, list[float | None]], ratio: float | None,
                target: str, ok: bool | None, extra: Any, errors: list[str]) -> dict[str, Any]:
    """One row of the JSON results; the single-node and the multi-node rows write the same keys."""
    return {
        "label": label,
        "unit": unit,
        "samples": samples,
        "median": {name: median_of(values) for name, values in samples.items()},
        "ratio": ratio,
        "target": target,
        "ok": ok,
        "extra": extra,
        "errors": errors,
    }


@dataclass
class SeriesRow:
    """A row of named series of samples (None: failed or never); each kind says its target,
    its verdict and its cells (bench_nodes.NodeRow, bench_stacks.StackRow)."""

    key: str
    label: str
    series: dict[str, list[float | None]]
    extra: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def median(self, name: str) -> float | None:
        return median_of(self.series[name])

    def ratio(self) -> float | None:
        return None

    def target(self) -> str:
        raise NotImplementedError

    def ok(self) -> bool | None:
        raise NotImplementedError

    def as_json(self) -> dict[str, Any]:
        return result_json(label=self.label, unit="s", samples=self.series, ratio=self.ratio(),
                           target=self.target(), ok=self.ok(), extra=self.extra, errors=self.errors)


def secs(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f} s"
