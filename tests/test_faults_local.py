"""Faults on one node, with real processes and real kernel states: a worker that SIGKILL cannot
end (cgroup freezer), a launcher killed with kill -9 (its temp dir), a --log-dir that fills up
(a tiny tmpfs), a rank that floods without newlines into a slowly read pipe.

The freezer and tmpfs tests need root (the CI machine runs them as root: never skipped there).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers_cli import TOKEN_VARIABLE, launcher_argv, processes_with_token, run_cli, wait_until, write_script
from sshd import SshHome

from ddplaunch.logs import Printer
from ddplaunch.ports import pick_free_port
from ddplaunch.procfs import KernelWait
from ddplaunch.report import unkillable_line
from ddplaunch.supervisor import Unkillable
from ddplaunch.watchdog import Orders, read_orders

NEEDS_ROOT = pytest.mark.skipif(
    os.geteuid() != 0 and not os.environ.get("CI"), reason="mounts a tmpfs / uses the cgroup freezer: needs root"
)


# -- the launcher killed with kill -9: its temp dir ---------------------------------------------


def test_the_guard_removes_the_temp_dir_of_a_launcher_killed_with_sigkill(
    start, job_env: dict[str, str], tmp_path: Path, token: str
) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    script = write_script(tmp_path / "wait.py", "import os, time\nprint('ready', os.environ['RANK'], flush=True)\ntime.sleep(300)\n")
    run = start("--nproc", "2", script, env=dict(job_env, TMPDIR=str(temp)))
    run.wait_lines("ready", 2)
    private = [p.name for p in temp.iterdir()]
    assert len(private) == 1 and private[0].startswith(f"ddplaunch-{run.proc.pid}-"), private
    assert (temp / private[0] / "attempt0").is_dir()
    run.signal(signal.SIGKILL)
    run.wait()
    wait_until(lambda: not processes_with_token(token), 5, "the guard to stop the workers")
    wait_until(lambda: not any(temp.iterdir()), 5, f"the guard to remove {private[0]}")


@pytest.mark.unit
def test_the_guard_reads_every_order_up_to_the_launchers_end() -> None:
    read_fd, write_fd = os.pipe()
    odd = "/tmp/a b\nc"  # a newline in a path cannot cut its order
    os.write(write_fd, f"+10\n+11\n-10\nrm {os.fsencode(odd).hex()}\n".encode())
    os.close(write_fd)
    orders = read_orders(read_fd)
    os.close(read_fd)
    assert orders == Orders(groups={11}, folders=[odd.encode()], clean=False)


# -- a --log-dir that fills up ----------------------------------------------------------------


@pytest.mark.unit
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
        """,
    )
    log_dir = small_tmpfs / "logs"
    done = run_cli(["--log-dir", str(log_dir), "--nproc", "2", script], job_env)
    assert done.code == 0, done.stderr[-2000:]  # the job's: before, the launcher crashed with 1
    for rank in (0, 1):
        seen = [line for line in done.stdout.splitlines() if line.startswith(f"{rank} | rank {rank} line")]
        assert [line.split()[5] for line in seen] == [f"{i:03d}" for i in range(300)]
    warnings = [line for line in done.stderr.splitlines() if "cannot write" in line]
    assert warnings == [
        f"ddplaunch: cannot write to --log-dir {log_dir} (No space left on device): the files stop here; "
        "the terminal still shows every line"
    ]


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


# -- a worker that SIGKILL cannot end ------------------------------------------------------------

FREEZER = Path("/sys/fs/cgroup/freezer")


