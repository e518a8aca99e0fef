"""Many ranks on one node under a small open-files limit, and many SSH hosts at once.

The launcher needs descriptors per rank (ddplaunch.limits): it raises its soft limit up to the
hard one when that is enough, gives each worker the original soft limit back, and refuses
with exit 2, starting nothing, when even the hard limit is too small.
"""

from __future__ import annotations

import resource
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers_cli import TOKEN_VARIABLE, launcher_argv, processes_with_token, wait_until, write_script
from sshd import SshdPool, start_sshd_pool

from ddplaunch.limits import FIXED, PER_WORKER_LOG, PER_WORKER_PIPES, SPAWN_TRANSIENT, descriptors_needed

TIMEOUT_S = 60


def limited(soft: int, hard: int) -> Callable[[], None]:
    """A preexec for the test's own subprocess: the launcher starts under these limits."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return apply


def run_limited(args: list[str], env: dict[str, str], cwd: Path, soft: int, hard: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        launcher_argv(*args), env=env, cwd=cwd, preexec_fn=limited(soft, hard), capture_output=True,
        text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL,
    )


@pytest.mark.unit
@pytest.mark.parametrize(
    ("nproc", "log_files", "per_rank"),
    [(1, False, 2), (256, False, 2), (256, True, 3), (4096, True, 3)],
)
def test_descriptors_needed_counts_two_pipes_and_a_log_file_per_rank(nproc: int, log_files: bool, per_rank: int) -> None:
    fixed = descriptors_needed(0, log_files)
    assert fixed == FIXED + SPAWN_TRANSIENT
    assert descriptors_needed(nproc, log_files) == fixed + nproc * per_rank
    assert PER_WORKER_PIPES + PER_WORKER_LOG == 3


@pytest.mark.unit
def test_256_ranks_fit_in_a_1024_limit_even_with_log_files() -> None:
    assert descriptors_needed(256, True) <= 1024
    assert descriptors_needed(400, True) > 1024  # the size that used to die with EMFILE


def test_256_ranks_start_stream_and_stop_under_ulimit_1024(job_env: dict[str, str], tmp_path: Path, token: str) -> None:
    result = run_limited(
        ["--nproc", "256", "--force", "--no-python", "sh", "-c", 'echo "line of $RANK"'],
        job_env, tmp_path, 1024, 1024,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if "line of" in line]
    assert sorted(int(line.rsplit(" ", 1)[1]) for line in lines) == list(range(256))
    assert processes_with_token(token) == []


def test_a_raised_soft_limit_is_given_back_to_every_worker(job_env: dict[str, str], tmp_path: Path, token: str) -> None:
    """Soft 256 cannot hold 256 ranks with log files; hard 1024 can: the launcher raises its
    own, and every worker still sees 256, as it would under torchrun."""
    result = run_limited(
        ["--nproc", "256", "--force", "--log-dir", str(tmp_path / "logs"), "--no-python", "sh", "-c",
         'echo "limit $(ulimit -Sn)"'],
        job_env, tmp_path, 256, 1024,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    limits = [line.rsplit(" ", 1)[1] for line in result.stdout.splitlines() if "limit " in line]
    assert limits == ["256"] * 256
    assert len(list((tmp_path / "logs").glob("rank*.log"))) == 256
    assert processes_with_token(token) == []


def test_too_small_a_hard_limit_is_an_error_naming_it_and_starts_nothing(job_env: dict[str, str], tmp_path: Path) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    marker = tmp_path / "started"
    result = run_limited(
        ["--nproc", "40", "--force", "--no-python", "touch", str(marker)],
        {**job_env, "TMPDIR": str(temp)}, tmp_path, 64, 64,
    )
    assert result.returncode == 2
    needed = descriptors_needed(40, False)
    assert f"--nproc 40 needs about {needed} open files" in result.stderr
    assert "at most 64" in result.stderr and f"ulimit -n {needed}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists() and list(temp.iterdir()) == []
    assert TOKEN_VARIABLE in job_env


# -- 16 SSH hosts ---------------------------------------------------------------------------

WIDE_HOSTS = 16
WIDE_FIRST_ADDRESS = "127.0.8.2"  # 127.0.8.2..17: apart from the suite's pool (127.0.1.x) and the bench's
SAY_HELLO = """
import os
print(f"hello from rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']} on node {os.environ['GROUP_RANK']}", flush=True)
"""


@pytest.fixture(scope="module")
def wide_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshdPool]:
    pool = start_sshd_pool(WIDE_HOSTS, tmp_path_factory.mktemp("wide-sshd"), first_address=WIDE_FIRST_ADDRESS,
                           alias_prefix="wide", port=0, timeout=30.0)
    try:
        yield pool
    finally:
        pool.stop()


def test_a_16_host_job_connects_runs_every_rank_and_leaves_nothing(
    wide_pool: SshdPool, tmp_path: Path, job_env: dict[str, str], token: str
) -> None:
    home = wide_pool.make_home(tmp_path / "home")
    script = write_script(tmp_path / "hello.py", SAY_HELLO)
    result = subprocess.run(
        launcher_argv("--hosts", ",".join(wide_pool.aliases), "--nproc", "1", "--heartbeat-timeout", "5",
                      "--env", f"{TOKEN_VARIABLE}={token}", "--run-id", token, script),
        env=home.env(job_env), cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    said = sorted(line.split("| ", 1)[1] for line in result.stdout.splitlines() if "hello from rank" in line)
    assert said == sorted(f"hello from rank {r} of {WIDE_HOSTS} on node {r}" for r in range(WIDE_HOSTS))
    # Workers carry the token in their environment, agents in their command line (--run-id;
    # --env values never go on one).
    wait_until(lambda: not processes_with_token(token, in_command_line=True), 15, "no worker or agent left")
    wait_until(lambda: not wide_pool.session_processes(), 15, "no SSH session left on any of the 16 hosts")
