"""--numa-binding: torch's rules on fake sysfs trees (tables, then torch's own code as the
judge), its errors, and real workers started bound to the sets."""

from __future__ import annotations

import os
import select
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from ddplaunch.devices import DeviceMap, Gpu, parse_nvidia_smi, visible_gpus
from ddplaunch.dryrun import render_plan
from ddplaunch.errors import LaunchError
from ddplaunch.numa import Sysfs, cpus_for_workers, format_cpulist, parse_cpulist, parse_mode
from ddplaunch.plan import PlanInputs, Program, build_plan
from ddplaunch.workers import WorkerTree
from numa_fakes import DUAL, FLAT, GRACE, SNC, TWO_CPUS, Box, build_sysfs, gpus_of, install_fake_machine, sysfs_address

MODES = ("node", "socket", "exclusive", "core-complex")


def span(first: int, last: int) -> frozenset[int]:
    return frozenset(range(first, last + 1))


def all_cpus(box: Box) -> frozenset[int]:
    return span(0, box.cores * box.smt - 1)


def bind(tmp_path: Path, box: Box, mode: str, nproc: int, cvd: str | None = None,
         usable: frozenset[int] | None = None, gpus: tuple[Gpu, ...] | None = None) -> tuple[frozenset[int], ...]:
    root = tmp_path / "sys"
    if not root.exists():
        build_sysfs(root, box)
    return cpus_for_workers(
        mode, nproc, gpus_of(box) if gpus is None else gpus, cvd,
        sysfs=str(root), usable=all_cpus(box) if usable is None else usable,
    )


# DUAL: node 0 = 0-7,16-23 (L3s: cores 0-3, 4-7), node 1 = 8-15,24-31 (L3s: 8-11, 12-15)
D0, D1 = span(0, 7) | span(16, 23), span(8, 15) | span(24, 31)
DUAL_CORE_PAIRS = [span(2 * i, 2 * i + 1) | span(16 + 2 * i, 17 + 2 * i) for i in range(8)]
DA, DB, DC, DD = (span(4 * i, 4 * i + 3) | span(16 + 4 * i, 19 + 4 * i) for i in range(4))


def snc_node(n: int) -> frozenset[int]:
    return span(4 * n, 4 * n + 3) | span(16 + 4 * n, 19 + 4 * n)


def snc_l3(n: int, half: int) -> frozenset[int]:
    first = 4 * n + 2 * half
    return span(first, first + 1) | span(16 + first, 17 + first)


def core(cpu: int, box: Box = SNC) -> frozenset[int]:
    return frozenset(box.threads(cpu))


NO_CORE_0 = all_cpus(SNC) - {0, 16}  # as `taskset -c 1-15,17-31`
NO_CPU_16 = all_cpus(SNC) - {16}  # a core with one of its threads out of reach
SPLIT_L3S = all_cpus(SNC) - {0, 1, 2, 18}  # node 0's two cache groups keep 16-17 and 3,19

