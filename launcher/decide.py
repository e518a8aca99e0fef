"""From the command line and the machine's facts to one decision: what this node will run.

Pure but for `gather_facts`, which reads the machine once (environment, CPUs, host name,
GPUs). Every mistake in the options is a LaunchError naming the flag and the fix.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace

from launcher.devices import (
    DeviceMap,
    Gpu,
    default_device_map,
    discover_gpus,
    map_gpu_ids,
    parse_gpu_ids,
    visible_gpus,
)
from launcher.errors import GpuDiscoveryError, LaunchError
from launcher.options import Options, parse_nnodes, parse_ranks, split_host_port
from launcher.plan import (
    PlanInputs,
    Program,
    Terminal,
    parse_env_assignments,
    resolve_nproc,
    tcp_port,
    validate_topology,
)

SINGLE_NODE_MASTER_ADDR = "127.0.0.1"
MULTI_NODE_DEFAULT_PORT = 29500  # torchrun's default, so existing multi-node recipes carry over
HEAD_SENDS_ADDRESS = "-"  # an agent's placeholder: the head sends node 0's address with its go


@dataclass(frozen=True)
class Facts:
    """What the plan needs from the machine, read once."""

    environ: dict[str, str]
    cpu_count: int
    hostname: str
    gpus: tuple[Gpu, ...]
    terminal: Terminal | None = None


def program_of(options: Options) -> Program:
    if options.module and options.no_python:
        raise LaunchError("-m/--module and --no-python exclude each other: choose one.")
    if options.module:
        return Program("module", options.script, options.script_args)
    if options.no_python:
        if not _is_executable(options.script):
            raise LaunchError(
                f"--no-python: {options.script!r} is not an executable file or a command on "
                "PATH. Check the name, or drop --no-python to run a Python script."
            )
        return Program("exec", options.script, options.script_args)
    if not os.path.isfile(options.script):
        raise LaunchError(
            f"SCRIPT {options.script!r} not found (looked in {os.getcwd()}). Give the path of "
            "a Python file, use -m for a module, or --no-python for an executable."
        )
    return Program("script", options.script, options.script_args)


def _is_executable(name: str) -> bool:
    import shutil

    if os.sep in name:
        return os.path.isfile(name) and os.access(name, os.X_OK)
    return shutil.which(name) is not None


def gather_facts(options: Options) -> Facts:
    wants_gpus = options.gpu_ids is not None or (options.nproc or "").strip().lower() in ("auto", "gpu")
    gpus: tuple[Gpu, ...] = ()
    if wants_gpus:
        gpus = discover_gpus()
    elif options.dry_run:
        try:
            gpus = discover_gpus()  # only to show the physical GPU column
        except GpuDiscoveryError:
            gpus = ()
    return Facts(
        environ=dict(os.environ),
        cpu_count=usable_cpus(),
        # what socket.gethostname() returns, without importing socket; an agent uses the head's name
        hostname=options.host_name or os.uname().nodename,
        gpus=gpus,
        terminal=None if options.agent else read_terminal(options.no_color, os.environ),
    )


def read_terminal(no_color: bool, environ: Mapping[str, str]) -> Terminal | None:
    """The terminal our output reaches (stderr's, where progress bars go, else stdout's), if any."""
    from launcher.logs import colour_enabled

    for fd in (2, 1):
        try:
            if os.isatty(fd):
                columns, lines = os.get_terminal_size(fd)
                break
        except OSError:
            continue
    else:
        return None
    colour = colour_enabled(no_color, environ, 1) and colour_enabled(no_color, environ, 2)
    return Terminal(columns or 80, lines or 24, colour)


def usable_cpus() -> int:
    """CPUs this process may run on (taskset, cpusets), not all the machine has."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Decision:
    """Everything decided before the first worker starts."""

    inputs: PlanInputs
    port_given: bool
    shown_ranks: frozenset[int] | None
    log_dir: str | None
    node_rank_given: bool = True
    detected: tuple[str, ...] = ()  # what came from a cluster's environment, for --dry-run


