"""The command line's job, from parsed options to an exit code, the same in every node mode.

`run_command` is what `ddplaunch` does: an SSH launch goes to the head (ddplaunch.fanout);
anything else is this node's launch: decide, let the node's role (ddplaunch.roles) prepare
and connect, then run attempts under the supervisor until the job ends.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace

from ddplaunch.decide import Decision, decide, gather_facts
from ddplaunch.errors import Interrupted, LaunchError
from ddplaunch.limits import ensure_descriptors
from ddplaunch.logs import PRIVATE_DIR
from ddplaunch.options import Options, heartbeat_timeout_of, kill_timeout_of
from ddplaunch.plan import Plan, build_plan, is_plain_int
from ddplaunch.roles import Role, role_for
from ddplaunch.stdin import keep_stdin_open

DRY_RUN_ERROR_DIR = "$TMPDIR/ddplaunch-<pid>"  # a real run makes a private directory there


def run_command(options: Options) -> int:
    """Everything `ddplaunch ...` does; a mistake is one paragraph on stderr and exit 2."""
    if options.agent:
        from ddplaunch.agent import say_hello

        say_hello()
    keep_stdin_open()
    if options.from_python:
        from ddplaunch.caller import follow_caller

        follow_caller()
    error: str | None = None
    try:
        options = with_env_resolved(options)
        heartbeat_timeout_of(options)  # each checked once, before anything starts
        kill_timeout_of(options)
        if options.hosts is not None or options.hostfile is not None:
            from ddplaunch.fanout import launch_on_hosts

            code = launch_on_hosts(options)
        else:
            refuse_sync_without_hosts(options)
            code = launch(options)
    except LaunchError as exc:
        print(f"ddplaunch: error: {exc}", file=sys.stderr, flush=True)
        code = exc.exit_code
        error = None if isinstance(exc, Interrupted) else str(exc)
    if options.from_python:
        from ddplaunch.caller import finish

        finish(options.from_python, code, error)
    if options.agent:
        from ddplaunch.agent import say_exit

        say_exit(code)
    return code


def refuse_sync_without_hosts(options: Options) -> None:
    """--sync copies to the hosts the head starts; a node started here already runs in this directory."""
    given = [flag for flag, value in (("--sync", options.sync), ("--sync-exclude", options.sync_exclude),
                                      ("--sync-max-size", options.sync_max_size)) if value]
    if given:
        raise LaunchError(
            f"{given[0]} copies this directory to the hosts of --hosts or --hostfile; without them the job "
            "runs here, in this directory. Drop it, or name the hosts with --hosts (on nodes started by hand, "
            "copy the code there yourself)."
        )


def with_env_resolved(options: Options) -> Options:
    """--env-file and --env, read and resolved once, here; from then on `options.env` holds
    KEY=VALUE only. An agent gets them so from its head, on stdin: never on a command line."""
    from ddplaunch.plan import resolve_env

    if options.agent:
        from ddplaunch.agent import receive_env

        pairs = receive_env()
    else:
        files = [(path, _read_env_file(path)) for path in options.env_file]
        pairs = resolve_env(options.env, files, os.environ, gpu_ids_given=options.gpu_ids is not None)
    return replace(options, env=tuple(f"{key}={value}" for key, value in pairs), env_file=())


def _read_env_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8", newline="") as file:  # a lone \r in a value stays
            return file.read()
    except OSError as exc:
        raise LaunchError(f"--env-file {path}: cannot read it ({exc.strerror}). Check the path.") from None
    except UnicodeDecodeError as exc:
        raise LaunchError(
            f"--env-file {path}: not UTF-8 text (byte {exc.start}); save it as UTF-8."
        ) from None


def launch(options: Options) -> int:
    """This node's part of the job."""
    if options.force and options.nproc is not None and is_plain_int(options.nproc.strip()):
        # planning is linear in --nproc: a typo such as --nproc 99999999 --force must be
        # refused now, not after minutes of it (checked again below with what was decided).
        # Without --force, decide's "far more workers than this machine has" comes first.
        ensure_descriptors(int(options.nproc), log_files=options.log_dir is not None)
    facts = gather_facts(options)
    log_dir = options.log_dir or None
    error_dir = os.path.join(log_dir, "errors") if log_dir else None
    decision = decide(options, facts, error_dir, head_links_nodes=options.agent)
    # before anything starts, even a dry run: too few open files is a mistake it should show
    ensure_descriptors(decision.inputs.nproc, log_files=decision.log_dir is not None or decision.files_wanted is not None)
    if options.dry_run:
        return show_dry_run(decision, error_dir, options)
    role = role_for(options, decision)
    prepared = role.prepare(facts)
    if prepared is None:
        return 1  # nothing was started
    if log_dir is not None:
        _make_dir(log_dir, "--log-dir")
        _make_dir(os.path.join(log_dir, "errors"), "--log-dir")  # the attempts' folders go in it
    private = _private_temp_dir()  # the job's own: error files without --log-dir, stack dumps
    try:
        stack_dir = None
        if prepared.stack_bootstrap:
            from ddplaunch.snapshot import prepare_bootstrap

            prepare_bootstrap(private)  # run from a zip (a shipped agent), the bootstrap is written out there
            stack_dir = os.path.join(private, "stacks")
            os.mkdir(stack_dir, 0o700)
        temp_dirs = (private, options.from_python) if options.from_python else (private,)
        return run(role, prepared, options, error_dir or private, stack_dir, temp_dirs)
    finally:
        import shutil

        shutil.rmtree(private, ignore_errors=True)