# (id, box, mode, nproc, CUDA_VISIBLE_DEVICES, usable CPUs (None: all), the expected sets)
CASES = [
    ("dual-node", DUAL, "node", 8, None, None, [D0] * 4 + [D1] * 4),
    ("dual-socket", DUAL, "socket", 8, None, None, [D0] * 4 + [D1] * 4),  # one node per socket
    ("dual-exclusive", DUAL, "exclusive", 8, None, None, DUAL_CORE_PAIRS),
    ("dual-core-complex", DUAL, "core-complex", 8, None, None, [DA, DB, DA, DB, DC, DD, DC, DD]),
    # fewer workers than GPUs: a node's CPUs are still shared among all its visible GPUs
    ("dual-exclusive-nproc2", DUAL, "exclusive", 2, None, None, DUAL_CORE_PAIRS[:2]),
    # --gpu-ids 4,6 (or CUDA_VISIBLE_DEVICES): the two share node 1 between them, in CUDA order
    ("dual-exclusive-gpus-4-6", DUAL, "exclusive", 2, "4,6", None, [DC, DD]),
    ("dual-exclusive-gpus-6-4", DUAL, "exclusive", 2, "6,4", None, [DC, DD]),
    ("dual-node-gpus-6-1", DUAL, "node", 2, "6,1", None, [D1, D0]),
    ("snc-node", SNC, "node", 8, None, None, [snc_node(0)] * 3 + [snc_node(1)] + [snc_node(2)] * 4),
    ("snc-socket", SNC, "socket", 8, None, None, [snc_node(0) | snc_node(1)] * 4 + [snc_node(2) | snc_node(3)] * 4),
    # 4 cores for 3 GPUs: the first GPU takes the extra one; a lone GPU takes its whole node
    ("snc-exclusive", SNC, "exclusive", 8, None, None,
     [core(0) | core(1), core(2), core(3), snc_node(1), core(8), core(9), core(10), core(11)]),
    # more GPUs than L3 groups: they wrap around and share
    ("snc-core-complex", SNC, "core-complex", 8, None, None,
     [snc_l3(0, 0), snc_l3(0, 1), snc_l3(0, 0), snc_l3(1, 0),
      snc_l3(2, 0), snc_l3(2, 1), snc_l3(2, 0), snc_l3(2, 1)]),
    # what this process may not use is left out, whatever the mode
    ("snc-node-no-core-0", SNC, "node", 3, None, NO_CORE_0, [snc_node(0) - {0, 16}] * 3),
    ("snc-socket-no-core-0", SNC, "socket", 1, None, NO_CORE_0, [(snc_node(0) | snc_node(1)) - {0, 16}]),
    ("snc-exclusive-no-core-0", SNC, "exclusive", 3, None, NO_CORE_0, [core(1), core(2), core(3)]),
    # the fuller L3 group comes first
    ("snc-core-complex-no-core-0", SNC, "core-complex", 3, None, NO_CORE_0,
     [snc_l3(0, 1), snc_l3(0, 0) - {0, 16}, snc_l3(0, 1)]),
    # equal groups go by their lowest CPU, usable or not: 16-17 is the group of CPU 0, 3,19 of 2
    ("snc-core-complex-split-l3s", SNC, "core-complex", 3, None, SPLIT_L3S, [{16, 17}, {3, 19}, {16, 17}]),
    # a core counts once even if only one of its threads is usable
    ("snc-exclusive-no-cpu-16", SNC, "exclusive", 3, None, NO_CPU_16, [frozenset({0}) | core(1), core(2), core(3)]),
    # numa_node -1 (one node): node 0, as torch reads it
    ("flat-node", FLAT, "node", 2, None, None, [span(0, 7)] * 2),
    ("flat-socket", FLAT, "socket", 2, None, None, [span(0, 7)] * 2),
    ("flat-exclusive", FLAT, "exclusive", 2, None, None, [core(0, FLAT) | core(1, FLAT), core(2, FLAT) | core(3, FLAT)]),
    ("flat-core-complex", FLAT, "core-complex", 2, None, None, [span(0, 7)] * 2),
    # memory-only NUMA nodes (GH200) do not stop the socket search (torch stops there)
    ("grace-socket", GRACE, "socket", 1, None, None, [span(0, 3)]),
    ("grace-node", GRACE, "node", 1, None, None, [span(0, 3)]),
    ("two-cpus-node", TWO_CPUS, "node", 2, None, None, [{0}, {1}]),
    ("two-cpus-exclusive", TWO_CPUS, "exclusive", 2, None, None, [{0}, {1}]),
]


