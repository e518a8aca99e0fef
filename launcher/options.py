"""The parsed command line (Options) and the small text parsers of its values: no I/O, no machine facts."""

from __future__ import annotations

import signal
from dataclasses import dataclass

from ddplaunch.errors import LaunchError
from ddplaunch.plan import FORWARDED_SIGNALS, is_plain_int

DEFAULT_GRACE_S = 30.0
# A stall report comes before torch's own collective timeouts end the job (NCCL's is 10 min,
# gloo's 30), yet after anything a healthy job does in silence (a checkpoint, an evaluation).
DEFAULT_STALL_TIMEOUT_S = 300.0
STALL_EXIT_CODE = 124  # --stall-action stop, as timeout(1)
# Head and agents (and static nodes) hear from each other every HEARTBEAT_INTERVAL_S; one that
# hears nothing for the timeout calls the other side gone. Long enough for a busy 2-core host
# under load, short enough that a cut host's GPUs are freed well within a minute.
DEFAULT_HEARTBEAT_TIMEOUT_S = 10.0
HEARTBEAT_INTERVAL_S = 2.0
# After SIGKILL, how long to wait for a worker to die before naming it as unkillable (state D:
# wedged in a driver or a NIC) and exiting anyway.
DEFAULT_KILL_TIMEOUT_S = 10.0
DEFAULT_JOIN_TIMEOUT_S = 600.0  # torchrun's rendezvous join timeout
SHUTDOWN_TIMEOUT_VARIABLE = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"  # torchrun's fallback for --shutdown-timeout
OUT, ERR = 1, 2  # torchrun's Std bits, which are also the streams' file descriptors


@dataclass(frozen=True)
class Options:
    """The parsed command line, before any fact about the machine is looked at."""

    script: str
    script_args: tuple[str, ...]
    nproc: str | None
    nnodes: str | None
    node_rank: int | None
    master_addr: str | None
    master_port: int | None
    rdzv_endpoint: str | None
    rdzv_backend: str | None
    join_timeout: float | None  # None: --rdzv-conf's, else DEFAULT_JOIN_TIMEOUT_S
    standalone: bool
    gpu_ids: str | None
    module: bool
    no_python: bool
    local_rank_arg: bool
    log_dir: str | None
    ranks: str | None
    max_restarts: int
    env: tuple[str, ...]
    dry_run: bool
    grace: float | None  # None: TORCH_ELASTIC_SHUTDOWN_TIMEOUT's, else DEFAULT_GRACE_S
    run_id: str | None
    no_color: bool
    hosts: str | None
    hostfile: str | None
    ssh_accept_new_host_keys: bool
    chdir: str | None
    python: str | None
    stdin: str
    agent: bool
    host_name: str | None
    # torchrun's options that ddplaunch honours or accepts; defaults as if not given
    rdzv_conf: str | None = None
    role: str | None = None
    run_path: bool = False
    redirects: str | None = None
    tee: str | None = None
    local_ranks_filter: str | None = None
    duplicate_stdout_filters: str | None = None
    duplicate_stderr_filters: str | None = None
    local_addr: str | None = None
    numa_binding: str | None = None
    signals_to_handle: str | None = None
    virtual_local_rank: bool = False
    monitor_interval: float | None = None
    start_method: str | None = None
    event_log_handler: str | None = None
    logs_specs: str | None = None
    force: bool = False
    stall_timeout: float | None = None  # None: DEFAULT_STALL_TIMEOUT_S; 0: off
    stall_action: str = "report"
    no_stack_bootstrap: bool = False
    heartbeat_timeout: float | None = None  # None: DEFAULT_HEARTBEAT_TIMEOUT_S
    kill_timeout: float | None = None  # None: DEFAULT_KILL_TIMEOUT_S
    env_file: tuple[str, ...] = ()
    sync: bool = False
    sync_exclude: tuple[str, ...] = ()
    sync_max_size: str | None = None
    from_python: str | None = None  # a Python caller's private folder (launcher.api): result.json goes there
    warm: bool = False  # fork every rank from one interpreter that imported warm_modules (ddplaunch.warm)
    warm_modules: str | None = None  # None: ddplaunch.warm.DEFAULT_MODULES


@dataclass(frozen=True)
class Stall:
    """--stall-timeout and --stall-action: after how long a silent job gets a stack report
    (0: never), and whether it is then stopped."""

    timeout: float = DEFAULT_STALL_TIMEOUT_S
    stop: bool = False

    @property
    def watched(self) -> bool:
        return self.timeout > 0


