"""Fake machines for --numa-binding: a sysfs tree in a temporary folder, and the GPU list that
nvidia-smi would print for it.

CPUs are numbered as Linux numbers them: first one thread of every core, then the second
thread of every core (with C cores, core c has threads c and c + C). CPU lists are written
as ranges, the way the kernel writes them, without the code under test.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path

from ddplaunch.devices import Gpu, parse_nvidia_smi


@dataclass(frozen=True)
class Box:
    """A machine: sockets x NUMA nodes per socket x cores per node x threads per core.

    gpu_nodes: the numa_node file of each GPU's PCI device, by nvidia-smi index (-1 allowed).
    l3_per_node: how many L3 caches (core complexes) split each node's cores evenly.
    cpuless_nodes: NUMA nodes with memory and no CPU after the others (a GH200's GPU memory).
    """

    sockets: int
    nodes_per_socket: int
    cores_per_node: int
    smt: int
    l3_per_node: int
    gpu_nodes: tuple[int, ...]
    cpuless_nodes: int = 0

    @property
    def nodes(self) -> int:
        return self.sockets * self.nodes_per_socket

    @property
    def cores(self) -> int:
        return self.nodes * self.cores_per_node

    def threads(self, core: int) -> list[int]:
        return [core + t * self.cores for t in range(self.smt)]

    def ranges(self, first_core: int, core_count: int) -> str:
        """The CPU list of these cores' threads, as ranges: '0-3,16-19'."""
        last = first_core + core_count - 1
        spans = [(first_core + t * self.cores, last + t * self.cores) for t in range(self.smt)]
        return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def bus_id(index: int) -> str:
    """As nvidia-smi prints it: an eight-digit domain and upper case."""
    return f"00000000:{0x18 + index:02X}:00.0"


def sysfs_address(index: int) -> str:
    return f"0000:{0x18 + index:02x}:00.0"


def nvidia_smi_output(box: Box) -> str:
    return "".join(f"{i}, GPU-{i:08d}, {bus_id(i)}\n" for i in range(len(box.gpu_nodes)))


def gpus_of(box: Box) -> tuple[Gpu, ...]:
    """The GPUs as the launcher reads them from nvidia-smi (its parser turns the bus ids into sysfs form)."""
    return parse_nvidia_smi(nvidia_smi_output(box))


def install_fake_machine(folder: Path, box: Box) -> tuple[Path, Path]:
    """A fake nvidia-smi for this box in folder/bin and its sysfs tree in folder/sys: (bin, sys).

    The fake answers as the real one does: the columns asked for, bus ids only if asked.
    The CLI's tests put bin first on PATH (helpers_cli.cli_env) and point the binding at sys.
    """
    three = nvidia_smi_output(box).splitlines()
    two = [line.rpartition(",")[0] for line in three]
    script = (
        '#!/bin/sh\ncase "$1" in\n'
        f"--query-gpu=index,uuid,pci.bus_id) {_printf(three)} ;;\n"
        f"--query-gpu=index,uuid) {_printf(two)} ;;\n"
        '*) echo "fake nvidia-smi: not a query it knows: $*" >&2; exit 2 ;;\nesac\n'
    )
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / "nvidia-smi"
    exe.write_text(script)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return bin_dir, build_sysfs(folder / "sys", box)


def _printf(lines: list[str]) -> str:
    return "printf '%s\\n' " + " ".join(f"'{line}'" for line in lines)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def build_sysfs(root: Path, box: Box) -> Path:
    """Write what binding reads (and a little it does not) under root; return root."""
    all_nodes = box.nodes + box.cpuless_nodes
    write(root / "devices/system/node/possible", f"0-{all_nodes - 1}" if all_nodes > 1 else "0")
    for node in range(all_nodes):
        cpus = box.ranges(node * box.cores_per_node, box.cores_per_node) if node < box.nodes else ""
        write(root / f"devices/system/node/node{node}/cpulist", cpus)
    for core in range(box.cores):
        _write_core(root, box, core)
    for index, node in enumerate(box.gpu_nodes):
        write(root / f"bus/pci/devices/{sysfs_address(index)}/numa_node", str(node))
        write(root / f"bus/pci/devices/{sysfs_address(index)}/vendor", "0x10de")
    return root


def _write_core(root: Path, box: Box, core: int) -> None:
    node, in_node = divmod(core, box.cores_per_node)
    per_l3 = box.cores_per_node // box.l3_per_node
    l3_first = node * box.cores_per_node + in_node // per_l3 * per_l3
    siblings = box.ranges(core, 1)
    caches = [
        ("Data", 1, siblings),
        ("Instruction", 1, siblings),
        ("Unified", 2, siblings),
        ("Unified", 3, box.ranges(l3_first, per_l3)),
    ]
    for cpu in box.threads(core):
        base = root / f"devices/system/cpu/cpu{cpu}"
        write(base / "topology/physical_package_id", str(node // box.nodes_per_socket))
        write(base / "topology/thread_siblings_list", siblings)
        for i, (kind, level, shared) in enumerate(caches):
            write(base / f"cache/index{i}/type", kind)
            write(base / f"cache/index{i}/level", str(level))
            write(base / f"cache/index{i}/shared_cpu_list", shared)


# Two sockets of one node each, 8 cores x 2 threads per node, two L3s per node, 4 GPUs a node.
# Node 0 is CPUs 0-7,16-23; node 1 is 8-15,24-31.
DUAL = Box(sockets=2, nodes_per_socket=1, cores_per_node=8, smt=2, l3_per_node=2, gpu_nodes=(0, 0, 0, 0, 1, 1, 1, 1))
# Two sockets of two nodes each (sub-NUMA clustering), 4 cores x 2 threads per node, two L3s
# per node; GPUs 0-2 on node 0, 3 on node 1, 4-7 on node 2, none on node 3.
# Node n is CPUs 4n..4n+3 and 16+4n..16+4n+3.
SNC = Box(sockets=2, nodes_per_socket=2, cores_per_node=4, smt=2, l3_per_node=2, gpu_nodes=(0, 0, 0, 1, 2, 2, 2, 2))
# One node whose GPUs report numa_node -1, as one-node machines often do.
FLAT = Box(sockets=1, nodes_per_socket=1, cores_per_node=4, smt=2, l3_per_node=1, gpu_nodes=(-1, -1))
# A Grace Hopper-like node: CPUs on node 0, nodes 1-2 memory only.
GRACE = Box(sockets=1, nodes_per_socket=1, cores_per_node=4, smt=1, l3_per_node=1, gpu_nodes=(0,), cpuless_nodes=2)
# This test machine's two CPUs as two nodes: GPU 0 near CPU 0, GPU 1 near CPU 1.
TWO_CPUS = Box(sockets=2, nodes_per_socket=1, cores_per_node=1, smt=1, l3_per_node=1, gpu_nodes=(0, 1))
