"""ddplaunch's command line: the click declarations, then one call to ddplaunch.job.run_command.

Each option's meaning lives in launcher/: ddplaunch.options (the parsed values and their small
parsers), ddplaunch.decide (what they mean on this machine), ddplaunch.job (running it).
"""

from __future__ import annotations

import sys

import click

from ddplaunch import __version__
from ddplaunch.options import DEFAULT_JOIN_TIMEOUT_S, Options, foreign_option_hint

CONTEXT = {
    "allow_interspersed_args": False,  # everything after SCRIPT belongs to the script
    "help_option_names": ["-h", "--help"],
    "max_content_width": 100,
}


class Command(click.Command):
    """click's command, whose hint for an unknown option names ddplaunch's equivalent when the
    option is another launcher's (DeepSpeed, horovodrun, mpirun, accelerate)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        typed_args = list(args)  # click's parser consumes the list it is given
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as exc:
            typed = _typed_option(exc.option_name, typed_args)
            hint = foreign_option_hint(typed)
            if hint is None:
                raise
            raise click.NoSuchOption(typed, message=f"No such option: {typed}. {hint}.", ctx=ctx) from None


class EnvironmentSwitch(click.types.BoolParamType):
    """A flag's boolean whose bad value from its environment variable names the variable (click
    would name only the flag, which the user never typed)."""

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> bool:
        try:
            return bool(super().convert(value, param, ctx))
        except click.BadParameter:
            source = None if ctx is None or param is None or param.name is None else ctx.get_parameter_source(param.name)
            if source is not click.core.ParameterSource.ENVIRONMENT or param is None:
                raise
            variable = param.envvar if isinstance(param.envvar, str) else "its variable"
            raise click.BadParameter(
                f"{variable}={value!s} is neither on nor off: set it to 1 (on for every job) or 0, or unset it.",
                ctx=ctx, param=param,
            ) from None


def _typed_option(name: str, args: list[str]) -> str:
    """The option as typed: click names `-n` for `-np`, a cluster of short options."""
    for arg in args:
        if arg.partition("=")[0] == name or (not arg.startswith("--") and arg.startswith(name)):
            return arg.partition("=")[0]
    return name


@click.command(cls=Command, context_settings=CONTEXT)
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
@click.option("--rdzv-backend", "--rdzv_backend", "rdzv_backend", envvar="PET_RDZV_BACKEND", metavar="static|c10d",
              help="torchrun's; either way the nodes meet at node 0's TCPStore at --rdzv-endpoint.")
@click.option("--rdzv-conf", "--rdzv_conf", "rdzv_conf", envvar="PET_RDZV_CONF", metavar="KEY=VALUE,...",
              help="torchrun's: its join_timeout (or timeout) is --join-timeout; other keys are ignored.")
@click.option("--join-timeout", "--join_timeout", "join_timeout", type=float, metavar="SECONDS",
              help=f"Across nodes: how long to wait for every node to join. Default: {DEFAULT_JOIN_TIMEOUT_S:g}.")
@click.option("--standalone", is_flag=True, envvar="PET_STANDALONE",
              help="One node with a free port (accepted as in torchrun; that is the default here).")
@click.option("--gpu-ids", "--gpu_ids", "gpu_ids", metavar="IDS",
              help="GPUs to use, e.g. 0,2,4,6: one worker each; every worker sees them all as "
                   "CUDA_VISIBLE_DEVICES and LOCAL_RANK i uses cuda:i.")
@click.option("-m", "--module", is_flag=True, envvar="PET_MODULE", help="Run SCRIPT as a Python module (python -m).")
@click.option("--no-python", "--no_python", "no_python", is_flag=True, envvar="PET_NO_PYTHON",
              help="Run SCRIPT as an executable, not through Python.")
@click.option("--run-path", "--run_path", "run_path", is_flag=True, envvar="PET_RUN_PATH",
              help="Run SCRIPT with runpy.run_path in each worker, as torchrun's --run-path does.")
@click.option("--local-rank-arg", "--local_rank_arg", "local_rank_arg", is_flag=True,
              help="Also pass --local-rank=N to the script, for torch.distributed.launch-era scripts.")
@click.option("--log-dir", "--log_dir", "log_dir", envvar="PET_LOG_DIR", metavar="DIR",
              help="Write rankN.log (raw lines) per rank and launcher.log (events) here.")
@click.option("--ranks", metavar="LIST",
              help="Only these global ranks reach the terminal, e.g. 0 or 0,3 or 0-3 (files get all).")
@click.option("--local-ranks-filter", "--local_ranks_filter", "local_ranks_filter", envvar="PET_LOCAL_RANKS_FILTER",
              metavar="LIST", help="torchrun's: only these local ranks, on every node, reach the terminal.")
@click.option("-r", "--redirects", "redirects", envvar="PET_REDIRECTS", metavar="STD",
              help="torchrun's: streams kept off the terminal, to the log files only: 1 stdout, 2 stderr, "
                   "3 both, or per local rank (0:3,1:2).")
@click.option("-t", "--tee", "tee", envvar="PET_TEE", metavar="STD",
              help="torchrun's: streams to the log files and the terminal (the terminal shows all "
                   "but --redirects anyway).")
@click.option("--duplicate-stdout-filters", "--duplicate_stdout_filters", "duplicate_stdout_filters",
              envvar="PET_DUPLICATE_STDOUT_FILTERS", metavar="A,B",
              help="Also copy the terminal's stdout lines containing A or B to filtered_stdout.log in the log dir.")
@click.option("--duplicate-stderr-filters", "--duplicate_stderr_filters", "duplicate_stderr_filters",
              envvar="PET_DUPLICATE_STDERR_FILTERS", metavar="A,B",
              help="The same for stderr lines, to filtered_stderr.log.")
@click.option("--max-restarts", "--max_restarts", "max_restarts", envvar="PET_MAX_RESTARTS", type=int,
              default=0, show_default=True, metavar="N",
              help="On a failure, stop all workers and start them all again, up to N times.")
@click.option("--env", "env", multiple=True, metavar="KEY[=VALUE]",
              help="Extra environment for the workers (repeatable); KEY alone forwards this shell's KEY.")
@click.option("--env-file", "env_file", multiple=True, metavar="FILE",
              help="KEY=VALUE lines for the workers' environment (repeatable; --env wins).")
@click.option("--dry-run", "--dry_run", "dry_run", is_flag=True, help="Print the plan and exit, starting nothing.")
@click.option("--grace", "--shutdown-timeout", "--shutdown_timeout", "grace", type=float, metavar="SECONDS",
              envvar="PET_SHUTDOWN_TIMEOUT",
              help="At teardown, time between the stop signal and SIGKILL. Default: "
                   "TORCH_ELASTIC_SHUTDOWN_TIMEOUT, else 30.")
@click.option("--signals-to-handle", "--signals_to_handle", "signals_to_handle", envvar="PET_SIGNALS_TO_HANDLE",
              metavar="SIGS", help="Signals that stop the job, each forwarded to the workers. "
                                   "Default: SIGTERM,SIGINT,SIGHUP; SIGQUIT (Ctrl-\\) prints every "
                                   "rank's stack unless listed here.")
@click.option("--stall-timeout", "stall_timeout", type=float, metavar="SECONDS",
              help="When no rank wrote a line for this long, print where every rank is (again at "
                   "doubling intervals while it lasts). Default: 300; 0: never.")
@click.option("--stall-action", "stall_action", type=click.Choice(["report", "stop"]), default="report",
              show_default=True, help="On a stall, only report, or stop the job with the report as "
                                      "root cause (exit code 124).")
@click.option("--heartbeat-timeout", "heartbeat_timeout", type=float, metavar="SECONDS",
              help="Across hosts and nodes: a head, agent or node not heard from for this long "
                   "is gone; its peers name it and stop. Default: 10.")
@click.option("--kill-timeout", "kill_timeout", type=float, metavar="SECONDS",
              help="After SIGKILL, how long to wait for the workers to die before naming those "
                   "that would not (stuck in the kernel) and exiting. Default: 10.")
@click.option("--no-stack-bootstrap", "no_stack_bootstrap", is_flag=True,
              help="Do not put the stack bootstrap (faulthandler on a real-time signal) into "
                   "Python workers; stacks then come from py-spy, if installed.")
@click.option("--warm/--no-warm", "warm", default=False, envvar="DDPLAUNCH_WARM",
              type=EnvironmentSwitch(),
              help="Import torch once per node, in one interpreter, and fork every rank (and every "
                   "restart) from it: the ranks start in a fraction of the time. DDPLAUNCH_WARM=1 "
                   "makes it your default; --no-warm then starts one job cold.")
@click.option("--warm-modules", "warm_modules", metavar="M1,M2,...",
              help="With --warm: the modules that interpreter imports. Default: torch.")
@click.option("--role", envvar="PET_ROLE", metavar="NAME", help="ROLE_NAME for the workers. Default: default.")
@click.option("--virtual-local-rank", "--virtual_local_rank", "virtual_local_rank", is_flag=True,
              envvar="PET_VIRTUAL_LOCAL_RANK",
              help="Each worker sees only its own GPU (as cuda:0) and LOCAL_RANK=0.")
@click.option("--numa-binding", "--numa_binding", "numa_binding", envvar="PET_NUMA_BINDING",
              type=click.Choice(["node", "socket", "exclusive", "core-complex"]),
              help="Bind each worker to the CPUs near its GPU.")
@click.option("--local-addr", "--local_addr", "local_addr", envvar="PET_LOCAL_ADDR", metavar="HOST",
              help="This node's address: MASTER_ADDR on one node; the name it gives the other nodes.")
@click.option("--force", is_flag=True, help="Start even a --nproc far beyond this machine's CPUs and GPUs.")
@click.option("--monitor-interval", "--monitor_interval", "monitor_interval", envvar="PET_MONITOR_INTERVAL",
              type=float, metavar="SECONDS", help="torchrun's; accepted, no meaning here (no polling).")
@click.option("--start-method", "--start_method", "start_method", envvar="PET_START_METHOD",
              type=click.Choice(["spawn", "fork", "forkserver"]),
              help="torchrun's; accepted, no meaning here (workers are new processes).")
@click.option("--event-log-handler", "--event_log_handler", "event_log_handler", envvar="PET_EVENT_LOG_HANDLER",
              metavar="NAME", help="torchrun's; accepted, no meaning here (see --log-dir's launcher.log).")
@click.option("--logs-specs", "--logs_specs", "logs_specs", envvar="PET_LOGS_SPECS", metavar="NAME",
              help="torchrun's; accepted, no meaning here (see --log-dir).")
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
@click.option("--sync", "sync", is_flag=True,
              help="With --hosts: first copy this directory to every host (only what changed since the last "
                   "time) and run the job in that copy: at --chdir DIR if given, else in a per-user cache folder.")
@click.option("--sync-exclude", "sync_exclude", multiple=True, metavar="PATTERN",
              help="With --sync: leave out paths matching the glob PATTERN (the whole path or any one part "
                   "of it, e.g. data or '*.ckpt'); repeatable. Git's ignored files never go.")
@click.option("--sync-max-size", "sync_max_size", metavar="SIZE",
              help="With --sync: the most it may copy, e.g. 500M or 4G. Default: 1G.")
@click.option("--python", "python", metavar="PATH",
              help="With --hosts: the Python on every host. Default: the one running ddplaunch here.")
@click.option("--stdin", "stdin", default="0", show_default=True, metavar="RANK|none",
              help="The global rank that reads ddplaunch's stdin (pdb at a breakpoint works); the "
                   "other ranks read /dev/null, as under mpirun. none: every rank reads /dev/null.")
@click.option("--agent", is_flag=True, hidden=True, help="Internal: run as a node agent for a head over SSH.")
@click.option("--host-name", "host_name", hidden=True, help="Internal: this host's name as the head knows it.")
@click.option("--from-python", "from_python", hidden=True, metavar="FOLDER",
              help="Internal: run for ddplaunch.run/spawn, whose private folder gets result.json.")
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
    from ddplaunch.job import run_command

    sys.exit(run_command(Options(**params)))  # type: ignore[arg-type]


def main() -> None:
    try:
        command.main(prog_name="ddplaunch")
    except SystemExit as done:
        if "torch" in sys.modules:
            # A static node imported torch for its store: leave skips the interpreter's slow
            # teardown of it. Only here, in the program's own main: a caller of `command` (a
            # test's CliRunner) keeps its process.
            from ddplaunch.agent_cli import leave

            leave(0 if done.code is None else done.code if isinstance(done.code, int) else 1)
        raise


if __name__ == "__main__":
    main()
