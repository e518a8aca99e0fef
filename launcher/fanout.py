"""An SSH launch, planned: the hosts, what each one runs, which variables cross (pure).

launch_on_hosts turns the options into that plan and hands it to the head (ddplaunch.head),
which connects, starts the agents and shows them all.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ddplaunch.errors import LaunchError
from ddplaunch.hosts import HostSpec, parse_hosts_flag, read_hostfile
from ddplaunch.plan import is_plain_int
from ddplaunch.secrets import shown

if TYPE_CHECKING:
    from collections.abc import Callable

    from ddplaunch.options import Options
    from ddplaunch.ship import AgentPlace
    from ddplaunch.ssh import SshTarget
    from ddplaunch.sync import SyncSource

    Shows = Callable[[int, int], bool]  # logs.Printer's per-(rank, stream) terminal filter

# Forwarded from the head to every remote worker unless --env sets them: the knobs of the
# communication libraries and of torch, which users set once in their shell.
FORWARDED_PREFIXES = ("NCCL_", "TORCH_", "PYTORCH_", "GLOO_", "UCX_", "FI_", "HF_", "WANDB_")
FORWARDED_NAMES = ("OMP_NUM_THREADS", "PYTHONPATH", "CUDA_LAUNCH_BLOCKING")
NO_DIR, NO_PYTHON, NO_AGENT = 120, 121, 122  # exit codes of the remote preflight shell line
# Flags the head hands to every agent unchanged (value-taking ones, then switches).
PASSED_OPTIONS = (
    "max_restarts", "grace", "join_timeout", "master_port", "role", "signals_to_handle", "numa_binding", "stdin",
    "heartbeat_timeout", "kill_timeout", "warm_modules",
)
PASSED_SWITCHES = (
    "module", "no_python", "run_path", "local_rank_arg", "virtual_local_rank", "force", "no_stack_bootstrap", "warm",
)
# What the head cannot do yet: it shows every host's lines by rank only, and each host has its own address.
NOT_WITH_HOSTS = {
    "local_addr": "--local-addr names one node; with --hosts each host is reached at its own address "
    "(use --master-addr to choose node 0's)",
    "duplicate_stdout_filters": "--duplicate-stdout-filters does not work with --hosts yet",
    "duplicate_stderr_filters": "--duplicate-stderr-filters does not work with --hosts yet",
}


@dataclass
class Host:
    """One host of the job: its node rank, where to reach it, and its workers (when known here)."""

    node_rank: int
    spec: HostSpec
    target: SshTarget
    nproc: int | None = None

    @property
    def name(self) -> str:
        return self.spec.host


# -- planning (pure) ------------------------------------------------------------------------------


def forwarded_env(environ: dict[str, str], explicit: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The head's variables every remote worker gets (sorted), then --env, which wins."""
    chosen = {
        key: value
        for key, value in environ.items()
        if key.startswith(FORWARDED_PREFIXES) or key in FORWARDED_NAMES
    }
    chosen.update(dict(explicit))
    return sorted(chosen.items())


def per_host_nproc(specs: Sequence[HostSpec], nproc: str | None) -> int | None:
    """Workers per host, where the head can know it: --nproc N wins; else a hostfile's slots,
    which must agree (RANK = node * nproc + local). None for auto/gpu/cpu, which each agent
    resolves on its own host."""
    if nproc is not None:
        return int(nproc) if is_plain_int(nproc.strip()) else None
    slots = {spec.slots or (len(spec.gpus) if spec.gpus else None) for spec in specs}
    slots.discard(None)
    if len(slots) > 1:
        listed = ", ".join(f"{s.host} slots={s.slots}" for s in specs)
        raise LaunchError(
            f"--hostfile: every host must run the same number of workers ({listed}); ranks are "
            "node_rank * nproc + local_rank. Give equal slots, or --nproc N for all."
        )
    return slots.pop() if slots else 1


