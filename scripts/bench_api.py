"""The Python API rows of scripts/bench.py (issue 12): ddplaunch.spawn against torch.multiprocessing.spawn.

scripts/bench.py runs these rows when selected (all are, by default; `--only api` runs only
them); the helpers they share with the other row modules live in benchlib.py.

Every measurement is one fresh Python process, DRIVER, written to the bench's folder as a
user's script would be: it imports the tool (ddplaunch, or torch.multiprocessing), calls
`spawn(fn, args, nprocs=4)` on a function of the module FUNCTIONS beside it (so both tools
find it by name), and prints one line, RESULT_MARK + JSON, with what it measured itself. The
two tools alternate on every repetition; each row's ratio is ddplaunch / mp.spawn.

  spawn4     fn does nothing: the time from just before the call to its return, measured in
             the driver (the ranks' start, their imports, their exit; mp.spawn's ranks import
             torch, whose _wrap runs fn). The notes add the whole driver process's wall time
             (its interpreter and its import of the tool included).      target ratio <= 0.5
  spawnfail  rank 1 raises at once, the others sleep 60 s and must be stopped: the time from
             the call to the exception caught in the driver; at that moment the driver counts
             the live processes carrying its BENCH_TOKEN (itself apart), i.e. what is left of
             the job: ranks, a launcher, mp's resource tracker. Every count is shown.
                                                    target ratio <= 0.3 with ddplaunch 0 left
  spawnkill  fn starts a subprocess that sleeps 60 s, writes a "ready" file, sleeps 60 s. Once
             every rank's file is there (bounded), the driver gets SIGKILL; 3 s later the live
             processes carrying its BENCH_TOKEN (/proc/PID/environ) are counted, then killed.
                                                    target ddplaunch 0 (the issue: mp.spawn 9)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil
from benchlib import (
    Bench,
    SeriesRow,
    Timeout,
    attempt,
    draw_rows,
    finish,
    kill_token,
    log,
    median_of,
    result_json,
    secs,
    token_processes,
    wait_exit,
)

API_KEYS = ("spawn4", "spawnfail", "spawnkill")
DDP, MP = "ddplaunch", "mp.spawn"
API_TOOLS = (DDP, MP)
NPROCS = 4
SPAWN4_TARGET = 0.5
SPAWNFAIL_TARGET = 0.3
KILL_SETTLE_S = 3.0  # after the driver's SIGKILL: what is still alive then is left behind
READY_TIMEOUT_S = 180.0  # mp.spawn's 4 ranks each import torch first: tens of seconds on a busy 2-CPU machine
DRIVER_TIMEOUT_S = 240.0
RESULT_MARK = "BENCH_API_RESULT "
GRANDCHILD = "bench-api-grandchild"

FUNCTIONS = "api_functions.py"
DRIVER = "api_driver.py"

API_WORKERS = {
    FUNCTIONS: f"""\
\"\"\"The functions scripts/bench_api.py's driver spawns: found by module and name by both tools.\"\"\"
import os, subprocess, sys, time


def noop(rank):
    pass


def fail_one(rank):
    if rank == 1:
        raise RuntimeError("rank 1 fails at once")
    time.sleep(60)


def sleep_with_child(rank, ready_dir):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", {GRANDCHILD!r}])
    path = os.path.join(ready_dir, f"ready{{rank}}")
    with open(path + ".tmp", "w") as f:
        f.write(str(child.pid))
    os.rename(path + ".tmp", path)
    time.sleep(60)
""",
    DRIVER: f"""\
\"\"\"One measurement of scripts/bench_api.py, as a user's script calls the API: TOOL MODE [READY_DIR].\"\"\"
import json, os, sys, time

import api_functions

MARK = {RESULT_MARK!r}


def left_running():
    \"\"\"The command lines of the live processes, this one apart, that carry our BENCH_TOKEN.\"\"\"
    import psutil

    token, found = os.environ["BENCH_TOKEN"], []
    for proc in psutil.process_iter():
        try:
            if proc.pid == os.getpid() or proc.environ().get("BENCH_TOKEN") != token:
                continue
            if proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.cmdline())
        except psutil.Error:
            continue
    return found


