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

from ddplaunch.devices import (
    DeviceMap,
    Gpu,
    default_device_map,
    discover_gpus,
    map_gpu_ids,
    parse_gpu_ids,
    visible_gpus,
)
from ddplaunch.errors import GpuDiscoveryError, LaunchError
from ddplaunch.options import (
    DEFAULT_GRACE_S,
    DEFAULT_JOIN_TIMEOUT_S,
    SHUTDOWN_TIMEOUT_VARIABLE,
    Options,
    Stall,
    StdSpec,
    TerminalFilter,
    check_rdzv_backend,
    parse_filters,
    parse_local_ranks,
    parse_nnodes,
    parse_rdzv_conf,
    parse_ranks,
    parse_signals,
    parse_stdin,
    parse_std,
    seconds,
    split_host_port,
    stall_of,
)
from ddplaunch.plan import (
    FORWARDED_SIGNALS,
    ROLE_NAME,
    PlanInputs,
    Program,
    Terminal,
    is_plain_int,
    parse_env_assignments,
    resolve_nproc,
    tcp_port,
    validate_topology,
)

SINGLE_NODE_MASTER_ADDR = "127.0.0.1"
MULTI_NODE_DEFAULT_PORT = 29500  # torchrun's default, so existing multi-node recipes carry over
C10D_DEFAULT_PORT = 29400  # torchrun's for a c10d endpoint without a port
HEAD_SENDS_ADDRESS = "-"  # an agent's placeholder: the head sends node 0's address with its go
WORKERS_PER_CPU = 4  # beyond this many per usable CPU (and per GPU), --nproc needs --force
# torchrun's options that mean nothing here, and why; each given one gets a note.
IGNORED_OPTIONS = {
    "monitor_interval": "the launcher wakes on events, not on a timer",
    "start_method": "workers always start as new processes, like torchrun's spawn",
    "event_log_handler": "the launcher's events go to launcher.log in --log-dir",
    "logs_specs": "worker output goes to rankN.log in --log-dir",
}


@dataclass(frozen=True)
class Facts:
    """What the plan needs from the machine, read once."""

    environ: dict[str, str]
    cpu_count: int
    hostname: str
    gpus: tuple[Gpu, ...]
    sysfs: str = "/sys"  # DDPLAUNCH_SYSFS: a fake machine's tree, for tests of --numa-binding
    terminal: Terminal | None = None


def program_of(options: Options, pythonpath: str | None = None) -> Program:
    """What each worker runs; checked here, so a typo fails before anything starts.

    `pythonpath`: the workers' PYTHONPATH, where `-m` looks besides this directory.
    """
    if options.module and options.no_python:
        raise LaunchError("-m/--module and --no-python exclude each other: choose one.")
    if options.run_path:  # before --no-python, which it overrides in torchrun
        if options.module:
            raise LaunchError("--run-path runs a file and -m/--module a module: choose one.")
        return Program("run-path", _python_file(options.script, "--run-path: SCRIPT"), options.script_args)
    if options.module:
        _check_module(options.script, pythonpath)
        return Program("module", options.script, options.script_args)
    if options.no_python:
        if not _is_executable(options.script):
            raise LaunchError(
                f"--no-python: {options.script!r} is not an executable file or a command on "
                "PATH. Check the name, or drop --no-python to run a Python script."
            )
        return Program("exec", options.script, options.script_args)
    return Program("script", _python_file(options.script, "SCRIPT"), options.script_args)


