"""The SSH connection layer against real sshd servers: config, host keys, login, many hosts."""

from __future__ import annotations

import base64
import getpass
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paramiko
import psutil
import pytest
from helpers_cli import wait_until
from sshd import SshdPool, SshHome, SshServer, new_user_key, start_sshd_pool

from ddplaunch import known_hosts as kh
from ddplaunch.errors import LaunchError
from ddplaunch.ssh import SshError, SshTarget, connect, connect_all, resolve_target

FLAG = "--ssh-accept-new-host-keys"


# --- resolve_target: pure, with a temporary config file -------------------------------------

CONFIG = """
Host node1
    HostName 10.0.0.1
    User alice
    Port 2222
    IdentityFile ~/keys/node1_key
    IdentityFile /abs/second_key

Host gpu*
    HostName %h.cluster.example

Host *
    User bob
"""
NODE1_KEYS = ("{home}/keys/node1_key", "/abs/second_key")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("host", "user", "port", "expected"),
    [
        ("node1", None, None, SshTarget("node1", "10.0.0.1", 2222, "alice", NODE1_KEYS)),
        ("node1", "carol", 22, SshTarget("node1", "10.0.0.1", 22, "carol", NODE1_KEYS)),
        ("gpu7", None, None, SshTarget("gpu7", "gpu7.cluster.example", 22, "bob", ())),
        ("10.9.9.9", None, 2200, SshTarget("10.9.9.9", "10.9.9.9", 2200, "bob", ())),
    ],
)
def test_resolve_target_applies_the_config_and_explicit_values_win(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    host: str,
    user: str | None,
    port: int | None,
    expected: SshTarget,
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    config = tmp_path / "config"
    config.write_text(CONFIG)
    files = tuple(name.format(home=tmp_path) for name in expected.identity_files)
    want = SshTarget(expected.alias, expected.hostname, expected.port, expected.user, files)
    assert resolve_target(host, user, port, config_path=str(config)) == want


@pytest.mark.unit
def test_resolve_target_reads_the_users_config_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_target("node1", None, None) == SshTarget("node1", "node1", 22, getpass.getuser(), ())
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text(CONFIG)
    assert resolve_target("node1", None, None).hostname == "10.0.0.1"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("config", "needle"),
    [
        (None, "does not exist"),
        ("Host node1\n    Port twenty\n", "'twenty'"),
        ("Host node1\n    Port 70000\n", "1-65535"),
        ("Host node1\n    ProxyJump bastion\n", "Proxyjump"),
        ("Host node1\n    =broken\n", "could not be used"),
    ],
)
def test_resolve_target_config_mistakes_are_launch_errors(tmp_path: Path, config: str | None, needle: str) -> None:
    path = tmp_path / "config"
    if config is not None:
        path.write_text(config)
    with pytest.raises(LaunchError) as raised:
        resolve_target("node1", None, None, config_path=str(path))
    assert needle in str(raised.value) and "node1" in str(raised.value)


# --- helpers for the live tests --------------------------------------------------------------


def _run(client: paramiko.SSHClient, command: str) -> str:
    _, stdout, _ = client.exec_command(command, timeout=10)
    out: bytes = stdout.read()
    assert stdout.channel.recv_exit_status() == 0
    return out.decode()


def _blob(server: SshServer) -> bytes:
    return base64.b64decode(server.host_public_key.split()[1])


def _target(home: SshHome, alias: str) -> SshTarget:
    return resolve_target(alias, None, None, config_path=str(home.config))


def _refused(target: SshTarget, *, accept_new_host_keys: bool, timeout: float = 10.0) -> SshError:
    """The error connect() raises; a connection that succeeds after all is closed, then fails."""
    try:
        client = connect(target, accept_new_host_keys=accept_new_host_keys, timeout=timeout)
    except SshError as exc:
        return exc
    client.close()
    raise AssertionError(f"connecting to {target.label} succeeded")


def _assert_all_closed(pool: SshdPool) -> None:
    """No session left on any server, no SSH socket or paramiko thread left in this process."""
    try:
        wait_until(lambda: not pool.session_processes(), 5, "sshd sessions to end")
    except AssertionError:
        left = [(proc.pid, proc.status(), proc.cmdline()) for proc in pool.session_processes()]
        raise AssertionError(f"sshd sessions still open: {left}") from None
    ports = {server.port for server in pool.servers}
    addresses = set(pool.addresses)

    def open_sockets() -> list[object]:
        return [
            conn
            for conn in psutil.Process().net_connections(kind="tcp")
            if conn.raddr and conn.raddr.ip in addresses and conn.raddr.port in ports
        ]

    wait_until(lambda: not open_sockets(), 5, "client sockets to close")
    wait_until(lambda: not _transport_threads(), 5, "paramiko transport threads to end")