def decide(options: Options, facts: Facts, error_dir: str | None, *, head_links_nodes: bool = False) -> Decision:
    """Validate the options against the machine's facts; raise LaunchError on any mistake.

    `head_links_nodes`: this node is an agent under an SSH head, which sends node 0's address
    with its go and links the nodes itself (so no node hosts a store for the others).
    """
    program = program_of(options)
    options, detected = with_cluster_defaults(options, facts.environ)
    nnodes = parse_nnodes(options.nnodes or "1")
    node_rank = 0 if options.node_rank is None else options.node_rank
    validate_topology(nnodes, node_rank)
    check_limits(options, nnodes)
    gpu_ids = parse_gpu_ids(options.gpu_ids) if options.gpu_ids is not None else None
    extra_env = parse_env_assignments(options.env, gpu_ids_given=gpu_ids is not None)
    # What the workers will really see: --env CUDA_VISIBLE_DEVICES wins over the inherited one.
    cvd = dict(extra_env).get("CUDA_VISIBLE_DEVICES", facts.environ.get("CUDA_VISIBLE_DEVICES"))
    visible = visible_gpus(facts.gpus, cvd)  # `auto` counts what CUDA would show, as torchrun does
    nproc = resolve_nproc(options.nproc, gpu_ids=gpu_ids, gpu_count=len(visible), cpu_count=facts.cpu_count)
    devices: DeviceMap = (
        map_gpu_ids(gpu_ids, facts.gpus, cvd) if gpu_ids else default_device_map(nproc, facts.gpus, cvd)
    )
    master_addr, port = rendezvous_address(options, nnodes, from_head=head_links_nodes)
    inputs = PlanInputs(
        program=program,
        nproc=nproc,
        master_addr=master_addr,
        master_port=port or 0,
        run_id=options.run_id or os.urandom(8).hex(),
        python=sys.executable,
        hostname=facts.hostname,
        cpu_count=facts.cpu_count,
        devices=devices,
        base_env=facts.environ,
        nnodes=nnodes,
        node_rank=node_rank,
        extra_env=extra_env,
        max_restarts=options.max_restarts,
        local_rank_arg=options.local_rank_arg,
        error_dir=error_dir,
        job_id=os.urandom(8).hex(),
        # Nodes started by hand meet at node 0's store, which the workers reuse. Over SSH the
        # head links the nodes, and rank 0 hosts the workers' store (env://, as on one node).
        agent_store=nnodes > 1 and not head_links_nodes,
        terminal=facts.terminal,
    )
    shown = parse_ranks(options.ranks, nnodes * nproc) if options.ranks else None
    rank_given = options.node_rank is not None or nnodes == 1
    return Decision(inputs, port is not None, shown, options.log_dir or None, rank_given, detected)


def with_cluster_defaults(options: Options, environ: dict[str, str]) -> tuple[Options, tuple[str, ...]]:
    """Under srun or mpirun, fill the topology flags the user left out; explicit flags win."""
    from launcher.detect import describe, detect_cluster

    found = detect_cluster(environ)
    if found is None or found.nnodes is None:
        return options, ()  # a stray MASTER_ADDR in a shell is not a cluster
    no_address = options.master_addr is None and options.rdzv_endpoint is None and found.master_addr is None
    if no_address and found.nnodes > 1:
        raise LaunchError(
            f"{found.source} gives this node its rank ({found.nnodes} nodes) but not node 0's address: "
            "pass --master-addr with the first host of the job (e.g. --master-addr node01), or export "
            "MASTER_ADDR to every task (mpirun -x MASTER_ADDR=node01)."
        )
    filled = replace(
        options,
        nnodes=options.nnodes if options.nnodes is not None else str(found.nnodes),
        node_rank=options.node_rank if options.node_rank is not None else found.node_rank,
        master_addr=options.master_addr if options.master_addr is not None else found.master_addr,
        master_port=options.master_port if options.master_port is not None else found.master_port,
    )
    if options.rdzv_endpoint is not None:  # the endpoint is an explicit address too
        filled = replace(filled, master_addr=options.master_addr, master_port=options.master_port)
    given = {
        "--nnodes": (options.nnodes, found.nnodes),
        "--node-rank": (options.node_rank, found.node_rank),
        "--master-addr": (options.master_addr, found.master_addr),
        "--master-port": (options.master_port, found.master_port),
        "--rdzv-endpoint": (options.rdzv_endpoint, None),
    }
    overridden = [
        f"{flag} {mine}" + (f" (detected {theirs})" if theirs is not None else "")
        for flag, (mine, theirs) in given.items()
        if mine is not None
    ]
    lines = describe(found)
    if overridden:
        lines.append("given on the command line, and winning over detection: " + ", ".join(overridden))
    return filled, tuple(lines)