def main():
    tool, mode, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    if tool == {DDP!r}:
        import ddplaunch as api
    else:
        import torch.multiprocessing as api
    fn = {{"noop": api_functions.noop, "fail": api_functions.fail_one, "sleep": api_functions.sleep_with_child}}[mode]
    report = {{"tool": tool, "mode": mode}}
    t0 = time.perf_counter()
    try:
        value = api.spawn(fn, args=tuple(rest), nprocs={NPROCS})
        report["call_s"] = time.perf_counter() - t0
        report["returned"] = repr(value)
    except Exception as exc:
        report["call_s"] = time.perf_counter() - t0
        report["raised"] = type(exc).__name__
        report["left"] = left_running()
    print(MARK + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
""",
}

# What a spawnfail driver must catch: the JobFailed, and mp.spawn's own.
EXPECTED_EXCEPTION = {DDP: "JobFailed", MP: "ProcessRaisedException"}


# -- the driver's report, and what its leftovers are (pure) -----------------------------------


def parse_report(stdout: str) -> dict[str, Any]:
    """The driver's RESULT_MARK line among whatever else reached its stdout (the launcher's own lines)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            report: dict[str, Any] = json.loads(line[len(RESULT_MARK):])
            return report
    raise RuntimeError("the driver printed no result line")


def process_kind(cmdline: Sequence[str]) -> str:
    """What a process of the job is, from its command line: rank, grandchild (a rank's own
    subprocess), resource tracker (multiprocessing's), launcher (ddplaunch's, or its guard), other."""
    text = " ".join(cmdline)
    module = cmdline[cmdline.index("-m") + 1] if "-m" in cmdline[:-1] else None  # the first -m: python's own
    if GRANDCHILD in cmdline:
        return "grandchild"
    if "resource_tracker" in text:
        return "resource tracker"
    if module == "ddplaunch.spawned" or "spawn_main" in text:
        return "rank"
    if module == "ddplaunch" or (cmdline and cmdline[0].endswith("/ddplaunch")):
        return "launcher"  # its command line names ddplaunch.spawned too, as the ranks' module
    return "other"


def count_kinds(cmdlines: Sequence[Sequence[str]]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for cmdline in cmdlines:
        kind = process_kind(cmdline)
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


# -- one driver run ---------------------------------------------------------------------------


def run_driver(bench: Bench, tool: str, mode: str, *args: str,
               while_running: Callable[[subprocess.Popen[bytes], str], None] | None = None) -> tuple[float, dict[str, Any]]:
    """Start the driver; `while_running(proc, token)`, if given, acts on it (spawnkill kills it).
    Else wait for its exit: (its whole wall time, its report). Whatever carries its token is
    killed at the end, however it went."""
    tag = f"{tool.replace('.', '_')}-{mode}-{os.urandom(4).hex()}"
    out_path, err_path = bench.workdir / f"out-api-{tag}.txt", bench.workdir / f"err-api-{tag}.txt"
    argv = [sys.executable, str(bench.workdir / DRIVER), tool, mode, *args]
    try:
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            started = time.time()
            proc, token = bench.start(argv, out, err, f"api {mode} {tool}")
            try:
                if while_running is not None:
                    while_running(proc, token)
                    return 0.0, {}
                exited = wait_exit(proc, timeout=DRIVER_TIMEOUT_S)
                if exited is None:
                    raise Timeout(f"{tool} {mode}: the driver did not exit")
            finally:
                finish(proc, token)
        if proc.returncode != 0:
            tail = err_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"{tool} {mode}: the driver exited {proc.returncode}: {' / '.join(tail)}")
        return exited - started, parse_report(out_path.read_text(errors="replace"))
    finally:
        out_path.unlink(missing_ok=True)
        err_path.unlink(missing_ok=True)


def run_spawn4(bench: Bench, tool: str, extra: dict[str, Any]) -> float:
    wall, report = run_driver(bench, tool, "noop")
    if "raised" in report:
        raise RuntimeError(f"{tool} spawn4: the call raised {report['raised']}")
    if tool == DDP and report.get("returned") != repr([None] * NPROCS):
        raise RuntimeError(f"{tool} spawn4: returned {report.get('returned')}, not {NPROCS} Nones")
    extra.setdefault("driver_wall", []).append(wall)
    return float(report["call_s"])


