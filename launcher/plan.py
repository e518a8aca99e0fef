"""The pure planning core: inputs in, a frozen plan out (one record per worker).

No environment reads, no I/O: the CLI gathers facts (environment, CPU count, GPUs, a free
port) and passes them in, so every rule here is tested by tables of cases.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from ddplaunch.devices import DeviceMap
from ddplaunch.errors import LaunchError
from ddplaunch.secrets import hidden, looks_secret, shown
from ddplaunch.snapshot import STACK_SIGNAL, STACKS_VARIABLE, bootstrap_dir, stacks_variable

ProgramKind = Literal["script", "module", "exec", "run-path"]

# Inherited by every descendant of a worker, so the guard can find those that left their
# process group (setsid) if the launcher is SIGKILLed. Unique per launcher run.
JOB_ID_VARIABLE = "DDPLAUNCH_JOB_ID"
# The signals the launcher forwards to workers, in torchrun's variable and spelling.
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"

# Set per worker by the launcher; an --env that tries to set one is a mistake.
RANK_VARIABLES = (
    "LOCAL_RANK",
    "RANK",
    "GROUP_RANK",
    "ROLE_RANK",
    "ROLE_NAME",
    "LOCAL_WORLD_SIZE",
    "WORLD_SIZE",
    "GROUP_WORLD_SIZE",
    "ROLE_WORLD_SIZE",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_USE_AGENT_STORE",
    "TORCHELASTIC_ERROR_FILE",
    "TORCHELASTIC_SIGNALS_TO_HANDLE",
    JOB_ID_VARIABLE,
)
_FLAG_FOR = {
    "MASTER_ADDR": "--master-addr",
    "MASTER_PORT": "--master-port",
    "NODE_RANK": "--node-rank",
    "GROUP_RANK": "--node-rank",
    "WORLD_SIZE": "--nproc and --nnodes",
    "LOCAL_WORLD_SIZE": "--nproc",
    "TORCHELASTIC_RUN_ID": "--run-id",
    "TORCHELASTIC_MAX_RESTARTS": "--max-restarts",
    "CUDA_VISIBLE_DEVICES": "--gpu-ids",
}
ROLE_NAME = "default"  # torchrun's, unless --role
# --run-path: torchrun calls runpy.run_path(script) in the worker with sys.argv = [script, *args].
# `python -c` gives the same: sys.path[0] is the working directory, not the script's folder.
RUN_PATH_CODE = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
# Workers write to pipes, so libraries would draw 10-column bars and no colour. At a terminal
# they are told it, unless the user set the variable: rich, pytest, Python 3.13+, loguru (from
# its next release) and many tools read FORCE_COLOR; CLICOLOR_FORCE is the other common
# spelling; PY_COLORS is pytest's and tox's. TTY_INTERACTIVE=0 keeps rich's colour but not its
# cursor-moving live displays, which several ranks would draw over each other.
COLOUR_VARIABLES = (("FORCE_COLOR", "1"), ("CLICOLOR_FORCE", "1"), ("PY_COLORS", "1"), ("TTY_INTERACTIVE", "0"))
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_EXPORT = re.compile(r"^export[ \t]+")  # --env-file lines may be written for a shell
_BLANKS = " \t"
_QUOTES = ("'", '"')


@dataclass(frozen=True)
class Program:
    """What each worker runs: a Python script, a module (-m), an executable (--no-python), or
    a script run by runpy.run_path (--run-path)."""

    kind: ProgramKind
    target: str
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Terminal:
    """The terminal the launcher's output goes to, as the workers should see it through their pipes."""

    columns: int
    lines: int
    colour: bool  # stdout and stderr are terminals, and neither --no-color nor NO_COLOR is set


@dataclass(frozen=True)
class PlanInputs:
    """Everything the plan depends on, gathered by the caller."""

    program: Program
    nproc: int
    master_addr: str
    master_port: int
    run_id: str
    python: str
    hostname: str
    cpu_count: int
    devices: DeviceMap
    base_env: Mapping[str, str] = field(default_factory=dict)
    nnodes: int = 1
    node_rank: int = 0
    extra_env: tuple[tuple[str, str], ...] = ()
    restart_count: int = 0
    max_restarts: int = 0
    local_rank_arg: bool = False
    error_dir: str | None = None
    job_id: str | None = None
    agent_store: bool = False  # multi-node: node 0's agent hosts the TCPStore at MASTER_PORT
    role: str = ROLE_NAME
    signals_to_handle: str = FORWARDED_SIGNALS
    virtual_local_rank: bool = False  # each worker sees only its own GPU, as cuda:0, LOCAL_RANK=0
    cpus: tuple[frozenset[int], ...] = ()  # --numa-binding: per local rank, the CPUs to run on
    terminal: Terminal | None = None  # None: the launcher's output goes to no terminal
    stdin_rank: int | None = 0  # the global rank that reads the launcher's stdin; None: no rank
    stack_dir: str | None = None  # where each worker's stack bootstrap writes; None: no bootstrap


