"""SSH connections to the nodes: ~/.ssh/config, host key checks, key login, many hosts at once.

Every way a connection can fail becomes one `SshError` paragraph that names the host and the
fix; a caller never sees a paramiko traceback.
"""

from __future__ import annotations

import errno
import getpass
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import paramiko

from ddplaunch import known_hosts as kh
from ddplaunch.errors import LaunchError

DEFAULT_PORT = kh.DEFAULT_PORT
USER_CONFIG = "~/.ssh/config"
USER_KNOWN_HOSTS = "~/.ssh/known_hosts"
# Read as well as the user's file, as OpenSSH does; never written.
GLOBAL_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
# Tried when the config names no IdentityFile, in OpenSSH's order (those paramiko can load).
DEFAULT_IDENTITIES = ("~/.ssh/id_rsa", "~/.ssh/id_ecdsa", "~/.ssh/id_ed25519")
ACCEPT_NEW_FLAG = "--ssh-accept-new-host-keys"
KEEPALIVE_S = 5
# A link that carries nothing back for this long is dead (OpenSSH users get the same from
# ServerAliveInterval 5 with ServerAliveCountMax 3): the connection then fails instead of
# waiting for the kernel's retransmission limit, about 15 minutes. The SSH head raises it to
# outlast --heartbeat-timeout, so that a user's longer timeout is the one that counts.
DEAD_LINK_S = 20.0
# connect_all waits this much past the timeout, so that a host's own, more precise error
# (no answer, no banner) arrives before the generic "did not finish in time".
_STRAGGLER_GRACE_S = 0.5

# paramiko's transport thread logs failures (with tracebacks) at ERROR; with no handler
# configured, logging's last resort would print them on the terminal, which the printer owns.
logging.getLogger("paramiko").addHandler(logging.NullHandler())


