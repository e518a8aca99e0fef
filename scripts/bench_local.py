"""The single-node rows of scripts/bench.py: ddplaunch and torchrun side by side on this machine.

scripts/bench.py runs these rows when selected (all are, by default); the helpers they share
with the multi-node rows (bench_nodes.py) live in benchlib.py. What is measured (all worker
scripts are written to a fresh temporary directory):

  launch     wall time of the whole command for a worker script that is an empty file,
             with 4 and with 32 workers, ddplaunch's stack bootstrap on (its default;
             bench_stacks.py has the same launch without it).        target ratio <= 0.08
  teardown   rank 1 sleeps 1 s, writes time.time() to a file and calls os._exit(1); the
             other ranks sleep 60 s. Measured: the moment the launcher process has exited
             (seen through a pidfd, so no polling delay) minus that timestamp.  <= 0.10
             ddplaunch's figure includes capturing where the other ranks were (they are
             bootstrapped Python workers) before they are stopped; each rep checks that its
             failure report on stderr (kept in a file) showed them.
  lines      4 ranks x 100,000 lines of ~60 bytes, printed with print() in a loop.
             ddplaunch runs with --log-dir and its terminal output redirected to a file;
             torchrun with `--tee 3 --log-dir DIR` and its output redirected to a file.
             Wall time, and the lines that reached the redirected stdout, counted per rank
             by their prefix (`R | ` for ddplaunch, `[defaultR]:` for torchrun). Lines
             lost = 400,000 minus lines counted.              <= 0.30 with none lost
  memory     peak RSS (VmHWM from /proc/PID/status, sampled every 20 ms, max kept) of the
             launcher process itself, not its workers, for 4 workers that sleep 2 s.  <= 0.15
  ranks256   256 workers that each print one line (`ranks256 line RANK`), ddplaunch with
             --force, stdout to a file: wall time of the whole command, and every rank's line
             checked. ddplaunch's launcher holds two pipes per rank (ddplaunch.limits raises
             its open-files limit when needed).                       target ratio <= 0.5
  orphans    4 workers that each start a child sleeping 60 s, then write a "ready" file.
             Once all 4 are ready the launcher pid gets SIGKILL; 3 s later the processes
             still alive that carry this launch's BENCH_TOKEN in their environment are
             counted (then killed). ddplaunch target: 0 survivors.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from benchlib import (
    DDP_LINE,
    EMPTY_SCRIPT,
    TOOLS,
    TORCH_LINE,
    Bench,
    Timeout,
    attempt,
    draw_table,
    finish,
    kill_token,
    lines_script,
    log,
    median_of,
    ok_mark,
    result_json,
    run_launch,
    tally_lines,
    token_processes,
    wait_exit,
)

LOCAL_KEYS = ("launch", "teardown", "lines", "memory", "orphans", "ranks256")
WIDE_NPROC = 256
WIDE_TARGET = 0.5
LINES_PER_RANK = 100_000
LINES_RANKS = 4

WORKERS = {
    "teardown.py": """\
import os, sys, time
if os.environ["RANK"] == "1":
    time.sleep(1.0)
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(repr(time.time()))
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    os._exit(1)
time.sleep(60)
""",
    "lines.py": lines_script(LINES_PER_RANK),
    "one_line.py": """\
import os
print("ranks256 line", os.environ["RANK"], flush=True)
""",
    "sleep2.py": """\
import time
time.sleep(2)
""",
    "orphans.py": """\
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "bench-grandchild"])
rank = os.environ["RANK"]
path = os.path.join(sys.argv[1], "ready" + rank)
with open(path + ".tmp", "w") as f:
    f.write(str(child.pid))