def _python_file(path: str, what: str) -> str:
    """A file Python can run: a script, or a folder (or zip) with a __main__.py, as `python` takes."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "__main__.py")):
            return path
        raise LaunchError(
            f"{what} {path!r} is a directory (with no __main__.py), not a Python file. Give the "
            f"script in it (e.g. {os.path.join(path, 'train.py')}), or -m for a package."
        )
    if not os.path.isfile(path):
        raise LaunchError(
            f"{what} {path!r} not found (looked in {os.getcwd()}). Give the path of "
            "a Python file, use -m for a module, or --no-python for an executable."
        )
    return path


def _check_module(name: str, pythonpath: str | None) -> None:
    """`-m NAME` must exist where the workers will look; no module is imported to find out."""
    from ddplaunch.modules import find_module, worker_sys_path

    found = find_module(name, worker_sys_path(os.getcwd(), pythonpath, sys.path))
    if found.verdict == "missing":
        raise LaunchError(
            f"-m {name}: {found.missing} (looked in {os.getcwd()}, PYTHONPATH and {sys.executable}'s "
            "site-packages). Check the name, run from the directory that holds the package, or "
            "give a file path without -m."
        )


def _is_executable(name: str) -> bool:
    import shutil

    if os.sep in name:
        return os.path.isfile(name) and os.access(name, os.X_OK)
    return shutil.which(name) is not None


def gather_facts(options: Options) -> Facts:
    wants_gpus = (
        options.gpu_ids is not None
        or options.numa_binding is not None
        or (options.nproc or "").strip().lower() in ("auto", "gpu")
    )
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
        sysfs=os.environ.get("DDPLAUNCH_SYSFS", "/sys"),
        terminal=None if options.agent else read_terminal(options.no_color, os.environ),
    )


def numa_sets(mode: str | None, nproc: int, facts: Facts, cuda_visible_devices: str | None) -> tuple[frozenset[int], ...]:
    """--numa-binding: per local rank, the CPUs near its GPU; () when not asked for."""
    if mode is None:
        return ()
    from ddplaunch.numa import cpus_for_workers  # only with --numa-binding

    return cpus_for_workers(mode, nproc, facts.gpus, cuda_visible_devices, sysfs=facts.sysfs)


def read_terminal(no_color: bool, environ: Mapping[str, str]) -> Terminal | None:
    """The terminal our output reaches (stderr's, where progress bars go, else stdout's), if any."""
    from ddplaunch.logs import terminal_colour

    for fd in (2, 1):
        try:
            if os.isatty(fd):
                columns, lines = os.get_terminal_size(fd)
                break
        except OSError:
            continue
    else:
        return None
    colour = terminal_colour(no_color, environ)
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
    terminal: TerminalFilter  # which ranks and streams reach the terminal
    log_dir: str | None
    node_rank_given: bool = True
    detected: tuple[str, ...] = ()  # what came from a cluster's environment, for --dry-run
    grace: float = DEFAULT_GRACE_S
    join_timeout: float = DEFAULT_JOIN_TIMEOUT_S
    duplicates: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())  # --duplicate-std{out,err}-filters
    notes: tuple[str, ...] = ()  # one line each, said before the workers start
    files_wanted: str | None = None  # why files are needed though --log-dir was not given
    stall: Stall = Stall()
    stack_bootstrap: bool = True  # put the stack bootstrap into the workers (--no-stack-bootstrap: not)
    warm: tuple[str, ...] | None = None  # --warm's modules; None: every worker starts cold


def decide(options: Options, facts: Facts, error_dir: str | None, *, head_links_nodes: bool = False) -> Decision:
    """Validate the options against the machine's facts; raise LaunchError on any mistake.

    `head_links_nodes`: this node is an agent under an SSH head, which sends node 0's address
    with its go and links the nodes itself (so no node hosts a store for the others).
    """
    options, detected = with_cluster_defaults(options, facts.environ)
    nnodes = parse_nnodes(options.nnodes or "1")
    node_rank = 0 if options.node_rank is None else options.node_rank
    validate_topology(nnodes, node_rank)
    check_limits(options, nnodes)
    gpu_ids = parse_gpu_ids(options.gpu_ids) if options.gpu_ids is not None else None
    extra_env = parse_env_assignments(options.env, gpu_ids_given=gpu_ids is not None)
    program = program_of(options, dict(extra_env).get("PYTHONPATH", facts.environ.get("PYTHONPATH")))
    # What the workers will really see: --env CUDA_VISIBLE_DEVICES wins over the inherited one.
    cvd = dict(extra_env).get("CUDA_VISIBLE_DEVICES", facts.environ.get("CUDA_VISIBLE_DEVICES"))
    visible = visible_gpus(facts.gpus, cvd)  # `auto` counts what CUDA would show, as torchrun does
    nproc = resolve_nproc(options.nproc, gpu_ids=gpu_ids, gpu_count=len(visible), cpu_count=facts.cpu_count)
    check_capacity(nproc, facts.cpu_count, max(len(visible), len(gpu_ids or ())), force=options.force)
    devices: DeviceMap = (
        map_gpu_ids(gpu_ids, facts.gpus, cvd) if gpu_ids else default_device_map(nproc, facts.gpus, cvd)
    )
    workers_cvd = devices.cuda_visible_devices if devices.cuda_visible_devices is not None else cvd
    cpus = numa_sets(options.numa_binding, nproc, facts, workers_cvd)
    master_addr, port = rendezvous_address(options, nnodes, from_head=head_links_nodes)
    inputs = PlanInputs(
        program=program,
        nproc=nproc,
        master_addr=master_addr,
        master_port=port or 0,
        run_id=options.run_id or os.urandom(8).hex(),
        python=sys.executable,
        hostname=options.local_addr or facts.hostname,
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
        role=role_of(options),
        signals_to_handle=parse_signals(options.signals_to_handle) if options.signals_to_handle else FORWARDED_SIGNALS,
        virtual_local_rank=options.virtual_local_rank,
        cpus=cpus,
        terminal=facts.terminal,
        stdin_rank=parse_stdin(options.stdin, nnodes * nproc),
    )
    terminal = terminal_filter(options, nnodes, nproc)
    duplicates = (parse_filters(options.duplicate_stdout_filters or ""), parse_filters(options.duplicate_stderr_filters or ""))
    rank_given = options.node_rank is not None or nnodes == 1
    return Decision(
        inputs, port is not None, terminal, options.log_dir or None, rank_given, detected,
        grace=grace_of(options, facts.environ),
        join_timeout=join_timeout_of(options),
        duplicates=duplicates,
        notes=notes_of(options) + warm_notes(options),
        files_wanted=None if options.log_dir else files_wanted(terminal, duplicates),
        stall=stall_of(options),
        stack_bootstrap=not options.no_stack_bootstrap,
        warm=warm_of(options),
    )


def warm_of(options: Options) -> tuple[str, ...] | None:
    """--warm's modules, or None when the job starts cold (warm_notes says why)."""
    from ddplaunch.warm import DEFAULT_MODULES, parse_modules

    if options.warm_modules is not None and not options.warm:
        raise LaunchError(f"--warm-modules {options.warm_modules} means nothing without --warm: add --warm, or drop it.")
    if not options.warm or warm_cold_reason(options) is not None:
        return None
    if options.warm_modules is None:
        return DEFAULT_MODULES
    try:
        return parse_modules(options.warm_modules)
    except ValueError as bad:
        raise LaunchError(
            f"--warm-modules {options.warm_modules}: {str(bad)!r} is not a module name. Give "
            "importable names separated by commas, e.g. --warm-modules torch,numpy."
        ) from None


