"""Cluster environments -> this node's place in the job (nnodes, node rank, node 0's address).

Pure: the caller passes the environment mapping in. One small class per environment, each a
map of variable names plus an "am I active?" check (submitit's shape); the first active one
wins, and DDPLAUNCH_CLUSTER forces one, or none, for tests. Slurm's host-list syntax is parsed
here too, into a typed error on bad input.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import ClassVar, TypeAlias

from ddplaunch.errors import LaunchError
from ddplaunch.plan import is_plain_int, tcp_port

FORCE_VARIABLE = "DDPLAUNCH_CLUSTER"
FIELDS = ("nnodes", "node_rank", "master_addr", "master_port")
_FLAG_OF = {
    "nnodes": "--nnodes",
    "node_rank": "--node-rank",
    "master_addr": "--master-addr",
    "master_port": "--master-port",
}
# PyTorch Lightning's rule, so a job that mixes both tools agrees on the port.
SLURM_PORT_BASE = 15000
# Expanding is the only costly step; a list this long is a typo, not a cluster.
MAX_EXPANDED_HOSTS = 1_000_000
_NOT_OURS_HINT = (
    "If it was set by hand, fix or unset it; set DDPLAUNCH_CLUSTER=none to skip cluster detection."
)

# ---------------------------------------------------------------------------------------------
# Slurm host lists: "login1,gpu[01-04,07],a[1-2]b[3-4]"

_Range: TypeAlias = tuple[int, int, int]  # low, high, zero-padded width
_Part: TypeAlias = str | tuple[_Range, ...]  # literal text, or one bracket group
_Pattern: TypeAlias = tuple[_Part, ...]  # one comma-separated entry
_BRACKET_GROUP = re.compile(r"(\[[^\]]*\])")
_HOSTLIST_FORMS = "Write hosts separated by commas, with numbered ranges in brackets, e.g. node1,gpu[01-04,07]."


class HostlistError(LaunchError):
    """A Slurm host list that does not parse; names the variable when there is one."""

    def __init__(self, text: str, problem: str, variable: str | None = None) -> None:
        self.text = text
        self.problem = problem
        self.variable = variable
        if variable is None:
            message = f"Host list {text!r} is not valid: {problem}. {_HOSTLIST_FORMS}"
        else:
            message = (
                f"{variable}={text!r} is not a valid Slurm host list: {problem}. Slurm sets it for each "
                f"srun task. {_NOT_OURS_HINT}"
            )
        super().__init__(message)


def expand_hostlist(text: str) -> list[str]:
    """Every host of a Slurm host list, in `scontrol show hostnames` order, padding kept."""
    patterns = _parse_hostlist(text)
    total = sum(_pattern_size(p) for p in patterns)
    if total > MAX_EXPANDED_HOSTS:
        raise HostlistError(text, f"it names {total} hosts, more than the {MAX_EXPANDED_HOSTS} allowed")
    return [host for pattern in patterns for host in _expand_pattern(pattern)]


def first_host(text: str) -> str:
    """The first host of a Slurm host list, without expanding it (n[1-100000] is cheap)."""
    first = _parse_hostlist(text)[0]
    return "".join(part if isinstance(part, str) else _number(part[0][0], part[0][2]) for part in first)


def hostlist_size(text: str) -> int:
    """How many hosts a Slurm host list names, without expanding it."""
    return sum(_pattern_size(p) for p in _parse_hostlist(text))


def _parse_hostlist(text: str) -> tuple[_Pattern, ...]:
    """Validate the whole list (linear in its length) so later steps only format numbers."""
    if not text.strip():
        raise HostlistError(text, "it is empty")
    entries = _split_entries(text)
    return tuple(_parse_entry(text, entry.strip(), index) for index, entry in enumerate(entries, 1))


def _split_entries(text: str) -> list[str]:
    """Split on the commas outside brackets; those inside separate ranges, not hosts."""
    entries: list[str] = []
    start = 0
    open_at: int | None = None
    for i, char in enumerate(text):
        if char == "[":
            if open_at is not None:
                raise HostlistError(text, f"the '[' at character {i + 1} opens inside another bracket")
            open_at = i
        elif char == "]":
            if open_at is None:
                raise HostlistError(text, f"the ']' at character {i + 1} has no matching '['")
            open_at = None
        elif char == "," and open_at is None:
            entries.append(text[start:i])
            start = i + 1
    if open_at is not None:
        raise HostlistError(text, f"the '[' at character {open_at + 1} is never closed")
    entries.append(text[start:])
    return entries


def _parse_entry(text: str, entry: str, index: int) -> _Pattern:
    if not entry:
        raise HostlistError(text, f"host {index} is empty (two commas in a row, or a comma at an end)")
    if any(char.isspace() for char in entry):
        raise HostlistError(text, f"host {entry!r} contains a space")
    pieces = _BRACKET_GROUP.split(entry)
    # split() with a capture group alternates literal, group, literal, ...: odd indexes are groups.
    return tuple(
        _parse_ranges(text, piece[1:-1]) if i % 2 else piece for i, piece in enumerate(pieces) if piece
    )


def _parse_ranges(text: str, inner: str) -> tuple[_Range, ...]:
    if not inner:
        raise HostlistError(text, "'[]' holds no number")
    ranges: list[_Range] = []
    for item in inner.split(","):
        low, dash, high = item.partition("-")
        high = high if dash else low
        if not (is_plain_int(low) and is_plain_int(high)):
            raise HostlistError(text, f"{item!r} in [{inner}] is not a number or a range like 1-4")
        if int(low) > int(high):
            raise HostlistError(text, f"the range {item} in [{inner}] runs backwards; write it as {high}-{low}")
        # Slurm's rule: the low end's digit count sets the padding ([01-10] -> 01..10, [8-10] -> 8..10).
        ranges.append((int(low), int(high), len(low)))
    return tuple(ranges)


def _number(value: int, width: int) -> str:
    return str(value).zfill(width)


def _choices(part: _Part) -> Iterator[str]:
    if isinstance(part, str):
        yield part
        return
    for low, high, width in part:
        for value in range(low, high + 1):
            yield _number(value, width)


def _expand_pattern(pattern: _Pattern) -> Iterator[str]:
    # product() varies the last group fastest: a[1-2]b[3-4] -> a1b3 a1b4 a2b3 a2b4, as Slurm.
    for combination in itertools.product(*(list(_choices(part)) for part in pattern)):
        yield "".join(combination)


def _pattern_size(pattern: _Pattern) -> int:
    return math.prod(
        1 if isinstance(part, str) else sum(high - low + 1 for low, high, _ in part) for part in pattern
    )


# ---------------------------------------------------------------------------------------------
# Environments


@dataclass(frozen=True)
class Detected:
    """What an environment says about this node's place in the job; None: it does not say."""

    source: str
    nnodes: int | None
    node_rank: int | None
    master_addr: str | None
    master_port: int | None
    # (field, where from), in FIELDS order, for --dry-run and error messages.
    origins: tuple[tuple[str, str], ...] = ()

    def origin(self, field: str) -> str | None:
        return dict(self.origins).get(field)