os.rename(path + ".tmp", path)
time.sleep(60)
""",
}


# -- the measurements: each returns one number per call -------------------------------------


def run_bare(bench: Bench, nproc: int) -> float:
    """No launcher: the same nproc `python -u empty.py` posix_spawn'ed at once. The floor for launch."""
    argv = [sys.executable, "-u", str(bench.workdir / EMPTY_SCRIPT)]
    token = bench.new_token()
    env = dict(os.environ, BENCH_TOKEN=token)
    pids: list[int] = []
    devnull = os.open(os.devnull, os.O_RDWR)
    actions = [(os.POSIX_SPAWN_DUP2, devnull, fd) for fd in (0, 1, 2)]
    try:
        t0 = time.perf_counter()
        for _ in range(nproc):
            pids.append(os.posix_spawn(argv[0], argv, env, file_actions=actions, setsid=True))
        deadline = time.monotonic() + 120
        waiting = set(pids)
        while waiting:
            if time.monotonic() > deadline:
                raise Timeout(f"bare launch nproc {nproc}")
            for pid in list(waiting):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    waiting.discard(pid)
            if waiting:
                time.sleep(0.002)
        elapsed = time.perf_counter() - t0
        pids.clear()
        log(f"    floor: {nproc} bare interpreters {elapsed:.4g} s")
        return elapsed
    finally:
        os.close(devnull)
        for pid in pids:  # only left on an error: kill and reap
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except OSError:
                pass
        kill_token(token)


# In ddplaunch's failure report when it captured the other ranks' stacks before stopping them
CAPTURE_SHOWN = "where the other ranks were just before they were told to stop".encode()


def run_teardown(bench: Bench, tool: str, extra: dict) -> float:
    tag = uuid.uuid4().hex
    stamp = bench.workdir / f"stamp-{tag}"
    err_path = bench.workdir / f"err-teardown-{tag}.txt"
    argv = bench.argv(tool, 4, "teardown.py", str(stamp))
    with open(err_path, "wb") as err:
        proc, token = bench.start(argv, subprocess.DEVNULL, err, f"teardown {tool}")
        try:
            exited = wait_exit(proc, timeout=90)
            if exited is None:
                raise Timeout(f"{tool} teardown")
            if not stamp.exists():
                raise RuntimeError(f"{tool} teardown: rank 1 wrote no timestamp (exit {proc.returncode})")
            took = exited - float(stamp.read_text())
        finally:
            finish(proc, token)
            stamp.unlink(missing_ok=True)
    extra.setdefault("capture_shown", []).append(CAPTURE_SHOWN in err_path.read_bytes())
    err_path.unlink()
    return took


def run_lines(bench: Bench, tool: str, extra: dict) -> float:
    tag = uuid.uuid4().hex[:8]
    logdir = bench.workdir / f"logs-{tool}-{tag}"
    out_path = bench.workdir / f"out-{tool}-{tag}.txt"
    err_path = bench.workdir / f"err-{tool}-{tag}.txt"
    opts = ("--log-dir", str(logdir)) if tool == "ddplaunch" else ("--tee", "3", "--log-dir", str(logdir))
    argv = bench.argv(tool, LINES_RANKS, "lines.py", tool_opts=opts)
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc, token = bench.start(argv, out, err, f"lines {tool}")
        try:
            if wait_exit(proc, timeout=180) is None:
                raise Timeout(f"{tool} lines")
            elapsed = time.perf_counter() - t0
        finally:
            finish(proc, token)
    try:
        pattern = DDP_LINE if tool == "ddplaunch" else TORCH_LINE
        tally_lines(extra, out_path, pattern, LINES_RANKS, LINES_PER_RANK)
        extra.setdefault("exit_code", []).append(proc.returncode)
        in_files = 0  # the per-rank log files, for comparison: rankN.log / <run>/attempt_0/N/stdout.log
        for r in range(LINES_RANKS):
            if tool == "ddplaunch":
                paths = [logdir / f"rank{r}.log"]
            else:
                paths = list(logdir.glob(f"*/attempt_0/{r}/stdout.log"))
            for path in paths:
                if path.is_file():
                    in_files += len(re.findall(rb"^rank %d line \d{6} x+$" % r, path.read_bytes(), re.MULTILINE))
        extra.setdefault("lost_in_files", []).append(LINES_RANKS * LINES_PER_RANK - in_files)
        return elapsed
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
        out_path.unlink(missing_ok=True)
        err_path.unlink(missing_ok=True)