def _transport_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if isinstance(t, paramiko.Transport) and t.is_alive()]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A TCP port that accepts connections (the kernel does) but never says anything."""
    with socket.create_server(("127.0.0.1", 0), backlog=16) as server:
        yield server.getsockname()[1]


@pytest.fixture
def http_port() -> Iterator[int]:
    """A TCP port that answers like a web server and hangs up: not SSH."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)

    def answer() -> None:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    if thread.is_alive():  # the test did not call: be the caller, so that accept() returns
        socket.create_connection(server.getsockname(), timeout=5).close()
    thread.join(timeout=10)
    server.close()


# --- connect ---------------------------------------------------------------------------------


def test_connect_through_an_alias_runs_commands_as_the_configured_user(ssh_home: SshHome) -> None:
    client = connect(_target(ssh_home, "host1"), accept_new_host_keys=False)
    try:
        assert _run(client, "id -un; echo $SSH_CONNECTION").split()[0] == "root"
        transport = client.get_transport()
        assert transport.getpeername() == ("127.0.1.2", ssh_home.servers[0].port)
        # A dead link must be noticed: SSH keepalives give TCP something to time out on.
        assert transport.packetizer._Packetizer__keepalive_interval == 5
        assert transport.sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert transport.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 20_000
    finally:
        client.close()


def test_unknown_host_key_is_refused_and_nothing_is_written(ssh_home: SshHome, sshd_pool: SshdPool) -> None:
    ssh_home.write_known_hosts(omit={"host2"})
    before = ssh_home.known_hosts.read_bytes()
    server = sshd_pool.server("host2")
    error = _refused(_target(ssh_home, "host2"), accept_new_host_keys=False)
    message = str(error)
    assert message.startswith(f"host2 (root@{server.address}:{server.port}): its host key is not known")
    assert kh.fingerprint(_blob(server)) in message and "ED25519" in message
    port = "" if server.port == 22 else f"-p {server.port} "
    assert f"ssh-keyscan -H {port}{server.address} >> {ssh_home.known_hosts}" in message
    assert FLAG in message and "\n" not in message
    assert error.hosts == ("host2",)
    assert ssh_home.known_hosts.read_bytes() == before
    _assert_all_closed(sshd_pool)


def _openssh_strict(home: SshHome, alias: str) -> subprocess.CompletedProcess[str]:
    """OpenSSH's own client runs `true` on the alias and accepts only keys in known_hosts."""
    return subprocess.run(
        ["ssh", "-F", str(home.config), "-o", "StrictHostKeyChecking=yes", alias, "true"],
        env=home.env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


def test_accepting_a_new_key_records_it_for_paramiko_and_openssh(ssh_home: SshHome, sshd_pool: SshdPool) -> None:
    ssh_home.write_known_hosts(omit={"host3"})
    connect(_target(ssh_home, "host3"), accept_new_host_keys=True).close()
    added = ssh_home.known_hosts.read_text().splitlines()[-1]
    assert added.startswith("|1|") and added.endswith(sshd_pool.server("host3").host_public_key)
    connect(_target(ssh_home, "host3"), accept_new_host_keys=False).close()
    ssh = _openssh_strict(ssh_home, "host3")
    assert ssh.returncode == 0, ssh.stderr
    assert len(ssh_home.known_hosts.read_text().splitlines()) == len(sshd_pool.servers)


@pytest.fixture(scope="module")
def odd_port_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshdPool]:
    """One server on a port other than 22, where known_hosts says "[host]:port"."""
    root = tmp_path_factory.mktemp("odd")
    pool = start_sshd_pool(1, root, first_address="127.0.2.2", alias_prefix="odd", port=0)
    yield pool
    pool.stop()


