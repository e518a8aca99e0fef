"""The --warm rows of issue 13: ranks forked from one interpreter that imported torch.

  warm4   4 ranks, gloo init_process_group and one all_reduce: from the command to the first
          collective done (each rank writes time.time() after its all_reduce; the latest
          counts), torchrun vs ddplaunch cold vs ddplaunch --warm, alternating in one run.
          Target: warm <= 0.40 of torchrun.
  warm32  32 ranks (--force) that import torch and write time.time() at once: from the
          command to the last rank started, ddplaunch cold vs --warm. Target: warm <= 0.5 of cold.

Besides the times: the warm interpreter's own start (its "imported torch in" line of
launcher.log) and its RSS, and each rank's RSS and PSS (/proc/self/smaps_rollup, read by
the rank after its collective), warm against cold: RSS counts the pages a rank shares with the
warm interpreter, PSS splits them among the sharers.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchlib import Bench, SeriesRow, Timeout, attempt, draw_rows, finish, log, median_of, secs, wait_exit

WARM_KEYS = ("warm4", "warm32")
TORCHRUN, COLD, WARM = "torchrun", "ddplaunch", "ddplaunch --warm"
WARM4_TARGET = 0.40
WARM32_TARGET = 0.5
RUN_TIMEOUT_S = 300.0

COLLECTIVE = "warm_collective.py"
STARTED = "warm_started.py"
WARM_WORKERS = {
    COLLECTIVE: """\
import json, os, sys, time
import torch, torch.distributed as dist

def memory(pid="self"):
    kib = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("Rss", "Pss"):
                kib[name] = int(rest.split()[0])
    return kib

def zygote():
    # the launcher's other child that runs ddplaunch.zygote, if any
    parent = os.getppid()
    for task in os.listdir(f"/proc/{parent}/task"):
        for pid in open(f"/proc/{parent}/task/{task}/children").read().split():
            try:
                if b"ddplaunch.zygote" in open(f"/proc/{pid}/cmdline", "rb").read():
                    return memory(pid)
            except OSError:
                pass
    return None

dist.init_process_group("gloo")
t = torch.ones(1)
dist.all_reduce(t)
done = time.time()
facts = {"done": done, "memory": memory(), "zygote": zygote() if os.environ["RANK"] == "0" else None}
with open(os.path.join(sys.argv[1], "rank" + os.environ["RANK"]), "w") as f:
    json.dump(facts, f)
dist.destroy_process_group()
""",
    STARTED: """\
import os, sys, time
import torch
with open(os.path.join(sys.argv[1], "rank" + os.environ["RANK"]), "w") as f:
    f.write(repr(time.time()))
""",
}
READY = re.compile(r"warm interpreter pid \d+ imported \S+ in ([0-9.]+)s")


class WarmRow(SeriesRow):
    """A row of up to three series (torchrun, ddplaunch cold, ddplaunch --warm)."""

    def __init__(self, key: str, label: str, tools: Sequence[str], target: float, against: str) -> None:
        super().__init__(key, label, {tool: [] for tool in tools}, {tool: {} for tool in tools})
        self.goal = target
        self.against = against

    def ratio(self) -> float | None:
        ours, theirs = self.median(WARM), self.median(self.against)
        return ours / theirs if ours is not None and theirs else None

    def target(self) -> str:
        return f"warm <= {self.goal:g} x {self.against}"

    def ok(self) -> bool | None:
        ratio = self.ratio()
        return None if ratio is None else ratio <= self.goal

    def cells(self) -> tuple[str, str, str, str]:
        ratio = self.ratio()
        medians = [secs(self.median(t)) if t in self.series else "-" for t in (TORCHRUN, COLD, WARM)]
        return medians[0], medians[1], medians[2], "n/a" if ratio is None else f"{ratio:.3f}"


def run_ranks(bench: Bench, tool: str, nproc: int, script: str, extra: dict[str, Any]) -> tuple[float, Path]:
    """Start one launch; wait for its end; return the time it started and its ranks' folder."""
    out = Path(bench.workdir) / f"out-{bench.launches + 1}"
    out.mkdir()
    opts: tuple[str, ...] = ()
    name = "torchrun" if tool == TORCHRUN else "ddplaunch"
    if tool != TORCHRUN:
        opts = ("--force", "--log-dir", str(out / "logs"), *(("--warm",) if tool == WARM else ()))
    argv = bench.argv(name, nproc, script, str(out), tool_opts=opts)
    started = time.time()
    proc, token = bench.start(argv, subprocess.DEVNULL, subprocess.DEVNULL, f"{script} {tool} n{nproc}")
    try:
        ended = wait_exit(proc, timeout=RUN_TIMEOUT_S)
        if ended is None:
            raise Timeout(f"{tool} n{nproc}")
        if proc.returncode != 0:
            raise RuntimeError(f"{tool} n{nproc} exited {proc.returncode}")
        extra.setdefault("exit_s", []).append(ended - started)
        log_file = out / "logs" / "launcher.log"
        if tool == WARM and log_file.exists():
            found = READY.search(log_file.read_text(errors="replace"))
            if found:
                extra.setdefault("zygote_ready_s", []).append(float(found.group(1)))
        return started, out
    finally:
        finish(proc, token)