def read_hwm_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None  # gone, or a zombie (its memory is released, VmHWM no longer shown)


def run_memory(bench: Bench, tool: str) -> float:
    argv = bench.argv(tool, 4, "sleep2.py")
    proc, token = bench.start(argv, subprocess.DEVNULL, subprocess.DEVNULL, f"memory {tool}")
    peak = [0]

    def sample() -> None:
        kib = read_hwm_kib(proc.pid)
        if kib is not None and kib > peak[0]:
            peak[0] = kib

    try:
        if wait_exit(proc, timeout=90, on_tick=sample, tick=0.02) is None:
            raise Timeout(f"{tool} memory")
        if peak[0] == 0:
            raise RuntimeError(f"{tool} memory: no VmHWM sample")
        return peak[0] / 1024.0  # MiB
    finally:
        finish(proc, token)


def run_orphans(bench: Bench, tool: str, extra: dict) -> float:
    ready = Path(tempfile.mkdtemp(prefix=f"ready-{tool}-", dir=bench.workdir))
    argv = bench.argv(tool, 4, "orphans.py", str(ready))
    proc, token = bench.start(argv, subprocess.DEVNULL, subprocess.DEVNULL, f"orphans {tool}")
    try:
        deadline = time.monotonic() + 90
        while len([p for p in ready.iterdir() if p.name.startswith("ready") and not p.name.endswith(".tmp")]) < 4:
            if proc.poll() is not None:
                raise RuntimeError(f"{tool} orphans: launcher exited {proc.returncode} before all workers were ready")
            if time.monotonic() > deadline:
                raise Timeout(f"{tool} orphans: workers not ready")
            time.sleep(0.02)
        before = len(token_processes(token)) - 1  # everything but the launcher itself
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        time.sleep(3.0)
        survivors = token_processes(token)
        kinds = {"worker": 0, "grandchild": 0, "other": 0}
        for p in survivors:
            try:
                cmd = p.cmdline()
            except psutil.Error:
                cmd = []
            if "bench-grandchild" in cmd:
                kinds["grandchild"] += 1
            elif any(arg.endswith("orphans.py") for arg in cmd):
                kinds["worker"] += 1
            else:
                kinds["other"] += 1
        extra.setdefault("before_kill", []).append(before)
        extra.setdefault("kinds", []).append(kinds)
        extra.setdefault("cleaned_up", []).append(kill_token(token))
        return float(len(survivors))
    finally:
        finish(proc, token)
        shutil.rmtree(ready, ignore_errors=True)


def run_wide(bench: Bench, tool: str, extra: dict) -> float:
    """256 ranks, one line each: wall time; the ranks whose line reached stdout go in extra."""
    out_path = bench.workdir / f"out-wide-{tool}-{uuid.uuid4().hex[:8]}.txt"
    opts = ("--force",) if tool == "ddplaunch" else ()
    argv = bench.argv(tool, WIDE_NPROC, "one_line.py", tool_opts=opts)
    try:
        with open(out_path, "wb") as out:
            t0 = time.perf_counter()
            proc, token = bench.start(argv, out, subprocess.DEVNULL, f"ranks256 {tool}")
            try:
                if wait_exit(proc, timeout=300) is None:
                    raise Timeout(f"{tool} ranks256")
                elapsed = time.perf_counter() - t0
            finally:
                finish(proc, token)
        seen = set(re.findall(rb"ranks256 line (\d+)$", out_path.read_bytes(), re.MULTILINE))
        extra.setdefault("ranks_heard", []).append(len(seen))
        if proc.returncode != 0:
            raise RuntimeError(f"{tool} ranks256 exited {proc.returncode}")
        if len(seen) != WIDE_NPROC:
            raise RuntimeError(f"{tool} ranks256: {len(seen)} of {WIDE_NPROC} ranks' lines reached stdout")
        return elapsed
    finally:
        out_path.unlink(missing_ok=True)


