"""Faults on one node, with real processes and real kernel states: a worker that SIGKILL cannot
end (cgroup freezer), a launcher killed with kill -9 (its temp dir), a --log-dir that fills up
(a tiny tmpfs), a rank that floods without newlines into a slowly read pipe.

The freezer and tmpfs tests need root (the CI machine runs them as root: never skipped there).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_cli import launcher_argv, processes_with_token, run_cli, wait_until, write_script

from launcher.logs import Printer

NEEDS_ROOT = pytest.mark.skipif(
    os.geteuid() != 0 and not os.environ.get("CI"), reason="mounts a tmpfs / uses the cgroup freezer: needs root"
)


# -- a --log-dir that fills up ----------------------------------------------------------------


def test_a_failing_rank_file_warns_once_and_the_terminal_gets_every_line(tmp_path: Path) -> None:
    """/dev/full fails every write with ENOSPC: rank0.log pointing there is a full disk."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "rank0.log").symlink_to("/dev/full")
    out, err = tmp_path / "out", tmp_path / "err"
    with open(out, "wb") as out_file, open(err, "wb") as err_file:
        printer = Printer(world_ranks=[0, 1], world_size=2, colour=False, log_dir=str(logs),
                          stdout_fd=out_file.fileno(), stderr_fd=err_file.fileno())
        for i in range(3):
            printer.feed(0, 1, f"zero {i}\n".encode())
            printer.feed(1, 1, f"one {i}\n".encode())
        printer.note("after the failure")
        printer.close()
    assert out.read_bytes().decode().splitlines() == [f"{r} | {name} {i}" for i in range(3) for r, name in ((0, "zero"), (1, "one"))]
    warnings = [line for line in err.read_text().splitlines() if "cannot write" in line]
    assert warnings == [
        f"ddplaunch: cannot write to --log-dir {logs} (No space left on device): the files stop here; "
        "the terminal still shows every line"
    ]
    assert (logs / "rank1.log").read_text() == ""  # its first line came after the failure: the files stopped
    assert "after the failure" not in (logs / "launcher.log").read_text()


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs of this test's own, unmounted whatever happens."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@NEEDS_ROOT
def test_a_log_dir_that_fills_up_mid_run_warns_once_and_the_job_goes_on(
    small_tmpfs: Path, tmp_path: Path, job_env: dict[str, str]
) -> None:
    script = write_script(
        tmp_path / "chatty.py",
        """
        import os
        rank = os.environ["RANK"]
        for i in range(300):  # 2 ranks x 300 KB into 64 KiB
            print(f"rank {rank} line {i:03d} " + "y" * 1000, flush=True)
        raise SystemExit(3)
        """,
    )
    log_dir = small_tmpfs / "logs"
    done = run_cli(["--log-dir", str(log_dir), "--nproc", "2", script], job_env)
    assert done.code == 3, done.stderr[-2000:]
    for rank in (0, 1):
        seen = [line for line in done.stdout.splitlines() if line.startswith(f"{rank} | rank {rank} line")]
        assert [line.split()[5] for line in seen] == [f"{i:03d}" for i in range(300)]
    warnings = [line for line in done.stderr.splitlines() if "cannot write" in line]
    assert warnings == [
        f"ddplaunch: cannot write to --log-dir {log_dir} (No space left on device): the files stop here; "
        "the terminal still shows every line"
    ]
    assert "Root cause (first observed failure)" in done.stderr


# -- a rank that floods without newlines, read slowly -------------------------------------------

FLOOD_BYTES = 104 << 20
RSS_GROWTH_LIMIT = 8 << 20  # logs.MAX_LINE_BYTES bounds a rank's buffers to ~1.5 MiB; 1 MiB lines took ~25 MiB


def _peak_rss(pid: int) -> int:
    """VmHWM; 0 once the process has exited (a zombie has none)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            fields = [line.split() for line in status if line.startswith("VmHWM:")]
    except OSError:
        return 0
    return int(fields[0][1]) * 1024 if fields else 0


def test_a_rank_flooding_without_newlines_keeps_the_launcher_small_and_its_file_whole(
    tmp_path: Path, job_env: dict[str, str]
) -> None:
    script = write_script(
        tmp_path / "flood.py",
        f"""
        import sys
        chunk = b"x" * (1 << 20)
        for _ in range({FLOOD_BYTES >> 20}):
            sys.stdout.buffer.write(chunk)
        """,
    )
    logs = tmp_path / "logs"
    argv = launcher_argv("--log-dir", str(logs), "--nproc", "1", script)
    proc = subprocess.Popen(argv, cwd=tmp_path, env=job_env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        received, start_rss, peak_rss = _read_slowly(proc)
        assert proc.wait(timeout=30) == 0, proc.communicate()[1][-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert received == FLOOD_BYTES  # the terminal got every byte, cut into lines
    assert peak_rss - start_rss < RSS_GROWTH_LIMIT, f"{start_rss >> 20} MiB at the start, {peak_rss >> 20} MiB peak"
    file = logs / "rank0.log"
    assert file.stat().st_size == FLOOD_BYTES + 1  # every byte, and the newline the stream lacked
    with open(file, "rb") as rank_log:
        xs = sum(chunk.count(b"x") for chunk in iter(lambda: rank_log.read(1 << 20), b""))
    assert xs == FLOOD_BYTES


def _read_slowly(proc: subprocess.Popen[bytes]) -> tuple[int, int, int]:
    """Read the launcher's stdout at most ~64 MB/s, polling its peak RSS as it goes: how many
    'x' arrived, the peak RSS when the first bytes came, the last peak seen."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    received = reads = start_rss = peak_rss = 0
    deadline = time.monotonic() + 60
    while data := os.read(fd, 1 << 16):
        received += data.count(b"x")
        if reads % 16 == 0:
            peak_rss = max(peak_rss, _peak_rss(proc.pid))
            start_rss = start_rss or peak_rss
        reads += 1
        assert time.monotonic() < deadline, "the flood took over 60 s"
        time.sleep(0.001)  # the slow reader: the pipe stays full
    return received, start_rss, peak_rss
