"""--hosts and --hostfile (DeepSpeed / MPI format) -> the machines of the job, in node-rank order.

Pure but for `read_hostfile`, the one function that opens a file. Host names stay as written:
~/.ssh/config aliases are resolved later, by the SSH transport.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ddplaunch.devices import is_gpu_id
from ddplaunch.errors import LaunchError
from ddplaunch.plan import is_plain_int, tcp_port

HOSTFILE_LINE = "`HOST [slots=N] [gpus=I,J]`"
_HOSTS_FORMS = (
    "Write each entry as HOST, USER@HOST, HOST:PORT or USER@HOST:PORT, IPv6 addresses in brackets "
    "([fe80::1]:22), e.g. --hosts node1,alice@node2:2222."
)
_HOSTFILE_FORMS = (
    f"Write one {HOSTFILE_LINE} line per node, where HOST is NAME, USER@NAME, NAME:PORT or [IPv6]:PORT."
)
# A leading '-' would read as an option to ssh-like tools; the rest is what host names and
# ~/.ssh/config aliases use in practice.
_HOST_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # fullmatch: "$" would let a final newline in
_USER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.$-]*")


@dataclass(frozen=True)
class HostSpec:
    """One machine of the job: an SSH destination plus what a hostfile says about its GPUs."""

    text: str  # the address as the user wrote it, for messages
    host: str  # a name, ~/.ssh/config alias or IP address; IPv6 without its brackets
    user: str | None = None
    port: int | None = None
    slots: int | None = None  # a hostfile's slots=N
    gpus: tuple[str, ...] | None = None  # a hostfile's gpus=1,3, kept as written

    @property
    def identity(self) -> tuple[str | None, str, int | None]:
        """What makes two entries the same node (DNS names ignore case)."""
        return (self.user, self.host.lower(), self.port)


class _AddressError(ValueError):
    """Internal: what is wrong with one address; callers add the flag and the fix."""


def parse_hosts_flag(text: str) -> tuple[HostSpec, ...]:
    """--hosts a,b,user@c:2222,[::1]:22: comma-separated SSH destinations, node 0 first."""
    if not text.strip():
        raise LaunchError(f"--hosts is empty: list the machines of the job, node 0 first. {_HOSTS_FORMS}")
    specs: list[HostSpec] = []
    for index, raw in enumerate(text.split(","), 1):
        entry = raw.strip()
        if not entry:
            raise LaunchError(
                f"--hosts {text!r}: entry {index} is empty (two commas in a row, or a comma at an end). "
                f"{_HOSTS_FORMS}"
            )
        try:
            user, host, port = _parse_address(entry)
        except _AddressError as exc:
            raise LaunchError(f"--hosts entry {entry!r}: {exc}. {_HOSTS_FORMS}") from None
        if port is not None and port < HOROVOD_SLOTS_BELOW:
            raise LaunchError(
                f"--hosts entry {entry!r}: {port} looks like a Horovod/MPI slot count (host:slots), "
                f"but here host:N is an SSH port. Write {host} and give the workers per host with "
                f"--nproc {port} (or use --hostfile with `{host} slots={port}`)."
            )
        specs.append(HostSpec(entry, host, user, port))
    repeat = _first_repeat(specs)
    if repeat is not None:
        first, second = repeat
        raise LaunchError(
            f"--hosts lists {specs[second].text!r} twice (entries {first + 1} and {second + 1}): each host "
            "is one node and node ranks follow the order of --hosts, so a repeated host would get two "
            "node ranks. Remove the repeat; to run more workers on one host, raise --nproc."
        )
    return tuple(specs)


def parse_hostfile(text: str, path: str) -> tuple[HostSpec, ...]:
    """A hostfile's contents; `path` only names it in messages. Node ranks follow line order."""
    specs: list[HostSpec] = []
    line_numbers: list[int] = []
    for number, raw in enumerate(text.splitlines(), 1):
        content = raw.split("#", 1)[0].strip()
        if content:
            specs.append(_parse_hostfile_line(content, f"--hostfile {path} line {number}"))
            line_numbers.append(number)
    if not specs:
        raise LaunchError(
            f"--hostfile {path} lists no host: every line is blank or a comment. {_HOSTFILE_FORMS}"
        )
    repeat = _first_repeat(specs)
    if repeat is not None:
        first, second = (line_numbers[i] for i in repeat)
        raise LaunchError(
            f"--hostfile {path} lines {first} and {second} both name {specs[repeat[1]].text!r}: each host is "
            "one node and node ranks follow the line order, so a repeated host would get two node ranks. "
            "Keep one line per host; to run more workers on it, raise its slots=."
        )
    return tuple(specs)