def run_spawnfail(bench: Bench, tool: str, extra: dict[str, Any]) -> float:
    _, report = run_driver(bench, tool, "fail")
    if "raised" not in report:
        raise RuntimeError(f"{tool} spawnfail: the call returned {report.get('returned')} instead of raising")
    kinds = count_kinds(report["left"])
    extra.setdefault("left", []).append(sum(kinds.values()))
    extra.setdefault("kinds", []).append(kinds)
    extra.setdefault("raised", []).append(report["raised"])
    return float(report["call_s"])


def run_spawnkill(bench: Bench, tool: str, extra: dict[str, Any]) -> float:
    ready = Path(tempfile.mkdtemp(prefix=f"api-ready-{tool.replace('.', '_')}-", dir=bench.workdir))
    survivors: list[float] = []

    def kill_when_ready(proc: subprocess.Popen[bytes], token: str) -> None:
        wait_ready(proc, ready, f"{tool} spawnkill")
        extra.setdefault("before_kill", []).append(len(token_processes(token)) - 1)  # the driver apart
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        time.sleep(KILL_SETTLE_S)  # the measurement's own interval, not a synchronisation
        alive = token_processes(token)
        extra.setdefault("kinds", []).append(count_kinds([cmdline_of(p) for p in alive]))
        extra.setdefault("cleaned_up", []).append(kill_token(token))
        survivors.append(float(len(alive)))

    try:
        run_driver(bench, tool, "sleep", str(ready), while_running=kill_when_ready)
    finally:
        shutil.rmtree(ready, ignore_errors=True)
    return survivors[0]


def wait_ready(proc: subprocess.Popen[bytes], ready: Path, what: str) -> None:
    """Until every rank's ready file is there; the driver's early exit or the deadline raise."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while len([p for p in ready.iterdir() if not p.name.endswith(".tmp")]) < NPROCS:
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: the driver exited {proc.returncode} before every rank was ready")
        if time.monotonic() > deadline:
            raise Timeout(f"{what}: the ranks were not all ready after {READY_TIMEOUT_S:g} s")
        time.sleep(0.05)


def cmdline_of(proc: psutil.Process) -> list[str]:
    try:
        return list(proc.cmdline())
    except psutil.Error:
        return []


# -- the rows ---------------------------------------------------------------------------------


class ApiRow(SeriesRow):
    """One API row: series "ddplaunch" and "mp.spawn"; extra holds each tool's notes."""

    unit = "s"

    def __init__(self, key: str, label: str) -> None:
        super().__init__(key, label, {tool: [] for tool in API_TOOLS}, {tool: {} for tool in API_TOOLS})

    def ratio(self) -> float | None:
        ours, theirs = self.median(DDP), self.median(MP)
        return ours / theirs if ours is not None and theirs else None

    def cells(self) -> tuple[str, str, str]:
        ratio = self.ratio()
        return secs(self.median(DDP)), secs(self.median(MP)), "n/a" if ratio is None else f"{ratio:.3f}"

    def as_json(self) -> dict[str, Any]:
        return result_json(label=self.label, unit=self.unit, samples=self.series, ratio=self.ratio(),
                           target=self.target(), ok=self.ok(), extra=self.extra, errors=self.errors)


class Spawn4Row(ApiRow):
    def __init__(self) -> None:
        super().__init__("spawn4", f"spawn, {NPROCS} no-op functions, call to return")

    def target(self) -> str:
        return f"<= {SPAWN4_TARGET:g}"

    def ok(self) -> bool | None:
        ratio = self.ratio()
        return None if ratio is None else ratio <= SPAWN4_TARGET


class SpawnFailRow(ApiRow):
    def __init__(self) -> None:
        super().__init__("spawnfail", "spawn, rank 1 raises, call to exception")

    def target(self) -> str:
        return f"<= {SPAWNFAIL_TARGET:g}, 0 left"

    def ok(self) -> bool | None:
        ratio, left = self.ratio(), self.extra[DDP].get("left", [])
        if ratio is None:
            return None
        return ratio <= SPAWNFAIL_TARGET and bool(left) and all(n == 0 for n in left)