def _get(environ: Mapping[str, str], name: str) -> str | None:
    """A variable's value, stripped; set-but-blank counts as unset (an `export X=` clears)."""
    value = environ.get(name, "").strip()
    return value or None


def _first_set(environ: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, str] | None:
    for name in names:
        value = _get(environ, name)
        if value is not None:
            return name, value
    return None


def _read_count(name: str, value: str, *, minimum: int, owner: str) -> int:
    if not is_plain_int(value) or int(value) < minimum:
        kind = "a whole number" if minimum == 0 else f"a whole number of at least {minimum}"
        raise LaunchError(f"{name}={value!r} is not {kind}. {owner} sets it for each task. {_NOT_OURS_HINT}")
    return int(value)


def _origins(**by_field: str) -> tuple[tuple[str, str], ...]:
    return tuple((field, by_field[field]) for field in FIELDS if field in by_field)


class ClusterEnvironment:
    """One launcher's variables. `required` lists groups; one variable of each group must be set."""

    name: ClassVar[str]
    key: ClassVar[str]  # the DDPLAUNCH_CLUSTER value that forces this environment
    where: ClassVar[str]  # how a user gets these variables, for the forced-but-missing message
    required: ClassVar[tuple[tuple[str, ...], ...]]

    def missing(self, environ: Mapping[str, str]) -> list[tuple[str, ...]]:
        return [group for group in self.required if _first_set(environ, group) is None]

    def is_active(self, environ: Mapping[str, str]) -> bool:
        return not self.missing(environ)

    def read(self, environ: Mapping[str, str]) -> Detected:
        """Only called when active. Raises LaunchError for a layout ddplaunch cannot run in."""
        raise NotImplementedError


