"""What the launcher says about a job: its start line, and at the end the failure summary
(one root-cause panel, then one line per other worker).

Drawn with plain text (and ANSI colour on a terminal) rather than rich: importing rich costs
about 50 ms here, which alone would double the time from a rank's death to the launcher's exit.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from ddplaunch.secrets import scrub
from ddplaunch.supervisor import AttemptResult, JobResult, Unkillable, WorkerProcess, describe_exit, signal_name

if TYPE_CHECKING:
    from ddplaunch.logs import Printer
    from ddplaunch.plan import Plan

OOM_HINT = "killed, possibly out of memory (SIGKILL)"
UNKILLABLE_HINT = "the machine may need its GPU reset or a reboot"


def exit_text(worker: WorkerProcess) -> str:
    if worker.term_signal == 9:
        return f"{OOM_HINT}, exit code {worker.exit_code}"
    return describe_exit(worker)


def read_error_file(path: str | None) -> str | None:
    """The traceback torch's @record wrote to TORCHELASTIC_ERROR_FILE, if any."""
    import json  # only on a failure: the start line comes from this module too

    if path is None:
        return None
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            data = json.load(file)
    except (OSError, ValueError):
        return None
    message = data.get("message", data) if isinstance(data, dict) else data
    if isinstance(message, dict):
        extra = message.get("extraInfo", {})
        callstack = extra.get("py_callstack") if isinstance(extra, dict) else None
        return str(callstack or message.get("message") or "").rstrip() or None
    return str(message).rstrip() or None


def shown_in(traceback: str, tail: list[str]) -> bool:
    """Whether the rank's last lines already end with this traceback (printed, then recorded)."""
    lines = [line for line in traceback.splitlines() if line.strip()]
    return bool(lines) and [line for line in tail if line.strip()][-len(lines):] == lines


def other_worker_line(worker: WorkerProcess, raised: str | None = None) -> str:
    """`raised`: the uncaught exception the rank printed before it was told to stop, if any:
    it failed on its own, whatever ended its process afterwards."""
    rank = worker.spec.global_rank
    where = f"rank {rank} (local rank {worker.spec.local_rank}, pid {worker.pid})"
    if worker.exit_code is None:
        return f"{where}: would not die (below)" if signal.SIGKILL in worker.signals_sent else f"{where}: still running"
    if raised is not None:
        if worker.term_signal is not None and worker.term_signal in worker.signals_sent:
            return f"{where}: failed too, raising {raised} (then terminated by ddplaunch, {signal_name(worker.term_signal)})"
        return f"{where}: failed too, raising {raised} ({exit_text(worker)})"
    if worker.term_signal is not None and worker.term_signal in worker.signals_sent:
        return f"{where}: terminated by ddplaunch ({signal_name(worker.term_signal)})"
    if worker.after_stop and worker.signals_sent:
        if worker.term_signal is None:
            return f"{where}: stopped by ddplaunch, exited with code {worker.exit_code}"
        return f"{where}: {exit_text(worker)} while being stopped"
    if worker.exit_code == 0:
        return f"{where}: finished (exit code 0) before the failure"
    return f"{where}: failed too ({exit_text(worker)})"


def render_failure(
    result: AttemptResult, tail: list[str], colour: bool, width: int | None = None,
    raised: Mapping[int, str] | None = None,
) -> str:
    """The report for a failed attempt whose root cause is a worker; `raised`: the other ranks
    that failed on their own, and the exception each printed."""
    import shutil

    cause = result.root_cause
    assert cause is not None
    width = width or min(100, shutil.get_terminal_size((100, 24)).columns)
    red, dim, bold, reset = ("\x1b[31m", "\x1b[2m", "\x1b[1m", "\x1b[0m") if colour else ("",) * 4
    spec = cause.spec
    title = f" Root cause (first observed failure): rank {spec.global_rank} "
    lines = [f"{red}{bold}━━{title}{'━' * max(3, width - len(title) - 2)}{reset}"]
    lines.append(
        f"  rank {spec.global_rank} · local rank {spec.local_rank} · host {spec.host} · "
        f"pid {cause.pid} · ran {cause.runtime:.2f} s"
    )
    lines.append(f"  {bold}{exit_text(cause)}{reset}")
    lines.append(f"  command: {' '.join(spec.argv)}")
    traceback = read_error_file(spec.error_file)
    if tail:
        lines.append(f"  {dim}last {len(tail)} lines of rank {spec.global_rank}:{reset}")
        lines.extend(f"  {dim}│{reset} {line}" for line in tail)
    else:
        lines.append(f"  {dim}rank {spec.global_rank} printed nothing{reset}")
    if traceback and not shown_in(traceback, tail):
        lines.append(f"  {dim}traceback from its error file (torch @record):{reset}")
        lines.extend(f"  {dim}│{reset} {line}" for line in traceback.splitlines())
    others = [w for w in result.workers if w is not cause]
    if others:
        lines.append(f"  {dim}other workers:{reset}")
        lines.extend(f"    {other_worker_line(w, (raised or {}).get(w.spec.global_rank))}" for w in others)
    if result.others_at_failure:
        from ddplaunch.stackreport import render_others

        lines.extend(render_others(result.others_at_failure, colour=colour))
    lines.append(f"{red}{'━' * width}{reset}")
    return "\n".join(lines) + "\n"


