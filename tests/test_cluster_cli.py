"""srun / mpirun: the CLI fills the topology from the cluster's variables; explicit flags win.

Real CLI runs (--dry-run, or an error before anything starts) with the variables Slurm and
Open MPI set for a task.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers_cli import cli_env, run_cli

SLURM_TASK = {
    "DDPLAUNCH_CLUSTER": "auto",
    "SLURM_JOB_ID": "1238234",
    "SLURM_STEP_ID": "0",
    "SLURM_NODEID": "2",
    "SLURM_PROCID": "2",
    "SLURM_NNODES": "4",
    "SLURM_NTASKS": "4",
    "SLURM_JOB_NODELIST": "gpu[07-09,11]",
}
MPI_TASK = {
    "DDPLAUNCH_CLUSTER": "auto",
    "OMPI_COMM_WORLD_SIZE": "3",
    "OMPI_COMM_WORLD_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "1",
}


@pytest.fixture
def script(tmp_path: Path) -> str:
    path = tmp_path / "train.py"
    path.write_text("print('never runs')\n")
    return str(path)


def dry_run(tmp_path: Path, env: dict[str, str], *args: str):
    return run_cli(["--dry-run", *args], {**cli_env(), **env}, cwd=tmp_path)


def test_srun_task_gets_its_node_rank_and_node_zero_from_slurm(tmp_path: Path, script: str) -> None:
    done = dry_run(tmp_path, SLURM_TASK, "--nproc", "2", script)
    assert done.code == 0, done.stderr
    assert "job: 4 node(s) x 2 worker(s) = world size 8; this is node 2; rendezvous at gpu07:23234" in done.stdout
    assert "detected Slurm: nnodes=4 from SLURM_NNODES, node_rank=2 from SLURM_NODEID" in done.stdout
    assert "master_addr=gpu07 from first host of SLURM_JOB_NODELIST=gpu[07-09,11]" in done.stdout
    assert "master_port=23234 derived from SLURM_JOB_ID=1238234" in done.stdout
    assert "rank 4: LOCAL_RANK=0 RANK=4" in done.stdout
    assert "TORCHELASTIC_USE_AGENT_STORE=True" in done.stdout


def test_explicit_flags_win_over_slurm_and_the_dry_run_says_so(tmp_path: Path, script: str) -> None:
    done = dry_run(tmp_path, SLURM_TASK, "--nproc", "2", "--master-port", "29555", "--node-rank", "3", script)
    assert done.code == 0, done.stderr
    assert "this is node 3; rendezvous at gpu07:29555" in done.stdout
    assert "winning over detection: --node-rank 3 (detected 2), --master-port 29555 (detected 23234)" in done.stdout


def test_master_addr_exported_to_the_tasks_wins_over_the_node_list(tmp_path: Path, script: str) -> None:
    done = dry_run(tmp_path, {**SLURM_TASK, "MASTER_ADDR": "10.1.2.3"}, "--nproc", "1", script)
    assert done.code == 0, done.stderr
    assert "rendezvous at 10.1.2.3:23234" in done.stdout


def test_srun_with_several_tasks_per_node_is_refused(tmp_path: Path, script: str) -> None:
    done = dry_run(tmp_path, {**SLURM_TASK, "SLURM_NTASKS": "16"}, "--nproc", "4", script)
    assert done.code == 2
    assert "--ntasks-per-node=1" in done.stderr and "Traceback" not in done.stderr


def test_mpirun_gives_ranks_and_needs_an_address(tmp_path: Path, script: str) -> None:
    done = dry_run(tmp_path, MPI_TASK, "--nproc", "2", script)
    assert done.code == 2
    assert "Open MPI" in done.stderr and "--master-addr" in done.stderr and "Traceback" not in done.stderr
    done = dry_run(tmp_path, MPI_TASK, "--nproc", "2", "--master-addr", "head01", script)
    assert done.code == 0, done.stderr
    assert "job: 3 node(s) x 2 worker(s) = world size 6; this is node 1; rendezvous at head01:29500" in done.stdout
    assert "detected Open MPI: nnodes=3 from OMPI_COMM_WORLD_SIZE, node_rank=1 from OMPI_COMM_WORLD_RANK" in done.stdout


def test_mpirun_with_several_ranks_per_node_is_refused(tmp_path: Path, script: str) -> None:
    done = dry_run(tmp_path, {**MPI_TASK, "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, "--master-addr", "h", script)
    assert done.code == 2
    assert "-npernode 1" in done.stderr


def test_outside_a_cluster_a_stray_master_addr_changes_nothing(tmp_path: Path, script: str) -> None:
    env = {"DDPLAUNCH_CLUSTER": "auto", "MASTER_ADDR": "10.9.9.9", "MASTER_PORT": "1234"}
    done = dry_run(tmp_path, env, "--nproc", "1", script)
    assert done.code == 0, done.stderr
    assert "job: 1 node(s) x 1 worker(s) = world size 1; this is node 0; rendezvous at 127.0.0.1:" in done.stdout
    assert "detected" not in done.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--nnodes", "2", "--rdzv-endpoint", "node0:29400"], "rendezvous at node0:29400"),
        (["--nnodes", "2", "--rdzv-endpoint", "node0"], "rendezvous at node0:29500"),
        (["--nnodes", "2", "--rdzv-endpoint", "[fd00::1]:29401"], "rendezvous at fd00::1:29401"),
        (["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "n:1"], "rendezvous at n:1"),
    ],
)
def test_rdzv_endpoint_is_torchruns_spelling_of_the_address(
    tmp_path: Path, script: str, args: list[str], needle: str
) -> None:
    done = dry_run(tmp_path, {}, *args, "--node-rank", "1", script)
    assert done.code == 0, done.stderr
    assert needle in done.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--rdzv-endpoint", "node0:http"], "--rdzv-endpoint 'node0:http' is not HOST or HOST:PORT"),
        (["--rdzv-endpoint", "node0:70000"], "--rdzv-endpoint 'node0:70000' is not HOST or HOST:PORT"),
        (["--rdzv-endpoint", "a:1", "--master-addr", "b"], "--rdzv-endpoint a:1 and --master-addr b disagree"),
        (["--rdzv-endpoint", "a:1", "--master-port", "2"], "--rdzv-endpoint a:1 and --master-port 2 disagree"),
        (["--join-timeout", "0"], "--join-timeout 0: use a number of seconds above 0"),
        (["--join-timeout", "nan"], "--join-timeout nan"),
    ],
)
def test_bad_rendezvous_flags_are_named(tmp_path: Path, script: str, args: list[str], needle: str) -> None:
    done = run_cli(["--nnodes", "2", *args, script], cli_env(), cwd=tmp_path)
    assert done.code == 2, done.output
    assert needle in done.stderr and "Traceback" not in done.stderr


def test_dry_run_without_node_rank_says_ranks_follow_arrival(tmp_path: Path, script: str) -> None:
    done = dry_run(tmp_path, {}, "--nnodes", "2", "--master-addr", "n0", script)
    assert done.code == 0, done.stderr
    assert "nodes take ranks in order of arrival" in done.stdout