class SpawnKillRow(ApiRow):
    unit = "procs"

    def __init__(self) -> None:
        super().__init__("spawnkill", f"caller SIGKILLed mid-spawn, left after {KILL_SETTLE_S:g} s")

    def ratio(self) -> float | None:
        return None  # a count, judged on its own

    def target(self) -> str:
        return "ddplaunch 0"

    def ok(self) -> bool | None:
        counts = self.series[DDP]
        if not counts or all(n is None for n in counts):
            return None
        return all(n == 0 for n in counts)

    def cells(self) -> tuple[str, str, str]:
        return counts_cell(self.series[DDP]), counts_cell(self.series[MP]), "n/a"


def counts_cell(values: Sequence[float | None]) -> str:
    value = median_of(values)
    return "n/a" if value is None else f"{value:g}"


def alternate(row: ApiRow, reps: int, one: Callable[[Bench, str, dict[str, Any]], float], bench: Bench) -> ApiRow:
    for rep in range(reps):
        for tool in API_TOOLS:
            value = attempt(row.errors, rep, tool, one, bench, tool, row.extra[tool])
            row.series[tool].append(value)
            log(f"    rep {rep + 1}/{reps} {tool:<9} {'-' if value is None else f'{value:.4g}'} {row.unit}")
    return row


def warm_up_api(bench: Bench) -> None:
    """One untimed spawn4 driver of each tool: neither pays for a cold page cache or bytecode."""
    log("warm-up (untimed): one spawn4 driver of each tool")
    for tool in API_TOOLS:
        try:
            run_driver(bench, tool, "noop")
        except (Timeout, RuntimeError, OSError) as exc:
            log(f"    ! warm-up {tool}: {exc}")


def measure_api(bench: Bench, reps: int, only: set[str], warm: bool = True) -> list[ApiRow]:
    wanted: list[tuple[str, Callable[[], ApiRow], Callable[[Bench, str, dict[str, Any]], float]]] = [
        ("spawn4", Spawn4Row, run_spawn4), ("spawnfail", SpawnFailRow, run_spawnfail),
        ("spawnkill", SpawnKillRow, run_spawnkill)]
    if warm:
        warm_up_api(bench)
    rows: list[ApiRow] = []
    for key, make, one in wanted:
        if only and key not in only:
            continue
        row = make()
        log(f"{row.label} ({DDP} / {MP}, nprocs {NPROCS})")
        rows.append(alternate(row, reps, one, bench))
    return rows


# -- the report -------------------------------------------------------------------------------


def render_api(rows: Sequence[ApiRow]) -> list[str]:
    header = ("Python API (issue 12)", "ddplaunch.spawn (median)", "mp.spawn (median)", "ratio", "target", "ok?")
    return draw_rows(header, rows, [note for row in rows for note in row_notes(row)])


def row_notes(row: ApiRow) -> list[str]:
    if isinstance(row, Spawn4Row):
        walls = {tool: median_of(row.extra[tool].get("driver_wall", [])) for tool in API_TOOLS}
        ours, theirs = walls[DDP], walls[MP]
        ratio = f" (ratio {ours / theirs:.3f})" if ours is not None and theirs else ""
        return [f"spawn4, the whole driver process (interpreter, import of the tool, the call): "
                f"ddplaunch {secs(ours)}, mp.spawn {secs(theirs)} median{ratio}"]
    if isinstance(row, SpawnFailRow):
        return [f"spawnfail, processes of the job left running when the exception reached the driver, "
                f"{tool:<9}: per rep {row.extra[tool].get('left', [])}"
                f"{last_kinds(row.extra[tool])}; raised {sorted(set(row.extra[tool].get('raised', [])))}"
                for tool in API_TOOLS]
    if isinstance(row, SpawnKillRow):
        return [f"spawnkill, alive {KILL_SETTLE_S:g} s after the caller's SIGKILL, {tool:<9}: per rep "
                f"{[None if v is None else int(v) for v in row.series[tool]]} (of "
                f"{row.extra[tool].get('before_kill', [])} besides the caller before the kill)"
                f"{last_kinds(row.extra[tool])} - all killed afterwards"
                for tool in API_TOOLS]
    return []


def last_kinds(extra: dict[str, Any]) -> str:
    kinds = extra.get("kinds", [])
    return f"; last run {kinds[-1]}" if kinds and kinds[-1] else ""
