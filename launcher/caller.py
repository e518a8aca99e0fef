"""The launcher's side of a Python caller (ddplaunch.run, ddplaunch.spawn; launcher.api).

With --from-python FOLDER the launcher is its caller's child: it asks the kernel for SIGTERM
when the caller dies (PR_SET_PDEATHSIG; SIGTERM stops the job as at a terminal), writes how
the job ended to FOLDER/result.json for the caller to read, and removes FOLDER itself when the
caller is gone by then (its guard does, should the launcher be killed). The caller's pid comes
in DDPLAUNCH_PARENT_PID, taken out of the environment before any worker inherits it.
"""

from __future__ import annotations

import json
import os
import signal
from typing import TYPE_CHECKING, Any

from ddplaunch.prctl import prctl

if TYPE_CHECKING:
    from ddplaunch.logs import Printer
    from ddplaunch.supervisor import JobResult

RESULT_FILE = "result.json"
PARENT_VARIABLE = "DDPLAUNCH_PARENT_PID"
PR_SET_PDEATHSIG = 1

_parent_pid: int | None = None


def follow_caller() -> None:
    """SIGTERM when the caller dies; at once if it died before this line (its pid is no longer our parent)."""
    global _parent_pid
    _parent_pid = int(os.environ.pop(PARENT_VARIABLE, "0") or 0) or None
    prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if caller_gone():
        os.kill(os.getpid(), signal.SIGTERM)


def caller_gone() -> bool:
    return _parent_pid is not None and os.getppid() != _parent_pid


def job_summary(result: JobResult, printer: Printer) -> dict[str, Any]:
    """result.json: the exit code, each rank's (-N: killed by signal N), and the root cause."""
    from ddplaunch.report import other_worker_line, raised_before_stop, read_error_file
    from ddplaunch.supervisor import failure_summary, signal_name

    last = result.last
    ranks = {str(w.spec.global_rank): (-w.term_signal if w.term_signal else w.exit_code) for w in last.workers}
    summary: dict[str, Any] = {"exit_code": result.exit_code, "ranks": ranks, "restarts": result.restarts}
    cause = last.root_cause
    if cause is not None:
        rank = cause.spec.global_rank
        tail = printer.tail(rank)
        raised = raised_before_stop(last, printer)
        summary["root_cause"] = {
            "rank": rank, "description": failure_summary(last), "exit_code": cause.exit_code,
            "signal": signal_name(cause.term_signal) if cause.term_signal else None, "host": cause.spec.host,
            "traceback": read_error_file(cause.spec.error_file) or traceback_in(tail), "last_lines": tail,
        }
        summary["others"] = [other_worker_line(w, raised.get(w.spec.global_rank)) for w in last.workers if w is not cause]
    elif result.exit_code != 0:
        if last.stop_signal is not None and last.elsewhere is None:
            description = f"stopped by {signal_name(last.stop_signal)}"
        elif last.stalled is not None:
            description = f"the job stalled ({last.stalled})"
        else:
            description = failure_summary(last)
        summary["root_cause"] = {"rank": None, "description": description, "exit_code": result.exit_code}
    return summary


def traceback_in(lines: list[str]) -> str | None:
    """The last Python traceback among a rank's last lines, up to its exception line."""
    starts = [i for i, line in enumerate(lines) if line.lstrip("[0123456789]: ").startswith("Traceback (most recent call last)")]
    return "\n".join(lines[starts[-1]:]) if starts else None


def write_result(folder: str, summary: dict[str, Any]) -> None:
    """Whole or not at all; once per launch (the first writer wins: the job's own summary)."""
    final = os.path.join(folder, RESULT_FILE)
    if os.path.exists(final):
        return
    with open(final + ".part", "w", encoding="utf-8") as file:
        json.dump(summary, file)
    os.replace(final + ".part", final)


def finish(folder: str, exit_code: int, error: str | None) -> None:
    """At the launcher's exit: the summary of what never reached a job (a mistake, a dry run,
    an SSH head's job), and the folder removed if no caller is left to read it."""
    try:
        write_result(folder, {"exit_code": exit_code, "error": error})
    except OSError:
        pass
    if caller_gone():
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