# -- the launcher's own lines around a job ------------------------------------------------------


def joined_line(hosts: dict[int, str]) -> str:
    names = ", ".join(f"{rank} {host}" for rank, host in sorted(hosts.items()))
    return f"all {len(hosts)} nodes joined (node rank, host: {names})"


def start_line(plan: Plan, stacks_pid: int | None = None) -> str:
    """`stacks_pid`: the launcher that prints every rank's stack on SIGQUIT, if it does."""
    ranks = [w.global_rank for w in plan.workers]
    span = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    text = f"starting {len(ranks)} worker(s), {span} of world size {plan.world_size}"
    omp = plan.common_env.get("OMP_NUM_THREADS")
    if omp is not None:
        text += f"; OMP_NUM_THREADS={omp} per worker (set it to override)"
    if stacks_pid is not None:
        text += f"; every rank's stack: Ctrl-\\ or kill -QUIT {stacks_pid}"
    return text


def raised_before_stop(result: AttemptResult, printer: Printer) -> dict[int, str]:
    """The ranks (other than the root cause) whose stderr showed an uncaught exception before
    they were told to stop, each with its exception's line."""
    raised = {}
    for worker in result.workers:
        rank = worker.spec.global_rank
        if worker is result.root_cause or worker.exit_code in (None, 0):
            continue
        own = [line for at, line in printer.exceptions_raised(rank) if result.stop_began is None or at <= result.stop_began]
        if own:
            raised[rank] = own[-1]
    return raised


def render_silent_node(result: AttemptResult, colour: bool, width: int | None = None) -> str:
    """The report when another node's launcher went silent: that node is the root cause, and
    this node's ranks (even one that failed first, its peers gone) are its consequences."""
    import shutil

    end = result.elsewhere
    assert end is not None
    width = width or min(100, shutil.get_terminal_size((100, 24)).columns)
    red, dim, bold, reset = ("\x1b[31m", "\x1b[2m", "\x1b[1m", "\x1b[0m") if colour else ("",) * 4
    title = f" Root cause (first observed failure): node {end.node_rank} ({end.host}) "
    lines = [f"{red}{bold}━━{title}{'━' * max(3, width - len(title) - 2)}{reset}"]
    lines.append(f"  {bold}{end.describe()}{reset}")
    lines.append(f"  {dim}no report comes from it: a dead launcher's guard stops its workers, a cut-off one stops them itself{reset}")
    if result.workers:
        lines.append(f"  {dim}this node's workers, stopped because of it (consequences, not causes):{reset}")
        lines.extend(f"    {other_worker_line(w)}" for w in result.workers)
    lines.append(f"{red}{'━' * width}{reset}")
    return "\n".join(lines) + "\n"


def finish(result: JobResult, printer: Printer, say: Callable[[str], None]) -> None:
    last = result.last
    if last.elsewhere is not None and last.elsewhere.kind == "silent":
        printer.block(render_silent_node(last, printer.colour))
    elif last.elsewhere is not None:
        say(f"root cause on another node: {last.elsewhere.describe()} (its report is in that node's output)")
    elif last.root_cause is not None:
        tail = printer.tail(last.root_cause.spec.global_rank)
        report = render_failure(last, tail, printer.colour, raised=raised_before_stop(last, printer))
        printer.block(scrub(report))  # a --hf-token=... in the command, a TOKEN=... a rank printed
    elif last.stalled is not None:
        say(f"root cause: the job stalled ({last.stalled}); the report above shows where each rank was")
    elif last.stop_signal is not None:
        say(f"stopped by {signal_name(last.stop_signal)}; {'not ' if last.unkillable else ''}all workers ended")
    for stuck in last.unkillable:
        printer.note(unkillable_line(stuck))  # a note, not `say`: an agent's reaches the head's terminal
    if last.exit_code != 0:
        say(f"exit code {last.exit_code}")


def unkillable_line(stuck: Unkillable) -> str:
    """rank 1 (pid 1234) would not die: state D (disk sleep) in __refrigerator; the machine ..."""
    if stuck.rank is None:
        who = f"a process the workers left (pid {stuck.pid})"
    elif stuck.is_worker:
        who = f"rank {stuck.rank} (pid {stuck.pid})"
    else:
        who = f"a child of rank {stuck.rank} (pid {stuck.pid})"
    where = f" in {stuck.wait.wchan}" if stuck.wait.wchan else ""
    return f"{who} would not die: state {stuck.wait.state}{where}; {UNKILLABLE_HINT}"