@pytest.mark.unit
@pytest.mark.parametrize(("box", "mode", "nproc", "cvd", "usable", "expected"),
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_cpus_for_workers(tmp_path: Path, box: Box, mode: str, nproc: int, cvd: str | None,
                          usable: frozenset[int] | None, expected: list[set[int]]) -> None:
    assert bind(tmp_path, box, mode, nproc, cvd, usable) == tuple(frozenset(cpus) for cpus in expected)


# -- torch's own code as the judge ----------------------------------------------------------

# (id, box, nproc, CUDA_VISIBLE_DEVICES, usable CPUs): every mode is checked on each
MACHINES = [
    ("dual", DUAL, 8, None, None),
    ("dual-nproc2", DUAL, 2, None, None),
    ("dual-gpus-6-4-1", DUAL, 3, "6,4,1", None),
    ("snc", SNC, 8, None, None),
    ("snc-no-core-0", SNC, 8, None, NO_CORE_0),
    ("snc-no-cpu-16", SNC, 8, None, NO_CPU_16),
    ("snc-split-l3s", SNC, 8, None, SPLIT_L3S),
    ("snc-gpus-5-4", SNC, 2, "5,4", None),
    ("flat", FLAT, 2, None, None),
    ("two-cpus", TWO_CPUS, 2, None, None),
]


def torch_binding(monkeypatch: pytest.MonkeyPatch, root: Path, box: Box, mode: str, nproc: int,
                  cvd: str | None, usable: frozenset[int]) -> tuple[frozenset[int], ...]:
    """torch/numa/binding.py's answer for this fake machine: its /sys reads and torch.cuda
    redirected to the fake tree and the fake GPUs, nothing else changed."""
    from torch.numa import binding

    cuda = visible_gpus(gpus_of(box), cvd)

    def at_root(path: str) -> str:
        assert path.startswith("/sys/"), path
        return str(root / path.removeprefix("/sys/"))

    def properties(index: int) -> SimpleNamespace:
        domain, bus, device_function = cuda[index].pci_address.split(":")
        device = device_function.split(".")[0]
        return SimpleNamespace(pci_domain_id=int(domain, 16), pci_bus_id=int(bus, 16), pci_device_id=int(device, 16))

    fake_os = SimpleNamespace(path=os.path, listdir=lambda p: os.listdir(at_root(p)), sched_getaffinity=lambda _: set(usable))
    fake_cuda = SimpleNamespace(device_count=lambda: len(cuda), get_device_properties=properties)
    monkeypatch.setattr(binding, "open", lambda path, *a, **k: open(at_root(path), *a, **k), raising=False)
    monkeypatch.setattr(binding, "os", fake_os)
    monkeypatch.setattr(binding, "torch", SimpleNamespace(cuda=fake_cuda))
    options = binding.NumaOptions(affinity_mode=binding.AffinityMode(mode))
    return tuple(frozenset(binding._get_logical_cpus_to_bind_to(gpu_index=i, numa_options=options)) for i in range(nproc))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("box", "nproc", "cvd", "usable"), [m[1:] for m in MACHINES], ids=[m[0] for m in MACHINES])
def test_same_sets_as_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, box: Box, nproc: int,
                            cvd: str | None, usable: frozenset[int] | None) -> None:
    ours = bind(tmp_path, box, mode, nproc, cvd, usable)
    theirs = torch_binding(monkeypatch, tmp_path / "sys", box, mode, nproc, cvd, usable or all_cpus(box))
    assert ours == theirs


# -- errors ---------------------------------------------------------------------------------


def remove(relative: str) -> Callable[[Path], None]:
    return lambda root: shutil.rmtree(root / relative) if (root / relative).is_dir() else (root / relative).unlink()


def overwrite(relative: str, text: str) -> Callable[[Path], None]:
    return lambda root: (root / relative).write_text(text)


def only_instruction_caches(root: Path) -> None:
    for path in root.glob("devices/system/cpu/cpu*/cache/index*/type"):
        path.write_text("Instruction\n")


def untouched(root: Path) -> None:
    pass


TWO_COLUMN_GPUS = parse_nvidia_smi("0, GPU-0\n1, GPU-1\n")  # an nvidia-smi that gave no bus id

