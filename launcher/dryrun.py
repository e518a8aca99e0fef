"""`--dry-run`: the plan as text. Pure (plan in, text out), pinned by a golden-file test.
Secret-looking variables show their length only (ddplaunch.secrets)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ddplaunch.options import Stall
from ddplaunch.plan import Plan
from ddplaunch.secrets import shown

# CUDA_VISIBLE_DEVICES is per worker only with --virtual-local-rank
PER_WORKER_KEYS = ("LOCAL_RANK", "RANK", "ROLE_RANK", "CUDA_VISIBLE_DEVICES", "TORCHELASTIC_ERROR_FILE")
STREAMS = ((1, "stdout"), (2, "stderr"))


def render_table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]


def render_plan(plan: Plan, *, notes: tuple[str, ...] = ()) -> str:
    """The table users know from tutorials, then the command and the environment added."""
    cvd = plan.common_env.get("CUDA_VISIBLE_DEVICES", plan.base_env.get("CUDA_VISIBLE_DEVICES", "(unset)"))
    rows: list[tuple[str, ...]] = [
        (
            str(w.node_rank),
            w.host,
            str(w.local_rank),
            str(w.global_rank),
            w.physical_gpu or "-",
            w.device,
            w.env_added.get("CUDA_VISIBLE_DEVICES", cvd),
        )
        for w in plan.workers
    ]
    header: tuple[str, ...] = (
        "node", "host", "local rank", "global rank", "physical GPU", "device", "CUDA_VISIBLE_DEVICES"
    )
    if any(w.cpus is not None for w in plan.workers):
        header, rows = with_cpus_column(plan, header, rows)
    first = plan.workers[0]
    out = [
        "ddplaunch dry run: nothing was started.",
        f"job: {plan.nnodes} node(s) x {plan.nproc} worker(s) = world size {plan.world_size}; "
        f"this is node {plan.node_rank}; rendezvous at {plan.master_addr}:{plan.master_port}",
        stdin_line(plan),
        *notes,
        "",
        *render_table(header, rows),
        "",
        f"command (local rank 0, global rank {first.global_rank} shown; --local-rank differs per worker):"
        if "--local-rank=0" in first.argv
        else "command (the same for every worker):",
        "  " + " ".join(_shell_quote(arg) for arg in first.argv),
        "",
        "environment added for every worker (the rest of yours passes through unchanged):",
        *(f"  {shown(key, value)}" for key, value in plan.common_env.items()),
        "",
        "environment added per worker:",
    ]
    for worker in plan.workers:
        own = [k for k in PER_WORKER_KEYS if k in worker.env_added and k not in plan.common_env]
        assignments = " ".join(shown(k, worker.env_added[k]) for k in own)
        out.append(f"  rank {worker.global_rank}: {assignments}")
    return "\n".join(out) + "\n"


def stdin_line(plan: Plan) -> str:
    """Which rank reads the launcher's stdin (--stdin)."""
    if plan.stdin_rank is None:
        return "stdin: none (--stdin none): every rank reads /dev/null"
    if plan.stdin_worker is None:
        return (
            f"stdin: rank {plan.stdin_rank} is on another node, which gives it that node's stdin; "
            "every rank here reads /dev/null"
        )
    return f"stdin: rank {plan.stdin_rank} reads ddplaunch's stdin; the other ranks read /dev/null"


def with_cpus_column(
    plan: Plan, header: tuple[str, ...], rows: list[tuple[str, ...]]
) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """--numa-binding: the CPUs each worker starts bound to, in taskset's spelling."""
    from ddplaunch.numa import format_cpulist

    cells = [format_cpulist(w.cpus) if w.cpus is not None else "-" for w in plan.workers]
    return (*header, "CPUs"), [(*row, cell) for row, cell in zip(rows, cells)]


def _shell_quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def terminal_line(plan: Plan, shows: Callable[[int, int], bool]) -> str | None:
    """What reaches the terminal, when --ranks, --local-ranks-filter or --redirects hold some back."""
    shown = {w.global_rank: [name for stream, name in STREAMS if shows(w.global_rank, stream)] for w in plan.workers}
    if all(len(streams) == len(STREAMS) for streams in shown.values()):
        return None
    parts = [f"rank {rank} {'+'.join(streams) or 'nothing'}" for rank, streams in shown.items()]
    return "on the terminal: " + ", ".join(parts) + " (log files, when written, get every line)"


def warm_line(modules: Sequence[str], nnodes: int, cold: str | None, module_run: bool) -> str:
    """--warm: how the ranks will start, or why this node would start them cold (`cold`,
    ddplaunch.warm.plan_cold_reason's)."""
    if cold is not None:
        return f"--warm: {cold}; a real run starts the workers cold"
    where = "on each node, one interpreter" if nnodes > 1 else "one interpreter"
    unchecked = (
        f"; -m: not checked for a variable the module sets before it imports {modules[0]} (a script is)"
        if module_run else ""
    )
    return (
        f"--warm: {where} imports {', '.join(modules)} once, then forks every rank from it (restarts fork "
        f"again); should that import start a thread or initialise CUDA, the ranks start cold instead{unchecked}"
    )


def stacks_line(bootstrap: bool, on_quit: bool, stall: Stall) -> str:
    """How the stack reports work in this job (the bootstrap's two variables are not listed above)."""
    how = (
        "Python workers get a bootstrap on PYTHONPATH (taken out of their environment again at start) "
        "that dumps their threads on a real-time signal"
        if bootstrap else "no bootstrap (--no-stack-bootstrap): stacks come from py-spy, if installed"
    )
    when = ["SIGQUIT (Ctrl-\\)"] if on_quit else []
    if stall.watched:
        when.append(f"after {stall.timeout:g} s without a line from any rank" + (" (then the job stops)" if stall.stop else ""))
    return f"stack reports: {', '.join(when) or 'only at a failure'}; {how}"