class OpenMpiEnvironment(ClusterEnvironment):
    """`mpirun -npernode 1 ddplaunch ...`: one launcher per node, world rank = node rank."""

    name = "Open MPI"
    key = "openmpi"
    where = "under `mpirun -npernode 1`"
    size = "OMPI_COMM_WORLD_SIZE"
    rank = "OMPI_COMM_WORLD_RANK"
    local_size = "OMPI_COMM_WORLD_LOCAL_SIZE"
    required = ((size,), (rank,))

    def read(self, environ: Mapping[str, str]) -> Detected:
        nnodes = _read_count(self.size, environ[self.size].strip(), minimum=1, owner="mpirun")
        node_rank = _read_count(self.rank, environ[self.rank].strip(), minimum=0, owner="mpirun")
        if node_rank >= nnodes:
            raise LaunchError(
                f"{self.rank}={node_rank} is not below {self.size}={nnodes}. mpirun sets both for each "
                f"process. {_NOT_OURS_HINT}"
            )
        local = _get(environ, self.local_size)
        if local is not None and _read_count(self.local_size, local, minimum=1, owner="mpirun") > 1:
            raise LaunchError(
                f"mpirun started {local} processes on this node ({self.local_size}={local}), but ddplaunch "
                "starts the workers itself (--nproc per node), so each would start its own set. Start one "
                "ddplaunch per node: `mpirun -npernode 1 ddplaunch --nproc N ...` (or `--map-by ppr:1:node`)."
            )
        # No master address here: mpirun's own contact address may not be rank 0's node.
        return Detected(self.name, nnodes, node_rank, None, None, _origins(nnodes=self.size, node_rank=self.rank))


