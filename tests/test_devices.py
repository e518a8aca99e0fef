"""GPU discovery and --gpu-ids mapping: table tests of the pure functions, then the real CLI
run against a fake nvidia-smi placed first on PATH."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from helpers_cli import (
    cli_env,
    gpu_uuid,
    install_fake_nvidia_smi,
    run_cli,
    table_column,
    table_rows,
)
from ddplaunch.devices import (
    DeviceMap,
    Gpu,
    default_device_map,
    map_gpu_ids,
    parse_gpu_ids,
    parse_nvidia_smi,
    sysfs_pci_address,
    visible_gpus,
)
from ddplaunch.errors import GpuDiscoveryError, LaunchError


def fake_gpus(count: int) -> tuple[Gpu, ...]:
    return tuple(Gpu(i, gpu_uuid(i)) for i in range(count))


GPUS8 = fake_gpus(8)
GPUS2 = fake_gpus(2)

# -- parse_nvidia_smi --------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("", ()),
        ("\n\n", ()),
        ("0, GPU-aaaa\n", (Gpu(0, "GPU-aaaa"),)),
        ("0, GPU-aaaa\n1, GPU-bbbb\n", (Gpu(0, "GPU-aaaa"), Gpu(1, "GPU-bbbb"))),
        ("0, GPU-aaaa\n\n  \n1, GPU-bbbb", (Gpu(0, "GPU-aaaa"), Gpu(1, "GPU-bbbb"))),  # blank lines
        ("  3 ,   GPU-cccc  \r\n", (Gpu(3, "GPU-cccc"),)),  # padding, CRLF
        ("0,GPU-aaaa\n", (Gpu(0, "GPU-aaaa"),)),
        ("\n".join(f"{i}, {gpu_uuid(i)}" for i in range(8)) + "\n", GPUS8),
        # the pci.bus_id column, in the sysfs form whatever nvidia-smi's case and domain width
        ("0, GPU-aaaa, 00000000:1B:00.0\n", (Gpu(0, "GPU-aaaa", "0000:1b:00.0"),)),
        ("0, GPU-aaaa, 0000:1b:00.0\n1, GPU-bbbb, 00000000:DC:00.0\n",
         (Gpu(0, "GPU-aaaa", "0000:1b:00.0"), Gpu(1, "GPU-bbbb", "0000:dc:00.0"))),
    ],
)
def test_parse_nvidia_smi_ok(output: str, expected: tuple[Gpu, ...]) -> None:
    assert parse_nvidia_smi(output) == expected


@pytest.mark.unit
@pytest.mark.parametrize(
    "output",
    [
        "No devices were found\n",
        "Failed to initialize NVML: Driver/library version mismatch\n",
        "0, GPU-aaaa\ngarbage\n",
        "0\n",  # one column
        "0, GPU-aaaa, extra\n",  # a third column that is no PCI bus id
        "0, GPU-aaaa, 1B:00.0\n",  # no PCI domain
        "0, GPU-aaaa, 00000000:1B:00.0, x\n",  # four columns
        "x, GPU-aaaa\n",  # index not a number
        "-1, GPU-aaaa\n",
        "0, \n",  # no uuid
        "index, uuid\n0, GPU-aaaa\n",  # a header (we ask for noheader)
    ],
)
def test_parse_nvidia_smi_broken(output: str) -> None:
    with pytest.raises(GpuDiscoveryError) as info:
        parse_nvidia_smi(output)
    message = str(info.value)
    assert "nvidia-smi" in message
    assert isinstance(info.value, LaunchError)  # so the CLI shows it as a usage error, exit 2


@pytest.mark.unit
@pytest.mark.parametrize(
    ("bus_id", "address"),
    [
        ("00000000:1B:00.0", "0000:1b:00.0"),  # nvidia-smi today
        ("0000:1B:00.0", "0000:1b:00.0"),  # older drivers
        ("0000:1b:00.0", "0000:1b:00.0"),  # already sysfs's form
        ("00010000:C1:00.1", "10000:c1:00.1"),  # a VMD domain wider than four digits stays whole
        ("0:1b:00.0", "0000:1b:00.0"),
        ("1b:00.0", None),
        ("0000:1b:00", None),
        ("0000:1b:00.8", None),  # functions are 0-7
        ("0000:1g:00.0", None),
        ("", None),
    ],
)
def test_sysfs_pci_address(bus_id: str, address: str | None) -> None:
    assert sysfs_pci_address(bus_id) == address


# -- parse_gpu_ids -----------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", ("0",)),
        ("0,2,4,6", ("0", "2", "4", "6")),
        ("6,4,2,0", ("6", "4", "2", "0")),  # order kept: LOCAL_RANK i uses the i-th
        (" 1 , 3 ", ("1", "3")),
        ("10", ("10",)),
        (gpu_uuid(3), (gpu_uuid(3),)),
        (f"0,{gpu_uuid(3)}", ("0", gpu_uuid(3))),
        ("MIG-GPU-aaaa/1/0", ("MIG-GPU-aaaa/1/0",)),
    ],
)
def test_parse_gpu_ids_ok(text: str, expected: tuple[str, ...]) -> None:
    assert parse_gpu_ids(text) == expected


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("0,,2", "empty entry"),
        ("", "empty entry"),
        ("0,", "empty entry"),
        (",1", "empty entry"),
        ("a", "'a' is not a GPU index or UUID"),
        ("-1", "'-1' is not a GPU index or UUID"),
        ("0,x", "'x' is not a GPU index or UUID"),
        ("1.0", "'1.0' is not a GPU index or UUID"),
        ("0 1", "'0 1' is not a GPU index or UUID"),
        ("cuda:0", "'cuda:0' is not a GPU index or UUID"),
        ("1,1", "twice"),
        ("0,2,0", "twice"),
    ],
)
def test_parse_gpu_ids_bad(text: str, says: str) -> None:
    with pytest.raises(LaunchError) as info:
        parse_gpu_ids(text)
    message = str(info.value)
    assert "--gpu-ids" in message
    assert says in message


# -- visible_gpus ------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("cvd", "expected_indices"),
    [
        (None, [0, 1, 2, 3, 4, 5, 6, 7]),  # unset: everything
        ("", []),  # set but empty: nothing
        ("4,5", [4, 5]),
        ("5,4", [5, 4]),  # CUDA's order is the variable's order
        (" 3 , 1 ", [3, 1]),
        (f"{gpu_uuid(6)},{gpu_uuid(2)}", [6, 2]),
        ("GPU-00000000-0000-0000-0000-000000000007", [7]),
        ("GPU-00000000-0000-0000-0000-00000000000", []),  # prefix of 10 UUIDs? ambiguous -> stop
        (f"1,{gpu_uuid(2)}", [1, 2]),  # mixed
        ("-1", []),  # the usual "hide all GPUs"
        ("0,1,-1,2", [0, 1]),  # stops at the first invalid id
        ("0,9,1", [0]),  # not present: stops there
        ("2,x,3", [2]),
        ("2,,3", [2]),
        ("NoDevFiles", []),
    ],
)
def test_visible_gpus(cvd: str | None, expected_indices: list[int]) -> None:
    assert [g.index for g in visible_gpus(GPUS8, cvd)] == expected_indices


@pytest.mark.unit
@pytest.mark.parametrize("cvd", ["4,4,5", "4,5,4"])
def test_visible_gpus_repeated_id_hides_everything(cvd: str) -> None:
    assert visible_gpus(GPUS8, cvd) == ()


@pytest.mark.unit
def test_visible_gpus_uuid_prefix() -> None:
    gpus = (Gpu(0, "GPU-1234abcd"), Gpu(1, "GPU-5678ef01"))
    assert visible_gpus(gpus, "GPU-5678") == (gpus[1],)
    assert visible_gpus(gpus, "GPU-") == ()  # too short / ambiguous


# -- map_gpu_ids -------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("requested", "gpus", "cvd", "expected"),
    [
        (("0", "2", "4", "6"), GPUS8, None, DeviceMap("0,2,4,6", ("0", "2", "4", "6"))),
        (("6", "1"), GPUS8, None, DeviceMap("6,1", ("6", "1"))),
        (("1",), GPUS2, None, DeviceMap("1", ("1",))),
        (("5",), GPUS8, "4,5", DeviceMap("5", ("5",))),  # inside the scheduler's allocation
        (("4", "5"), GPUS8, "4,5", DeviceMap("4,5", ("4", "5"))),
        (("5", "4"), GPUS8, "4,5", DeviceMap("5,4", ("5", "4"))),
        ((gpu_uuid(3), gpu_uuid(1)), GPUS8, None, DeviceMap(f"{gpu_uuid(3)},{gpu_uuid(1)}", ("3", "1"))),
        (("2", gpu_uuid(5)), GPUS8, None, DeviceMap(f"2,{gpu_uuid(5)}", ("2", "5"))),
        (("4",), GPUS8, f"{gpu_uuid(4)}", DeviceMap("4", ("4",))),  # CVD by UUID, --gpu-ids by index
    ],
)
def test_map_gpu_ids_ok(requested, gpus, cvd, expected: DeviceMap) -> None:
    devices = map_gpu_ids(requested, gpus, cvd)
    assert devices == expected
    # every worker gets the whole list; LOCAL_RANK i is physical GPU requested[i]
    assert devices.cuda_visible_devices == ",".join(requested)
    assert len(devices.physical) == len(requested)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("requested", "gpus", "cvd", "says"),
    [
        (("0",), (), None, "no GPU found"),
        (("7",), GPUS2, None, "GPU 7 is not on this machine (nvidia-smi lists 0, 1)"),
        (("0", "2"), GPUS2, None, "GPU 2 is not on this machine"),
        (("GPU-ffffffff",), GPUS8, None, "GPU GPU-ffffffff is not on this machine"),
        (("0",), GPUS8, "4,5", "outside CUDA_VISIBLE_DEVICES=4,5"),
        (("0",), GPUS8, "4,5", "allows physical GPUs 4,5"),
        (("4", "6"), GPUS8, "4,5", "GPU 6 is outside"),
        (("0",), GPUS8, "", "allows physical GPUs none"),
        (("0",), GPUS8, "-1", "allows physical GPUs none"),
        (("0", gpu_uuid(0)), GPUS8, None, "names the same GPU twice"),
        ((gpu_uuid(3), "3"), GPUS8, None, "names the same GPU twice"),
    ],
)
def test_map_gpu_ids_errors(requested, gpus, cvd, says: str) -> None:
    with pytest.raises(LaunchError) as info:
        map_gpu_ids(requested, gpus, cvd)
    message = str(info.value)
    assert "--gpu-ids" in message
    assert says in message


# -- default_device_map ------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("nproc", "gpus", "cvd", "physical"),
    [
        (2, (), None, ("", "")),  # no GPU known: nothing to show
        (2, GPUS8, None, ("0", "1")),
        (4, GPUS2, None, ("0", "1", "", "")),  # more workers than GPUs
        (2, GPUS8, "4,5", ("4", "5")),  # cuda:i is the i-th visible GPU
        (2, GPUS8, "6,2", ("6", "2")),
        (3, GPUS8, "6,2", ("6", "2", "")),
        (1, GPUS8, "", ("",)),
        (2, GPUS8, f"{gpu_uuid(7)},{gpu_uuid(3)}", ("7", "3")),
    ],
)
def test_default_device_map(nproc, gpus, cvd, physical) -> None:
    devices = default_device_map(nproc, gpus, cvd)
    assert devices == DeviceMap(cuda_visible_devices=None, physical=physical)  # CVD passes through


# -- end to end: the real CLI with a fake nvidia-smi on PATH ------------------------------------

WORKER_SCRIPT = """\
import os
print("SAW CVD=%s LOCAL_RANK=%s RANK=%s" % (
    os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("LOCAL_RANK"), os.environ.get("RANK")))