def stall_of(options: Options) -> Stall:
    timeout = options.stall_timeout
    if timeout is None:
        timeout = DEFAULT_STALL_TIMEOUT_S
    elif timeout != timeout or timeout < 0 or timeout == float("inf"):
        raise LaunchError(
            f"--stall-timeout {timeout:g}: use a number of seconds, 0 or more (e.g. 300; 0 turns "
            "stall reports off)."
        )
    if options.stall_action == "stop" and timeout == 0:
        raise LaunchError("--stall-action stop needs a stall to act on: give --stall-timeout SECONDS above 0.")
    return Stall(timeout, options.stall_action == "stop")


def heartbeat_timeout_of(options: Options) -> float:
    """--heartbeat-timeout: seconds of silence after which a peer (head, agent, node) is gone."""
    return _positive_seconds(options.heartbeat_timeout, DEFAULT_HEARTBEAT_TIMEOUT_S, "--heartbeat-timeout", "10")


def kill_timeout_of(options: Options) -> float:
    """--kill-timeout: seconds to wait after SIGKILL for the workers to die."""
    return _positive_seconds(options.kill_timeout, DEFAULT_KILL_TIMEOUT_S, "--kill-timeout", "10")


def _positive_seconds(value: float | None, default: float, flag: str, example: str) -> float:
    if value is None:
        return default
    if value != value or value <= 0 or value == float("inf"):
        raise LaunchError(f"{flag} {value:g}: use a number of seconds above 0 (e.g. {example}).")
    return value


def parse_nnodes(text: str) -> int:
    low, sep, high = text.partition(":")
    if sep and low == high:
        text = low  # torchrun's "2:2" is a fixed size
    if not is_plain_int(text.strip()):
        raise LaunchError(
            f"--nnodes {text!r} is not a number of nodes. Use a positive integer; elastic "
            "ranges (MIN:MAX) are not supported, the job size is fixed."
        )
    return int(text)


def parse_ranks(text: str, world_size: int) -> frozenset[int]:
    """--ranks: global ranks and ranges, e.g. 0,3 or 0-3."""
    return _rank_set(text, "--ranks", "global ranks like 0 or 0,3 or 0-3", world_size, f"world size {world_size}")


def parse_local_ranks(text: str, nproc: int) -> frozenset[int]:
    """--local-ranks-filter (torchrun's): local ranks, the same on every node."""
    flag, example = "--local-ranks-filter", "local ranks like 0 or 0,1"
    return _rank_set(text, flag, example, nproc, f"--nproc {nproc}, local ranks on every node")


def _rank_set(text: str, flag: str, example: str, count: int, what: str) -> frozenset[int]:
    ranks: set[int] = set()
    for part in text.split(","):
        low, sep, high = part.strip().partition("-")
        if not is_plain_int(low) or (sep and not is_plain_int(high)):
            raise LaunchError(f"{flag} {text!r}: {part!r} is not a rank or range. Use {example}.")
        span = range(int(low), int(high if sep else low) + 1)
        if not span or span[-1] >= count:
            raise LaunchError(f"{flag} {text!r} names a rank outside 0..{count - 1} ({what}).")
        ranks.update(span)
    return frozenset(ranks)


def parse_stdin(text: str, world_size: int) -> int | None:
    """--stdin RANK|none: the global rank that reads the launcher's stdin; None for none."""
    value = text.strip()
    if value.lower() == "none":
        return None
    if not is_plain_int(value):
        raise LaunchError(
            f"--stdin {text!r} is not a rank. Give the global rank that reads this terminal's "
            "input (default 0), or none to give every rank /dev/null."
        )
    if int(value) >= world_size:
        raise LaunchError(
            f"--stdin {value} names a rank outside 0..{world_size - 1} (world size {world_size}). "
            "Give a rank of the job, or none."
        )
    return int(value)



def split_host_port(text: str) -> tuple[str, str | None]:
    """`host`, `host:port`, `[v6]` or `[v6]:port`."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else (None if not rest else rest)
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, port
    return text, None




# -- torchrun's output options: --redirects, --tee, --local-ranks-filter ------------------------


@dataclass(frozen=True)
class StdSpec:
    """A --redirects/--tee value: torchrun's Std bits (1 stdout, 2 stderr, 3 both) for every
    local rank, or per local rank (`0:1,1:2`), where a local rank left out gets 0."""

    everyone: int = 0
    by_local_rank: tuple[tuple[int, int], ...] | None = None

    def bits(self, local_rank: int) -> int:
        if self.by_local_rank is None:
            return self.everyone
        return dict(self.by_local_rank).get(local_rank, 0)


def parse_std(text: str, flag: str) -> StdSpec:
    """torchrun's syntax: `3`, or `LOCAL_RANK:BITS,...` (e.g. `0:3,1:2`), bits 0-3."""
    value = text.strip()
    if _is_std_bits(value):
        return StdSpec(int(value))
    pairs = [part.strip().partition(":") for part in value.split(",")]
    if not all(sep and is_plain_int(rank.strip()) and _is_std_bits(bits.strip()) for rank, sep, bits in pairs):
        raise LaunchError(
            f"{flag} {text!r} is not torchrun's stream choice. Use 1 (stdout), 2 (stderr), 3 (both) "
            f"or 0 (none) for every local rank, or one per local rank, e.g. {flag} 0:3,1:2."
        )
    return StdSpec(0, tuple((int(rank), int(bits)) for rank, _, bits in pairs))


