"""The sshd test fixture itself: OpenSSH's own client reaches every server, teardown is complete."""

from __future__ import annotations

import select
import subprocess
from pathlib import Path

import psutil
from helpers_cli import wait_until
from sshd import SshdPool, SshHome, start_sshd_pool


def _ssh(home: SshHome, alias: str, command: str, *options: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["ssh", "-F", str(home.config), *options, alias, command],
        env=home.env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:  # gone, or a zombie, since it was listed
        return []


def _alive(proc: psutil.Process) -> bool:
    try:
        return bool(proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def test_openssh_client_reaches_every_server_through_its_alias(ssh_home: SshHome, sshd_pool: SshdPool) -> None:
    procs = {alias: _ssh(ssh_home, alias, "echo $(id -un)@$SSH_CONNECTION") for alias in ssh_home.aliases}
    for alias, proc in procs.items():
        out, err = proc.communicate(timeout=20)
        server = sshd_pool.server(alias)
        assert proc.returncode == 0, err
        # SSH_CONNECTION ends with the server's address and port: the alias reached its own server.
        assert out.strip().startswith("root@127.") and out.split()[-2:] == [server.address, str(server.port)]
    assert len(set(sshd_pool.addresses)) == 8


def test_a_host_left_out_of_known_hosts_is_refused_by_openssh(ssh_home: SshHome) -> None:
    ssh_home.write_known_hosts(omit={"host2"})
    proc = _ssh(ssh_home, "host2", "true", "-o", "StrictHostKeyChecking=yes")
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 255
    assert "Host key verification failed" in err
    proc = _ssh(ssh_home, "host1", "true", "-o", "StrictHostKeyChecking=yes")
    assert proc.wait(timeout=20) == 0


def test_stop_ends_the_servers_and_their_sessions(tmp_path: Path) -> None:
    pool = start_sshd_pool(1, tmp_path / "srv", first_address="127.0.3.2", alias_prefix="lone")
    try:
        home = pool.make_home(tmp_path / "home")
        client = _ssh(home, "lone1", "echo started; exec sleep 300")
        assert client.stdout is not None
        ready, _, _ = select.select([client.stdout], [], [], 20)
        assert ready and client.stdout.readline() == "started\n"
        # its shell execs sleep right after the echo: a cmdline read mid-exec can come back empty
        wait_until(lambda: any("sleep" in " ".join(_cmdline(proc)) for proc in pool.session_processes()), 5,
                   "the session's sleep")
        sessions = pool.session_processes()
    finally:
        pool.stop()
    assert pool.servers[0].process.poll() is not None
    wait_until(lambda: not [proc for proc in sessions if _alive(proc)], 5, "sessions to end")
    assert client.wait(timeout=10) == 255  # the client saw its server go away