"""


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "work" / "show_env.py"
    path.parent.mkdir()
    path.write_text(WORKER_SCRIPT)
    return path


@pytest.fixture
def fake_smi(tmp_path: Path):
    """fake_smi(variant, **env) -> env dict for the CLI with that fake nvidia-smi first on PATH.

    variant None: no nvidia-smi at all (PATH holds only an empty directory).
    """

    def make(variant: str | None, **extra: str) -> dict[str, str]:
        bin_dir = install_fake_nvidia_smi(tmp_path / f"bin-{variant}", variant)
        return cli_env(bin_dir, only_bin_dir=variant is None, **extra)

    return make


def test_fake_nvidia_smi_itself(fake_smi, tmp_path: Path) -> None:
    import subprocess

    env = fake_smi("8gpu")
    done = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"],
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    assert parse_nvidia_smi(done.stdout) == GPUS8
    assert done.stdout.splitlines()[0] == "0, GPU-00000000-0000-0000-0000-000000000000"


def test_dry_run_gpu_ids_0246(fake_smi, script: Path) -> None:
    result = run_cli(["--dry-run", "--gpu-ids", "0,2,4,6", str(script)], fake_smi("8gpu"))
    assert result.code == 0, result.output
    assert "world size 4" in result.stdout
    rows = table_rows(result.stdout)
    assert len(rows) == 4
    assert table_column(result.stdout, "local rank") == ["0", "1", "2", "3"]
    assert table_column(result.stdout, "global rank") == ["0", "1", "2", "3"]
    assert table_column(result.stdout, "physical GPU") == ["0", "2", "4", "6"]
    assert table_column(result.stdout, "device") == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert table_column(result.stdout, "CUDA_VISIBLE_DEVICES") == ["0,2,4,6"] * 4
    assert "  CUDA_VISIBLE_DEVICES=0,2,4,6" in result.stdout.splitlines()


def test_dry_run_nproc_auto_uses_all_gpus(fake_smi, script: Path) -> None:
    result = run_cli(["--dry-run", "--nproc", "auto", str(script)], fake_smi("8gpu"))
    assert result.code == 0, result.output
    assert len(table_rows(result.stdout)) == 8
    assert table_column(result.stdout, "physical GPU") == [str(i) for i in range(8)]
    assert table_column(result.stdout, "device") == [f"cuda:{i}" for i in range(8)]
    assert "world size 8" in result.stdout


def usable_cpus() -> int:
    """The CPUs this process may run on (taskset, cpusets); the CLI it starts inherits them."""
    return len(os.sched_getaffinity(0))


def test_dry_run_nproc_auto_without_gpu_uses_cpus(fake_smi, script: Path) -> None:
    result = run_cli(["--dry-run", "--nproc", "auto", str(script)], fake_smi("nogpu"))
    assert result.code == 0, result.output
    assert len(table_rows(result.stdout)) == usable_cpus()
    assert set(table_column(result.stdout, "device")) == {"cpu"}


@pytest.mark.parametrize("variant", ["nogpu", None])
def test_dry_run_nproc_gpu_without_gpu(fake_smi, script: Path, variant: str | None) -> None:
    result = run_cli(["--dry-run", "--nproc", "gpu", str(script)], fake_smi(variant))
    assert result.code == 2, result.output
    assert "--nproc gpu" in result.stderr
    assert "no GPU found" in result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == ""


def test_dry_run_gpu_not_present(fake_smi, script: Path) -> None:
    result = run_cli(["--dry-run", "--gpu-ids", "5", str(script)], fake_smi("2gpu"))
    assert result.code == 2, result.output
    assert "--gpu-ids: GPU 5 is not on this machine (nvidia-smi lists 0, 1)" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("variant", "says"),
    [
        ("broken", "nvidia-smi printed"),
        ("failing", "nvidia-smi failed (exit 9: Failed to initialize NVML: Driver/library version mismatch)"),
    ],
)
@pytest.mark.parametrize("args", [["--gpu-ids", "0"], ["--nproc", "gpu"], ["--nproc", "auto"]])
def test_dry_run_unusable_nvidia_smi(fake_smi, script: Path, variant: str, says: str, args: list[str]) -> None:
    result = run_cli(["--dry-run", *args, str(script)], fake_smi(variant))
    assert result.code == 2, result.output
    assert "nvidia-smi" in result.stderr
    assert says in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("variant", ["broken", "failing", "nogpu", None])
def test_dry_run_without_gpu_ids_survives_any_nvidia_smi(fake_smi, script: Path, variant: str | None) -> None:
    result = run_cli(["--dry-run", "--nproc", "2", str(script)], fake_smi(variant))
    assert result.code == 0, result.output
    assert table_column(result.stdout, "device") == ["cpu", "cpu"]
    assert table_column(result.stdout, "physical GPU") == ["-", "-"]
    assert table_column(result.stdout, "CUDA_VISIBLE_DEVICES") == ["(unset)", "(unset)"]


def test_dry_run_without_gpu_ids_shows_gpus_when_known(fake_smi, script: Path) -> None:
    result = run_cli(["--dry-run", "--nproc", "2", str(script)], fake_smi("8gpu"))
    assert result.code == 0, result.output
    assert table_column(result.stdout, "physical GPU") == ["0", "1"]
    assert table_column(result.stdout, "device") == ["cuda:0", "cuda:1"]
    assert "CUDA_VISIBLE_DEVICES=" not in result.stdout  # not added: the user's (unset) passes through


@pytest.mark.parametrize("gpu_ids", ["4,5", "5", "5,4"])
def test_dry_run_inside_scheduler_allocation(fake_smi, script: Path, gpu_ids: str) -> None:
    env = fake_smi("8gpu", CUDA_VISIBLE_DEVICES="4,5")
    result = run_cli(["--dry-run", "--gpu-ids", gpu_ids, str(script)], env)
    assert result.code == 0, result.output
    assert table_column(result.stdout, "physical GPU") == gpu_ids.split(",")
    assert table_column(result.stdout, "CUDA_VISIBLE_DEVICES") == [gpu_ids] * len(gpu_ids.split(","))


@pytest.mark.parametrize("gpu_ids", ["0", "4,6", "3,5"])
def test_dry_run_outside_scheduler_allocation(fake_smi, script: Path, gpu_ids: str) -> None:
    env = fake_smi("8gpu", CUDA_VISIBLE_DEVICES="4,5")
    result = run_cli(["--dry-run", "--gpu-ids", gpu_ids, str(script)], env)
    assert result.code == 2, result.output
    assert "outside CUDA_VISIBLE_DEVICES=4,5" in result.stderr
    assert "allows physical GPUs 4,5" in result.stderr
    assert "Traceback" not in result.output


def test_dry_run_gpu_ids_by_uuid(fake_smi, script: Path) -> None:
    ids = f"{gpu_uuid(7)},{gpu_uuid(1)}"
    result = run_cli(["--dry-run", "--gpu-ids", ids, str(script)], fake_smi("8gpu"))
    assert result.code == 0, result.output
    assert table_column(result.stdout, "physical GPU") == ["7", "1"]
    assert table_column(result.stdout, "CUDA_VISIBLE_DEVICES") == [ids, ids]


def test_dry_run_cpu_without_nvidia_smi(fake_smi, script: Path) -> None:
    result = run_cli(["--dry-run", "--nproc", "2", str(script)], fake_smi(None))
    assert result.code == 0, result.output
    assert len(table_rows(result.stdout)) == 2
    assert table_column(result.stdout, "device") == ["cpu", "cpu"]
    assert "ddplaunch dry run: nothing was started." in result.stdout


def test_real_run_sees_gpu_ids(fake_smi, script: Path) -> None:
    result = run_cli(["--gpu-ids", "1,3", "--no-color", str(script)], fake_smi("8gpu"))
    assert result.code == 0, result.output
    seen = re.findall(r"SAW CVD=(\S+) LOCAL_RANK=(\S+) RANK=(\S+)", result.stdout)
    assert sorted(seen) == [("1,3", "0", "0"), ("1,3", "1", "1")], result.output
    # every line of a worker carries its rank prefix
    for line in result.stdout.splitlines():
        if "SAW" in line:
            rank = re.search(r"RANK=(\d+)$", line).group(1)  # type: ignore[union-attr]
            assert line.startswith(rank), line


# -- bugs found and fixed: kept as regression tests ---------------------------------------------


@pytest.mark.parametrize("nproc", ["gpu", "auto"])
def test_nproc_gpu_counts_only_visible_gpus(fake_smi, script: Path, nproc: str) -> None:
    """As torchrun (torch.cuda.device_count()): only the GPUs CUDA_VISIBLE_DEVICES lets through."""
    env = fake_smi("8gpu", CUDA_VISIBLE_DEVICES="4,5")
    result = run_cli(["--dry-run", "--nproc", nproc, str(script)], env)
    assert result.code == 0, result.output
    assert table_column(result.stdout, "physical GPU") == ["4", "5"]
    assert table_column(result.stdout, "device") == ["cuda:0", "cuda:1"]


@pytest.mark.parametrize("cvd", ["", "-1"])
def test_nproc_with_every_gpu_hidden(fake_smi, script: Path, cvd: str) -> None:
    env = fake_smi("8gpu", CUDA_VISIBLE_DEVICES=cvd)
    gpu = run_cli(["--dry-run", "--nproc", "gpu", str(script)], env)
    assert gpu.code == 2, gpu.output
    assert "--nproc gpu" in gpu.stderr and "Traceback" not in gpu.output
    auto = run_cli(["--dry-run", "--nproc", "auto", str(script)], env)
    assert auto.code == 0, auto.output
    assert len(table_rows(auto.stdout)) == usable_cpus()  # no visible GPU: one per usable CPU
    assert set(table_column(auto.stdout, "device")) == {"cpu"}


def test_dry_run_physical_column_follows_env_cvd(fake_smi, script: Path) -> None:
    result = run_cli(["--dry-run", "--nproc", "2", "--env", "CUDA_VISIBLE_DEVICES=4,5", str(script)],
                     fake_smi("8gpu"))
    assert result.code == 0, result.output
    assert table_column(result.stdout, "CUDA_VISIBLE_DEVICES") == ["4,5", "4,5"]
    assert table_column(result.stdout, "physical GPU") == ["4", "5"]