# (id, mode, nproc, CUDA_VISIBLE_DEVICES, usable CPUs, GPUs (None: DUAL's), how sysfs is broken, says)
ERRORS = [
    ("unknown-mode", "nodes", 1, None, None, None, untouched, "--numa-binding 'nodes' is not a binding mode"),
    ("no-gpu", "node", 2, None, None, (), untouched, "--numa-binding needs GPUs"),
    ("all-hidden", "node", 2, "-1", None, None, untouched, "none of this machine's 8 (CUDA_VISIBLE_DEVICES=-1)"),
    ("too-few-gpus", "node", 3, "0,1", None, None, untouched, "Use --nproc 2 or fewer"),
    ("too-many-workers", "node", 9, None, None, None, untouched, "Use --nproc 8 or fewer"),
    ("no-bus-id", "node", 1, None, None, TWO_COLUMN_GPUS, untouched, "no PCI bus id for GPU 0"),
    ("pci-device-missing", "node", 3, None, None, None, remove(f"bus/pci/devices/{sysfs_address(2)}"),
     f"GPU 2 is PCI device {sysfs_address(2)} per nvidia-smi, but"),
    # exclusive reads every visible GPU's node, as torch does, even one no worker uses
    ("peer-pci-device-missing", "exclusive", 1, None, None, None, remove(f"bus/pci/devices/{sysfs_address(7)}"),
     "GPU 7 is PCI device"),
    ("numa-node-garbage", "node", 1, None, None, None, overwrite(f"bus/pci/devices/{sysfs_address(0)}/numa_node", "x"),
     "it holds 'x'"),
    ("node-cpulist-missing", "node", 1, None, None, None, remove("devices/system/node/node0/cpulist"),
     "could not read"),
    ("possible-missing", "socket", 1, None, None, None, remove("devices/system/node/possible"), "possible"),
    ("node-cpus-out-of-reach", "node", 8, None, D0, None, untouched,
     "GPU 4 is on NUMA node 1, and none of that node's CPUs is one this launcher may use (0-7,16-23"),
    ("too-few-cores", "exclusive", 4, None, span(0, 2) | span(8, 15), None, untouched,
     "NUMA node 0 has 3 usable physical core(s) for its 4 GPUs"),
    ("siblings-missing", "exclusive", 1, None, None, None, remove("devices/system/cpu/cpu3/topology/thread_siblings_list"),
     "cpu3/topology/thread_siblings_list"),
    ("package-missing", "socket", 1, None, None, None, remove("devices/system/cpu/cpu0/topology/physical_package_id"),
     "CPU 0's socket"),
    ("no-data-cache", "core-complex", 1, None, None, None, only_instruction_caches, "lists no data cache"),
    ("cache-dir-missing", "core-complex", 1, None, None, None, remove("devices/system/cpu/cpu4/cache"), "cpu4/cache"),
]


@pytest.mark.unit
@pytest.mark.parametrize(("mode", "nproc", "cvd", "usable", "gpus", "breaks", "says"),
                         [case[1:] for case in ERRORS], ids=[case[0] for case in ERRORS])
def test_errors(tmp_path: Path, mode: str, nproc: int, cvd: str | None, usable: frozenset[int] | None,
                gpus: tuple[Gpu, ...] | None, breaks: Callable[[Path], None], says: str) -> None:
    breaks(build_sysfs(tmp_path / "sys", DUAL))
    with pytest.raises(LaunchError) as info:
        bind(tmp_path, DUAL, mode, nproc, cvd, usable, gpus)
    message = str(info.value)
    assert message.startswith("--numa-binding")
    assert says in message
    assert "\n" not in message