def warm_cold_reason(options: Options) -> str | None:
    if options.no_python:
        return "--no-python runs an executable, not Python"
    if options.run_path:
        return "--run-path is not supported warm yet"
    return None


def warm_notes(options: Options) -> tuple[str, ...]:
    why = warm_cold_reason(options) if options.warm else None
    return () if why is None else (f"--warm: {why}; starting the workers cold",)


def role_of(options: Options) -> str:
    if options.role is None:
        return ROLE_NAME
    if not options.role.strip():
        raise LaunchError("--role is empty: give the workers' role name (ROLE_NAME), e.g. --role trainer.")
    return options.role


def terminal_filter(options: Options, nnodes: int, nproc: int) -> TerminalFilter:
    """--ranks (global), --local-ranks-filter (local, every node), --redirects and --tee."""
    return TerminalFilter(
        nproc,
        ranks=parse_ranks(options.ranks, nnodes * nproc) if options.ranks else None,
        local_ranks=parse_local_ranks(options.local_ranks_filter, nproc) if options.local_ranks_filter else None,
        redirects=parse_std(options.redirects, "--redirects") if options.redirects else StdSpec(),
        tee=parse_std(options.tee, "--tee") if options.tee else StdSpec(),
    )


def files_wanted(terminal: TerminalFilter, duplicates: tuple[tuple[str, ...], ...]) -> str | None:
    """Why this launch needs log files though --log-dir was not given (torchrun makes a temporary
    directory then); None if it does not. --tee alone needs none: the terminal shows it all."""
    if terminal.hides_streams():
        return "--redirects keeps output off the terminal"
    if any(duplicates):
        return "--duplicate-stdout/stderr-filters copy lines to a file"
    return None


def grace_of(options: Options, environ: dict[str, str]) -> float:
    """--grace / --shutdown-timeout, else TORCH_ELASTIC_SHUTDOWN_TIMEOUT (torchrun's), else 30 s."""
    if options.grace is not None:
        return options.grace
    text = environ.get(SHUTDOWN_TIMEOUT_VARIABLE)
    return DEFAULT_GRACE_S if not text else seconds(text, SHUTDOWN_TIMEOUT_VARIABLE, above_zero=False)


def join_timeout_of(options: Options) -> float:
    """--join-timeout, or --rdzv-conf's join_timeout (torchrun's spelling); they must agree."""
    conf = parse_rdzv_conf(options.rdzv_conf).join_timeout if options.rdzv_conf else None
    given = options.join_timeout
    if given is not None and conf is not None and given != conf:
        raise LaunchError(
            f"--join-timeout {given:g} and --rdzv-conf {options.rdzv_conf} disagree; give one of them."
        )
    return given if given is not None else conf if conf is not None else DEFAULT_JOIN_TIMEOUT_S