def agent_argv(options: Options, host: Host, nnodes: int) -> list[str]:
    """The agent's command line after the interpreter and its zip: flags only. The workers'
    variables follow on its stdin (frames.env_line), as a command line is readable by every
    user of the host."""
    argv = ["--agent", "--host-name", host.name]
    argv += ["--nnodes", str(nnodes), "--node-rank", str(host.node_rank)]
    if options.nproc is not None:
        argv += ["--nproc", options.nproc]
    elif host.nproc is not None:
        argv += ["--nproc", str(host.nproc)]
    gpu_ids = host.spec.gpus if host.spec.gpus else options.gpu_ids
    if gpu_ids:
        argv += ["--gpu-ids", gpu_ids if isinstance(gpu_ids, str) else ",".join(gpu_ids)]
    for name in PASSED_OPTIONS:
        value = getattr(options, name)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", _exact(value) if isinstance(value, float) else str(value)]
    argv += [f"--{name.replace('_', '-')}" for name in PASSED_SWITCHES if getattr(options, name)]
    argv += ["--stall-timeout", "0"]  # the head sees every rank's output: it watches for a stall, job-wide
    argv += ["--run-id", options.run_id] if options.run_id else []
    return [*argv, options.script, *options.script_args]


FALLBACK_PYTHON = "python3"  # a fresh host has no copy of the head's virtualenv, but has this


def pythons_of(options: Options) -> tuple[str, ...]:
    """The interpreters a host tries, first found wins: --python's alone; else the head's own
    path (the same virtualenv on a shared filesystem or a cloned machine), then python3."""
    if options.python:
        return (options.python,)
    return (sys.executable,) if sys.executable == FALLBACK_PYTHON else (sys.executable, FALLBACK_PYTHON)


def python_of(options: Options) -> str:
    """The interpreters a host tries, in words (for errors): "/venv/bin/python or python3"."""
    return " or ".join(pythons_of(options))