# -- running reps, alternating --------------------------------------------------------------


@dataclass
class Row:
    key: str
    label: str
    unit: str
    target: float | None  # ratio target; None: judged otherwise
    samples: dict[str, list[float | None]] = field(default_factory=lambda: {t: [] for t in TOOLS})
    extra: dict[str, dict] = field(default_factory=lambda: {t: {} for t in TOOLS})
    errors: list[str] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)  # launch rows: no launcher at all

    def median(self, tool: str) -> float | None:
        return median_of(self.samples[tool])

    def ratio(self) -> float | None:
        d, t = self.median("ddplaunch"), self.median("torchrun")
        if d is None or not t:
            return None
        return d / t

    def as_json(self) -> dict[str, Any]:
        target, ok = verdict(self)
        return {
            **result_json(label=self.label, unit=self.unit, samples=self.samples, ratio=self.ratio(),
                          target=target, ok=ok, extra=self.extra, errors=self.errors),
            "baseline_no_launcher": self.baseline or None,
        }


def alternate(row: Row, reps: int, one: Callable[[str, dict], float],
              after_rep: Callable[[Row], None] | None = None) -> Row:
    for rep in range(reps):
        for tool in TOOLS:
            value = attempt(row.errors, rep, tool, one, tool, row.extra[tool])
            row.samples[tool].append(value)
            shown = "-" if value is None else f"{value:.4g}"
            log(f"    rep {rep + 1}/{reps} {tool:<9} {shown} {row.unit}")
        if after_rep is not None:
            after_rep(row)
    return row


def measure_local(bench: Bench, reps: int, only: set[str]) -> list[Row]:
    rows: list[Row] = []

    def want(name: str) -> bool:
        return not only or name in only

    if want("launch"):
        for nproc in (4, 32):
            log(f"launch, nproc {nproc}")
            one: Callable[[str, dict], float] = functools.partial(launch_one, bench, nproc)
            floor: Callable[[Row], None] = functools.partial(add_floor, bench, nproc=nproc)
            rows.append(alternate(Row(f"launch_{nproc}", f"launch, nproc {nproc}", "s", 0.08), reps, one, floor))
    if want("teardown"):
        log("teardown, nproc 4")
        rows.append(alternate(Row("teardown", "teardown after rank death", "s", 0.10), reps,
                              lambda tool, x: run_teardown(bench, tool, x)))
    if want("lines"):
        log(f"lines, {LINES_RANKS} x {LINES_PER_RANK:,}")
        rows.append(alternate(Row("lines", f"lines {LINES_RANKS}x{LINES_PER_RANK // 1000}k, wall", "s", 0.30), reps,
                              lambda tool, x: run_lines(bench, tool, x)))
    if want("memory"):
        log("memory, nproc 4")
        rows.append(alternate(Row("memory", "launcher peak RSS", "MiB", 0.15), reps,
                              lambda tool, _x: run_memory(bench, tool)))
    if want("ranks256"):
        log(f"ranks256: {WIDE_NPROC} workers, one line each")
        rows.append(alternate(Row("ranks256", f"launch, nproc {WIDE_NPROC}, a line each", "s", WIDE_TARGET), reps,
                              lambda tool, x: run_wide(bench, tool, x)))
    if want("orphans"):
        log("orphans after SIGKILL of the launcher, nproc 4")
        rows.append(alternate(Row("orphans", "survivors of SIGKILL", "procs", None), reps,
                              lambda tool, x: run_orphans(bench, tool, x)))
    return rows


def launch_one(bench: Bench, nproc: int, tool: str, _extra: dict) -> float:
    return run_launch(bench, tool, nproc)


def add_floor(bench: Bench, row: Row, nproc: int) -> None:
    try:
        row.baseline.append(run_bare(bench, nproc))
    except (Timeout, OSError) as exc:
        row.errors.append(f"floor: {exc}")