@dataclass(frozen=True)
class Worker:
    """One worker process of this node: who it is, what it runs, what it is told."""

    node_rank: int
    local_rank: int
    global_rank: int
    host: str
    physical_gpu: str
    device: str
    argv: tuple[str, ...]
    env_added: Mapping[str, str]
    error_file: str | None
    cpus: frozenset[int] | None = None  # started bound to these CPUs; None: the launcher's own


@dataclass(frozen=True)
class Plan:
    """The workers of one node, and the job-wide facts the dry run shows."""

    workers: tuple[Worker, ...]
    nnodes: int
    nproc: int
    node_rank: int
    world_size: int
    master_addr: str
    master_port: int
    run_id: str
    restart_count: int
    max_restarts: int
    common_env: Mapping[str, str]
    base_env: Mapping[str, str]
    stdin_rank: int | None = 0  # job-wide; it may be on another node
    stack_dir: str | None = None  # the stack bootstrap's directory (ddplaunch.snapshot); None: off

    @property
    def stdin_worker(self) -> Worker | None:
        """This node's worker that reads the launcher's stdin; the others read /dev/null."""
        return next((w for w in self.workers if w.global_rank == self.stdin_rank), None)

    def environment_of(self, worker: Worker) -> dict[str, str]:
        """The full environment of one worker: the user's, then what the launcher adds."""
        env = dict(self.base_env)
        env.update(worker.env_added)
        if self.stack_dir is not None:
            add_stack_bootstrap(env, self.stack_dir)
        return env


def add_stack_bootstrap(env: dict[str, str], stack_dir: str) -> None:
    """Put the stack bootstrap first on PYTHONPATH. It takes itself out of the worker's
    environment again at start-up, so the script sees what torchrun would give it; the dry
    run says so in a line rather than listing these two variables."""
    had = "PYTHONPATH" in env
    env[STACKS_VARIABLE] = stacks_variable(STACK_SIGNAL, had, stack_dir)
    env["PYTHONPATH"] = bootstrap_dir() + (os.pathsep + env["PYTHONPATH"] if had else "")


def parse_nproc(text: str, *, gpu_count: int, cpu_count: int) -> int:
    """--nproc: a positive int, `auto` (GPUs, else CPUs), `gpu` or `cpu`, as torchrun."""
    value = text.strip().lower()
    if value == "auto":
        return gpu_count if gpu_count > 0 else cpu_count
    if value == "gpu":
        if gpu_count == 0:
            raise LaunchError(
                "--nproc gpu: no GPU found on this machine (nvidia-smi is missing or lists "
                "none). Use --nproc cpu or a number, e.g. --nproc 2."
            )
        return gpu_count
    if value == "cpu":
        return cpu_count
    if not is_plain_int(value) or int(value) < 1:
        raise LaunchError(
            f"--nproc {text!r} is not a number of workers. Use a positive integer "
            "(e.g. --nproc 4), or auto, gpu or cpu."
        )
    return int(value)


def is_plain_int(text: str) -> bool:
    """ASCII digits only: str.isdigit() also accepts '²', which int() then rejects."""
    return text.isascii() and text.isdigit()


def tcp_port(text: str) -> int | None:
    """`text` as a TCP port (plain digits, 1-65535), or None; callers word their own error."""
    return int(text) if is_plain_int(text) and 1 <= int(text) <= 65535 else None


def resolve_nproc(
    text: str | None, *, gpu_ids: tuple[str, ...] | None, gpu_count: int, cpu_count: int
) -> int:
    """Workers per node from --nproc and --gpu-ids; the default is one per listed GPU, else 1."""
    if text is None:
        return len(gpu_ids) if gpu_ids else 1
    if gpu_ids and text.strip().lower() in ("auto", "gpu"):
        return len(gpu_ids)
    nproc = parse_nproc(text, gpu_count=gpu_count, cpu_count=cpu_count)
    if gpu_ids and nproc != len(gpu_ids):
        raise LaunchError(
            f"--nproc {nproc} does not match --gpu-ids {','.join(gpu_ids)} "
            f"({len(gpu_ids)} GPUs): one worker runs per listed GPU. Drop --nproc, "
            f"or list {nproc} GPUs."
        )
    return nproc