def run_warm4(bench: Bench, tool: str, extra: dict[str, Any]) -> float:
    started, out = run_ranks(bench, tool, 4, COLLECTIVE, extra)
    facts = [json.loads((out / f"rank{r}").read_text()) for r in range(4)]
    extra.setdefault("rss_kib", []).append(median_of(f["memory"]["Rss"] for f in facts))
    extra.setdefault("pss_kib", []).append(median_of(f["memory"]["Pss"] for f in facts))
    if facts[0]["zygote"]:
        extra.setdefault("zygote_rss_kib", []).append(facts[0]["zygote"]["Rss"])
    shutil.rmtree(out, ignore_errors=True)
    return max(f["done"] for f in facts) - started


def run_warm32(bench: Bench, tool: str, extra: dict[str, Any]) -> float:
    started, out = run_ranks(bench, tool, 32, STARTED, extra)
    times = [float((out / f"rank{r}").read_text()) for r in range(32)]
    shutil.rmtree(out, ignore_errors=True)
    return max(times) - started


def alternate(row: WarmRow, reps: int, one: Callable[[Bench, str, dict[str, Any]], float], bench: Bench) -> WarmRow:
    for rep in range(reps):
        for tool in row.series:
            value = attempt(row.errors, rep, tool, one, bench, tool, row.extra[tool])
            row.series[tool].append(value)
            log(f"    rep {rep + 1}/{reps} {tool:<16} {'-' if value is None else f'{value:.3f}'} s")
    return row


def measure_warm(bench: Bench, reps: int, only: set[str]) -> list[WarmRow]:
    rows = []
    if "warm4" in only:
        log("warm4: 4 ranks, gloo init + one all_reduce, command to the last collective done")
        row = WarmRow("warm4", "4 ranks, first all_reduce done", (TORCHRUN, COLD, WARM), WARM4_TARGET, TORCHRUN)
        rows.append(alternate(row, reps, run_warm4, bench))
    if "warm32" in only:
        log("warm32: 32 ranks importing torch, command to the last rank started")
        row = WarmRow("warm32", "32 ranks, all started (torch imported)", (COLD, WARM), WARM32_TARGET, COLD)
        rows.append(alternate(row, reps, run_warm32, bench))
    return rows


def render_warm(rows: Sequence[WarmRow]) -> list[str]:
    header = ("--warm (issue 13)", "torchrun", "ddplaunch cold", "ddplaunch --warm", "ratio", "target", "ok?")
    notes = []
    for row in rows:
        for tool, extra in row.extra.items():
            parts = [f"exit {secs(median_of(extra.get('exit_s', [])))}"]
            if extra.get("rss_kib"):
                parts.append(f"per rank RSS {mib(median_of(extra['rss_kib']))}, PSS {mib(median_of(extra['pss_kib']))}")
            if extra.get("zygote_ready_s"):
                parts.append(f"warm interpreter ready after {secs(median_of(extra['zygote_ready_s']))}")
            if extra.get("zygote_rss_kib"):
                parts.append(f"its RSS {mib(median_of(extra['zygote_rss_kib']))}")
            notes.append(f"{row.key}, {tool:<16}: " + "; ".join(parts))
    return draw_rows(header, rows, notes)


def mib(kib: float | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.0f} MiB"