@pytest.fixture
def freezer(token: str) -> Iterator[Callable[[int], None]]:
    """freeze(pid): puts one test worker into a cgroup v1 freezer group of this test's own
    (state D, wchan __refrigerator, SIGKILL left pending). Afterwards the group is thawed, so
    the pending SIGKILL ends the worker, and removed."""
    group = FREEZER / f"ddplaunch-test-{token}"
    group.mkdir()
    frozen: list[int] = []

    def freeze(pid: int) -> None:
        (group / "cgroup.procs").write_text(f"{pid}\n")
        frozen.append(pid)
        (group / "freezer.state").write_text("FROZEN\n")
        wait_until(lambda: (group / "freezer.state").read_text().strip() == "FROZEN", 5, "the freezer to freeze")

    try:
        yield freeze
    finally:
        (group / "freezer.state").write_text("THAWED\n")
        for pid in frozen:
            wait_until(lambda: not _alive(pid), 10, f"frozen pid {pid} to die once thawed")
        wait_until(lambda: not (group / "cgroup.procs").read_text().strip(), 5, "the group to empty")
        group.rmdir()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[0] != b"Z"
    except OSError:
        return False


# Rank 1 writes its pid and waits to be frozen; rank 0 fails once the test opens the fifo.
FREEZE_ME = """
import os, sys, time
rank, here = os.environ["RANK"], sys.argv[1]
if rank == "1":
    with open(os.path.join(here, "pid.tmp"), "w") as f:
        f.write(str(os.getpid()))
    os.rename(os.path.join(here, "pid.tmp"), os.path.join(here, "pid"))
    print("ready 1", flush=True)
    time.sleep(300)
print("ready 0", flush=True)
open(os.path.join(here, "go")).read()  # blocks until the test has frozen rank 1
raise SystemExit(5)
"""


@NEEDS_ROOT
def test_a_worker_that_would_not_die_is_named_and_the_launcher_exits(
    start, freezer: Callable[[int], None], tmp_path: Path, token: str
) -> None:
    script = write_script(tmp_path / "freeze_me.py", FREEZE_ME)
    os.mkfifo(tmp_path / "go")
    run = start("--nproc", "2", "--grace", "0.5", "--kill-timeout", "1", script, str(tmp_path))
    run.wait_lines("ready", 2)
    stuck = int((tmp_path / "pid").read_text())
    freezer(stuck)
    with open(tmp_path / "go", "w"):
        pass  # rank 0 reads end of file and fails
    failed = time.monotonic()
    assert run.wait(timeout=15) == 5
    took = time.monotonic() - failed
    assert took < 0.5 + 1 + 2.0, f"exited {took:.1f}s after the failure (grace 0.5 s + kill timeout 1 s)"
    assert f"rank 1 (local rank 1, pid {stuck}): would not die (below)" in run.err
    # The kernel names where the task froze: __refrigerator, or the sleep it froze in.
    said = rf"ddplaunch: rank 1 \(pid {stuck}\) would not die: state D \(disk sleep\) in \w+; "
    assert re.search(said + "the machine may need its GPU reset or a reboot", run.err), run.err
    assert "exit code 5" in run.err
    assert [p.pid for p in processes_with_token(token)] == [stuck]  # the guard stood down; only it is left


@NEEDS_ROOT
def test_over_ssh_the_agent_gives_up_too_and_the_head_shows_its_note(
    start, freezer: Callable[[int], None], ssh_home: SshHome, job_env: dict[str, str], tmp_path: Path, token: str
) -> None:
    script = write_script(tmp_path / "freeze_me.py", FREEZE_ME)
    os.mkfifo(tmp_path / "go")
    run = start(
        "--env", f"{TOKEN_VARIABLE}={token}", "--hosts", "host3", "--nproc", "2", "--grace", "0.5",
        "--kill-timeout", "1", script, str(tmp_path), env=ssh_home.env(job_env),
    )
    run.wait_lines("ready", 2, timeout=60)
    stuck = int((tmp_path / "pid").read_text())
    freezer(stuck)
    with open(tmp_path / "go", "w"):
        pass
    assert run.wait(timeout=30) == 5, run.err
    said = rf"ddplaunch: host3: rank 1 \(pid {stuck}\) would not die: state D \(disk sleep\) in \w+; "
    assert re.search(said + "the machine may need its GPU reset or a reboot", run.err), run.err


