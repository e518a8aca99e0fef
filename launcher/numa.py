"""--numa-binding: the CPUs near each worker's GPU, by the rules of torch/numa/binding.py, without torch.

torch finds a GPU's PCI device through torch.cuda and applies the set with numactl. Here
nvidia-smi's bus id names the device in sysfs, and WorkerTree.spawn starts each worker already
bound (ddplaunch.workers), so neither torch nor numactl is needed. `read_topology` reads sysfs
once; `cpus_of` applies torch's rules to what it read, and is pure:

- node: the usable CPUs of the GPU's NUMA node (numa_node -1, as one-node machines often
  write, means node 0);
- socket: those of every NUMA node whose first usable CPU is in the same package;
- exclusive: the node's physical cores, split evenly among the GPUs on that node in CUDA
  order, the first GPUs taking one more when they do not divide; a core's hyperthreads go
  together;
- core-complex: the groups of CPUs that share their largest data cache (L3), the largest group
  first; the node's i-th GPU takes group i modulo their count, so GPUs share when groups run out.

"Usable" means this launcher may run on it (sched_getaffinity), as torch intersects too.
Where torch fails (a CPU-less NUMA node in the socket search) this skips the node instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from ddplaunch.devices import Gpu, visible_gpus
from ddplaunch.errors import LaunchError

Mode = Literal["node", "socket", "exclusive", "core-complex"]
MODES: tuple[Mode, ...] = ("node", "socket", "exclusive", "core-complex")
# These share a node's CPUs out among all the GPUs on it, so every visible GPU's node is read.
SHARING_MODES: tuple[Mode, ...] = ("exclusive", "core-complex")
# torch drops instruction caches before picking the largest one.
_DATA_CACHES = ("Unified", "Data")


@dataclass(frozen=True)
class Topology:
    """What the rules need from the machine, as `read_topology` found it."""

    gpu_names: tuple[str, ...]  # per CUDA index: the GPU's nvidia-smi index, for messages
    gpu_nodes: tuple[int, ...]  # per CUDA index: the GPU's NUMA node
    node_cpus: Mapping[int, frozenset[int]]  # per NUMA node read: its usable CPUs
    # per CPU read, what the mode groups CPUs by: its package (socket), the first CPU
    # of its physical core (exclusive) or of the CPUs sharing its largest cache (core-complex)
    unit_of: Mapping[int, int]
    usable: frozenset[int]


def parse_mode(text: str) -> Mode:
    for mode in MODES:
        if text.strip().lower() == mode:
            return mode
    raise LaunchError(
        f"--numa-binding {text!r} is not a binding mode: use node, socket, exclusive or "
        "core-complex (node if in doubt), or leave the option out."
    )


def cpus_for_workers(
    mode_text: str,
    nproc: int,
    gpus: Sequence[Gpu],
    cuda_visible_devices: str | None,
    *,
    sysfs: str = "/sys",
    usable: frozenset[int] | None = None,
) -> tuple[frozenset[int], ...]:
    """Per local rank, the CPUs to bind that worker to, as torchrun --numa-binding would.

    `gpus`: all of this machine's GPUs (nvidia-smi, with bus ids); `cuda_visible_devices`: what
    the workers' CUDA sees (the --gpu-ids list, else the inherited or --env value). Local rank
    i uses cuda:i, the i-th of those, as torch's `gpu_index=local_rank` does.
    """
    mode = parse_mode(mode_text)
    cuda = visible_gpus(tuple(gpus), cuda_visible_devices)
    check_enough_gpus(nproc, len(gpus), len(cuda), cuda_visible_devices)
    allowed = usable if usable is not None else frozenset(os.sched_getaffinity(0))
    read = cuda if mode in SHARING_MODES else cuda[:nproc]
    topology = read_topology(mode, read, Sysfs(sysfs), allowed)
    return tuple(cpus_of(mode, topology, rank) for rank in range(nproc))


def check_enough_gpus(nproc: int, gpu_count: int, visible_count: int, cuda_visible_devices: str | None) -> None:
    if gpu_count == 0:
        raise LaunchError(
            "--numa-binding needs GPUs: it binds each worker to the CPUs near its GPU, and "
            "nvidia-smi is missing or lists no GPU on this machine. Drop --numa-binding to run "
            "without binding, or run where nvidia-smi lists the GPUs."
        )
    hidden = f" (CUDA_VISIBLE_DEVICES={cuda_visible_devices})" if cuda_visible_devices is not None else ""
    if visible_count == 0:
        raise LaunchError(
            f"--numa-binding needs GPUs: the workers see none of this machine's {gpu_count}{hidden}. "
            "Let them see their GPUs (--gpu-ids, or CUDA_VISIBLE_DEVICES), or drop --numa-binding."
        )
    if visible_count < nproc:
        raise LaunchError(
            f"--numa-binding binds local rank i to the CPUs near cuda:i, but the workers see "
            f"{visible_count} of this machine's {gpu_count} GPU(s){hidden} for {nproc} workers. "
            f"Use --nproc {visible_count} or fewer, or drop --numa-binding."
        )


# -- the rules (pure) ------------------------------------------------------------------------


def cpus_of(mode: Mode, topology: Topology, cuda_index: int) -> frozenset[int]:
    """The CPUs for the worker on cuda:`cuda_index`."""
    node = topology.gpu_nodes[cuda_index]
    near = topology.node_cpus[node]
    if not near:
        raise LaunchError(
            f"--numa-binding {mode}: GPU {topology.gpu_names[cuda_index]} is on NUMA node {node}, and "
            f"none of that node's CPUs is one this launcher may use ({format_cpulist(topology.usable)}, "
            "as taskset, a cpuset or the scheduler allows). Give the job CPUs on that node, or drop "
            "--numa-binding."
        )
    if mode == "node":
        return near
    if mode == "socket":
        return same_socket(topology, near)
    peers = [i for i, on in enumerate(topology.gpu_nodes) if on == node]  # CUDA order: torch sorts
    units = group_by(near, topology.unit_of)
    if mode == "exclusive":
        return even_share([units[key] for key in sorted(units)], peers.index(cuda_index), len(peers), node)
    # core-complex: the fullest cache group first, then the lowest CPU, as torch orders them
    groups = sorted(units.items(), key=lambda item: (-len(item[1]), item[0]))
    return groups[peers.index(cuda_index) % len(groups)][1]


def same_socket(topology: Topology, near: frozenset[int]) -> frozenset[int]:
    """All usable CPUs of the nodes in `near`'s package; torch places a node by its first CPU.

    A node with no usable CPU (memory only, as a Grace Hopper's GPU memory) is skipped, where
    torch stops with a ValueError.
    """
    socket = topology.unit_of[min(near)]
    chosen = [cpus for cpus in topology.node_cpus.values() if cpus and topology.unit_of[min(cpus)] == socket]
    return frozenset[int]().union(*chosen)


def even_share(cores: list[frozenset[int]], position: int, sharers: int, node: int) -> frozenset[int]:
    """The `position`-th of `sharers` even slices of `cores`; the first slices get the remainder."""
    per_gpu, extra = divmod(len(cores), sharers)
    if per_gpu < 1:
        raise LaunchError(
            f"--numa-binding exclusive: NUMA node {node} has {len(cores)} usable physical core(s) for "
            f"its {sharers} GPUs, and each GPU needs a core of its own. Use --numa-binding node to "
            "share the node's CPUs, or give the job more cores."
        )
    start = position * per_gpu + min(position, extra)
    end = start + per_gpu + (1 if position < extra else 0)
    return frozenset[int]().union(*cores[start:end])


def group_by(cpus: Iterable[int], unit_of: Mapping[int, int]) -> dict[int, frozenset[int]]:
    groups: dict[int, set[int]] = {}
    for cpu in cpus:
        groups.setdefault(unit_of[cpu], set()).add(cpu)
    return {key: frozenset(members) for key, members in groups.items()}


def parse_cpulist(text: str) -> frozenset[int]:
    """A sysfs CPU list ("0-3,8,10-11"; empty for a node without CPUs). ValueError if malformed."""
    cpus: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        first, dash, last = part.partition("-")
        low = int(first)
        high = int(last) if dash else low
        if low < 0 or high < low:
            raise ValueError(f"bad CPU range {part!r}")
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


def format_cpulist(cpus: Iterable[int]) -> str:
    """The sysfs and taskset spelling: "0-3,8,10-11"."""
    ranges: list[list[int]] = []
    for cpu in sorted(cpus):
        if ranges and cpu == ranges[-1][1] + 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in ranges)


# -- reading sysfs ---------------------------------------------------------------------------


def read_topology(mode: Mode, gpus: Sequence[Gpu], sysfs: Sysfs, usable: frozenset[int]) -> Topology:
    """Read what `mode` needs about these GPUs (CUDA order) and the CPUs near them."""
    gpu_nodes = tuple(sysfs.gpu_node(gpu) for gpu in gpus)
    node_cpus = {node: sysfs.node_cpus(node) & usable for node in sorted(set(gpu_nodes))}
    unit_of: dict[int, int] = {}
    if mode == "socket":
        for node in sorted(sysfs.possible_nodes() - node_cpus.keys()):
            node_cpus[node] = sysfs.node_cpus(node, missing_ok=True) & usable
        unit_of = {min(cpus): sysfs.package_of(min(cpus)) for cpus in node_cpus.values() if cpus}
    elif mode in SHARING_MODES:
        sharers = sysfs.thread_siblings if mode == "exclusive" else sysfs.cache_sharers
        unit_of = first_of_groups(set().union(*node_cpus.values()), sharers)
    return Topology(tuple(str(g.index) for g in gpus), gpu_nodes, node_cpus, unit_of, usable)


def first_of_groups(cpus: Iterable[int], sharers: Callable[[int], frozenset[int]]) -> dict[int, int]:
    """Each CPU's group (a core, a cache) named by its lowest CPU, as torch names it.

    The kernel lists a group the same from each of its members, so one read serves them all:
    a core complex of 16 CPUs costs one cache scan, not 16.
    """
    first_of: dict[int, int] = {}
    for cpu in sorted(cpus):
        if cpu not in first_of:
            group = sharers(cpu) | {cpu}
            first_of.update(dict.fromkeys(group, min(group)))
    return first_of


class Sysfs:
    """The files binding reads under a sysfs root: /sys, or a tree a test built."""

    def __init__(self, root: str = "/sys") -> None:
        self.root = root

    def gpu_node(self, gpu: Gpu) -> int:
        if not gpu.pci_address:
            raise LaunchError(
                f"--numa-binding: nvidia-smi gave no PCI bus id for GPU {gpu.index}, so its NUMA node "
                "is unknown. Check `nvidia-smi --query-gpu=index,pci.bus_id --format=csv`, or drop "
                "--numa-binding."
            )
        device = self._path(f"bus/pci/devices/{gpu.pci_address}")
        if not os.path.isdir(device):
            raise LaunchError(
                f"--numa-binding: GPU {gpu.index} is PCI device {gpu.pci_address} per nvidia-smi, but "
                f"{device} does not exist, so its NUMA node is unknown. In a container, let it see "
                "the host's /sys; else drop --numa-binding."
            )
        # A one-node machine often says -1; torch reads that as node 0.
        return max(self._number(f"bus/pci/devices/{gpu.pci_address}/numa_node", "the GPU's NUMA node"), 0)

    def node_cpus(self, node: int, *, missing_ok: bool = False) -> frozenset[int]:
        relative = f"devices/system/node/node{node}/cpulist"
        if missing_ok and not os.path.exists(self._path(relative)):
            return frozenset()
        return self._cpus(relative, f"the CPUs of NUMA node {node}")

    def possible_nodes(self) -> frozenset[int]:
        return self._cpus("devices/system/node/possible", "the NUMA nodes")

    def package_of(self, cpu: int) -> int:
        return self._number(f"devices/system/cpu/cpu{cpu}/topology/physical_package_id", f"CPU {cpu}'s socket")

    def thread_siblings(self, cpu: int) -> frozenset[int]:
        siblings = f"devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"
        return self._cpus(siblings, f"the hyperthreads of CPU {cpu}'s core")

    def cache_sharers(self, cpu: int) -> frozenset[int]:
        """The CPUs sharing `cpu`'s highest-level data cache; of equal levels, the first listed."""
        caches = f"devices/system/cpu/cpu{cpu}/cache"
        best_level = -1
        best: frozenset[int] | None = None
        for index in self._cache_indices(caches):
            entry = f"{caches}/index{index}"
            if self._text(f"{entry}/type", f"CPU {cpu}'s caches").strip() not in _DATA_CACHES:
                continue
            level = self._number(f"{entry}/level", f"CPU {cpu}'s caches")
            if level > best_level:
                best_level, best = level, self._cpus(f"{entry}/shared_cpu_list", f"CPU {cpu}'s caches")
        if best is None:
            raise LaunchError(
                f"--numa-binding core-complex: {self._path(caches)} lists no data cache, so CPU {cpu}'s "
                "core complex is unknown. Use --numa-binding node or exclusive instead."
            )
        return best

    def _cache_indices(self, caches: str) -> list[int]:
        try:
            names = os.listdir(self._path(caches))
        except OSError as exc:
            raise self._unreadable(caches, "the CPU caches", exc) from None
        return sorted(int(name[5:]) for name in names if name.startswith("index") and name[5:].isdecimal())

    def _path(self, relative: str) -> str:
        return os.path.join(self.root, relative)

    def _text(self, relative: str, what: str) -> str:
        try:
            with open(self._path(relative)) as file:
                return file.read()
        except OSError as exc:
            raise self._unreadable(relative, what, exc) from None

    def _number(self, relative: str, what: str) -> int:
        text = self._text(relative, what)
        try:
            return int(text.strip())
        except ValueError:
            raise self._unreadable(relative, what, f"it holds {text.strip()!r}") from None

    def _cpus(self, relative: str, what: str) -> frozenset[int]:
        text = self._text(relative, what)
        try:
            return parse_cpulist(text)
        except ValueError:
            raise self._unreadable(relative, what, f"it holds {text.strip()!r}") from None

    def _unreadable(self, relative: str, what: str, why: OSError | str) -> LaunchError:
        reason = why if isinstance(why, str) else why.strerror or str(why)
        return LaunchError(
            f"--numa-binding: could not read {self._path(relative)} ({reason}), which tells {what}. "
            "In a container, let it see the host's /sys; else drop --numa-binding."
        )