EnvPairs = tuple[tuple[str, str], ...]


def parse_env_assignments(pairs: tuple[str, ...], *, gpu_ids_given: bool) -> EnvPairs:
    """--env KEY=VALUE (repeatable): checked here so a typo fails before anything starts.
    (`resolve_env` has turned --env KEY and --env-file into such pairs by the time a launch
    reads them.)"""
    parsed: list[tuple[str, str]] = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not is_env_name(key):
            raise LaunchError(
                f"--env {(shown(key, value) if sep else pair)!r} is not KEY=VALUE. Write it as --env NAME=value "
                "(NAME made of letters, digits and _), e.g. --env NCCL_DEBUG=INFO."
            )
        parsed.append(_checked("--env", key, value, gpu_ids_given))
    return tuple(parsed)


def resolve_env(
    args: tuple[str, ...], files: Sequence[tuple[str, str]], environ: Mapping[str, str], *, gpu_ids_given: bool
) -> EnvPairs:
    """--env-file FILE (each file's text, in order), then --env KEY=VALUE or KEY (this shell's
    KEY, as `docker run -e KEY`): one variable once, the last word wins."""
    chosen: dict[str, str] = {}
    for name, text in files:
        chosen.update(parse_env_file(text, name, gpu_ids_given=gpu_ids_given))
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep and is_env_name(key):
            if key not in environ:
                raise LaunchError(_unset_message(key, environ))
            value = environ[key]
        elif not sep or not is_env_name(key):
            raise LaunchError(
                f"--env {(shown(key, value) if sep else arg)!r} is not KEY=VALUE (nor KEY). Write --env "
                "NAME=value, or --env NAME to forward this shell's NAME (NAME made of letters, digits "
                "and _), e.g. --env NCCL_DEBUG=INFO."
            )
        chosen[key] = _checked("--env", key, value, gpu_ids_given)[1]
    return tuple(chosen.items())


def _unset_message(key: str, environ: Mapping[str, str]) -> str:
    """--env KEY with KEY unset here; `--env "$HF_TOKEN"` (the value, not the name) must not echo it."""
    named = next((name for name, value in environ.items() if value == key and looks_secret(name)), None)
    if named is not None:
        return (
            f"--env {hidden(key)}: that is the value of {named}, not a variable's name, and it is not "
            f"printed here. To forward {named}, write --env {named} (no $)."
        )
    return (
        f"--env {key}: {key} is not set in this shell, so there is nothing to forward. "
        f"Set it (export {key}=...), or give the value: --env {key}=VALUE."
    )


def parse_env_file(text: str, name: str, *, gpu_ids_given: bool = False) -> EnvPairs:
    """An --env-file's text. One variable per line, `NAME=value`:

    - blank lines, and lines whose first non-blank character is `#`, are skipped;
    - `export ` before NAME is allowed (a file a shell can also source); blanks around NAME,
      around `=` and at the ends of the value are dropped;
    - a value wholly in single or double quotes loses them, and what is inside is kept exactly
      (blanks, `#`, the other quote, even the same quote: there are no escapes); a value that
      starts with a quote must end with the same one (a value never spans lines);
    - anything else (an unquoted value) is taken literally: `#` in it is no comment, `$X` is
      not expanded.
    A bad line is an error naming the file and the line, never its value.
    """
    pairs: list[tuple[str, str]] = []
    for number, line in enumerate(text.removeprefix("\ufeff").split("\n"), start=1):
        line = line.removesuffix("\r").strip(_BLANKS)
        if not line or line.startswith("#"):
            continue
        where = f"--env-file {name} line {number}:"
        key, sep, value = _EXPORT.sub("", line, count=1).partition("=")
        key, value = key.strip(_BLANKS), value.strip(_BLANKS)
        if not sep or not is_env_name(key):
            raise LaunchError(
                f"{where} not NAME=value. Write one variable per line as NAME=value (NAME made of "
                "letters, digits and _; `export ` before it is allowed); # starts a comment line."
            )
        if value[:1] in _QUOTES:
            if len(value) < 2 or value[-1] != value[0]:
                raise LaunchError(
                    f"{where} the value of {key} opens a quote ({value[0]}) that the line does not close. "
                    "Close it at the end of the line (a value cannot span lines)."
                )
            value = value[1:-1]
        pairs.append(_checked(where, key, value, gpu_ids_given))
    return tuple(pairs)


def is_env_name(text: str) -> bool:
    """fullmatch: `$` alone would also accept a name ending in a newline."""
    return _ENV_KEY.fullmatch(text) is not None


