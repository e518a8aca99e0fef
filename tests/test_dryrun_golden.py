"""The --dry-run text, pinned by golden files under tests/golden/.

Regenerate after an intended change with:  UPDATE_GOLDEN=1 pytest tests/test_dryrun_golden.py
then read the diff of tests/golden/ before committing it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from helpers_cli import cli_env, gpu_uuid, install_fake_nvidia_smi, run_cli, table_column
from ddplaunch.devices import Gpu, default_device_map, map_gpu_ids, parse_gpu_ids
from ddplaunch.dryrun import render_plan, warm_line
from ddplaunch.plan import PlanInputs, Program, build_plan

GOLDEN_DIR = Path(__file__).parent / "golden"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"

FAKE_GPUS = tuple(Gpu(i, gpu_uuid(i)) for i in range(8))

COMMON = dict(
    python="python3",
    hostname="node0",
    run_id="golden",
    master_port=29500,
    cpu_count=8,
    error_dir="/tmp/ddplaunch-golden",
    base_env={"HOME": "/home/user", "PATH": "/usr/bin:/bin"},
)


def case_cpu_nproc2() -> PlanInputs:
    return PlanInputs(
        program=Program("script", "train.py", ("--epochs", "3")),
        nproc=2,
        master_addr="127.0.0.1",
        devices=default_device_map(2, (), None),
        **COMMON,  # type: ignore[arg-type]
    )


def case_gpu_ids_0246() -> PlanInputs:
    gpu_ids = parse_gpu_ids("0,2,4,6")
    return PlanInputs(
        program=Program("script", "train.py", ()),
        nproc=len(gpu_ids),
        master_addr="127.0.0.1",
        devices=map_gpu_ids(gpu_ids, FAKE_GPUS, None),
        **COMMON,  # type: ignore[arg-type]
    )


def case_numa_exclusive_gpu_ids_0246() -> PlanInputs:
    """--numa-binding exclusive on two sockets of 8 cores x 2 threads, GPUs 0,2 on the first."""
    halves = [frozenset([*range(first, first + 4), *range(first + 16, first + 20)]) for first in (0, 4, 8, 12)]
    return replace(case_gpu_ids_0246(), cpus=tuple(halves))


def case_two_nodes_local_rank_arg() -> PlanInputs:
    return PlanInputs(
        program=Program("script", "train.py", ("--data", "/data/my set", "--lr", "0.1")),
        nproc=2,
        master_addr="10.0.0.1",
        devices=default_device_map(2, (), None),
        nnodes=2,
        node_rank=1,
        local_rank_arg=True,
        **COMMON,  # type: ignore[arg-type]
    )


def case_torchrun_options() -> PlanInputs:
    """--gpu-ids 1,3 --virtual-local-rank --role rank --signals-to-handle ...,SIGUSR1 --run-path."""
    gpu_ids = parse_gpu_ids("1,3")
    return PlanInputs(
        program=Program("run-path", "/abs/train.py", ("--job.config_file", "x.toml")),
        nproc=len(gpu_ids),
        master_addr="127.0.0.1",
        devices=map_gpu_ids(gpu_ids, FAKE_GPUS, None),
        role="rank",
        signals_to_handle="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        virtual_local_rank=True,
        **COMMON,  # type: ignore[arg-type]
    )


CASES = {
    "cpu_nproc2": case_cpu_nproc2,
    "gpu_ids_0246": case_gpu_ids_0246,
    "numa_exclusive_gpu_ids_0246": case_numa_exclusive_gpu_ids_0246,
    "two_nodes_local_rank_arg": case_two_nodes_local_rank_arg,
    "torchrun_options": case_torchrun_options,
}


def check_golden(name: str, actual: str) -> None:
    path = GOLDEN_DIR / f"{name}.txt"
    if UPDATE:
        GOLDEN_DIR.mkdir(exist_ok=True)
        path.write_text(actual)
        return
    if not path.exists():
        pytest.fail(f"{path} is missing; run with UPDATE_GOLDEN=1 to create it, then review it")
    expected = path.read_text()
    assert actual == expected, (
        f"dry-run output differs from {path}; if the change is intended, rerun with UPDATE_GOLDEN=1 "
        "and review the diff"
    )


@pytest.mark.unit
@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name: str) -> None:
    text = render_plan(build_plan(CASES[name]()))
    check_golden(name, text)


@pytest.mark.unit
def test_golden_content_sanity() -> None:
    """A few facts about the rendered cases that must hold whatever the golden files say."""
    cpu = render_plan(build_plan(case_cpu_nproc2()))
    assert "job: 1 node(s) x 2 worker(s) = world size 2; this is node 0; rendezvous at 127.0.0.1:29500" in cpu
    assert "  python3 -u train.py --epochs 3\n" in cpu
    assert "  OMP_NUM_THREADS=4\n" in cpu
    assert "rank 1: LOCAL_RANK=1 RANK=1 ROLE_RANK=1 TORCHELASTIC_ERROR_FILE=/tmp/ddplaunch-golden/attempt0/rank1.json" in cpu
    assert "HOME=" not in cpu  # the user's environment is not listed, only what is added

    gpu = render_plan(build_plan(case_gpu_ids_0246()))
    assert table_column(gpu, "physical GPU") == ["0", "2", "4", "6"]
    assert table_column(gpu, "device") == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert table_column(gpu, "CUDA_VISIBLE_DEVICES") == ["0,2,4,6"] * 4
    assert "  CUDA_VISIBLE_DEVICES=0,2,4,6\n" in gpu

    two = render_plan(build_plan(case_two_nodes_local_rank_arg()))
    assert "job: 2 node(s) x 2 worker(s) = world size 4; this is node 1; rendezvous at 10.0.0.1:29500" in two
    assert table_column(two, "global rank") == ["2", "3"]
    assert table_column(two, "node") == ["1", "1"]
    assert "command (local rank 0, global rank 2 shown; --local-rank differs per worker):" in two
    assert "  python3 -u train.py --local-rank=0 --data '/data/my set' --lr 0.1\n" in two
    assert "  rank 2: LOCAL_RANK=0 RANK=2 ROLE_RANK=2" in two
    assert "  rank 3: LOCAL_RANK=1 RANK=3 ROLE_RANK=3" in two


def test_cli_dry_run(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text("print('never run')\n")
    env = cli_env(install_fake_nvidia_smi(tmp_path / "bin", None), only_bin_dir=True)
    result = run_cli(
        ["--dry-run", "--nproc", "2", "--master-port", "29500", "--run-id", "golden", str(script), "--lr", "0.1"],
        env,
    )
    assert result.code == 0, result.output
    assert result.stderr == ""
    out = result.stdout
    lines = out.splitlines()
    assert lines[0] == "ddplaunch dry run: nothing was started."
    assert "world size 2" in lines[1] and "rendezvous at 127.0.0.1:29500" in lines[1]
    assert table_column(out, "global rank") == ["0", "1"]
    assert table_column(out, "device") == ["cpu", "cpu"]
    assert "command (the same for every worker):" in lines
    command = lines[lines.index("command (the same for every worker):") + 1]
    assert command.startswith("  ")
    assert sys.executable in command
    assert command.strip().split() == [sys.executable, "-u", str(script), "--lr", "0.1"]
    for key_line in ("  MASTER_ADDR=127.0.0.1", "  MASTER_PORT=29500", "  TORCHELASTIC_RUN_ID=golden",
                     "  WORLD_SIZE=2", "  LOCAL_WORLD_SIZE=2", "  TORCHELASTIC_USE_AGENT_STORE=False"):
        assert key_line in lines, key_line
    assert any(line.startswith("  rank 0: LOCAL_RANK=0 RANK=0 ROLE_RANK=0 TORCHELASTIC_ERROR_FILE=") for line in lines)
    assert any(line.startswith("  rank 1: LOCAL_RANK=1 RANK=1 ROLE_RANK=1 TORCHELASTIC_ERROR_FILE=") for line in lines)
    assert "port picked free" not in out  # the port was given
    assert "never run" not in out


def test_cli_dry_run_without_port_says_it_was_picked(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text("print('never run')\n")
    env = cli_env(install_fake_nvidia_smi(tmp_path / "bin", None), only_bin_dir=True)
    result = run_cli(["--dry-run", str(script)], env)
    assert result.code == 0, result.output
    assert "(port picked free now; a real run picks again)" in result.stdout
    assert table_column(result.stdout, "global rank") == ["0"]  # default: one worker


@pytest.mark.unit
@pytest.mark.parametrize(("args", "line"), [
    ((("torch",), 1, None, False),
     "--warm: one interpreter imports torch once, then forks every rank from it (restarts fork again); "
     "should that import start a thread or initialise CUDA, the ranks start cold instead"),
    ((("torch", "numpy"), 2, None, True),
     "--warm: on each node, one interpreter imports torch, numpy once, then forks every rank from it (restarts fork "
     "again); should that import start a thread or initialise CUDA, the ranks start cold instead; "
     "-m: not checked for a variable the module sets before it imports torch (a script is)"),
    ((("torch",), 1, "the workers' Python (/usr/bin/python2) is not the launcher's", False),
     "--warm: the workers' Python (/usr/bin/python2) is not the launcher's; a real run starts the workers cold"),
])
def test_dry_run_says_how_warm_ranks_start(args: tuple[tuple[str, ...], int, str | None, bool], line: str) -> None:
    assert warm_line(*args) == line


def test_cli_dry_run_warm_says_why_the_script_would_start_cold(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text("import os\nos.environ['OMP_NUM_THREADS'] = '8'\nimport torch\n")
    env = cli_env(install_fake_nvidia_smi(tmp_path / "bin", None), only_bin_dir=True)
    result = run_cli(["--dry-run", "--warm", "--nproc", "2", "--master-port", "29500", str(script)], env)
    assert result.code == 0, result.output
    said = ("--warm: train.py sets OMP_NUM_THREADS (line 2) before importing torch, which reads it at import; "
            "a real run starts the workers cold")
    assert said in result.stdout.splitlines(), result.stdout
    assert result.stderr == ""