class SshError(LaunchError):
    """Connecting to one or more hosts failed; the message names each host and the fix."""

    def __init__(self, message: str, hosts: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.hosts = tuple(hosts)


@dataclass(frozen=True)
class SshTarget:
    """Where and as whom to log in, after ~/.ssh/config and the command line are applied."""

    alias: str  # as the user named it (for messages)
    hostname: str  # after ~/.ssh/config HostName
    port: int
    user: str
    identity_files: tuple[str, ...]

    @property
    def label(self) -> str:
        """"node1 (alice@10.0.0.1:22)": both names, since either may be the one that is wrong."""
        address = f"{self.user}@{self.hostname}:{self.port}"
        return address if self.alias == self.hostname else f"{self.alias} ({address})"


def resolve_target(host: str, user: str | None, port: int | None, *, config_path: str | None = None) -> SshTarget:
    """Apply ~/.ssh/config (HostName, User, Port, IdentityFile) to `host`; explicit values win."""
    path = config_path if config_path is not None else os.path.expanduser(USER_CONFIG)
    options = _config_options(host, path, required=config_path is not None)
    for option in ("proxyjump", "proxycommand"):
        if options.get(option):
            raise SshError(
                f"SSH host {host}: {path} sets {option.title()} for it, which ddplaunch does not "
                "support; give an address it can reach directly (HostName under "
                f"'Host {host}'), or run ddplaunch from a machine inside the cluster.",
                [host],
            )
    config_port = _config_port(host, path, options.get("port"))
    return SshTarget(
        alias=host,
        hostname=str(options.get("hostname", host)),
        port=port if port is not None else config_port,
        user=user if user is not None else str(options.get("user") or getpass.getuser()),
        identity_files=tuple(str(name) for name in options.get("identityfile", ())),
    )


def connect(
    target: SshTarget,
    *,
    accept_new_host_keys: bool,
    known_hosts: str | None = None,
    timeout: float = 10.0,
    added_keys: list[str] | None = None,
    dead_link_s: float = DEAD_LINK_S,
) -> paramiko.SSHClient:
    """Open an authenticated connection, the host key checked against known_hosts first.

    `known_hosts` is the file read and, with `accept_new_host_keys`, appended to (default
    ~/.ssh/known_hosts); the system-wide files are read too. `timeout` bounds each phase:
    TCP connect, SSH handshake, authentication; after `dead_link_s` with nothing back, the
    link is dead.
    """
    deadline = time.monotonic() + timeout
    user_file = known_hosts if known_hosts is not None else os.path.expanduser(USER_KNOWN_HOSTS)
    entries = kh.read_known_hosts([user_file, *GLOBAL_KNOWN_HOSTS])
    name = kh.host_key_name(target.hostname, target.port)
    policy = _HostKeyPolicy(target, entries, name, user_file, accept_new_host_keys, added_keys)
    sock = _open_socket(target, timeout, dead_link_s)
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(policy)  # its key stores stay empty: the policy decides
    try:
        remaining = max(deadline - time.monotonic(), 0.1)
        client.connect(
            target.hostname,
            target.port,
            sock=sock,
            timeout=remaining,
            banner_timeout=remaining,
            auth_timeout=remaining,
            transport_factory=_transport_factory(kh.known_key_types(entries, name)),
            auth_strategy=_KeyLogin(target, deadline),
        )
        client.get_transport().set_keepalive(KEEPALIVE_S)
    except BaseException as exc:
        transport = client.get_transport()
        greeted = transport is not None and bool(transport.remote_version)
        client.close()
        sock.close()
        if isinstance(exc, (paramiko.SSHException, EOFError, OSError)):
            raise _protocol_error(target, exc, timeout, greeted, time.monotonic() >= deadline) from None
        raise
    return client


def connect_all(
    targets: Sequence[SshTarget],
    *,
    accept_new_host_keys: bool,
    known_hosts: str | None = None,
    timeout: float = 10.0,
    added_keys: list[str] | None = None,
    dead_link_s: float = DEAD_LINK_S,
) -> list[paramiko.SSHClient]:
    """Connect to every target at once; all succeed, or all are closed and one error says why.

    Clients come back in the order of `targets`. The error lists each failed host on its own
    line, so one run shows every host that needs fixing.
    """
    attempts = [_Attempt(target) for target in targets]
    for attempt in attempts:
        attempt.start(
            accept_new_host_keys=accept_new_host_keys, known_hosts=known_hosts, timeout=timeout, added_keys=added_keys,
            dead_link_s=dead_link_s,
        )
    deadline = time.monotonic() + timeout + _STRAGGLER_GRACE_S
    for attempt in attempts:
        attempt.finished.wait(max(deadline - time.monotonic(), 0))
    outcomes = [attempt.settle() for attempt in attempts]
    clients = [client for client, _ in outcomes if client is not None]
    errors = [(attempt.target, error) for attempt, (_, error) in zip(attempts, outcomes) if error is not None]
    if not errors:
        return clients
    for client in clients:
        client.close()
    for _, error in errors:
        if not isinstance(error, SshError):
            raise error  # a bug, not a host problem: keep its traceback
    if len(targets) == 1:
        raise errors[0][1]
    lines = [f"  {error}" for _, error in errors]
    raise SshError(
        f"Could not connect to {len(errors)} of {len(targets)} hosts over SSH:\n" + "\n".join(lines),
        [target.alias for target, _ in errors],
    )


class _Attempt:
    """One host's connection in its own thread; abandoned at the deadline, it closes itself."""

    def __init__(self, target: SshTarget) -> None:
        self.target = target
        self.finished = threading.Event()
        self._lock = threading.Lock()
        self._client: paramiko.SSHClient | None = None
        self._error: BaseException | None = None
        self._abandoned = False
        self._timeout = 0.0

    def start(
        self, *, accept_new_host_keys: bool, known_hosts: str | None, timeout: float, added_keys: list[str] | None,
        dead_link_s: float = DEAD_LINK_S,
    ) -> None:
        self._timeout = timeout
        kwargs = {
            "accept_new_host_keys": accept_new_host_keys,
            "known_hosts": known_hosts,
            "timeout": timeout,
            "added_keys": added_keys,
            "dead_link_s": dead_link_s,
        }
        name = f"ssh-connect-{self.target.alias}"
        threading.Thread(target=self._run, kwargs=kwargs, name=name, daemon=True).start()

    def _run(self, **kwargs: Any) -> None:
        client, error = None, None
        try:
            client = connect(self.target, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread, which re-raises bugs
            error = exc
        with self._lock:
            if self._abandoned and client is not None:
                client.close()
            self._client, self._error = client, error
        self.finished.set()

    def settle(self) -> tuple[paramiko.SSHClient | None, BaseException | None]:
        """The outcome now; a connection still under way is given up and closes when done."""
        with self._lock:
            if self._client is None and self._error is None:
                self._abandoned = True
                return None, SshError(
                    f"{self.target.label}: did not finish connecting within {self._timeout:g} s "
                    "(the SSH handshake or login stalled); check the host's load and its sshd "
                    "logs, or raise the SSH timeout.",
                    [self.target.alias],
                )
            return self._client, self._error


def _config_options(host: str, path: str, *, required: bool) -> dict[str, Any]:
    try:
        config = paramiko.SSHConfig.from_path(path)
        return dict(config.lookup(host))
    except FileNotFoundError:
        if required:
            raise SshError(f"SSH config file {path} (for host {host}) does not exist.", [host]) from None
        return {"hostname": host}
    except (OSError, UnicodeDecodeError) as exc:
        raise SshError(f"Cannot read SSH config {path} (for host {host}): {exc}.", [host]) from None
    except paramiko.SSHException as exc:
        raise SshError(
            f"SSH config {path} could not be used for host {host}: {exc}. Fix that line "
            f"(check it with `ssh -G {host}`).",
            [host],
        ) from None


def _config_port(host: str, path: str, value: Any) -> int:
    if value is None:
        return DEFAULT_PORT
    try:
        port = int(value)
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise SshError(f"SSH config {path} gives host {host} the port {value!r}; use 1-65535.", [host])
    return port


def _open_socket(target: SshTarget, timeout: float, dead_link_s: float = DEAD_LINK_S) -> socket.socket:
    """The TCP connection, done here so that each way it fails gets its own message."""
    where = f"{target.label}: "
    try:
        sock = socket.create_connection((target.hostname, target.port), timeout=timeout)
        _notice_dead_links(sock, dead_link_s)
        return sock
    except socket.gaierror as exc:
        reason = (
            f"cannot resolve the host name {target.hostname!r} ({exc.strerror}). Check its "
            f"spelling, or give its address with HostName under 'Host {target.alias}' in "
            "~/.ssh/config."
        )
    except ConnectionRefusedError:
        reason = (
            f"connection refused on port {target.port}: no SSH server listens there. Check "
            "that sshd runs on that host and that the port is right (Port in ~/.ssh/config)."
        )
    except TimeoutError:
        reason = (
            f"no answer on port {target.port} within {timeout:g} s: the host is down, the "
            "address is wrong, or a firewall drops the packets."
        )
    except OSError as exc:
        if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            reason = f"the host is unreachable ({exc.strerror}); check the address and the network."
        else:
            reason = f"cannot connect to port {target.port}: {exc.strerror or exc}."
    raise SshError(where + reason, [target.alias])


def _notice_dead_links(sock: socket.socket, dead_link_s: float = DEAD_LINK_S) -> None:
    """TCP keepalive for an idle link, a user timeout for one with unanswered data.

    The transport's SSH keepalive (every KEEPALIVE_S) gives TCP data to send; these options
    make the kernel give up on a peer that stops acknowledging it.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    probes = 3
    interval = max(int(dead_link_s) // (probes + 1), 1)
    for name, value in (
        ("TCP_KEEPIDLE", interval),
        ("TCP_KEEPINTVL", interval),
        ("TCP_KEEPCNT", probes),
        ("TCP_USER_TIMEOUT", int(dead_link_s * 1000)),  # milliseconds
    ):
        if hasattr(socket, name):  # Linux names; other systems keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _protocol_error(target: SshTarget, exc: BaseException, timeout: float, greeted: bool, late: bool) -> SshError:
    if not greeted:
        reason = (
            f"port {target.port} accepted the connection, but no SSH greeting came (within "
            f"{timeout:g} s): it is not an SSH server, or sshd dropped the connection (too "
            "many at once: MaxStartups in sshd_config)."
        )
    elif late:
        # paramiko reports a handshake that ran out of time as "No existing session".
        reason = f"the SSH handshake did not finish within {timeout:g} s; the host may be overloaded."
    else:
        text = str(exc) or type(exc).__name__
        reason = f"SSH protocol error: {text}. Check that `ssh {target.alias} true` works."
    return SshError(f"{target.label}: {reason}", [target.alias])


def _transport_factory(known_types: Sequence[str]) -> Callable[..., Any]:
    """A Transport that asks first for the host key types known_hosts lists for this host.

    As OpenSSH does: a server with several host keys then shows the one we can check, and
    offering another type means the listed key is gone (a changed host, see known_hosts).
    """

    def make(sock: socket.socket, disabled_algorithms: Any = None) -> Any:
        transport = paramiko.Transport(sock, disabled_algorithms=disabled_algorithms)
        options = transport.get_security_options()
        offered = list(options.key_types)
        wanted = [algorithm for key_type in known_types for algorithm in _algorithms(key_type)]
        first = [algorithm for algorithm in dict.fromkeys(wanted) if algorithm in offered]
        options.key_types = first + [algorithm for algorithm in offered if algorithm not in first]
        return transport

    return make


def _algorithms(key_type: str) -> tuple[str, ...]:
    # known_hosts says "ssh-rsa" for RSA keys, which are negotiated as SHA-2 signatures.
    return ("rsa-sha2-512", "rsa-sha2-256") if key_type == "ssh-rsa" else (key_type,)


class _HostKeyPolicy:
    """paramiko's missing-host-key hook, called for every connection: known, ask, or refuse."""

    def __init__(
        self,
        target: SshTarget,
        entries: Sequence[kh.KnownHostKey],
        name: str,
        user_file: str,
        accept_new: bool,
        added_keys: list[str] | None = None,
    ) -> None:
        self.added_keys = added_keys
        self.target = target
        self.entries = entries
        self.name = name
        self.user_file = user_file
        self.accept_new = accept_new

    def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
        key_type, blob = key.get_name(), key.asbytes()
        check = kh.check_host_key(self.entries, self.name, key_type, blob)
        if check.verdict == "known":
            return
        offered = f"{kh.key_kind(key_type)} key {kh.fingerprint(blob)}"
        if check.verdict == "unknown" and self.accept_new:
            self._remember(key_type, blob, offered)
            return
        explain = {"unknown": self._unknown, "changed": self._changed, "revoked": self._revoked}[check.verdict]
        raise SshError(f"{self.target.label}: " + explain(offered, check.conflict), [self.target.alias])

    def _remember(self, key_type: str, blob: bytes, offered: str) -> None:
        # Trust on first use means trust recorded: a key that is not written would be
        # accepted again, unchecked, on every run.
        try:
            kh.append_known_host(self.user_file, self.name, key_type, blob)
            if self.added_keys is not None:  # said by the caller, who owns the terminal
                self.added_keys.append(f"{self.target.label}: permanently added its {offered} to {self.user_file}")
        except OSError as exc:
            raise SshError(
                f"{self.target.label}: accepting its new {offered} needs it written to "
                f"{self.user_file}, which failed ({exc.strerror or exc}); make that file "
                "writable, or add the key yourself.",
                [self.target.alias],
            ) from None

    def _unknown(self, offered: str, conflict: kh.KnownHostKey | None) -> str:
        port = "" if self.target.port == DEFAULT_PORT else f"-p {self.target.port} "
        return (
            f"its host key is not known: no line for {self.name!r} in {self.user_file}. The "
            f"server offered the {offered}. If that is the host's real key (on the host, "
            "`ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub` shows it), add it with "
            f"`ssh-keyscan -H {port}{self.target.hostname} >> {self.user_file}`, or rerun with "
            f"{ACCEPT_NEW_FLAG} to trust each new host's key on first use (like OpenSSH's "
            "StrictHostKeyChecking=accept-new)."
        )

    def _changed(self, offered: str, conflict: kh.KnownHostKey | None) -> str:
        assert conflict is not None
        old = f"{kh.key_kind(conflict.key_type)} key {kh.fingerprint(conflict.blob)}"
        return (
            "WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! The server offered the "
            f"{offered}, but {conflict.where} lists the {old} for {self.name!r}. Someone could "
            "be eavesdropping on you right now (man-in-the-middle attack), or the host's key "
            f"was just replaced. Refusing to connect ({ACCEPT_NEW_FLAG} never overrides this). "
            "If you know the key changed, remove the old one with "
            f"`ssh-keygen -R '{self.name}' -f {conflict.path}`, then add the "
            "new one after checking its fingerprint on the host."
        )

    def _revoked(self, offered: str, conflict: kh.KnownHostKey | None) -> str:
        assert conflict is not None
        return (
            f"the server offered the {offered}, which {conflict.where} marks @revoked. "
            "Refusing to connect; the host needs a new host key, listed in your known_hosts."
        )


class _KeyLogin:
    """paramiko's auth_strategy hook: public keys only, remembering each for the error message.

    Order: the IdentityFiles (or the default ~/.ssh/id_* files when the config names none),
    then the ssh-agent's other keys. Encrypted key files are skipped, not prompted for: many
    hosts log in at once, so such keys must come from the agent.
    """

    def __init__(self, target: SshTarget, deadline: float) -> None:
        self.target = target
        self.deadline = deadline
        self.tried: list[str] = []
        self.notes: list[str] = []

    def authenticate(self, transport: Any) -> list[Any]:
        agent = _agent(self.notes)
        try:
            for label, key in self._keys(agent):
                if self._try(transport, label, key):
                    return []
        finally:
            if agent is not None:
                agent.close()
        raise SshError(self._refused(), [self.target.alias])

    def _try(self, transport: Any, label: str, key: Any) -> bool:
        try:
            remaining = transport.auth_publickey(self.target.user, key)
        except paramiko.BadAuthenticationType as exc:
            raise self._error(
                "the server does not accept key logins (it allows: "
                f"{', '.join(exc.allowed_types) or 'nothing'}). ddplaunch logs in with keys only: "
                "enable PubkeyAuthentication in the host's sshd_config."
            ) from None
        except paramiko.AuthenticationException:
            if time.monotonic() > self.deadline:
                raise self._error("the login did not finish in time (the server is slow to answer).") from None
            self.tried.append(label)
            return False
        except paramiko.SSHException as exc:
            raise self._error(
                f"the server closed the connection during login after {len(self.tried) + 1} "
                f"key(s) ({exc}); sshd allows only MaxAuthTries (default 6) keys, so name the "
                f"right one with IdentityFile and IdentitiesOnly yes under 'Host "
                f"{self.target.alias}' in ~/.ssh/config."
            ) from None
        if remaining:
            raise self._error(
                f"the server accepted {label} but then asks for {', '.join(remaining)} as well; "
                "ddplaunch cannot answer prompts, so the hosts it starts need key-only logins."
            )
        return True

    def _keys(self, agent: Any) -> Iterator[tuple[str, Any]]:
        seen: set[bytes] = set()
        for path, configured in self._identity_paths():
            key = self._load(path, configured)
            if key is not None and key.asbytes() not in seen:
                seen.add(key.asbytes())
                yield f"{path} ({kh.key_kind(key.get_name())} {key.fingerprint})", key
        for key in agent.get_keys() if agent is not None else ():
            if key.asbytes() not in seen:
                seen.add(key.asbytes())
                yield f"agent key {key.comment or key.fingerprint}", key

    def _identity_paths(self) -> Iterator[tuple[str, bool]]:
        configured = bool(self.target.identity_files)
        for name in self.target.identity_files or DEFAULT_IDENTITIES:
            yield os.path.expanduser(name), configured

    def _load(self, path: str, configured: bool) -> Any:
        try:
            return paramiko.PKey.from_path(path)
        except FileNotFoundError:
            if configured:  # OpenSSH skips a missing IdentityFile too, but the user should know
                self.notes.append(f"IdentityFile {path} does not exist")
        except (TypeError, paramiko.PasswordRequiredException):
            self.notes.append(f"{path} is encrypted (add it to the agent: `ssh-add {path}`)")
        except (OSError, ValueError, paramiko.SSHException) as exc:
            self.notes.append(f"{path} could not be read as a private key ({exc})")
        return None

    def _refused(self) -> str:
        user, host = self.target.user, self.target.hostname
        if self.tried:
            what = f"the server refused every key for user {user!r}; tried {'; '.join(self.tried)}"
        else:
            what = f"no key to offer for user {user!r}"
        notes = list(self.notes)
        if not self.target.identity_files and not any(os.path.exists(p) for p, _ in self._identity_paths()):
            notes.insert(0, f"no IdentityFile for '{self.target.alias}', no ~/.ssh/id_rsa, id_ecdsa or id_ed25519")
        detail = "".join(f"; {note}" for note in notes)
        port = "" if self.target.port == DEFAULT_PORT else f"-p {self.target.port} "
        return (
            f"{self.target.label}: {what}{detail}. Put your public key into "
            f"~{user}/.ssh/authorized_keys on {host} (`ssh-copy-id {port}{user}@{host}`), or "
            f"name the right key (IdentityFile) or user (User) under 'Host {self.target.alias}' "
            "in ~/.ssh/config."
        )

    def _error(self, reason: str) -> SshError:
        return SshError(f"{self.target.label}: {reason}", [self.target.alias])


def _agent(notes: list[str]) -> Any:
    if not os.environ.get("SSH_AUTH_SOCK"):
        notes.append("no ssh-agent: SSH_AUTH_SOCK is not set")
        return None
    try:
        return paramiko.Agent()
    except paramiko.SSHException as exc:
        notes.append(f"the ssh-agent did not answer ({exc})")
        return None
