"""ddplaunch's command line: the click declarations, and (for now) running a launch in each node mode."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from typing import TYPE_CHECKING

import click

from launcher import __version__
from launcher.decide import Decision, Facts, decide, gather_facts
from launcher.errors import Interrupted, LaunchError
from launcher.options import DEFAULT_GRACE_S, DEFAULT_JOIN_TIMEOUT_S, Options
from launcher.plan import Plan, build_plan

if TYPE_CHECKING:
    from launcher.logs import Printer
    from launcher.rendezvous import NodeLink
    from launcher.supervisor import Peers

DRY_RUN_ERROR_DIR = "$TMPDIR/ddplaunch-<pid>"  # a real run makes a private directory there

CONTEXT = {
    "allow_interspersed_args": False,  # everything after SCRIPT belongs to the script
    "help_option_names": ["-h", "--help"],
    "max_content_width": 100,
}


@click.command(context_settings=CONTEXT)
@click.option("--nproc", "--nproc-per-node", "--nproc_per_node", "nproc", envvar="PET_NPROC_PER_NODE",
              metavar="N|auto|gpu|cpu",
              help="Workers on this node: a number, auto (GPUs, else CPUs), gpu or cpu. "
                   "Default: the number of --gpu-ids, else 1.")
@click.option("--nnodes", envvar="PET_NNODES", metavar="N",
              help="Number of nodes in the job. Default: from Slurm (srun) or Open MPI (mpirun) "
                   "when run under them, else 1.")
@click.option("--node-rank", "--node_rank", "node_rank", envvar="PET_NODE_RANK", type=int, metavar="R",
              help="This node's rank, 0..nnodes-1. Default: 0 on one node; across nodes, the order "
                   "in which nodes join (the node that owns --master-addr is 0).")
@click.option("--master-addr", "--master_addr", "master_addr", envvar="PET_MASTER_ADDR", metavar="HOST",
              help="Address of node 0, where rank 0 hosts the rendezvous. Default on one node: 127.0.0.1.")
@click.option("--master-port", "--master_port", "master_port", envvar="PET_MASTER_PORT", type=int,
              metavar="PORT", help="Rendezvous port. Default: a free port on one node, 29500 across nodes.")
@click.option("--rdzv-endpoint", "--rdzv_endpoint", "rdzv_endpoint", envvar="PET_RDZV_ENDPOINT",
              metavar="HOST[:PORT]", help="torchrun's spelling of --master-addr and --master-port.")
@click.option("--rdzv-backend", "--rdzv_backend", "rdzv_backend", envvar="PET_RDZV_BACKEND",
              type=click.Choice(["static", "c10d"]), hidden=True,
              help="Accepted for torchrun command lines; nodes always meet at node 0's TCPStore.")
@click.option("--join-timeout", "--join_timeout", "join_timeout", type=float, default=DEFAULT_JOIN_TIMEOUT_S,
              show_default=True, metavar="SECONDS", help="Across nodes: how long to wait for every node to join.")
@click.option("--standalone", is_flag=True, envvar="PET_STANDALONE",
              help="One node with a free port (accepted as in torchrun; that is the default here).")
@click.option("--gpu-ids", "--gpu_ids", "gpu_ids", metavar="IDS",
              help="GPUs to use, e.g. 0,2,4,6: one worker each; every worker sees them all as "
                   "CUDA_VISIBLE_DEVICES and LOCAL_RANK i uses cuda:i.")
@click.option("-m", "--module", is_flag=True, help="Run SCRIPT as a Python module (python -m).")
@click.option("--no-python", "--no_python", "no_python", is_flag=True,
              help="Run SCRIPT as an executable, not through Python.")
@click.option("--local-rank-arg", "--local_rank_arg", "local_rank_arg", is_flag=True,
              help="Also pass --local-rank=N to the script, for torch.distributed.launch-era scripts.")
@click.option("--log-dir", "--log_dir", "log_dir", envvar="PET_LOG_DIR", metavar="DIR",
              help="Write rankN.log (raw lines) per rank and launcher.log (events) here.")
@click.option("--ranks", metavar="LIST",
              help="Only these global ranks reach the terminal, e.g. 0 or 0,3 or 0-3 (files get all).")
@click.option("--max-restarts", "--max_restarts", "max_restarts", envvar="PET_MAX_RESTARTS", type=int,
              default=0, show_default=True, metavar="N",
              help="On a failure, stop all workers and start them all again, up to N times.")
@click.option("--env", "env", multiple=True, metavar="KEY=VALUE", help="Extra environment for the workers (repeatable).")
@click.option("--dry-run", "--dry_run", "dry_run", is_flag=True, help="Print the plan and exit, starting nothing.")
@click.option("--grace", type=float, default=DEFAULT_GRACE_S, show_default=True, metavar="SECONDS",
              help="At teardown, time between SIGTERM and SIGKILL.")
@click.option("--run-id", "--run_id", "--rdzv-id", "--rdzv_id", "run_id", envvar="PET_RDZV_ID", metavar="ID",
              help="TORCHELASTIC_RUN_ID for the workers. Default: a fresh random id.")
@click.option("--no-color", "--no_color", "no_color", is_flag=True, help="No colour (also: NO_COLOR=1).")
@click.option("--hosts", "-H", "hosts", metavar="H1,H2,...",
              help="Start the job on these hosts over SSH, node rank in this order; entries may be "
                   "user@host:port and names from ~/.ssh/config.")
@click.option("--hostfile", metavar="FILE",
              help="Hosts in the DeepSpeed/MPI format: `node1 slots=4`, optional `gpus=0,1,2,3`, # comments.")
@click.option("--ssh-accept-new-host-keys", "ssh_accept_new_host_keys", is_flag=True,
              help="Trust and remember a host key seen for the first time (OpenSSH's accept-new). "
                   "A changed key is always refused.")
@click.option("--chdir", metavar="DIR", help="With --hosts: the working directory on every host. Default: this one.")
@click.option("--python", "python", metavar="PATH",
              help="With --hosts: the Python on every host. Default: the one running ddplaunch here.")
@click.option("--agent", is_flag=True, hidden=True, help="Internal: run as a node agent for a head over SSH.")
@click.option("--host-name", "host_name", hidden=True, help="Internal: this host's name as the head knows it.")
@click.version_option(__version__, "-V", "--version", prog_name="ddplaunch")
@click.argument("script", metavar="SCRIPT")
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED, metavar="[SCRIPT_ARGS]...")
def command(**params: object) -> None:
    """Launch SCRIPT as a PyTorch distributed job with torchrun's environment.

    \b
    Examples:
      ddplaunch --nproc 8 train.py --lr 0.1
      ddplaunch --gpu-ids 0,2,4,6 train.py
      ddplaunch --nproc 2 --dry-run train.py
    """
    options = Options(**params)  # type: ignore[arg-type]
    if options.agent:
        from launcher.agent import say_hello

        say_hello()
    try:
        if options.hosts is not None or options.hostfile is not None:
            from launcher.fanout import launch_on_hosts

            code = launch_on_hosts(options)
        else:
            code = launch(options)
    except LaunchError as exc:
        click.echo(f"ddplaunch: error: {exc}", err=True)
        code = exc.exit_code
    if options.agent:
        from launcher.agent import say_exit

        say_exit(code)
    if "torch" in sys.modules:
        # A multi-node agent imported torch for its store; the interpreter's teardown of torch
        # costs ~0.5 s and every resource of ours is already released.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main() -> None:
    command.main(prog_name="ddplaunch")


# -- from options to a plan ------------------------------------------------------------------


def launch(options: Options) -> int:
    from launcher.ports import check_port_free, pick_free_port

    facts = gather_facts(options)
    log_dir = options.log_dir or None
    error_dir = os.path.join(log_dir, "errors") if log_dir else None
    decided = decide(options, facts, error_dir, head_links_nodes=options.agent)
    if options.agent:
        told = await_head(decided, options, facts)
        if told is None:
            return 1  # the head went away before saying go: nothing was started
        decided = told
    inputs = decided.inputs
    if options.dry_run:
        from launcher.dryrun import render_plan

        port = inputs.master_port or pick_free_port()
        note = () if decided.port_given else ("(port picked free now; a real run picks again)",)
        shown_dir = error_dir or DRY_RUN_ERROR_DIR
        plan = build_plan(replace(inputs, master_port=port, error_dir=shown_dir, job_id="<random per run>"))
        if not decided.node_rank_given:
            note = (*note, "(node rank shown as 0: without --node-rank, nodes take ranks in order of arrival)")
        click.echo(render_plan(plan, notes=decided.detected), nl=False)
        for line in note:
            click.echo(line)
        return 0
    if decided.port_given and decided.node_rank_given and inputs.node_rank == 0 and not options.agent:
        check_port_free(inputs.master_port)  # an agent's was checked before it said ready
    if log_dir is not None:
        _make_dir(log_dir, "--log-dir")
    made_error_dir = None
    if error_dir is None:
        made_error_dir = error_dir = _private_temp_dir()
    try:
        return run(decided, options, error_dir)
    finally:
        if made_error_dir is not None:
            import shutil

            shutil.rmtree(made_error_dir, ignore_errors=True)


def await_head(decided: Decision, options: Options, facts: Facts) -> Decision | None:
    """Agent mode: the checks passed; report ready (node 0: its address and port), await go."""
    from launcher.agent import HeadGone, handshake, ssh_server_address
    from launcher.ports import check_port_free, pick_free_port

    inputs = decided.inputs
    port = inputs.master_port if options.master_port is not None else 0
    if inputs.node_rank == 0:
        if port:
            check_port_free(port)  # before ready: a busy port then starts nothing anywhere
        else:
            port = pick_free_port()
    try:
        addr, port = handshake(ssh_server_address(facts.environ) or inputs.hostname, port)
    except HeadGone:
        return None
    return replace(decided, inputs=replace(inputs, master_addr=addr, master_port=port), port_given=True)


def run(decided: Decision, options: Options, error_dir: str) -> int:
    from launcher.logs import Printer, colour_enabled
    from launcher.ports import pick_free_port
    from launcher.report import finish, joined_line, start_line
    from launcher.supervisor import run_job

    inputs = replace(decided.inputs, error_dir=error_dir)
    link: Peers | None = None
    if options.agent:
        from launcher.agent import HeadLink

        master = (inputs.master_addr, inputs.master_port)
        link = head = HeadLink(inputs.node_rank, inputs.hostname, master, pick_port=options.master_port is None)
    elif inputs.nnodes > 1:
        link = node_link = join_nodes(decided, options)
        assert node_link.node_rank is not None
        inputs = replace(inputs, node_rank=node_link.node_rank, run_id=node_link.shape.run_id)

    def new_plan(restart: int) -> Plan:
        addr, port = inputs.master_addr, inputs.master_port
        if options.agent:  # the head's go for this attempt named node 0's address and port
            addr, port = head.master_addr, head.master_port
        elif not decided.port_given:
            port = pick_free_port()
        return build_plan(replace(inputs, restart_count=restart, master_addr=addr, master_port=port))

    first = new_plan(0)  # the first attempt's plan; it also sizes the printer and start line

    def plan_for_attempt(restart: int) -> Plan:
        return first if restart == 0 else new_plan(restart)

    colour = colour_enabled(options.no_color, os.environ, 1) and colour_enabled(options.no_color, os.environ, 2)
    printer: Printer
    if options.agent:
        from launcher.agent import FramePrinter

        printer = FramePrinter(world_ranks=[w.global_rank for w in first.workers], world_size=first.world_size)
    else:
        printer = Printer(
            world_ranks=[w.global_rank for w in first.workers],
            world_size=first.world_size,
            colour=colour,
            shown_ranks=decided.shown_ranks,
            log_dir=decided.log_dir,
        )
    say = printer.log_event if options.agent else printer.note  # the head sums up for all hosts
    try:
        if link is not None and not options.agent:
            say(joined_line(node_link.hosts))
        say(start_line(first))
        result = run_job(
            plan_for_attempt,
            printer=printer,
            grace=options.grace,
            max_restarts=inputs.max_restarts,
            job_id=inputs.job_id,
            peers=link,
        )
        finish(result, printer, say)
        return result.exit_code
    except KeyboardInterrupt:
        raise Interrupted("interrupted while waiting for the other nodes; no worker is running.") from None
    finally:
        if link is not None:
            link.close()
        printer.close()


def join_nodes(decided: Decision, options: Options) -> NodeLink:
    """Meet the other nodes (static multi-node); returns once all have joined."""
    from launcher.rendezvous import JobShape, NodeLink

    inputs = decided.inputs
    who = f"node {inputs.node_rank}" if decided.node_rank_given else "this node (rank by arrival)"
    if not options.agent:  # an agent's head shows its own progress
        click.echo(
            f"ddplaunch: {who} is waiting for {inputs.nnodes} nodes at {inputs.master_addr}:"
            f"{inputs.master_port} (--join-timeout {options.join_timeout:g}s)",
            err=True,
        )
    link = NodeLink(
        master_addr=inputs.master_addr,
        master_port=inputs.master_port,
        shape=JobShape(inputs.nnodes, inputs.nproc, inputs.max_restarts, inputs.run_id),
        run_id_given=options.run_id is not None,
        node_rank=inputs.node_rank if decided.node_rank_given else None,
        hostname=inputs.hostname,
        join_timeout=options.join_timeout,
    )
    try:
        link.join(0)
    except KeyboardInterrupt:
        link.close()
        raise Interrupted("interrupted while waiting for the other nodes; no worker was started.") from None
    except BaseException:
        link.close()
        raise
    return link


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


if __name__ == "__main__":
    main()