class SlurmEnvironment(ClusterEnvironment):
    """`srun --ntasks-per-node=1 ddplaunch ...`: one launcher per node of the step."""

    name = "Slurm"
    key = "slurm"
    where = "inside an srun step"
    job_id = "SLURM_JOB_ID"
    node_id = "SLURM_NODEID"
    # Step variables first: a step may run on part of the job's nodes, and SLURM_NODEID counts
    # within the step, so node 0 is the step's first host, not the job's.
    nodelist = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    nnodes = ("SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
    ntasks = ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    # The step's own count first: SLURM_NTASKS_PER_NODE may be inherited from sbatch's options.
    tasks_per_node = ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE")
    step_id = ("SLURM_STEP_ID", "SLURM_STEPID")
    required = ((job_id,), (node_id,), nodelist)

    def read(self, environ: Mapping[str, str]) -> Detected:
        list_name, list_text = _first_set(environ, self.nodelist) or ("", "")
        try:
            size = hostlist_size(list_text)
            master = first_host(list_text)
        except HostlistError as exc:
            raise HostlistError(exc.text, exc.problem, variable=list_name) from None
        nnodes, nnodes_origin = self._nnodes(environ, list_name, list_text, size)
        node_rank = _read_count(self.node_id, environ[self.node_id].strip(), minimum=0, owner="Slurm")
        if node_rank >= nnodes:
            raise LaunchError(
                f"{self.node_id}={node_rank} is not below the node count {nnodes} ({nnodes_origin}). "
                f"Slurm sets both for each srun task. {_NOT_OURS_HINT}"
            )
        if _first_set(environ, self.step_id) is None:
            self._check_batch_step(nnodes, nnodes_origin)
        else:
            self._check_one_task_per_node(environ, nnodes)
        job_id = environ[self.job_id].strip()
        if not is_plain_int(job_id):
            raise LaunchError(f"{self.job_id}={job_id!r} is not a Slurm job number. {_NOT_OURS_HINT}")
        return Detected(
            self.name,
            nnodes,
            node_rank,
            master,
            SLURM_PORT_BASE + int(job_id[-4:]),
            _origins(
                nnodes=nnodes_origin,
                node_rank=self.node_id,
                master_addr=f"first host of {list_name}={list_text}",
                master_port=f"derived from {self.job_id}={job_id}",
            ),
        )

    def _nnodes(self, environ: Mapping[str, str], list_name: str, list_text: str, size: int) -> tuple[int, str]:
        found = _first_set(environ, self.nnodes)
        if found is None:
            return size, f"the number of hosts in {list_name}={list_text}"
        name, value = found
        nnodes = _read_count(name, value, minimum=1, owner="Slurm")
        if nnodes != size:
            # Mixing the job's list with the step's count would point at a node outside the step.
            raise LaunchError(
                f"{name}={nnodes} but {list_name}={list_text} names {size} hosts; Slurm keeps them equal "
                f"within one step. {_NOT_OURS_HINT}"
            )
        return nnodes, name

    def _check_batch_step(self, nnodes: int, nnodes_origin: str) -> None:
        """The batch script runs on the first node only: a multi-node launch from it would hang."""
        if nnodes > 1:
            raise LaunchError(
                f"ddplaunch is running in the batch script of a {nnodes}-node Slurm job ({nnodes_origin}) "
                f"rather than in an srun step ({self.step_id[0]} is not set), so only this node would join "
                "and it would wait for the others forever. Start one ddplaunch per node with "
                "`srun --ntasks-per-node=1 ddplaunch --nproc N ...`, or set DDPLAUNCH_CLUSTER=none to "
                "launch on this node alone."
            )

    def _check_one_task_per_node(self, environ: Mapping[str, str], nnodes: int) -> None:
        fix = (
            "but ddplaunch starts the workers itself (--nproc per node), so each task would start its "
            "own set. Start one ddplaunch per node: `srun --ntasks-per-node=1 ddplaunch --nproc N ...`."
        )
        per_node = _first_set(environ, self.tasks_per_node)
        if per_node is not None:
            most = max(_parse_tasks_per_node(*per_node))
            if most > 1:
                raise LaunchError(f"srun started {most} tasks per node ({per_node[0]}={per_node[1]}), {fix}")
        total = _first_set(environ, self.ntasks)
        if total is not None:
            count = _read_count(total[0], total[1], minimum=1, owner="Slurm")
            if count != nnodes:
                raise LaunchError(f"srun started {count} tasks on {nnodes} nodes ({total[0]}={count}), {fix}")


_TASKS_ITEM = re.compile(r"^([0-9]+)(?:\(x[0-9]+\))?$")


def _parse_tasks_per_node(name: str, value: str) -> list[int]:
    """Slurm's compressed counts: "2(x3),1" is 2 tasks on each of 3 nodes, then 1."""
    counts: list[int] = []
    for item in value.split(","):
        match = _TASKS_ITEM.match(item.strip())
        if match is None:
            raise LaunchError(
                f"{name}={value!r} is not a Slurm task count like 1 or 2(x3),1. {_NOT_OURS_HINT}"
            )
        counts.append(int(match.group(1)))
    return counts


class PlainEnvironment(ClusterEnvironment):
    """No cluster, but MASTER_ADDR / MASTER_PORT exported by the user: only the rendezvous."""

    name = "environment"
    key = "environment"
    where = "with MASTER_ADDR or MASTER_PORT exported"
    required = (("MASTER_ADDR", "MASTER_PORT"),)

    def read(self, environ: Mapping[str, str]) -> Detected:
        return Detected(self.name, None, None, None, None)


# Open MPI first: under a Slurm allocation, mpirun's processes inherit the allocation's SLURM_*
# variables (and its daemons' srun step), which describe mpirun's layout, not this process.
ENVIRONMENTS: tuple[ClusterEnvironment, ...] = (OpenMpiEnvironment(), SlurmEnvironment(), PlainEnvironment())


def detect_cluster(environ: Mapping[str, str]) -> Detected | None:
    """This node's place in the job from the environment, or None when nothing is detected.

    MASTER_ADDR / MASTER_PORT, when set, win over what an environment derives.
    """
    chosen = _chosen_environment(environ)
    if chosen is None:
        return None
    return _with_master_overrides(environ, chosen.read(environ))


def _chosen_environment(environ: Mapping[str, str]) -> ClusterEnvironment | None:
    forced = (_get(environ, FORCE_VARIABLE) or "auto").lower()
    if forced == "auto":
        return next((env for env in ENVIRONMENTS if env.is_active(environ)), None)
    if forced == "none":
        return None
    by_key = {env.key: env for env in ENVIRONMENTS}
    if forced not in by_key:
        raise LaunchError(
            f"{FORCE_VARIABLE}={environ[FORCE_VARIABLE]!r} is not a known choice; use one of "
            f"auto, none, {', '.join(by_key)}, or unset it to detect the cluster automatically."
        )
    chosen = by_key[forced]
    missing = chosen.missing(environ)
    if missing:
        names = ", ".join(" or ".join(group) for group in missing)
        raise LaunchError(
            f"{FORCE_VARIABLE}={forced} but {names} {'is' if len(missing) == 1 else 'are'} not set, so there is "
            f"no {chosen.name} layout to read. Run ddplaunch {chosen.where}, or unset {FORCE_VARIABLE}."
        )
    return chosen


def _with_master_overrides(environ: Mapping[str, str], detected: Detected) -> Detected:
    origins = dict(detected.origins)
    addr, port = detected.master_addr, detected.master_port
    given_addr = _get(environ, "MASTER_ADDR")
    if given_addr is not None:
        if any(char.isspace() for char in given_addr):
            raise LaunchError(
                f"MASTER_ADDR={given_addr!r} is not a host name or IP address; set it to node 0's address "
                "or unset it."
            )
        addr, origins["master_addr"] = given_addr, "MASTER_ADDR"
    given_port = _get(environ, "MASTER_PORT")
    if given_port is not None:
        port = tcp_port(given_port)
        if port is None:
            raise LaunchError(
                f"MASTER_PORT={given_port!r} is not a TCP port; set it to a number in 1-65535, or unset it "
                "to let ddplaunch choose."
            )
        origins["master_port"] = "MASTER_PORT"
    return replace(
        detected,
        master_addr=addr,
        master_port=port,
        origins=tuple((field, origins[field]) for field in FIELDS if field in origins),
    )


def describe(detected: Detected) -> list[str]:
    """Lines for --dry-run: each value and where it came from, then what must come from flags."""
    facts = [
        f"{field}={getattr(detected, field)} {_phrase(detected.origin(field))}"
        for field in FIELDS
        if getattr(detected, field) is not None
    ]
    head = "from the environment" if detected.source == PlainEnvironment.name else f"detected {detected.source}"
    lines = [f"{head}: {', '.join(facts)}"]
    missing = [field for field in FIELDS if getattr(detected, field) is None]
    if missing:
        flags = ", ".join(_FLAG_OF[field] for field in missing)
        lines.append(f"not detected: {', '.join(missing)} (taken from {flags} or their defaults)")
    return lines


def _phrase(origin: str | None) -> str:
    if origin is None:
        return ""
    return origin if origin.startswith("derived ") else f"from {origin}"