def _exact(value: float) -> str:
    """A float as the agent must read it back: short where that is exact ("5", not "5.0"),
    else every digit ("{:g}" keeps six: --grace 0.1234567 became 0.123457)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def remote_command(pythons: Sequence[str], agent: AgentPlace, argv: Sequence[str], workdir: str) -> str:
    """One shell line: check the directory, an interpreter (the first of `pythons` found) and
    the shipped agent (a file of its name and size in the cache, else NO_AGENT: the head
    uploads it and runs this again), then become the agent. One round trip when it is cached."""
    q = shlex.quote
    zip_path = agent.shell_path  # no shell variable of ours: a login shell may be fish
    found = [f"command -v {q(python)} >/dev/null 2>&1" for python in pythons]
    run = f"{zip_path} {' '.join(q(arg) for arg in argv)}"
    *first, last = pythons
    return (
        f"cd -- {q(workdir)} 2>/dev/null || exit {NO_DIR}; "
        f"{' || '.join(found)} || exit {NO_PYTHON}; "
        f'[ "$(wc -c 2>/dev/null <{zip_path})" -eq {agent.size} ] 2>/dev/null || exit {NO_AGENT}; '
        + "".join(f"{check} && exec {q(python)} {run}; " for check, python in zip(found, first))
        + f"exec {q(last)} {run}"
    )


def preflight_problem(
    name: str, status: int | None, printed: Sequence[str], workdir: str, python: str, agent: str = "the agent's zip"
) -> str:
    """Why an agent ended before saying ready (its exit status, what it printed), in words
    that name the host and the fix."""
    from ddplaunch.ship import MIN_PYTHON, OLD_PYTHON

    said = "\n".join(line for line in printed if line.strip())
    if status == NO_DIR:
        return f"{name}: working directory {workdir} does not exist there; create it or pass --chdir DIR."
    if status == NO_PYTHON:
        return f"{name}: no Python at {python}; install Python 3.10 or newer there or pass --python PATH."
    if status == NO_AGENT:
        return (f"{name}: ddplaunch's agent is still not at {agent} after it was sent there; check that the folder "
                "is writable and not full, or set DDPLAUNCH_AGENT_CACHE on this host to another folder of that host.")
    if status == OLD_PYTHON and said:
        return f"{name}: {said}"
    if any(mark in said for mark in ("No module named", "can't find '__main__' module", "zipimport", "BadZipFile")):
        return (f"{name}: ddplaunch's agent (sent to {agent}) cannot run with {python}: {said.splitlines()[-1]}. "
                f"Pass --python PATH to a Python {'.'.join(map(str, MIN_PYTHON))} or newer that can, or delete "
                "that file there to have it sent again.")
    said = re.sub(r"^ddplaunch: error: ", "", said)
    return f"{name}: {said or f'the agent exited with status {status} before it was ready'}"


# -- running --------------------------------------------------------------------------------------


def launch_on_hosts(options: Options) -> int:
    from dataclasses import replace

    from ddplaunch.decide import grace_of, notes_of, role_of
    from ddplaunch.head import Head
    from ddplaunch.options import parse_signals, parse_stdin, stall_of
    from ddplaunch.plan import parse_env_assignments

    hosts = plan_hosts(options)
    role_of(options)  # checked here once, rather than by every host
    stall_of(options)  # the head watches for a stall (its agents do not)
    if options.signals_to_handle is not None:
        parse_signals(options.signals_to_handle)
    shown_ranks, shows = head_filter(options, hosts)
    stdin_rank = parse_stdin(options.stdin, world_size_of(hosts) or 1 << 30)  # else each agent checks it
    # The agents do not see this shell's TORCH_ELASTIC_SHUTDOWN_TIMEOUT: resolve it here.
    options = replace(options, run_id=options.run_id or os.urandom(8).hex(), grace=grace_of(options, dict(os.environ)))
    for note in notes_of(options):
        print(f"ddplaunch: {note}", file=sys.stderr, flush=True)
    explicit = parse_env_assignments(options.env, gpu_ids_given=options.gpu_ids is not None)
    env = forwarded_env(dict(os.environ), [*head_terminal_env(options, hosts, explicit), *explicit])
    from ddplaunch.sync import script_for_copy, source_of

    sync = source_of(options, dict(os.environ), os.getcwd())
    workdir = options.chdir or os.getcwd()
    if sync is not None:
        options = replace(options, script=script_for_copy(options, sync))
        workdir = sync.remote_dir
    if options.dry_run:
        sync_lines = dry_run_sync(options, hosts, sync) if sync is not None else []
        print(render_hosts(options, hosts, env, workdir, stdin_rank, sync_lines), end="")
        return 0
    if shows is not None and options.log_dir is None:
        from ddplaunch.roles import temp_log_dir

        log_dir, note = temp_log_dir("--redirects keeps output off the terminal")
        print(f"ddplaunch: {note}", file=sys.stderr, flush=True)
        options = replace(options, log_dir=log_dir)
    return Head(options, hosts, env, workdir, shown_ranks, shows, sync).run()


def dry_run_sync(options: Options, hosts: Sequence[Host], sync: SyncSource) -> list[str]:
    """What --sync would send to each host: the one part of a dry run that contacts them
    (over SSH, reading only the record each copy keeps of itself)."""
    from ddplaunch.head import connect
    from ddplaunch.sync import dry_run_lines, peek_hosts

    agents = connect(hosts, lambda event: None, accept_new_host_keys=options.ssh_accept_new_host_keys)
    try:
        return dry_run_lines(sync, peek_hosts([(h.name, a.open_sftp) for h, a in zip(hosts, agents)], sync))
    finally:
        for agent in agents:
            agent.close()


def head_terminal_env(options: Options, hosts: Sequence[Host], explicit: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The head's terminal, for remote workers: their lines reach it, not the agent's SSH channel."""
    from ddplaunch.decide import read_terminal
    from ddplaunch.plan import terminal_env

    terminal = read_terminal(options.no_color, os.environ)
    given = {*os.environ, *(key for key, _ in explicit)}
    return sorted(terminal_env(terminal, prefixed_world_size(hosts), given).items())


def prefixed_world_size(hosts: Sequence[Host]) -> int:
    """What the head's printer sizes the rank prefixes by: two digits when agents pick nproc."""
    return world_size_of(hosts) or 100


def world_size_of(hosts: Sequence[Host]) -> int | None:
    """Known on the head when every host's worker count is a number (not auto/gpu/cpu)."""
    counts = {h.nproc for h in hosts}
    if len(counts) != 1 or None in counts:
        return None
    (nproc,) = counts
    assert nproc is not None
    return len(hosts) * nproc