def notes_of(options: Options) -> tuple[str, ...]:
    """One line per torchrun option that was given but means nothing here."""
    notes = [
        f"--{name.replace('_', '-')} is torchrun's and has no meaning here ({why}); ignored"
        for name, why in IGNORED_OPTIONS.items()
        if getattr(options, name) is not None
    ]
    ignored = parse_rdzv_conf(options.rdzv_conf).ignored if options.rdzv_conf else ()
    if ignored:
        notes.append(
            f"--rdzv-conf {', '.join(ignored)}: no meaning here (the nodes meet at node 0's TCPStore); ignored"
        )
    return tuple(notes)


def check_capacity(nproc: int, cpu_count: int, gpu_count: int, *, force: bool) -> None:
    """A --nproc far beyond the machine is a typo more often than a plan: it would spawn until
    the machine chokes. --force says it is meant."""
    limit = max(WORKERS_PER_CPU * cpu_count, gpu_count)
    if nproc <= limit or force:
        return
    gpus = f"{gpu_count} GPU(s)" if gpu_count else "no GPU"
    raise LaunchError(
        f"--nproc {nproc} is far more workers than this machine can run: {cpu_count} usable CPU(s) "
        f"and {gpus} (at most {limit}: {WORKERS_PER_CPU} per CPU, or one per GPU). Use a smaller "
        "--nproc, or add --force if you mean it."
    )


def with_cluster_defaults(options: Options, environ: dict[str, str]) -> tuple[Options, tuple[str, ...]]:
    """Under srun or mpirun, fill the topology flags the user left out; explicit flags win."""
    from ddplaunch.detect import describe, detect_cluster

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
    grace, join = options.grace, options.join_timeout
    if grace is not None and (not math.isfinite(grace) or grace < 0):
        raise LaunchError(f"--grace {grace:g} (--shutdown-timeout): use a number of seconds, 0 or more (e.g. 30).")
    if join is not None and (not math.isfinite(join) or join <= 0):
        raise LaunchError(f"--join-timeout {join:g}: use a number of seconds above 0 (e.g. --join-timeout 600).")
    if options.rdzv_backend is not None:
        check_rdzv_backend(options.rdzv_backend)
    if options.local_addr is not None and not options.local_addr.strip():
        raise LaunchError("--local-addr is empty: give this node's host name or IP address, or leave it out.")
    if options.master_addr is not None and not options.master_addr.strip():
        raise LaunchError("--master-addr is empty: give node 0's host name or IP address, or leave it out on one node.")
    port = options.master_port
    if port is not None and not 1 <= port <= 65535:
        raise LaunchError(f"--master-port {port} is not a TCP port; use 1-65535, or leave it out.")


def rendezvous_address(options: Options, nnodes: int, *, from_head: bool = False) -> tuple[str, int | None]:
    """MASTER_ADDR and MASTER_PORT; a port of None means: pick a free one per attempt.

    On one node, --local-addr (this node's address, as torchrun's c10d rendezvous publishes
    it) is MASTER_ADDR unless --master-addr is given.
    """
    addr, port = options.master_addr, options.master_port
    endpoint = options.rdzv_endpoint
    if endpoint is not None:
        addr, port = merge_endpoint(endpoint, addr, port)
        host, port_text = split_host_port(endpoint)
        if port is None and nnodes > 1 and port_text is not None:  # HOST:0
            raise LaunchError(
                f"--rdzv-endpoint {endpoint}: port 0 (a free port) works on one node only, as the "
                f"other nodes cannot know which port node 0 picked. Give a port, e.g. "
                f"--rdzv-endpoint {host}:{MULTI_NODE_DEFAULT_PORT}."
            )
        if port is None and nnodes > 1 and options.rdzv_backend == "c10d":
            port = C10D_DEFAULT_PORT
    if nnodes == 1 and options.local_addr and options.master_addr is None:
        addr = options.local_addr
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
    """--rdzv-endpoint HOST[:PORT], torchrun's spelling; it must agree with --master-addr/port.
    Port 0 means a free port, as in torchrun (`localhost:0`)."""
    host, port_text = split_host_port(endpoint)
    free = port_text is not None and is_plain_int(port_text) and int(port_text) == 0
    endpoint_port = tcp_port(port_text) if port_text is not None and not free else None
    if not host or (port_text is not None and endpoint_port is None and not free):
        raise LaunchError(
            f"--rdzv-endpoint {endpoint!r} is not HOST or HOST:PORT (port 1-65535, or 0 for a free one), "
            "e.g. --rdzv-endpoint 10.0.0.1:29500."
        )
    if addr is not None and addr != host:
        raise LaunchError(f"--rdzv-endpoint {endpoint} and --master-addr {addr} disagree; give one of them.")
    if port is not None and endpoint_port is not None and port != endpoint_port:
        raise LaunchError(f"--rdzv-endpoint {endpoint} and --master-port {port} disagree; give one of them.")
    return host, port if port is not None else endpoint_port


# -- running ---------------------------------------------------------------------------------
