"""The parsed command line (Options) and the small text parsers of its values: no I/O, no machine facts."""

from __future__ import annotations

from dataclasses import dataclass

from launcher.errors import LaunchError
from launcher.plan import is_plain_int

DEFAULT_GRACE_S = 30.0
DEFAULT_JOIN_TIMEOUT_S = 600.0  # torchrun's rendezvous join timeout


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
    join_timeout: float
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
    grace: float
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
    ranks: set[int] = set()
    for part in text.split(","):
        low, sep, high = part.strip().partition("-")
        if not is_plain_int(low) or (sep and not is_plain_int(high)):
            raise LaunchError(
                f"--ranks {text!r}: {part!r} is not a rank or range. Use global ranks like "
                "0 or 0,3 or 0-3."
            )
        span = range(int(low), int(high if sep else low) + 1)
        if not span or span[-1] >= world_size:
            raise LaunchError(
                f"--ranks {text!r} names a rank outside 0..{world_size - 1} "
                f"(world size {world_size})."
            )
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