def _checked(where: str, key: str, value: str, gpu_ids_given: bool) -> tuple[str, str]:
    """A variable a worker may be given: not one ddplaunch sets, and a value an environment can hold."""
    if key in RANK_VARIABLES or (key == "CUDA_VISIBLE_DEVICES" and gpu_ids_given):
        flag = _FLAG_FOR.get(key)
        hint = f"use {flag} instead" if flag else "the launcher sets it for every worker"
        raise LaunchError(f"{where} {key}=... would override a variable ddplaunch sets per worker; {hint}.")
    if "\0" in value:
        raise LaunchError(f"{where} the value of {key} holds a NUL character, which no environment can hold.")
    return key, value


def validate_topology(nnodes: int, node_rank: int) -> None:
    """--nnodes / --node-rank must describe a real position in the job."""
    if nnodes < 1:
        raise LaunchError(f"--nnodes {nnodes}: a job needs at least one node; use --nnodes 1 or more.")
    if not 0 <= node_rank < nnodes:
        raise LaunchError(
            f"--node-rank {node_rank} is outside 0..{nnodes - 1} for --nnodes {nnodes}. "
            "Number the nodes from 0, one distinct rank per node."
        )


def worker_argv(inputs: PlanInputs, local_rank: int) -> tuple[str, ...]:
    """The worker's command line; Python runs unbuffered (-u) so prints arrive at once."""
    program = inputs.program
    extra = (f"--local-rank={local_rank}",) if inputs.local_rank_arg else ()
    if program.kind == "exec":
        return (program.target, *extra, *program.args)
    if program.kind == "module":
        return (inputs.python, "-u", "-m", program.target, *extra, *program.args)
    if program.kind == "run-path":
        return (inputs.python, "-u", "-c", RUN_PATH_CODE, program.target, *extra, *program.args)
    return (inputs.python, "-u", program.target, *extra, *program.args)


def common_env(inputs: PlanInputs) -> dict[str, str]:
    """The variables every worker of this node shares, in torchrun's order."""
    world_size = inputs.nnodes * inputs.nproc
    env = {
        "GROUP_RANK": str(inputs.node_rank),
        "NODE_RANK": str(inputs.node_rank),
        "ROLE_NAME": inputs.role,
        "LOCAL_WORLD_SIZE": str(inputs.nproc),
        "WORLD_SIZE": str(world_size),
        "GROUP_WORLD_SIZE": str(inputs.nnodes),
        "ROLE_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": inputs.master_addr,
        "MASTER_PORT": str(inputs.master_port),
        "TORCHELASTIC_RESTART_COUNT": str(inputs.restart_count),
        "TORCHELASTIC_MAX_RESTARTS": str(inputs.max_restarts),
        "TORCHELASTIC_RUN_ID": inputs.run_id,
        # One node: rank 0 hosts the TCPStore, as with env:// anywhere. Several: node 0's
        # agent hosts it and every worker is a client, exactly as under torchrun.
        "TORCHELASTIC_USE_AGENT_STORE": str(inputs.agent_store),
        "TORCHELASTIC_SIGNALS_TO_HANDLE": inputs.signals_to_handle,
    }
    extra_keys = {key for key, _ in inputs.extra_env}
    if "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in inputs.base_env:
        env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"
    if "OMP_NUM_THREADS" not in inputs.base_env and "OMP_NUM_THREADS" not in extra_keys:
        env["OMP_NUM_THREADS"] = str(omp_threads(inputs.cpu_count, inputs.nproc))
    if inputs.devices.cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = inputs.devices.cuda_visible_devices
    if inputs.job_id is not None:
        env[JOB_ID_VARIABLE] = inputs.job_id
    given = {*inputs.base_env, *extra_keys}
    env.update(terminal_env(inputs.terminal, world_size, given))
    env.update(inputs.extra_env)
    if inputs.virtual_local_rank:
        env.pop("CUDA_VISIBLE_DEVICES", None)  # each worker gets its own, in build_worker
    return env


def visible_list(inputs: PlanInputs) -> str | None:
    """CUDA_VISIBLE_DEVICES as the workers would inherit it: --gpu-ids, else --env's, else yours."""
    if inputs.devices.cuda_visible_devices is not None:
        return inputs.devices.cuda_visible_devices
    return dict(inputs.extra_env).get("CUDA_VISIBLE_DEVICES", inputs.base_env.get("CUDA_VISIBLE_DEVICES"))