def _is_std_bits(text: str) -> bool:
    return text in ("0", "1", "2", "3")


@dataclass(frozen=True)
class TerminalFilter:
    """Which (rank, stream) reach the terminal. The --log-dir files always get everything.

    A line is shown when its global rank passes --ranks, its local rank passes
    --local-ranks-filter (torchrun's, on every node), and its stream is not redirected to the
    files only (--redirects; --tee names streams that go to the files *and* the terminal, so a
    stream in both is shown, as in torchrun).
    """

    nproc: int
    ranks: frozenset[int] | None = None
    local_ranks: frozenset[int] | None = None
    redirects: StdSpec = StdSpec()
    tee: StdSpec = StdSpec()

    def shows(self, rank: int, stream: int) -> bool:
        local = rank % self.nproc
        if self.ranks is not None and rank not in self.ranks:
            return False
        if self.local_ranks is not None and local not in self.local_ranks:
            return False
        return not self.hidden_bits(local) & stream

    def hidden_bits(self, local_rank: int) -> int:
        """The streams of this local rank that go to the files only."""
        return self.redirects.bits(local_rank) & ~self.tee.bits(local_rank)

    def hides_streams(self) -> bool:
        """Whether --redirects keeps a stream of some worker off the terminal."""
        return any(self.hidden_bits(local) for local in range(self.nproc))

    def shown_ranks(self, world_size: int) -> frozenset[int] | None:
        """The global ranks shown at all (None: every rank), for a printer that filters by rank."""
        if self.ranks is None and self.local_ranks is None:
            return None
        return frozenset(r for r in range(world_size) if self.shows(r, OUT) or self.shows(r, ERR))


def parse_filters(text: str) -> tuple[str, ...]:
    """--duplicate-std{out,err}-filters: comma-separated needles, `,,` for a literal comma.

    Empty needles are dropped: torchrun's help says an empty list duplicates nothing, and an
    empty needle (from a trailing comma) would match every line.
    """
    placeholder = "\0"
    needles = text.replace(",,", placeholder).split(",")
    return tuple(n.replace(placeholder, ",") for n in needles if n)


# -- torchrun's rendezvous and signal options ---------------------------------------------------

JOIN_TIMEOUT_KEYS = ("join_timeout", "timeout")  # c10d's, then the static backend's


@dataclass(frozen=True)
class RdzvConf:
    """What --rdzv-conf means here: the join timeout, and the keys that have no meaning."""

    join_timeout: float | None
    ignored: tuple[str, ...]


def parse_rdzv_conf(text: str) -> RdzvConf:
    """torchrun's `KEY=VALUE,...`: join_timeout (or the static backend's timeout) is the join
    timeout; torchrun's other keys tune its rendezvous, which ddplaunch does not use."""
    config: dict[str, str] = {}
    for part in text.split(","):
        key, _, value = (piece.strip() for piece in part.partition("="))
        if not key or not value:
            raise LaunchError(
                f"--rdzv-conf {text!r}: {part.strip()!r} is not KEY=VALUE. Write it as torchrun does, "
                "e.g. --rdzv-conf join_timeout=900,timeout=900."
            )
        config[key] = value
    found = [key for key in JOIN_TIMEOUT_KEYS if key in config]
    timeout = None
    if found:
        timeout = seconds(config[found[0]], f"--rdzv-conf {found[0]}", above_zero=True)
    ignored = tuple(key for key in config if key not in found[:1])
    return RdzvConf(timeout, ignored)


def seconds(text: str, what: str, *, above_zero: bool) -> float:
    """A number of seconds from text (a flag's value or a variable), finite and not negative."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if value != value or value in (float("inf"), float("-inf")) or value < 0 or (above_zero and value == 0):
        bound = "above 0" if above_zero else "0 or more"
        raise LaunchError(f"{what} {text!r}: use a number of seconds, {bound} (e.g. 30).")
    return value


RDZV_BACKENDS = ("static", "c10d")


def check_rdzv_backend(backend: str) -> None:
    """static and c10d both mean: the nodes meet at node 0's TCPStore, at --rdzv-endpoint."""
    if backend in RDZV_BACKENDS:
        return
    if backend.startswith("etcd"):
        raise LaunchError(
            f"--rdzv-backend {backend}: ddplaunch's nodes meet at node 0's TCPStore, not at an etcd "
            "server. Use --rdzv-backend c10d --rdzv-endpoint NODE0:PORT (node 0's address), or leave "
            "--rdzv-backend out."
        )
    raise LaunchError(f"--rdzv-backend {backend!r}: use static or c10d (both meet at node 0's TCPStore).")


