"""A network cut between the SSH head and one host: packets dropped, no connection closed.

Real sshd servers of this file's own on 127.0.6.x (the other SSH tests use 127.0.1.x, so they
never see these rules) and real iptables DROP rules for the head's traffic with one of them.
All on loopback: the head connects from 127.0.0.1 to the host's address, so "-s ADDR" on
INPUT and "-d ADDR" on OUTPUT drop exactly the head <-> that sshd traffic (asserted from the
head's own sockets). --heartbeat-timeout 3 keeps the tests short; the bounds are the issue's
(head out within 30 s, no worker within 45 s at the default 10 s), scaled down.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from helpers_cli import TOKEN_VARIABLE, Run, launcher_argv, wait_until, write_script
from sshd import SshdPool, SshHome, start_sshd_pool

TIMEOUT_S = 3
HEAD_EXIT_S = 12.0  # after the cut: the timeout, a beat's interval, the other host's stop
NO_WORKER_S = 15.0  # after the cut: the cut host's agent hears nothing for the timeout, then stops

# Each rank writes its pid to DIR/RANK. Rank 1 (the host to be cut) floods its output once
# FLOOD exists, so that its agent's stdout is full when the head falls silent (a write to a
# dead head must not hold up the stop). Rank 0 fails (code 3) on SIGUSR1.
WORKER = """
import os, signal, sys, time
pids, flood = sys.argv[1], sys.argv[2]
with open(os.path.join(pids, os.environ["RANK"]), "w") as f:
    f.write(str(os.getpid()))
signal.signal(signal.SIGUSR1, lambda *_: sys.exit(3))
print(f"up {os.environ['RANK']}", flush=True)
while os.environ["RANK"] == "1" and not os.path.exists(flood):
    time.sleep(0.05)
while os.environ["RANK"] == "1":
    print("x" * 4000, flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def cut_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshdPool]:
    """Two hosts of our own, cut1 and cut2 on 127.0.6.2 and 127.0.6.3."""
    pool = start_sshd_pool(2, tmp_path_factory.mktemp("sshd-cut"), first_address="127.0.6.2", alias_prefix="cut", port=0)
    try:
        yield pool
    finally:
        pool.stop()


@pytest.fixture
def cut_home(cut_pool: SshdPool, tmp_path: Path) -> SshHome:
    return cut_pool.make_home(tmp_path / "home")


@contextmanager
def dropped(address: str) -> Iterator[None]:
    """Every packet to or from `address` dropped, as a pulled cable; the rules always go again."""
    rules = [["INPUT", "-s", address, "-j", "DROP"], ["OUTPUT", "-d", address, "-j", "DROP"]]
    added: list[list[str]] = []
    try:
        for rule in rules:
            subprocess.run(["iptables", "-I", *rule], check=True, capture_output=True)
            added.append(rule)
        yield
    finally:
        for rule in added:
            subprocess.run(["iptables", "-D", *rule], check=False, capture_output=True)


