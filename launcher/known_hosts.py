"""OpenSSH known_hosts files: is a server's host key known, unknown, changed or revoked?

Read and matched here rather than by paramiko's HostKeys, which rejects a whole file that
holds a `@revoked` line, matches names case-sensitively without OpenSSH's wildcards and
negations, and keeps one key per type per host (OpenSSH accepts any listed key, as during a
key rotation).
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import hmac
import os
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

DEFAULT_PORT = 22
REVOKED = "@revoked"
CERT_AUTHORITY = "@cert-authority"
_HASH_MAGIC = "|1|"

Verdict = Literal["known", "unknown", "changed", "revoked"]


@dataclass(frozen=True)
class KnownHostKey:
    """One usable line of a known_hosts file."""

    path: str
    line: int
    patterns: tuple[str, ...]  # host patterns, or one hashed "|1|salt|hash" name
    key_type: str  # "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", ...
    blob: bytes  # the public key as sent on the wire
    marker: str | None = None  # "@revoked", "@cert-authority" or None

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    def matches(self, name: str) -> bool:
        return _host_matches(name.lower(), self.patterns)


@dataclass(frozen=True)
class HostKeyCheck:
    """The verdict for one offered key; `conflict` is the line that disagrees, if any."""

    verdict: Verdict
    conflict: KnownHostKey | None = None


def host_key_name(hostname: str, port: int) -> str:
    """The name a known_hosts line uses: the host for port 22, else "[host]:port".

    Lower-cased as OpenSSH does before hashing, so that its hashed lines and ours agree.
    """
    host = hostname.lower()
    return host if port == DEFAULT_PORT else f"[{host}]:{port}"


def read_known_hosts(paths: Iterable[str]) -> list[KnownHostKey]:
    """Every usable line of the files that exist; lines OpenSSH would skip are skipped too."""
    entries: list[KnownHostKey] = []
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                lines = handle.read().splitlines()
        except (FileNotFoundError, NotADirectoryError):
            continue
        for number, line in enumerate(lines, 1):
            entry = parse_line(line, path, number)
            if entry is not None:
                entries.append(entry)
    return entries


def parse_line(line: str, path: str = "", number: int = 0) -> KnownHostKey | None:
    fields = line.split()
    if not fields or fields[0].startswith("#"):
        return None
    marker = None
    if fields[0].startswith("@"):
        marker, fields = fields[0], fields[1:]
        if marker not in (REVOKED, CERT_AUTHORITY):
            return None
    if len(fields) < 3:
        return None
    try:
        blob = base64.b64decode(fields[2], validate=True)
    except (binascii.Error, ValueError):
        return None
    if _blob_type(blob) != fields[1]:
        return None
    return KnownHostKey(path, number, tuple(fields[0].split(",")), fields[1], blob, marker)


def check_host_key(entries: Sequence[KnownHostKey], name: str, key_type: str, blob: bytes) -> HostKeyCheck:
    """Decide like OpenSSH with StrictHostKeyChecking: revoked and changed keys are never fine.

    A host listed only with keys of other types counts as changed, not unknown: the client
    prefers the listed types (see `known_key_types`), so a server offering none of them has
    lost those keys or is not the host it claims to be.
    """
    matching = [entry for entry in entries if entry.matches(name)]
    for entry in matching:
        if entry.marker == REVOKED and entry.blob == blob:
            return HostKeyCheck("revoked", entry)
    plain = [entry for entry in matching if entry.marker is None]
    if any(entry.blob == blob for entry in plain):
        return HostKeyCheck("known")
    same_type = [entry for entry in plain if entry.key_type == key_type]
    if same_type or plain:
        return HostKeyCheck("changed", (same_type or plain)[0])
    return HostKeyCheck("unknown")


def known_key_types(entries: Sequence[KnownHostKey], name: str) -> tuple[str, ...]:
    """The key types listed for this host, first seen first, for host key negotiation."""
    types = [entry.key_type for entry in entries if entry.marker is None and entry.matches(name)]
    return tuple(dict.fromkeys(types))


def fingerprint(blob: bytes) -> str:
    """OpenSSH's default fingerprint: SHA256, base64 without padding."""
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii")
    return "SHA256:" + digest.rstrip("=")


def key_kind(key_type: str) -> str:
    """"ssh-ed25519" -> "ED25519", as OpenSSH names key types in its messages."""
    if key_type.startswith("ecdsa-"):
        return "ECDSA"
    return key_type.removeprefix("ssh-").split("-")[0].upper()


def hashed_name(name: str, salt: bytes | None = None) -> str:
    """The HashKnownHosts form of a host name, as `ssh-keyscan -H` writes it."""
    salt = os.urandom(20) if salt is None else salt
    digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return f"{_HASH_MAGIC}{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"


def append_known_host(path: str, name: str, key_type: str, blob: bytes, *, hashed: bool = True) -> str:
    """Append one line for this host, creating the file (and ~/.ssh, mode 700) if needed.

    Locked and written with one append so that parallel connections, in this process or in
    another launcher, never interleave lines. Returns the line written.
    """
    directory = os.path.dirname(path)
    if directory and not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700, exist_ok=True)
    host = hashed_name(name) if hashed else name
    line = f"{host} {key_type} {base64.b64encode(blob).decode('ascii')}\n"
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        # A file whose last line lacks its newline would swallow ours into that line.
        prefix = "\n" if size and os.pread(fd, 1, size - 1) != b"\n" else ""
        os.write(fd, (prefix + line).encode("ascii"))
    finally:
        os.close(fd)  # closing releases the lock
    return line


def _blob_type(blob: bytes) -> str | None:
    if len(blob) < 4:
        return None
    (length,) = struct.unpack(">I", blob[:4])
    if length > len(blob) - 4:
        return None
    return blob[4 : 4 + length].decode("ascii", errors="replace")


def _host_matches(name: str, patterns: Sequence[str]) -> bool:
    if len(patterns) == 1 and patterns[0].startswith(_HASH_MAGIC):
        return _hashed_matches(name, patterns[0])
    matched = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if _glob(pattern[1:] if negated else pattern).fullmatch(name):
            if negated:
                return False  # a negated match vetoes the line, as in OpenSSH's match_hostname
            matched = True
    return matched


def _hashed_matches(name: str, hashed: str) -> bool:
    parts = hashed[len(_HASH_MAGIC) :].split("|")
    if len(parts) != 2:
        return False
    try:
        salt, expected = (base64.b64decode(part, validate=True) for part in parts)
    except (binascii.Error, ValueError):
        return False
    return hmac.compare_digest(hmac.new(salt, name.encode(), hashlib.sha1).digest(), expected)


def _glob(pattern: str) -> re.Pattern[str]:
    # Only * and ? are special in OpenSSH patterns; "[host]:port" brackets are literal.
    return re.compile("".join({"*": ".*", "?": "."}.get(c, re.escape(c)) for c in pattern.lower()))