def read_hostfile(path: str) -> tuple[HostSpec, ...]:
    """Read and parse --hostfile PATH; an unreadable file is a LaunchError, not a traceback."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError:
        raise LaunchError(f"--hostfile {path} is not a UTF-8 text file. {_HOSTFILE_FORMS}") from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise LaunchError(
            f"--hostfile {path}: cannot read it ({reason}). Give the path of a text file; {_HOSTFILE_FORMS}"
        ) from None
    return parse_hostfile(text, path)


def _parse_hostfile_line(content: str, where: str) -> HostSpec:
    address, *settings = content.split()
    if "=" in address:
        raise LaunchError(f"{where}: {content!r} is not {HOSTFILE_LINE}; it must start with the host.")
    try:
        user, host, port = _parse_address(address)
    except _AddressError as exc:
        raise LaunchError(f"{where}: host {address!r}: {exc}. {_HOSTFILE_FORMS}") from None
    values: dict[str, str] = {}
    for setting in settings:
        key, equals, value = setting.partition("=")
        if not equals or key not in ("slots", "gpus"):
            what = f"the setting {key!r} is unknown" if equals else f"{setting!r} is a stray word"
            raise LaunchError(
                f"{where}: {content!r} is not {HOSTFILE_LINE} ({what}; only slots= and gpus= are read)."
            )
        if key in values:
            raise LaunchError(f"{where}: {content!r} sets {key}= twice; keep one.")
        values[key] = value
    slots = _parse_slots(values["slots"], where) if "slots" in values else None
    gpus = _parse_gpus(values["gpus"], where) if "gpus" in values else None
    if slots is not None and gpus is not None and len(gpus) != slots:
        raise LaunchError(
            f"{where}: slots={slots} but gpus={values['gpus']} lists {len(gpus)} GPUs; one worker runs per "
            "listed GPU, so make the two agree, or drop slots=."
        )
    return HostSpec(address, host, user, port, slots, gpus)


def _parse_slots(value: str, where: str) -> int:
    if not is_plain_int(value) or int(value) < 1:
        raise LaunchError(f"{where}: slots={value} is not a positive whole number; write e.g. slots=4.")
    return int(value)


def _parse_gpus(value: str, where: str) -> tuple[str, ...]:
    ids = tuple(value.split(","))
    if not all(ids):
        raise LaunchError(
            f"{where}: gpus={value} has an empty GPU id; list indexes or UUIDs separated by single commas, "
            "e.g. gpus=0,1."
        )
    wrong = next((gpu for gpu in ids if not is_gpu_id(gpu)), None)
    if wrong is not None:
        # they become that host's --gpu-ids: caught here, not later by its agent
        raise LaunchError(
            f"{where}: gpus={value}: {wrong!r} is not a GPU index or UUID; list indexes as nvidia-smi "
            "numbers them, or UUIDs (GPU-...), e.g. gpus=0,1."
        )
    repeated = next((gpu for i, gpu in enumerate(ids) if gpu in ids[:i]), None)
    if repeated is not None:
        raise LaunchError(f"{where}: gpus={value} lists GPU {repeated} twice; each worker needs its own GPU.")
    return ids


def _parse_address(entry: str) -> tuple[str | None, str, int | None]:
    """USER@HOST:PORT with optional parts -> (user, host, port). Raises _AddressError."""
    user: str | None = None
    rest = entry
    if "@" in entry:
        user, _, rest = entry.partition("@")
        if not user:
            raise _AddressError("the user name before '@' is empty")
        if "@" in rest:
            raise _AddressError("it has more than one '@'")
        if not _USER_NAME.fullmatch(user):
            raise _AddressError(f"{user!r} is not a user name")
    if rest.startswith("["):
        host, port_text = _split_bracketed(rest)
    elif rest.count(":") > 1:
        raise _AddressError("an IPv6 address needs brackets, e.g. [fe80::1] or [fe80::1]:22")
    else:
        host, colon, after = rest.partition(":")
        port_text = after if colon else None
        if not _HOST_NAME.fullmatch(host):
            raise _AddressError("the host name is empty" if not host else f"{host!r} is not a host name")
    return user, host, None if port_text is None else _parse_port(port_text)


def _split_bracketed(rest: str) -> tuple[str, str | None]:
    """[IPv6] or [IPv6]:PORT -> (address, port text or None)."""
    close = rest.find("]")
    if close < 0:
        raise _AddressError("the '[' of the IPv6 address is never closed")
    address, after = rest[1:close], rest[close + 1 :]
    try:
        ipaddress.IPv6Address(address)
    except ValueError:
        raise _AddressError(f"[{address}] is not an IPv6 address") from None
    if after and not after.startswith(":"):
        raise _AddressError(f"{after!r} after ']' is not :PORT")
    return address, after[1:] if after else None


# No sshd listens below port 20; `-H node1:4` there is Horovod's "4 slots on node1".
HOROVOD_SLOTS_BELOW = 20


def _parse_port(text: str) -> int:
    if not text:
        raise _AddressError("the port after ':' is empty")
    port = tcp_port(text)
    if port is None:
        raise _AddressError(f"port {text} is not a TCP port (1-65535)")
    return port


def _first_repeat(specs: Sequence[HostSpec]) -> tuple[int, int] | None:
    """Indexes of the first entry that repeats an earlier one, and of that earlier one."""
    seen: dict[tuple[str | None, str, int | None], int] = {}
    for index, spec in enumerate(specs):
        if spec.identity in seen:
            return seen[spec.identity], index
        seen[spec.identity] = index
    return None