class Job:
    """A two-host job whose ranks block; their pids, and its start and the cut."""

    def __init__(self, start: Callable[..., Run], home: SshHome, job_env: dict[str, str], token: str, tmp_path: Path,
                 *extra: str) -> None:
        self.pids = tmp_path / "pids"
        self.pids.mkdir()
        self.flood = tmp_path / "flood"
        script = write_script(tmp_path / "worker.py", WORKER)
        self.run = start(
            "--hosts", "cut1,cut2", "--nproc", "1", "--heartbeat-timeout", str(TIMEOUT_S),
            "--env", f"{TOKEN_VARIABLE}={token}", *extra, script, str(self.pids), str(self.flood),
            env=home.env(job_env),
        )
        self.run.wait_lines("| up ", 2, timeout=60)
        self.workers = [int((self.pids / rank).read_text()) for rank in ("0", "1")]

    def head_talks_to(self, address: str) -> bool:
        connections = psutil.Process(self.run.proc.pid).net_connections("tcp")
        return any(c.raddr and c.raddr.ip == address and c.laddr.ip == "127.0.0.1" for c in connections)

    def exits_within(self, seconds: float, since: float) -> tuple[int, float]:
        code = self.run.wait(timeout=max(since + seconds - time.monotonic(), 0.1))
        return code, time.monotonic() - since


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_host_cut_off_mid_run_is_named_and_every_worker_stops(
    start: Callable[..., Run], cut_pool: SshdPool, cut_home: SshHome, job_env: dict[str, str], token: str, tmp_path: Path
) -> None:
    job = Job(start, cut_home, job_env, token, tmp_path)
    address = cut_pool.server("cut2").address
    assert job.head_talks_to(address)
    with dropped(address):
        cut_at = time.monotonic()
        job.flood.touch()  # the cut host's rank now fills its agent's pipe to sshd
        code, took = job.exits_within(HEAD_EXIT_S, cut_at)
        assert code == 1, job.run.err
        assert "lost cut2 (node 1): nothing heard from it for 3 s: the network or the host is down" in job.run.err
        wait_until(lambda: all(gone(pid) for pid in job.workers), NO_WORKER_S - (time.monotonic() - cut_at),
                   "no worker left on either host")
        agent_left = [p for p in cut_pool.server("cut2").session_processes() if "--agent" in p.cmdline()]
        wait_until(lambda: not any(p.is_running() and not gone(p.pid) for p in agent_left), 5, "the cut host's agent ended")
    assert took > TIMEOUT_S - 2  # the head waited for the silence, not less


def test_a_host_cut_off_while_the_others_wait_to_restart_ends_the_job(
    start: Callable[..., Run], cut_pool: SshdPool, cut_home: SshHome, job_env: dict[str, str], token: str, tmp_path: Path
) -> None:
    """Rank 0 fails just after the cut: its host is ready for the restart and waits for a go
    that needs the cut host too. The attempt's end does not reach a host waiting for a go, so
    the head stops it, and the job ends instead of waiting forever."""
    job = Job(start, cut_home, job_env, token, tmp_path, "--max-restarts", "1")
    with dropped(cut_pool.server("cut2").address):
        cut_at = time.monotonic()
        os.kill(job.workers[0], signal.SIGUSR1)
        code, took = job.exits_within(HEAD_EXIT_S, cut_at)
        assert code == 1, job.run.err  # a lost host's, not the "interrupted" of the host told to stop
        assert "lost cut2 (node 1): nothing heard from it for 3 s" in job.run.err
        wait_until(lambda: all(gone(pid) for pid in job.workers), NO_WORKER_S - (time.monotonic() - cut_at),
                   "no worker left on either host")


CHATTY = """
import sys
for i in range(2000):
    print(f"line {i} " + "y" * 1000)
sys.stdout.flush()
"""


def test_a_head_held_up_on_its_terminal_is_not_taken_for_gone(
    cut_home: SshHome, job_env: dict[str, str], token: str, tmp_path: Path
) -> None:
    """No packet is dropped here: the head's own stdout stops being read (a terminal paused
    with Ctrl-S), so its loop blocks on a write for longer than the timeout. Its beats come
    from a thread of their own, so the agents wait, and the job ends well once it is read."""
    script = write_script(tmp_path / "chatty.py", CHATTY)
    argv = launcher_argv("--hosts", "cut1,cut2", "--nproc", "1", "--heartbeat-timeout", "2",
                         "--env", f"{TOKEN_VARIABLE}={token}", script)
    with (tmp_path / "err").open("wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, env=cut_home.env(job_env), cwd=tmp_path)
        try:
            assert proc.stdout is not None and os.read(proc.stdout.fileno(), 1)  # running; 4 MB will not fit the pipe
            time.sleep(2.5 * 2)  # the stall itself is what is tested: unread for 2.5 timeouts
            out, _ = proc.communicate(timeout=30)
        finally:
            proc.kill() if proc.poll() is None else None
    said = (tmp_path / "err").read_text()
    assert proc.returncode == 0, said
    assert out.count(b" | line ") == 2 * 2000 and "nothing heard" not in said
