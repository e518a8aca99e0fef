"""Benchmark ddplaunch against torchrun, side by side, in one run.

Run it from the repository root with the project's virtualenv:

    .venv/bin/python scripts/bench.py              # full run (5 repetitions, 6 to 7 minutes)
    .venv/bin/python scripts/bench.py --quick      # 2 repetitions, everything still measured
    .venv/bin/python scripts/bench.py --reps 9 --json results.json
    .venv/bin/python scripts/bench.py --only nodes # only the multi-node rows (--no-nodes: all but them)
    .venv/bin/python scripts/bench.py --only stacks --reps 3   # only the stack-report rows
    .venv/bin/python scripts/bench.py --only sync --reps 3     # --sync of a 2,000-file, 50 MiB tree to 2 hosts
    .venv/bin/python scripts/bench.py --only api --reps 3      # ddplaunch.spawn against torch.multiprocessing.spawn

Both tools are run as their console scripts, taken from next to sys.executable (else from
PATH): `ddplaunch --nproc N ...` and `torchrun --standalone --nproc-per-node N ...`. Within
each measurement the tools ALTERNATE on every repetition (ddplaunch, torchrun, ddplaunch,
torchrun, ...), so slow drifts of the machine hit both alike. Each row reports the median
of each tool and the ratio ddplaunch / torchrun (lower is better for ddplaunch). One
untimed warm-up launch of each tool comes first, so neither pays for a cold page cache.

What is measured (all worker scripts are written to a fresh temporary directory):

  launch, teardown, lines, memory, orphans, ranks256   the single-node rows
             (scripts/bench_local.py describes them): the whole command for 4 and 32 empty
             workers (<= 0.08), a rank's death to the launcher's exit (<= 0.10), 4 x 100,000
             printed lines (<= 0.30, none lost), the launcher's peak RSS (<= 0.15), what
             survives a SIGKILL of the launcher (ddplaunch: 0), and 256 ranks printing a line
             each (<= 0.5). Workers get ddplaunch's stack bootstrap (the default), and the teardown row's failure report includes the capture of the
             other ranks' stacks; the row checks that the report showed them.
  sigquit, nobootstrap   the stack-report rows of issue 9 (scripts/bench_stacks.py describes
             them): SIGQUIT to the printed report of every rank's stack, 4 ranks (<= 0.5 s)
             and 32 (<= 1.5 s), ddplaunch only (torchrun has no such report); launch of 4
             empty workers with --no-stack-bootstrap (<= 0.08) beside the same with it, and
             the bootstrap's cost per worker start (< 3 ms). `--only stacks` picks both.
  nodes      multi-node rows (scripts/bench_nodes.py describes them): `--hosts` with 8 vs 2
             hosts over real sshd servers on this machine (<= 1.5), a failure on static
             node 1 -> node 0's workers stopped and its launcher exited (<= 2 s; torchrun's
             node 0 never stops), 4 x 50,000 lines through SSH against one node (0 lost), and
             the connect phase of 16 hosts against 2 (<= 2.0), and 2 hosts to all workers running
             with the agent sent vs already cached (first <= cached + 0.5 s), and --sync of a
             generated 2,000-file, 50 MiB tree to 2 hosts: first (all sent) and second (up to
             date) against no --sync (second <= plain + 0.5 s; at most 3 repetitions).
             `--only hosts,crossnode,sshlines,connect16,ship,sync` picks single ones.
  spawn4, spawnfail, spawnkill   the Python API rows of issue 12 (scripts/bench_api.py
             describes them), ddplaunch.spawn against torch.multiprocessing.spawn, each
             measurement a fresh driver script calling the API: 4 no-op functions, call to
             return (<= 0.5); rank 1 raises, call to exception with nothing left running
             (<= 0.3); the caller SIGKILLed mid-call, processes left 3 s later (ddplaunch: 0).
             `--only api` picks the three.
  warm4, warm32   the --warm rows of issue 13 (scripts/bench_warm.py describes them): 4 gloo
             ranks to the first all_reduce done, torchrun vs ddplaunch cold vs --warm (warm
             <= 0.40 of torchrun), and 32 ranks importing torch to all started, cold vs --warm
             (<= 0.5); with the warm interpreter's start and RSS, and RSS/PSS per rank.
             `--only warm` picks both.

This module is the entry: the options, which rows run, the report. The four row modules
share their helpers through scripts/benchlib.py and do not import each other.

Every wait is bounded; every process a launch started (found by its BENCH_TOKEN, in its
environment or, for the SSH agents, as `BENCH_TOKEN=...` in its command line) is killed in a
finally block, so the benchmark leaves nothing running.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench_api import API_KEYS, API_WORKERS, ApiRow, measure_api, render_api
from bench_local import LOCAL_KEYS, WORKERS, Row, measure_local, render_local, warm_up
from bench_nodes import NODE_KEYS, NodeRow, measure_nodes, render_nodes
from bench_stacks import STACK_KEYS, StackRow, measure_stacks, render_stacks
from bench_stacks import WORKERS as STACK_WORKERS
from bench_warm import WARM_KEYS, WARM_WORKERS, WarmRow, measure_warm, render_warm
from benchlib import EMPTY_SCRIPT, TOOLS, Bench, kill_token, log


# -- finding the tools ------------------------------------------------------------------------


def find_tool(name: str) -> str:
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        sys.exit(f"bench: cannot find {name!r} next to {sys.executable} or on PATH")
    return found


# -- the report -------------------------------------------------------------------------------


def render(rows: list[Row], node_rows: Sequence[NodeRow] = (), stack_rows: Sequence[StackRow] = (),
           api_rows: Sequence[ApiRow] = (), warm_rows: Sequence[WarmRow] = ()) -> str:
    lines = render_local(rows)
    tables = [(warm_rows, render_warm), (api_rows, render_api), (stack_rows, render_stacks), (node_rows, render_nodes)]
    for table_rows, render_table in tables:
        if table_rows:
            lines += [""] if lines else []
            lines.extend(render_table(table_rows))  # type: ignore[operator]
    errors: list[str] = []
    seen: list[list[str]] = []
    every: list[Row | NodeRow | StackRow | ApiRow | WarmRow] = [*rows, *warm_rows, *api_rows, *stack_rows, *node_rows]
    for r in every:
        if not any(r.errors is s for s in seen):  # the two cross-node rows share one list
            seen.append(r.errors)
            errors.extend(f"  {r.key}: {e}" for e in r.errors)
    if errors:
        lines.append("")
        lines.append("errors:")
        lines.extend(errors)
    return "\n".join(lines)


def to_json(rows: list[Row], meta: dict[str, Any], node_rows: Sequence[NodeRow] = (),
            stack_rows: Sequence[StackRow] = (), api_rows: Sequence[ApiRow] = (),
            warm_rows: Sequence[WarmRow] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {"meta": meta, "results": {}}
    others: list[NodeRow | StackRow | ApiRow | WarmRow] = [*node_rows, *stack_rows, *api_rows, *warm_rows]
    for other in others:
        out["results"][other.key] = other.as_json()
    for row in rows:
        out["results"][row.key] = row.as_json()
    return out


# -- the entry --------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description="ddplaunch vs torchrun, alternating, medians and ratios.")
    parser.add_argument("--reps", type=int, default=5, help="repetitions per tool per measurement (default 5)")
    parser.add_argument("--quick", action="store_true", help="2 repetitions (every measurement still runs)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--only", metavar="LIST",
                        help="comma-separated subset: launch,teardown,lines,memory,orphans,ranks256; the stack reports' "
                             "sigquit,nobootstrap, or 'stacks' for both; the multi-node hosts,crossnode,sshlines,connect16,ship,sync, "
                             "or 'nodes' for those six; the Python API's spawn4,spawnfail,spawnkill, or 'api' for "
                             "those three; --warm's warm4,warm32, or 'warm' (default: all)")
    parser.add_argument("--no-nodes", action="store_true",
                        help="skip the multi-node rows (hosts, crossnode, sshlines, connect16, ship, sync)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up launches")
    args = parser.parse_args()
    reps = 2 if args.quick else args.reps
    if reps < 1:
        parser.error("--reps must be at least 1")
    only = {s.strip() for s in args.only.split(",")} if args.only else set()
    unknown = only - {*LOCAL_KEYS, *STACK_KEYS, *NODE_KEYS, *API_KEYS, *WARM_KEYS, "stacks", "nodes", "api", "warm"}
    if unknown:
        parser.error(f"--only: unknown measurement(s) {sorted(unknown)}")
    for group, keys in (("stacks", STACK_KEYS), ("nodes", NODE_KEYS), ("api", API_KEYS), ("warm", WARM_KEYS)):
        if group in only:
            only = (only - {group}) | set(keys)
    selected = only or {*LOCAL_KEYS, *STACK_KEYS, *NODE_KEYS, *API_KEYS, *WARM_KEYS}
    if args.no_nodes:
        selected -= set(NODE_KEYS)
        if not selected:
            parser.error("--no-nodes with --only naming only multi-node rows leaves nothing to measure")

    command = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    print(f"$ {command}", flush=True)
    tools = {name: find_tool(name) for name in TOOLS}
    started = time.time()
    load_before = os.getloadavg()[0]  # timed rows on a machine others share: say how busy it was
    with tempfile.TemporaryDirectory(prefix="ddplaunch-bench-") as tmp:
        workdir = Path(tmp)
        (workdir / EMPTY_SCRIPT).write_text("")
        for name, text in {**WORKERS, **STACK_WORKERS, **API_WORKERS, **WARM_WORKERS}.items():
            (workdir / name).write_text(text)
        bench = Bench(tools, workdir, run_token=uuid.uuid4().hex)
        log(f"tools: {tools['ddplaunch']} | {tools['torchrun']}; reps {reps}; workers in {workdir}")
        try:
            if not args.no_warmup:
                warm_up(bench)
            rows = measure_local(bench, reps, selected)
            warm_rows: list[WarmRow] = []
            if selected & set(WARM_KEYS):
                warm_rows = measure_warm(bench, reps, selected)
            api_rows: list[ApiRow] = []
            if selected & set(API_KEYS):
                api_rows = measure_api(bench, reps, selected, warm=not args.no_warmup)
            stack_rows: list[StackRow] = []
            if selected & set(STACK_KEYS):
                stack_rows = measure_stacks(bench, reps, selected)
            node_rows: list[NodeRow] = []
            if selected & set(NODE_KEYS):
                node_rows = measure_nodes(bench, reps, selected)
        finally:
            for n in range(1, bench.launches + 1):  # nothing of ours may outlive the benchmark
                kill_token(f"{bench.run_token}-{n}", timeout=2)
    elapsed = time.time() - started
    load_after = os.getloadavg()[0]
    against = "torchrun" + (" (the Python API rows: mp.spawn)" if api_rows else "")
    print(f"# {reps} rep(s) per tool, alternating; ratio = ddplaunch / {against} median; "
          f"{os.cpu_count()} CPU(s); {elapsed:.0f} s in all; load average {load_before:.2f} before, "
          f"{load_after:.2f} after")
    print(render(rows, node_rows, stack_rows, api_rows, warm_rows))
    if args.json:
        meta = {
            "command": command,
            "reps": reps,
            "tools": tools,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "elapsed_s": elapsed,
            "load_average_1min": {"before": load_before, "after": load_after},
        }
        Path(args.json).write_text(json.dumps(to_json(rows, meta, node_rows, stack_rows, api_rows, warm_rows), indent=2) + "\n")
        print(f"# JSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