def warm_up(bench: Bench) -> None:
    log("warm-up (untimed): one launch of each tool")
    for tool in TOOLS:
        try:
            run_launch(bench, tool, 1)
        except (Timeout, RuntimeError, OSError) as exc:
            log(f"    ! warm-up {tool}: {exc}")


# -- verdicts and output --------------------------------------------------------------------


def verdict(row: Row) -> tuple[str, bool | None]:
    """(target text, ok?) for one row."""
    ratio = row.ratio()
    if row.key == "orphans":
        d = row.samples["ddplaunch"]
        ok = bool(d) and all(v == 0 for v in d)
        return "ddplaunch 0", ok
    assert row.target is not None
    if ratio is None:
        return f"<= {row.target:g}", None
    ok = ratio <= row.target
    if row.key == "lines":
        lost = row.extra["ddplaunch"].get("lost", [])
        ok = ok and bool(lost) and all(n == 0 for n in lost)
        return f"<= {row.target:g}, 0 lost", ok
    return f"<= {row.target:g}", ok


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "MiB":
        return f"{value:.1f} MiB"
    return f"{value:g}"



def render_local(rows: list[Row]) -> list[str]:
    """The single-node table and the notes under it (floors, lines, orphans)."""
    header = ("measurement", "ddplaunch (median)", "torchrun (median)", "ratio", "target", "ok?")
    table = []
    for row in rows:
        target, ok = verdict(row)
        ratio = row.ratio()
        table.append((
            row.label,
            fmt(row.median("ddplaunch"), row.unit),
            fmt(row.median("torchrun"), row.unit),
            "n/a" if ratio is None or row.key == "orphans" else f"{ratio:.3f}",
            target,
            ok_mark(ok),
        ))
    lines = draw_table(header, table) if rows else []
    by_key = {r.key: r for r in rows}
    floors = [r for r in rows if r.baseline]
    if floors:
        lines.append("")
        for row in floors:
            floor = statistics.median(row.baseline)
            d, t = row.median("ddplaunch"), row.median("torchrun")
            text = f"floor for {row.label}: the same workers started bare, no launcher: {floor:.3f} s median"
            if t:
                text += f" (= ratio {floor / t:.3f} of torchrun)"
            if d is not None:
                text += f"; ddplaunch's own share {d - floor:+.3f} s"
            lines.append(text)
    if "teardown" in by_key:
        shown = by_key["teardown"].extra["ddplaunch"].get("capture_shown", [])
        lines.append("")
        lines.append(f"teardown, ddplaunch: its failure report said where the other ranks were (their stacks, "
                     f"captured before they were stopped) in {sum(shown)} of {len(shown)} reps")
    if "lines" in by_key:
        row = by_key["lines"]
        lines.append("")
        total = LINES_RANKS * LINES_PER_RANK
        for tool in TOOLS:
            lost = row.extra[tool].get("lost", [])
            per = row.extra[tool].get("per_rank", [])
            in_files = row.extra[tool].get("lost_in_files", [])
            lines.append(f"lines lost on stdout ({total:,} expected per run), {tool:<9}: per rep {lost}"
                         f"{'' if not per else f'; last run per rank {per[-1]}'}"
                         f"; lost in its --log-dir files: {in_files}")
    if "ranks256" in by_key:
        row = by_key["ranks256"]
        lines.append("")
        lines.append(f"ranks256: ranks whose line reached stdout, of {WIDE_NPROC}, per rep: "
                     + "; ".join(f"{tool} {row.extra[tool].get('ranks_heard', [])}" for tool in TOOLS))
    if "orphans" in by_key:
        row = by_key["orphans"]
        lines.append("")
        for tool in TOOLS:
            counts = [None if v is None else int(v) for v in row.samples[tool]]
            kinds = row.extra[tool].get("kinds", [])
            before = row.extra[tool].get("before_kill", [])
            lines.append(f"orphans surviving 3 s after SIGKILL, {tool:<9}: per rep {counts}"
                         f" (of {before} token processes besides the launcher before the kill)"
                         f"{'' if not kinds else f'; last run {kinds[-1]}'} - all killed afterwards")
    return lines