def show_dry_run(decision: Decision, error_dir: str | None, options: Options) -> int:
    from ddplaunch.dryrun import render_plan, stacks_line, terminal_line
    from ddplaunch.roles import quit_reports
    from ddplaunch.ports import pick_free_port

    inputs = decision.inputs
    port = inputs.master_port or pick_free_port()
    notes = () if decision.port_given else ("(port picked free now; a real run picks again)",)
    shown_dir = error_dir or DRY_RUN_ERROR_DIR
    plan = build_plan(replace(inputs, master_port=port, error_dir=shown_dir, job_id="<random per run>"))
    if not decision.node_rank_given:
        notes = (*notes, "(node rank shown as 0: without --node-rank, nodes take ranks in order of arrival)")
    said = [*decision.detected, *decision.notes, *warm_lines(decision.warm, plan), terminal_line(plan, decision.terminal.shows),
            stacks_line(decision.stack_bootstrap, quit_reports(options), decision.stall)]
    if decision.files_wanted is not None:
        said.append(f"{decision.files_wanted}: a real run writes every rank's output to a new $TMPDIR/ddplaunch-logs-*")
    sys.stdout.write(render_plan(plan, notes=tuple(line for line in said if line)))
    for line in notes:
        sys.stdout.write(line + "\n")
    sys.stdout.flush()
    return 0


def warm_lines(modules: tuple[str, ...] | None, plan: Plan) -> tuple[str, ...]:
    """--dry-run --warm: how this node's ranks would start (reads the script, starts nothing)."""
    if modules is None:
        return ()
    from ddplaunch.dryrun import warm_line
    from ddplaunch.warm import plan_cold_reason, runs_module

    return (warm_line(modules, plan.nnodes, plan_cold_reason(plan, modules), runs_module(plan)),)


def run(
    role: Role, decision: Decision, options: Options, error_dir: str, stack_dir: str | None = None,
    temp_dirs: tuple[str, ...] = (),
) -> int:
    """Attempts until the job ends; returns its exit code. `temp_dirs`: the job's private
    folder (removed by the caller, or by the guard if this launcher is killed), and a Python
    caller's (launcher.caller), which gets the job's summary."""
    from ddplaunch.report import finish
    from ddplaunch.supervisor import SignalPlan, StackSettings, run_job

    peers, inputs = role.connect(replace(decision.inputs, error_dir=error_dir, stack_dir=stack_dir))

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
            # an agent does what its head says: the head turns SIGQUIT into a report itself
            signals=SignalPlan.handling(inputs.signals_to_handle if options.signals_to_handle or options.agent else None),
            stdin=role.stdin(printer, first),
            stacks=StackSettings(decision.stall, ReportDir(decision.log_dir)),
            kill_timeout=kill_timeout_of(options),
            temp_dirs=temp_dirs,
            warm=decision.warm,
        )
        finish(result, printer, lambda text: role.say(printer, text))
        if options.from_python:
            from ddplaunch.caller import job_summary, write_result

            write_result(options.from_python, job_summary(result, printer))
        return result.exit_code
    except KeyboardInterrupt:
        raise Interrupted("interrupted while waiting for the other nodes; no worker is running.") from None
    finally:
        if peers is not None:
            peers.close()
        printer.close()


def _make_dir(path: str, flag: str) -> None:
    try:
        os.makedirs(path, mode=PRIVATE_DIR, exist_ok=True)
    except OSError as exc:
        raise LaunchError(f"{flag} {path!r}: cannot create it ({exc.strerror}). Pick a writable directory.") from None


class ReportDir:
    """Where stack reports' full-stacks files go: --log-dir/stacks, else a temporary directory
    that is kept (the report names it), made only when the first report is."""

    def __init__(self, log_dir: str | None) -> None:
        self._log_dir = log_dir
        self._path: str | None = None

    def __call__(self) -> str:
        if self._path is None:
            if self._log_dir is not None:
                self._path = os.path.join(self._log_dir, "stacks")
                os.makedirs(self._path, mode=PRIVATE_DIR, exist_ok=True)
            else:
                import tempfile

                self._path = tempfile.mkdtemp(prefix="ddplaunch-stacks-")
        return self._path


def _private_temp_dir() -> str:
    base = os.environ.get("TMPDIR") or "/tmp"
    path = os.path.join(base, f"ddplaunch-{os.getpid()}-{os.urandom(4).hex()}")
    os.mkdir(path, 0o700)
    return path