def head_filter(options: Options, hosts: Sequence[Host]) -> tuple[frozenset[int] | None, Shows | None]:
    """What the head's terminal shows: the global ranks (--ranks, --local-ranks-filter), and per
    stream when --redirects keeps some off it (None: every stream of a shown rank)."""
    from ddplaunch.decide import terminal_filter
    from ddplaunch.options import parse_ranks

    world = world_size_of(hosts)
    if world is None:
        torchrun_filters = [flag for flag, given in (("--local-ranks-filter", options.local_ranks_filter),
                                                     ("--redirects", options.redirects)) if given]
        if torchrun_filters:
            raise LaunchError(
                f"{' and '.join(torchrun_filters)} with --hosts need the workers per host: give --nproc N."
            )
        return (parse_ranks(options.ranks, 1 << 30) if options.ranks else None), None
    terminal = terminal_filter(options, len(hosts), world // len(hosts))
    return terminal.shown_ranks(world), (terminal.shows if terminal.hides_streams() else None)


def plan_hosts(options: Options) -> list[Host]:
    from ddplaunch.ssh import resolve_target

    if options.hosts is not None and options.hostfile is not None:
        raise LaunchError("--hosts and --hostfile both name the hosts; give one of them.")
    check_for_hosts(options)
    for flag, given in (("--nnodes", options.nnodes), ("--node-rank", options.node_rank),
                        ("--rdzv-endpoint", options.rdzv_endpoint)):
        if given is not None:
            raise LaunchError(
                f"{flag} does not go with --hosts/--hostfile: the host list sets the nodes and their "
                "order. Drop it (or drop the host list and start each node by hand)."
            )
    specs = read_hostfile(options.hostfile) if options.hostfile else parse_hosts_flag(options.hosts or "")
    nproc = per_host_nproc(specs, options.nproc)
    return [
        Host(rank, spec, resolve_target(spec.host, spec.user, spec.port), nproc)
        for rank, spec in enumerate(specs)
    ]


def check_for_hosts(options: Options) -> None:
    """The options the head cannot honour yet are refused before any host is contacted."""
    for name, why in NOT_WITH_HOSTS.items():
        if getattr(options, name):
            raise LaunchError(f"{why}. Drop it, or start each node by hand.")


def render_hosts(
    options: Options, hosts: Sequence[Host], env: Sequence[tuple[str, str]], workdir: str, stdin_rank: int | None,
    sync_lines: Sequence[str] = (),
) -> str:
    lines = [
        "ddplaunch dry run: nothing was started; the hosts were only read, for --sync (below)." if sync_lines else
        "ddplaunch dry run: nothing was started, no host was contacted.",
        f"job: {len(hosts)} host(s); node rank follows host order; MASTER_ADDR: "
        f"{options.master_addr or 'the first host, as the head reaches it'}; MASTER_PORT: "
        f"{options.master_port or 'picked free on the first host'}",
        "stdin: none (--stdin none): every rank reads /dev/null" if stdin_rank is None else
        f"stdin: forwarded from here to rank {stdin_rank} on its host; the other ranks read /dev/null",
        "",
        "node  host  ssh",
    ]
    lines += [f"{h.node_rank:<4}  {h.name}  {h.target.label}" for h in hosts]
    lines += ["", "environment forwarded to every remote worker (NCCL_*, TORCH_*, ... and --env):"]
    lines += [f"  {shown(key, value)}" for key, value in env] or ["  (none)"]
    lines += ["", "command run on each host over SSH (node 0 shown; the environment above follows on its stdin):"]
    from ddplaunch.ship import build_agent_zip, place_of

    place = place_of(build_agent_zip(), dict(os.environ))
    lines.append("  " + remote_command(pythons_of(options), place, agent_argv(options, hosts[0], len(hosts)), workdir))
    lines.append(f"  (the agent is this ddplaunch's own code, sent once to {place.shown} on each host)")
    lines += sync_lines
    return "\n".join(lines) + "\n"