@pytest.mark.unit
def test_cache_group_is_the_first_listed_of_the_highest_data_caches(tmp_path: Path) -> None:
    caches = {  # index -> (type, level, shared_cpu_list), for CPU 5
        0: ("Data", 1, "5"),
        1: ("Instruction", 4, "0-15"),  # not a data cache, whatever its level
        2: ("Unified", 3, "4-5"),
        10: ("Unified", 3, "0-7"),  # the same level, listed after index2 (not before, as text sorts)
    }
    for index, (kind, level, shared) in caches.items():
        entry = tmp_path / f"devices/system/cpu/cpu5/cache/index{index}"
        entry.mkdir(parents=True)
        for name, text in (("type", kind), ("level", str(level)), ("shared_cpu_list", shared)):
            (entry / name).write_text(text + "\n")
    (tmp_path / "devices/system/cpu/cpu5/cache/uevent").write_text("")
    assert Sysfs(str(tmp_path)).cache_sharers(5) == {4, 5}


# -- the small parsers ------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(("text", "mode"), [("node", "node"), ("core-complex", "core-complex"), (" Socket ", "socket")])
def test_parse_mode(text: str, mode: str) -> None:
    assert parse_mode(text) == mode


@pytest.mark.unit
@pytest.mark.parametrize("text", ["", "core_complex", "nodes", "numa"])
def test_parse_mode_bad(text: str) -> None:
    with pytest.raises(LaunchError, match="node, socket, exclusive or core-complex"):
        parse_mode(text)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "cpus"),
    [("0-3,8,10-11\n", {0, 1, 2, 3, 8, 10, 11}), ("\n", set()), ("5", {5}), ("0-0", {0}), (" 2 , 4-5 ", {2, 4, 5})],
)
def test_parse_cpulist(text: str, cpus: set[int]) -> None:
    assert parse_cpulist(text) == cpus


@pytest.mark.unit
@pytest.mark.parametrize("text", ["x", "3-1", "1-2-3", "-1", "0-"])
def test_parse_cpulist_bad(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cpulist(text)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("cpus", "text"),
    [({0, 1, 2, 3, 8, 10, 11}, "0-3,8,10-11"), (set(), ""), ({7}, "7"), ({1, 2}, "1-2"), ({4, 0, 2}, "0,2,4")],
)
def test_format_cpulist(cpus: set[int], text: str) -> None:
    assert format_cpulist(cpus) == text


# -- the plan carries the sets; the dry run shows them ----------------------------------------


def plan_inputs(cpus: tuple[frozenset[int], ...], nproc: int = 2, program: Program | None = None) -> PlanInputs:
    return PlanInputs(
        program=program or Program("script", "train.py"),
        nproc=nproc,
        master_addr="127.0.0.1",
        master_port=29500,
        run_id="numa",
        python=sys.executable,
        hostname="node0",
        cpu_count=2,
        devices=DeviceMap(None, ("0", "1")[:nproc]),
        cpus=cpus,
    )


@pytest.mark.unit
def test_plan_gives_each_worker_its_set() -> None:
    plan = build_plan(plan_inputs((frozenset({0, 2}), frozenset({1, 3}))))
    assert [w.cpus for w in plan.workers] == [{0, 2}, {1, 3}]
    assert [w.cpus for w in build_plan(plan_inputs(())).workers] == [None, None]


@pytest.mark.unit
def test_dry_run_shows_a_cpus_column_only_when_bound() -> None:
    from helpers_cli import table_column, table_header

    bound = render_plan(build_plan(plan_inputs((span(0, 7) | span(16, 23), span(8, 15)))))
    assert table_column(bound, "CPUs") == ["0-7,16-23", "8-15"]
    assert "CPUs" not in table_header(render_plan(build_plan(plan_inputs(()))))