def own_gpu(inputs: PlanInputs, local_rank: int) -> str:
    """--virtual-local-rank: the one GPU this worker sees, as torchrun's agent picks it: entry
    `local_rank` of the inherited CUDA_VISIBLE_DEVICES, or GPU `local_rank` without one."""
    visible = visible_list(inputs)
    if visible is None:
        return str(local_rank)
    entries = [entry.strip() for entry in visible.split(",")]
    if local_rank >= len(entries):
        raise LaunchError(
            f"--virtual-local-rank: local rank {local_rank} has no GPU of its own in "
            f"CUDA_VISIBLE_DEVICES={visible} ({len(entries)} listed). Start at most {len(entries)} "
            "workers per node, or list more GPUs."
        )
    return entries[local_rank]
def terminal_env(terminal: Terminal | None, world_size: int, given: Set[str]) -> dict[str, str]:
    """What tells workers writing to pipes about the terminal their lines reach, minus `given`.

    COLUMNS (rich, argparse, shutil) is the width left after the rank prefix; tqdm does not read
    it (it asks its file, a pipe), so TQDM_NCOLS, one column less as tqdm leaves at a terminal.
    """
    if terminal is None:
        return {}
    columns = max(terminal.columns - prefix_width(world_size), 10)
    env = {"COLUMNS": str(columns), "LINES": str(terminal.lines), "TQDM_NCOLS": str(columns - 1)}
    if terminal.colour:
        env.update(COLOUR_VARIABLES)
    return {key: value for key, value in env.items() if key not in given}


def prefix_width(world_size: int) -> int:
    """Columns of the rank prefix `N | ` as ddplaunch.logs.rank_prefixes draws it."""
    return len(str(max(0, world_size - 1))) + 3


def omp_threads(cpu_count: int, nproc: int) -> int:
    """Share the cores: torchrun's fixed 1 starves CPU workers (pytorch#22260)."""
    return max(1, cpu_count // max(1, nproc))


def error_file_path(error_dir: str | None, restart_count: int, global_rank: int) -> str | None:
    """Where torch's @record writes a rank's traceback; one per rank and attempt."""
    if error_dir is None:
        return None
    return f"{error_dir}/attempt{restart_count}/rank{global_rank}.json"


def build_worker(inputs: PlanInputs, shared: Mapping[str, str], local_rank: int) -> Worker:
    global_rank = inputs.node_rank * inputs.nproc + local_rank
    error_file = error_file_path(inputs.error_dir, inputs.restart_count, global_rank)
    virtual = inputs.virtual_local_rank
    per_worker = {"LOCAL_RANK": "0" if virtual else str(local_rank), "RANK": str(global_rank),
                  "ROLE_RANK": str(global_rank)}
    if error_file is not None:
        per_worker["TORCHELASTIC_ERROR_FILE"] = error_file
    if virtual:
        per_worker["CUDA_VISIBLE_DEVICES"] = own_gpu(inputs, local_rank)
    physical = inputs.devices.physical[local_rank] if local_rank < len(inputs.devices.physical) else ""
    return Worker(
        node_rank=inputs.node_rank,
        local_rank=local_rank,
        global_rank=global_rank,
        host=inputs.hostname,
        physical_gpu=physical,
        device=("cuda:0" if virtual else f"cuda:{local_rank}") if physical else "cpu",
        argv=worker_argv(inputs, local_rank),
        env_added=MappingProxyType({**per_worker, **shared}),
        error_file=error_file,
        cpus=inputs.cpus[local_rank] if inputs.cpus else None,
    )


def build_plan(inputs: PlanInputs) -> Plan:
    """The frozen plan for this node. Raises LaunchError for an impossible request."""
    validate_topology(inputs.nnodes, inputs.node_rank)
    if inputs.nproc < 1:
        raise LaunchError(f"--nproc {inputs.nproc}: start at least one worker per node.")
    if not 1 <= inputs.master_port <= 65535:
        raise LaunchError(
            f"--master-port {inputs.master_port} is not a TCP port; use 1-65535 "
            "(or leave it out on one node and a free one is picked)."
        )
    shared = common_env(inputs)
    workers = tuple(build_worker(inputs, shared, i) for i in range(inputs.nproc))
    return Plan(
        workers=workers,
        nnodes=inputs.nnodes,
        nproc=inputs.nproc,
        node_rank=inputs.node_rank,
        world_size=inputs.nnodes * inputs.nproc,
        master_addr=inputs.master_addr,
        master_port=inputs.master_port,
        run_id=inputs.run_id,
        restart_count=inputs.restart_count,
        max_restarts=inputs.max_restarts,
        common_env=MappingProxyType(shared),
        base_env=MappingProxyType(dict(inputs.base_env)),
        stdin_rank=inputs.stdin_rank,
        stack_dir=inputs.stack_dir,
    )