def check_limits(options: Options, nnodes: int) -> None:
    if options.standalone and nnodes != 1:
        raise LaunchError(f"--standalone is a one-node launch; drop it or drop --nnodes {nnodes}.")
    if options.max_restarts < 0:
        raise LaunchError(f"--max-restarts {options.max_restarts}: use 0 (no restart) or more.")
    if not math.isfinite(options.grace) or options.grace < 0:
        raise LaunchError(f"--grace {options.grace:g}: use a number of seconds, 0 or more (e.g. --grace 30).")
    if not math.isfinite(options.join_timeout) or options.join_timeout <= 0:
        raise LaunchError(
            f"--join-timeout {options.join_timeout:g}: use a number of seconds above 0 (e.g. --join-timeout 600)."
        )
    if options.master_addr is not None and not options.master_addr.strip():
        raise LaunchError("--master-addr is empty: give node 0's host name or IP address, or leave it out on one node.")
    port = options.master_port
    if port is not None and not 1 <= port <= 65535:
        raise LaunchError(f"--master-port {port} is not a TCP port; use 1-65535, or leave it out.")


def rendezvous_address(options: Options, nnodes: int, *, from_head: bool = False) -> tuple[str, int | None]:
    """MASTER_ADDR and MASTER_PORT; a port of None means: pick a free one per attempt."""
    addr, port = options.master_addr, options.master_port
    if options.rdzv_endpoint is not None:
        addr, port = merge_endpoint(options.rdzv_endpoint, addr, port)
    if addr is None and from_head:
        addr = HEAD_SENDS_ADDRESS
    if addr is None and nnodes > 1:
        raise LaunchError(
            f"--nnodes {nnodes} needs --master-addr (or --rdzv-endpoint HOST:PORT): the address "
            "of node 0 that every node can reach (e.g. --master-addr 10.0.0.1). Run the same "
            "command on each node, with its own --node-rank or none (ranks then follow arrival)."
        )
    if port is None and nnodes > 1:
        port = MULTI_NODE_DEFAULT_PORT
    return addr or SINGLE_NODE_MASTER_ADDR, port


def merge_endpoint(endpoint: str, addr: str | None, port: int | None) -> tuple[str, int | None]:
    """--rdzv-endpoint HOST[:PORT], torchrun's spelling; it must agree with --master-addr/port."""
    host, port_text = split_host_port(endpoint)
    endpoint_port = tcp_port(port_text) if port_text is not None else None
    if not host or (port_text is not None and endpoint_port is None):
        raise LaunchError(
            f"--rdzv-endpoint {endpoint!r} is not HOST or HOST:PORT (port 1-65535), "
            "e.g. --rdzv-endpoint 10.0.0.1:29500."
        )
    if addr is not None and addr != host:
        raise LaunchError(f"--rdzv-endpoint {endpoint} and --master-addr {addr} disagree; give one of them.")
    if port is not None and endpoint_port is not None and port != endpoint_port:
        raise LaunchError(f"--rdzv-endpoint {endpoint} and --master-port {port} disagree; give one of them.")
    return host, port if port is not None else endpoint_port


# -- running ---------------------------------------------------------------------------------
