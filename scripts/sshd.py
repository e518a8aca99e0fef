"""Real OpenSSH servers on loopback addresses, and fake HOMEs that reach them.

Each server is its own `sshd -D` with a throw-away host key, listening on port 22 of its own
127.0.1.x address (a free port when 22 is taken), so a test sees what a user's cluster looks
like: several hosts, aliases in ~/.ssh/config, host keys in ~/.ssh/known_hosts. The tests use
them (tests/ssh_fixtures.py; pytest finds this module through `pythonpath` in pyproject.toml)
and so does the benchmark (scripts/bench_nodes.py).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

SSHD = "/usr/sbin/sshd"  # sshd re-executes itself per connection, so it needs an absolute path
SSH_KEYGEN = "ssh-keygen"
USER = "root"
POLL_S = 0.01
KEYGEN_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0


class SshdError(RuntimeError):
    """The test servers could not be started; the message says why and how to fix it."""


@dataclass(frozen=True)
class SshServer:
    """One running sshd, as a test sees it."""

    alias: str
    address: str
    port: int
    host_key: Path
    host_public_key: str  # "ssh-ed25519 AAAA..." without the comment
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def known_hosts_name(self) -> str:
        # OpenSSH (and paramiko) look up non-default ports as "[host]:port".
        return self.address if self.port == 22 else f"[{self.address}]:{self.port}"

    def known_hosts_line(self) -> str:
        return f"{self.known_hosts_name} {self.host_public_key}\n"

    def session_processes(self) -> list[psutil.Process]:
        """sshd's per-connection children and whatever they started: empty when all clients left."""
        if self.process.poll() is not None:
            return []  # reaped: its pid may belong to another process by now
        try:
            return list(psutil.Process(self.process.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            return []


@dataclass(frozen=True)
class SshHome:
    """A fake HOME whose ~/.ssh reaches the servers: config aliases, known_hosts, one key."""

    home: Path
    config: Path
    known_hosts: Path
    identity: Path
    servers: tuple[SshServer, ...]

    @property
    def aliases(self) -> tuple[str, ...]:
        return tuple(server.alias for server in self.servers)

    def write_known_hosts(self, omit: Collection[str] = ()) -> None:
        """Rewrite known_hosts with every server's key except those of the aliases in `omit`."""
        lines = [s.known_hosts_line() for s in self.servers if s.alias not in omit]
        self.known_hosts.write_text("".join(lines))

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """An environment for a subprocess that uses this HOME and no ssh-agent."""
        env = dict(os.environ if base is None else base)
        env["HOME"] = str(self.home)
        env.pop("SSH_AUTH_SOCK", None)
        return env


class SshdPool:
    """Servers started together; `stop()` ends them and every session they hold."""

    def __init__(self, root: Path, servers: Sequence[SshServer], user_key: Path) -> None:
        self.root = root
        self.servers = tuple(servers)
        self.user_key = user_key

    @property
    def aliases(self) -> tuple[str, ...]:
        return tuple(server.alias for server in self.servers)

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(server.address for server in self.servers)

    def server(self, alias: str) -> SshServer:
        for server in self.servers:
            if server.alias == alias:
                return server
        raise KeyError(alias)

    def session_processes(self) -> list[psutil.Process]:
        return [proc for server in self.servers for proc in server.session_processes()]

    def make_home(self, home: Path, *, omit: Collection[str] = ()) -> SshHome:
        """Build HOME/.ssh for these servers; `omit` leaves those aliases out of known_hosts."""
        ssh_dir = home / ".ssh"
        ssh_dir.mkdir(parents=True, exist_ok=True)
        ssh_dir.chmod(0o700)
        identity = ssh_dir / "id_ed25519"
        shutil.copyfile(self.user_key, identity)
        identity.chmod(0o600)  # ssh refuses a private key others can read
        shutil.copyfile(self.user_key.with_suffix(".pub"), identity.with_suffix(".pub"))
        config = ssh_dir / "config"
        known_hosts = ssh_dir / "known_hosts"
        config.write_text("".join(_client_block(s, identity, known_hosts) for s in self.servers))
        result = SshHome(home, config, known_hosts, identity, self.servers)
        result.write_known_hosts(omit)
        return result

    def stop(self) -> None:
        for server in self.servers:
            _stop_server(server)


def _client_block(server: SshServer, identity: Path, known_hosts: Path) -> str:
    # Absolute paths: OpenSSH expands ~ from the passwd entry, not from $HOME, so a fake HOME
    # only works for the ssh binary when the config names its files outright.
    return (
        f"Host {server.alias}\n"
        f"    HostName {server.address}\n"
        f"    Port {server.port}\n"
        f"    User {USER}\n"
        f"    IdentityFile {identity}\n"
        "    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {known_hosts}\n"
        "    GlobalKnownHostsFile /dev/null\n"
        "    BatchMode yes\n"
    )


def require_sshd() -> None:
    if not os.access(SSHD, os.X_OK):
        raise SshdError(
            f"{SSHD} is missing, and the SSH tests never skip. Install it with "
            "`apt-get install -y openssh-server`, or run scripts/test.sh, which does."
        )


def keygen(path: Path, comment: str) -> subprocess.Popen[bytes]:
    """Start ssh-keygen for an unencrypted ed25519 key (fast); the caller waits."""
    return subprocess.Popen(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def wait_keygens(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        out, _ = proc.communicate(timeout=KEYGEN_TIMEOUT_S)
        if proc.returncode != 0:
            raise SshdError(f"ssh-keygen failed ({proc.returncode}): {out.decode(errors='replace')}")


def new_user_key(path: Path, comment: str = "ddplaunch-test-user") -> Path:
    wait_keygens([keygen(path, comment)])
    return path


def start_sshd_pool(
    count: int,
    root: Path,
    *,
    first_address: str = "127.0.1.2",
    alias_prefix: str = "host",
    port: int = 22,
    timeout: float = 10.0,
) -> SshdPool:
    """Start `count` servers on consecutive loopback addresses and wait until all greet.

    port=22 falls back to a free port per address where 22 is taken; port=0 always picks one.
    """
    require_sshd()
    # Privilege separation needs this directory; a container has no systemd to create it.
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    addresses = _addresses(first_address, count)
    user_key = root / "user_ed25519"
    host_keys = [root / f"{alias_prefix}{i + 1}_host_ed25519" for i in range(count)]
    wait_keygens(
        [keygen(user_key, "ddplaunch-test-user")]
        + [keygen(key, f"{alias_prefix}{i + 1}") for i, key in enumerate(host_keys)]
    )
    authorized = root / "authorized_keys"
    authorized.write_text(user_key.with_suffix(".pub").read_text())
    deadline = time.monotonic() + timeout
    launched: list[SshServer] = []
    servers: list[SshServer] = []
    try:
        for i, (address, key) in enumerate(zip(addresses, host_keys)):
            alias = f"{alias_prefix}{i + 1}"
            launched.append(_launch(root, alias, address, _pick_port(address, port), key, authorized))
        for server in launched:
            servers.append(_wait_ready(server, root, authorized, deadline))
    except BaseException:
        # The ready ones are in `servers`; stopping a stopped one again is harmless.
        for server in servers + launched[len(servers) :]:
            _stop_server(server)
        raise
    return SshdPool(root, servers, user_key)


def _addresses(first: str, count: int) -> list[str]:
    a, b, c, d = (int(part) for part in first.split("."))
    if a != 127 or d + count > 255:
        raise ValueError(f"{count} servers from {first} would leave 127.0.0.0/8 or the /24")
    return [f"{a}.{b}.{c}.{d + i}" for i in range(count)]


def _pick_port(address: str, wanted: int) -> int:
    if wanted:
        try:
            with socket.socket() as probe:
                # As sshd binds: a previous run's connections in TIME_WAIT do not block it.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((address, wanted))
            return wanted
        except OSError:
            pass
    with socket.socket() as probe:
        probe.bind((address, 0))
        port: int = probe.getsockname()[1]
        return port


def _launch(root: Path, alias: str, address: str, port: int, host_key: Path, authorized: Path) -> SshServer:
    config = root / f"{alias}_sshd_config"
    config.write_text(_server_config(address, port, host_key, authorized))
    log = root / f"{alias}_sshd.log"
    with log.open("wb") as log_file:  # a relaunch starts a fresh log
        process = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C at the test terminal must not reach it first
        )
    public = " ".join(host_key.with_suffix(".pub").read_text().split()[:2])
    return SshServer(alias, address, port, host_key, public, process, log)


def _server_config(address: str, port: int, host_key: Path, authorized: Path) -> str:
    return "\n".join(
        [
            f"ListenAddress {address}:{port}",
            "AddressFamily inet",
            f"HostKey {host_key}",
            "PidFile none",
            "StrictModes no",  # the fixture files live in pytest's temporary folders
            "UsePAM no",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            f"AuthorizedKeysFile {authorized}",
            "PermitUserEnvironment no",
            # No AcceptEnv line: the server takes no environment from clients.
            "MaxStartups 100:30:200",  # many hosts connect at once in connect_all tests
            "MaxSessions 100",
            "UseDNS no",
            "PrintMotd no",
            "LogLevel ERROR",
            "Subsystem sftp internal-sftp",
            "",
        ]
    )


def _wait_ready(server: SshServer, root: Path, authorized: Path, deadline: float) -> SshServer:
    """Wait for the SSH banner; relaunch on a free port if another process took the port first.

    The server given is stopped on failure, and so is any relaunched one.
    """
    attempts = 3
    for attempt in range(attempts):
        try:
            failure = _await_banner(server, deadline)
        except BaseException:
            _stop_server(server)
            raise
        if failure is None:
            return server
        _stop_server(server)
        log = server.log.read_text(errors="replace")
        if "Address already in use" not in log or attempt == attempts - 1:
            where = f"{server.alias} ({server.address}:{server.port})"
            raise SshdError(f"sshd for {where} {failure}; its log:\n{log}")
        port = _pick_port(server.address, 0)
        server = _launch(root, server.alias, server.address, port, server.host_key, authorized)
    raise AssertionError("not reached: the last attempt returns or raises")


def _await_banner(server: SshServer, deadline: float) -> str | None:
    """None once the server greets; else why not. Short reads, so that an sshd that died
    (and a port someone else answers on) is noticed before the deadline."""
    while True:
        if server.process.poll() is not None:
            return f"exited with {server.process.returncode}"
        if time.monotonic() > deadline:
            return "sent no SSH banner before the deadline"
        try:
            with socket.create_connection((server.address, server.port), timeout=POLL_S * 10) as conn:
                conn.settimeout(POLL_S * 10)
                # Ours, not another test run's sshd that got the port first.
                if conn.recv(256).startswith(b"SSH-2.0") and _listens(server):
                    return None
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ECONNRESET, None):
                raise
        time.sleep(POLL_S)  # nothing to wait on until sshd listens: poll, bounded by deadline


def _listens(server: SshServer) -> bool:
    try:
        sockets = psutil.Process(server.process.pid).net_connections(kind="tcp")
    except psutil.Error:
        return False
    return any(s.status == psutil.CONN_LISTEN and tuple(s.laddr) == (server.address, server.port) for s in sockets)


def _stop_server(server: SshServer) -> None:
    # Freeze the listener first: stopped, it forks no session while the sessions are listed.
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGSTOP)
    sessions = server.session_processes()
    for proc in [*sessions, server.process]:
        try:
            proc.kill()
        except (psutil.Error, ProcessLookupError):
            pass
    psutil.wait_procs(sessions, timeout=STOP_TIMEOUT_S)
    server.process.wait(timeout=STOP_TIMEOUT_S)