UNCATCHABLE = ("SIGKILL", "SIGSTOP")


def parse_signals(text: str) -> str:
    """--signals-to-handle: signal names (SIGUSR1, USR1, sigusr1), checked and in torchrun's
    spelling, as the workers are told in TORCHELASTIC_SIGNALS_TO_HANDLE."""
    names: list[str] = []
    for part in text.split(","):
        name = part.strip().upper()
        name = name if name.startswith("SIG") else "SIG" + name
        if name not in signal.Signals.__members__ or name.startswith("SIG_"):
            raise LaunchError(
                f"--signals-to-handle {text!r}: {part.strip()!r} is not a signal name. Use names "
                f"separated by commas, e.g. --signals-to-handle {FORWARDED_SIGNALS},SIGUSR1."
            )
        if name in UNCATCHABLE or name == "SIGCHLD":
            why = "cannot be caught" if name in UNCATCHABLE else "is how ddplaunch learns a worker ended"
            raise LaunchError(f"--signals-to-handle: {name} {why}; leave it out of the list.")
        if name not in names:
            names.append(name)
    return ",".join(names)


# -- other launchers' spellings, for the hint on an unknown option ------------------------------

FOREIGN_OPTIONS = {
    # DeepSpeed
    "--num_gpus": "DeepSpeed's --num_gpus is --nproc N here (workers on each node)",
    "--num_nodes": "DeepSpeed's --num_nodes is --nnodes N here (or --hosts/--hostfile to start them over SSH)",
    "--include": "DeepSpeed's --include is --hosts H1,H2 (hosts) and --gpu-ids 0,2 (GPUs) here",
    "--exclude": "DeepSpeed's --exclude has no equivalent: list the hosts to use with --hosts and the GPUs with --gpu-ids",
    "--launcher": "DeepSpeed's --launcher: ddplaunch starts remote nodes over SSH itself with --hosts/--hostfile",
    "--ssh_port": "DeepSpeed's --ssh_port is host:port in --hosts (or Port in ~/.ssh/config) here",
    "--no_local_rank": "DeepSpeed's --no_local_rank is the default here (--local-rank-arg adds the argument)",
    "--bind_cores_to_rank": "DeepSpeed's --bind_cores_to_rank is --numa-binding core-complex (CPUs near each GPU) here",
    # horovodrun and mpirun
    "-np": "horovodrun's/mpirun's -np is the total; here --nproc N (per node) times --nnodes or the hosts of --hosts",
    "-n": "mpirun's -n is the total; here --nproc N (per node) times --nnodes or the hosts of --hosts",
    "--num-proc": "horovodrun's --num-proc is the total; here --nproc N (per node) times the hosts of --hosts",
    "-x": "mpirun's -x NAME=VALUE is --env NAME=VALUE here",
    "--npernode": "mpirun's --npernode is --nproc N here (workers on each node)",
    "-npernode": "mpirun's -npernode is --nproc N here (workers on each node)",
    "--output-filename": "horovodrun's --output-filename is --log-dir DIR here (DIR/rankN.log per rank)",
    "-p": "horovodrun's -p (SSH port) is host:port in --hosts (or Port in ~/.ssh/config) here",
    # accelerate
    "--num_processes": "accelerate's --num_processes is the total; here --nproc N (per node) times --nnodes",
    "--num_machines": "accelerate's --num_machines is --nnodes N here",
    "--machine_rank": "accelerate's --machine_rank is --node-rank R here",
    "--main_process_ip": "accelerate's --main_process_ip is --master-addr HOST here",
    "--main_process_port": "accelerate's --main_process_port is --master-port PORT here",
    "--multi_gpu": "accelerate's --multi_gpu is implied here: give --nproc N or --gpu-ids",
    "--mixed_precision": "accelerate's --mixed_precision is set in your script here; the launcher only starts processes",
    # Slurm, torch.distributed.launch
    "--ntasks-per-node": "srun's --ntasks-per-node is --nproc N here (run one ddplaunch per node under srun)",
    "--nodes": "--nodes is --nnodes N here",
    "--use_env": "torch.distributed.launch's --use_env is always on here (ranks come in the environment); "
    "--local-rank-arg adds the old --local-rank=N argument",
}


def foreign_option_hint(name: str) -> str | None:
    """What ddplaunch calls an option that another launcher spells `name` (either spelling)."""
    bare = name.partition("=")[0]
    for spelling in (bare, bare.replace("-", "_").replace("__", "--", 1), bare.replace("_", "-")):
        if spelling in FOREIGN_OPTIONS:
            return FOREIGN_OPTIONS[spelling]
    return None