def test_discovery_reads_the_bus_ids_a_fake_nvidia_smi_prints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The query the launcher really runs, answered by the fake the CLI tests use."""
    from ddplaunch.devices import discover_gpus

    bin_dir, root = install_fake_machine(tmp_path, DUAL)
    monkeypatch.setenv("PATH", str(bin_dir))
    gpus = discover_gpus()
    assert [g.pci_address for g in gpus] == [sysfs_address(i) for i in range(8)]
    assert cpus_for_workers("node", 8, gpus, None, sysfs=str(root), usable=all_cpus(DUAL)) == (D0,) * 4 + (D1,) * 4


# -- real workers, started bound --------------------------------------------------------------

SHOW_AFFINITY = Program("exec", sys.executable, ("-c", "import os; print(sorted(os.sched_getaffinity(0)))"))


def output_of(fd: int, timeout: float = 20.0) -> str:
    """Everything a worker writes to this pipe until it closes it, within the deadline."""
    deadline, chunks = time.monotonic() + timeout, []
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"no end of output within {timeout}s"
            chunk = os.read(fd, 4096)
            if not chunk:
                return b"".join(chunks).decode()
            chunks.append(chunk)
    finally:
        os.close(fd)


def test_workers_start_bound_to_the_sets(tmp_path: Path) -> None:
    """The sets for this 2-CPU machine described as two NUMA nodes, each with one GPU; each
    worker reports its own affinity from inside."""
    own = frozenset(os.sched_getaffinity(0))
    if not {0, 1} <= own:
        pytest.skip(f"needs CPUs 0 and 1; this process may use {sorted(own)}")
    cpus = bind(tmp_path, TWO_CPUS, "node", 2, usable=own)
    assert cpus == ({0}, {1})
    plan = build_plan(plan_inputs(cpus, program=SHOW_AFFINITY))
    unbound = build_plan(plan_inputs((), nproc=1, program=SHOW_AFFINITY)).workers[0]
    tree = WorkerTree(watchdog=None)
    seen = []
    for spec in (*plan.workers, unbound):
        worker, pipes = tree.spawn(spec, dict(os.environ))
        assert frozenset(os.sched_getaffinity(0)) == own  # the launcher got its own mask back
        os.close(pipes.stderr)
        seen.append(output_of(pipes.stdout).strip())
        assert os.waitpid(worker.pid, 0)[1] == 0
    assert seen == ["[0]", "[1]", str(sorted(own))]


# -- through the command line ---------------------------------------------------------------------


def test_the_cli_starts_each_worker_bound_near_its_gpu(tmp_path: Path) -> None:
    """`ddplaunch --numa-binding node` on this 2-CPU machine described as two NUMA nodes with
    one GPU each: each rank reports its own affinity; the dry run shows the same sets."""
    from helpers_cli import cli_env, run_cli

    if not {0, 1} <= frozenset(os.sched_getaffinity(0)):
        pytest.skip("needs CPUs 0 and 1")
    bin_dir, sys_dir = install_fake_machine(tmp_path, TWO_CPUS)
    env = cli_env(bin_dir, DDPLAUNCH_SYSFS=str(sys_dir))
    script = tmp_path / "show.py"
    script.write_text("import os\nprint('cpus', sorted(os.sched_getaffinity(0)))\n")
    run = run_cli(["--numa-binding", "node", "--nproc", "2", str(script)], env, cwd=tmp_path)
    assert run.code == 0, run.stderr
    assert sorted(line for line in run.stdout.splitlines() if "cpus" in line) == ["0 | cpus [0]", "1 | cpus [1]"]
    dry = run_cli(["--numa-binding", "node", "--nproc", "2", "--dry-run", str(script)], env, cwd=tmp_path)
    assert dry.code == 0 and "CPUs" in dry.stdout, dry.stderr


def test_the_cli_without_gpus_refuses_numa_binding(tmp_path: Path) -> None:
    from helpers_cli import cli_env, install_fake_nvidia_smi, run_cli

    script = tmp_path / "s.py"
    script.write_text("print('ran')\n")
    env = cli_env(install_fake_nvidia_smi(tmp_path / "bin", "nogpu"))
    run = run_cli(["--numa-binding", "node", str(script)], env, cwd=tmp_path)
    assert run.code == 2 and "--numa-binding" in run.stderr and "ran" not in run.stdout
    assert "Traceback" not in run.stderr