@NEEDS_ROOT
def test_the_guard_of_a_killed_launcher_gives_up_on_a_frozen_worker_and_still_cleans_up(
    start, freezer: Callable[[int], None], job_env: dict[str, str], tmp_path: Path, token: str
) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    script = write_script(tmp_path / "freeze_me.py", FREEZE_ME)
    os.mkfifo(tmp_path / "go")
    run = start("--nproc", "2", "--kill-timeout", "1", script, str(tmp_path), env=dict(job_env, TMPDIR=str(temp)))
    run.wait_lines("ready", 2)
    stuck = int((tmp_path / "pid").read_text())
    freezer(stuck)
    run.signal(signal.SIGKILL)
    run.wait()
    # The guard: SIGTERM, 1 s, SIGKILL, then at most --kill-timeout (1 s) before it removes the dir.
    wait_until(lambda: not any(temp.iterdir()), 5, "the guard to remove the temp dir")
    wait_until(lambda: [p.pid for p in processes_with_token(token)] == [stuck], 2, "all but the frozen one to go")


# -- the words for a process that would not die --------------------------------------------------

D = KernelWait("D (disk sleep)", "__refrigerator")
HINT = "the machine may need its GPU reset or a reboot"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("stuck", "line"),
    [
        (Unkillable(1234, 1, True, D), f"rank 1 (pid 1234) would not die: state D (disk sleep) in __refrigerator; {HINT}"),
        (Unkillable(1240, 1, False, D), f"a child of rank 1 (pid 1240) would not die: state D (disk sleep) in __refrigerator; {HINT}"),
        (Unkillable(1250, None, False, D), f"a process the workers left (pid 1250) would not die: state D (disk sleep) in __refrigerator; {HINT}"),
        (Unkillable(7, 0, True, KernelWait("R (running)", None)), f"rank 0 (pid 7) would not die: state R (running); {HINT}"),
    ],
)
def test_a_process_that_would_not_die_is_named_with_its_state_and_wchan(stuck: Unkillable, line: str) -> None:
    assert unkillable_line(stuck) == line


@NEEDS_ROOT
def test_between_static_nodes_the_stuck_node_tells_the_other_which_process_would_not_die(
    start, freezer: Callable[[int], None], tmp_path: Path, token: str
) -> None:
    """Node 1's worker is frozen; node 0's rank fails. Node 1 gives up on it after its
    --kill-timeout, and node 0, which waits for node 1 to stop (within its grace and kill
    timeout), prints node 1's closing word: which process, in which state."""
    script = write_script(tmp_path / "freeze_me.py", FREEZE_ME)
    os.mkfifo(tmp_path / "go")
    port = pick_free_port()
    nodes = [
        start("--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port), "--node-rank", str(node),
              "--nproc", "1", "--grace", "0.5", "--kill-timeout", "1", script, str(tmp_path))
        for node in (0, 1)
    ]
    nodes[1].wait_line("ready 1", timeout=120)
    nodes[0].wait_line("ready 0", timeout=30)
    stuck = int((tmp_path / "pid").read_text())
    freezer(stuck)
    with open(tmp_path / "go", "w"):
        pass  # rank 0 reads end of file and fails
    assert nodes[0].wait(timeout=30) == 5, nodes[0].err
    assert nodes[1].wait(timeout=30) == 5, nodes[1].err
    host = os.uname().nodename
    said = rf"node 1 \({re.escape(host)}\): rank 1 \(pid {stuck}\) would not die: state D \(disk sleep\) in \w+; "
    assert re.search(said + "the machine may need its GPU reset or a reboot", nodes[0].err), nodes[0].err
    assert re.search(rf"ddplaunch: rank 1 \(pid {stuck}\) would not die", nodes[1].err), nodes[1].err