def test_non_default_port_uses_the_bracketed_known_hosts_name(
    odd_port_pool: SshdPool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = odd_port_pool.make_home(tmp_path / "home", omit={"odd1"})
    monkeypatch.setenv("HOME", str(home.home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    server = odd_port_pool.servers[0]
    assert server.port != 22
    message = str(_refused(_target(home, "odd1"), accept_new_host_keys=False))
    assert f"no line for '[127.0.2.2]:{server.port}'" in message
    assert f"ssh-keyscan -H -p {server.port} 127.0.2.2 >>" in message
    connect(_target(home, "odd1"), accept_new_host_keys=True).close()
    entries = kh.read_known_hosts([str(home.known_hosts)])
    check = kh.check_host_key(entries, f"[127.0.2.2]:{server.port}", "ssh-ed25519", _blob(server))
    assert check.verdict == "known"
    ssh = _openssh_strict(home, "odd1")
    assert ssh.returncode == 0, ssh.stderr


def _other_key(tmp_path: Path, key_type: str = "ed25519") -> str:
    path = tmp_path / f"other_{key_type}"
    subprocess.run(["ssh-keygen", "-q", "-t", key_type, "-N", "", "-f", str(path)], check=True, timeout=30)
    return " ".join(path.with_suffix(".pub").read_text().split()[:2])


@pytest.mark.parametrize("key_type", ["ed25519", "ecdsa"])
def test_a_changed_host_key_is_refused_even_with_the_flag(
    ssh_home: SshHome, sshd_pool: SshdPool, tmp_path: Path, key_type: str
) -> None:
    # ecdsa: known_hosts lists only a type the server does not have, which OpenSSH would show
    # as "keys of a different type are already known"; it is refused here too.
    server = sshd_pool.server("host4")
    ssh_home.write_known_hosts(omit={"host4"})
    with ssh_home.known_hosts.open("a") as handle:
        handle.write(f"{server.known_hosts_name} {_other_key(tmp_path, key_type)}\n")
    before = ssh_home.known_hosts.read_bytes()
    message = str(_refused(_target(ssh_home, "host4"), accept_new_host_keys=True))
    line = len(sshd_pool.servers)
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in message
    assert f"{ssh_home.known_hosts}:{line}" in message and kh.fingerprint(_blob(server)) in message
    assert f"ssh-keygen -R '{server.known_hosts_name}' -f {ssh_home.known_hosts}" in message and FLAG in message
    assert ssh_home.known_hosts.read_bytes() == before
    _assert_all_closed(sshd_pool)


def test_a_revoked_host_key_is_refused(ssh_home: SshHome, sshd_pool: SshdPool) -> None:
    server = sshd_pool.server("host5")
    with ssh_home.known_hosts.open("a") as handle:
        handle.write(f"@revoked * {server.host_public_key}\n")
    assert "marks @revoked" in str(_refused(_target(ssh_home, "host5"), accept_new_host_keys=True))


def _direct(address: str, port: int) -> SshTarget:
    return SshTarget(address, address, port, "root", ())


@pytest.mark.parametrize(
    ("where", "needle"),
    [
        ("no-server", "127.0.1.250:22: connection refused on port 22"),
        ("closed-port", "host1 (root@127.0.1.2:1): connection refused on port 1"),
        ("no-dns", "cannot resolve the host name 'no-such-node.invalid'"),
        ("silent", "accepted the connection, but no SSH greeting came (within 0.5 s)"),
        ("http", "accepted the connection, but no SSH greeting came"),
    ],
)
def test_unreachable_hosts_fail_fast_with_one_clear_paragraph(
    ssh_home: SshHome, silent_port: int, http_port: int, where: str, needle: str
) -> None:
    targets = {
        "no-server": _direct("127.0.1.250", 22),
        "closed-port": resolve_target("host1", None, 1, config_path=str(ssh_home.config)),
        "no-dns": _direct("no-such-node.invalid", 22),
        "silent": _direct("127.0.0.1", silent_port),
        "http": _direct("127.0.0.1", http_port),
    }
    started = time.monotonic()
    message = str(_refused(targets[where], accept_new_host_keys=False, timeout=0.5))
    assert time.monotonic() - started < 5
    assert needle in message and "\n" not in message
    wait_until(lambda: not _transport_threads(), 5, "paramiko transport threads to end")


def test_a_key_the_server_does_not_know_is_an_auth_error_naming_user_and_key(
    ssh_home: SshHome, sshd_pool: SshdPool
) -> None:
    ssh_home.identity.unlink()
    new_user_key(ssh_home.identity, "stranger")
    fingerprint = paramiko.PKey.from_path(ssh_home.identity).fingerprint
    message = str(_refused(_target(ssh_home, "host6"), accept_new_host_keys=False))
    assert message.startswith("host6 (root@127.0.1.7:")
    assert f"refused every key for user 'root'; tried {ssh_home.identity} (ED25519 {fingerprint})" in message
    assert "SSH_AUTH_SOCK is not set" in message and "ssh-copy-id" in message and "\n" not in message
    _assert_all_closed(sshd_pool)


def test_an_encrypted_key_is_skipped_with_a_hint(ssh_home: SshHome) -> None:
    ssh_home.identity.unlink()
    keygen = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(ssh_home.identity)]
    subprocess.run(keygen, check=True, timeout=30)
    message = str(_refused(_target(ssh_home, "host1"), accept_new_host_keys=False))
    port = ssh_home.servers[0].port
    assert message.startswith(f"host1 (root@127.0.1.2:{port}): no key to offer for user 'root'; ")
    assert f"{ssh_home.identity} is encrypted (add it to the agent: `ssh-add {ssh_home.identity}`)" in message


# --- connect_all -----------------------------------------------------------------------------


def test_connect_all_reaches_eight_hosts_in_order(ssh_home: SshHome, sshd_pool: SshdPool) -> None:
    targets = [_target(ssh_home, alias) for alias in reversed(ssh_home.aliases)]
    started = time.monotonic()
    clients = connect_all(targets, accept_new_host_keys=False, timeout=10)
    elapsed = time.monotonic() - started
    try:
        peers = [client.get_transport().getpeername() for client in clients]
        assert peers == [(target.hostname, target.port) for target in targets]
        assert elapsed < 3, f"8 parallel connections took {elapsed:.2f}s"
    finally:
        for client in clients:
            client.close()
    _assert_all_closed(sshd_pool)


@pytest.mark.parametrize("bad", ["no-server", "unknown-key", "silent"])
def test_connect_all_names_only_the_failed_host_and_leaves_nothing_open(
    ssh_home: SshHome, sshd_pool: SshdPool, silent_port: int, bad: str
) -> None:
    targets = [_target(ssh_home, alias) for alias in ssh_home.aliases]
    if bad == "no-server":
        targets.insert(3, _direct("127.0.1.250", 22))
        expected = ("root@127.0.1.250:22", "connection refused")
    elif bad == "unknown-key":
        ssh_home.write_known_hosts(omit={"host5"})
        expected = ("host5", "its host key is not known")
    else:
        targets.insert(0, _direct("127.0.0.1", silent_port))
        expected = (f"root@127.0.0.1:{silent_port}", "no SSH greeting came")
    started = time.monotonic()
    with pytest.raises(SshError) as raised:
        connect_all(targets, accept_new_host_keys=False, timeout=1.0)
    assert time.monotonic() - started < 3
    lines = str(raised.value).splitlines()
    assert lines[0] == f"Could not connect to 1 of {len(targets)} hosts over SSH:"
    assert len(lines) == 2 and lines[1].startswith(f"  {expected[0]}") and expected[1] in lines[1]
    assert raised.value.hosts == (expected[0].split("@")[-1].split(":")[0],)
    _assert_all_closed(sshd_pool)


def test_connect_all_gives_up_on_a_host_that_stalls_past_the_deadline(
    ssh_home: SshHome, sshd_pool: SshdPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A login that hangs (a wedged sshd) must not hold the launch: connect_all returns at its
    # deadline, and the late connection closes itself when it finally finishes.
    release = threading.Event()
    real = paramiko.Transport.auth_publickey

    def slow_for_host2(self: paramiko.Transport, username: str, key: paramiko.PKey) -> list[str]:
        if self.getpeername()[0] == "127.0.1.3":
            release.wait(timeout=10)
        return real(self, username, key)  # type: ignore[no-any-return]

    monkeypatch.setattr(paramiko.Transport, "auth_publickey", slow_for_host2)
    targets = [_target(ssh_home, alias) for alias in ssh_home.aliases[:3]]
    started = time.monotonic()
    try:
        with pytest.raises(SshError) as raised:
            connect_all(targets, accept_new_host_keys=False, timeout=1.0)
        assert time.monotonic() - started < 3
    finally:
        release.set()
    assert raised.value.hosts == ("host2",) and "did not finish connecting within 1 s" in str(raised.value)
    _assert_all_closed(sshd_pool)


def test_no_key_at_all_says_where_keys_were_looked_for(ssh_home: SshHome) -> None:
    ssh_home.identity.unlink()
    target = SshTarget("host1", "127.0.1.2", ssh_home.servers[0].port, "root", ())
    message = str(_refused(target, accept_new_host_keys=False))
    assert "no key to offer for user 'root'; no IdentityFile for 'host1', no ~/.ssh/id_rsa" in message
    assert "SSH_AUTH_SOCK is not set" in message


def test_paramiko_logging_never_reaches_the_terminal(http_port: int) -> None:
    # Without a handler, paramiko's transport thread prints its traceback through logging's
    # last resort; in pytest the logging plugin hides that, so a fresh interpreter checks it.
    code = (
        "import sys\n"
        "from ddplaunch.ssh import SshError, SshTarget, connect\n"
        f"target = SshTarget('web', '127.0.0.1', {http_port}, 'root', ())\n"
        "try:\n"
        "    connect(target, accept_new_host_keys=False, timeout=5)\n"
        "except SshError as exc:\n"
        "    print(exc)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False)
    assert run.returncode == 0 and "no SSH greeting came" in run.stdout
    assert run.stderr == ""
