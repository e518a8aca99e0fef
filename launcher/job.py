"""The command line's job, from parsed options to an exit code, the same in every node mode.

`run_command` is what `ddplaunch` does: an SSH launch goes to the head (launcher.fanout);
anything else is this node's launch: decide, let the node's role (launcher.roles) prepare
and connect, then run attempts under the supervisor until the job ends.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace

from launcher.decide import Decision, decide, gather_facts
from launcher.errors import Interrupted, LaunchError
from launcher.options import Options
from launcher.plan import Plan, build_plan
from launcher.roles import Role, role_for
from launcher.stdin import keep_stdin_open

DRY_RUN_ERROR_DIR = "$TMPDIR/ddplaunch-<pid>"  # a real run makes a private directory there


def run_command(options: Options) -> int:
    """Everything `ddplaunch ...` does; a mistake is one paragraph on stderr and exit 2."""
    if options.agent:
        from launcher.agent import say_hello

        say_hello()
    keep_stdin_open()
    try:
        if options.hosts is not None or options.hostfile is not None:
            from launcher.fanout import launch_on_hosts

            code = launch_on_hosts(options)
        else:
            code = launch(options)
    except LaunchError as exc:
        print(f"ddplaunch: error: {exc}", file=sys.stderr, flush=True)
        code = exc.exit_code
    if options.agent:
        from launcher.agent import say_exit

        say_exit(code)
    return code


def launch(options: Options) -> int:
    """This node's part of the job."""
    facts = gather_facts(options)
    log_dir = options.log_dir or None
    error_dir = os.path.join(log_dir, "errors") if log_dir else None
    decision = decide(options, facts, error_dir, head_links_nodes=options.agent)
    if options.dry_run:
        return show_dry_run(decision, error_dir)
    role = role_for(options, decision)
    prepared = role.prepare(facts)
    if prepared is None:
        return 1  # nothing was started
    if log_dir is not None:
        _make_dir(log_dir, "--log-dir")
    made_error_dir = None
    if error_dir is None:
        made_error_dir = error_dir = _private_temp_dir()
    try:
        return run(role, prepared, options, error_dir)
    finally:
        if made_error_dir is not None:
            import shutil

            shutil.rmtree(made_error_dir, ignore_errors=True)


def show_dry_run(decision: Decision, error_dir: str | None) -> int:
    from launcher.dryrun import render_plan, terminal_line
    from launcher.ports import pick_free_port

    inputs = decision.inputs
    port = inputs.master_port or pick_free_port()
    notes = () if decision.port_given else ("(port picked free now; a real run picks again)",)
    shown_dir = error_dir or DRY_RUN_ERROR_DIR
    plan = build_plan(replace(inputs, master_port=port, error_dir=shown_dir, job_id="<random per run>"))
    if not decision.node_rank_given:
        notes = (*notes, "(node rank shown as 0: without --node-rank, nodes take ranks in order of arrival)")
    said = [*decision.detected, *decision.notes, terminal_line(plan, decision.terminal.shows)]
    if decision.files_wanted is not None:
        said.append(f"{decision.files_wanted}: a real run writes every rank's output to a new $TMPDIR/ddplaunch-logs-*")
    sys.stdout.write(render_plan(plan, notes=tuple(line for line in said if line)))
    for line in notes:
        sys.stdout.write(line + "\n")
    sys.stdout.flush()
    return 0


def run(role: Role, decision: Decision, options: Options, error_dir: str) -> int:
    """Attempts until the job ends; returns its exit code."""
    from launcher.report import finish
    from launcher.supervisor import SignalPlan, run_job

    peers, inputs = role.connect(replace(decision.inputs, error_dir=error_dir))

    def new_plan(restart: int) -> Plan:
        addr, port = role.address(inputs)
        return build_plan(replace(inputs, restart_count=restart, master_addr=addr, master_port=port))

    first = new_plan(0)  # the first attempt's plan; it also sizes the printer and start line

    def plan_for_attempt(restart: int) -> Plan:
        return first if restart == 0 else new_plan(restart)

    printer = role.printer(first)
    try:
        for note in decision.notes:
            role.say(printer, note)
        role.announce(printer, first)
        result = run_job(
            plan_for_attempt,
            printer=printer,
            grace=decision.grace,
            max_restarts=inputs.max_restarts,
            job_id=inputs.job_id,
            peers=peers,
            signals=SignalPlan.handling(inputs.signals_to_handle),
            stdin=role.stdin(printer, first),
        )
        finish(result, printer, lambda text: role.say(printer, text))
        return result.exit_code
    except KeyboardInterrupt:
        raise Interrupted("interrupted while waiting for the other nodes; no worker is running.") from None
    finally:
        if peers is not None:
            peers.close()
        printer.close()


def _make_dir(path: str, flag: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise LaunchError(f"{flag} {path!r}: cannot create it ({exc.strerror}). Pick a writable directory.") from None


def _private_temp_dir() -> str:
    base = os.environ.get("TMPDIR") or "/tmp"
    path = os.path.join(base, f"ddplaunch-{os.getpid()}-{os.urandom(4).hex()}")
    os.mkdir(path, 0o700)
    return path
