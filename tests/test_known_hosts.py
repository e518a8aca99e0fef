"""known_hosts reading and matching, table-driven: the rules OpenSSH applies, without a server."""

from __future__ import annotations

import base64
import struct
from pathlib import Path

import pytest

from ddplaunch import known_hosts as kh

pytestmark = pytest.mark.unit


def _blob(key_type: str, body: bytes) -> bytes:
    return struct.pack(">I", len(key_type)) + key_type.encode() + body


ED_A = _blob("ssh-ed25519", b"A" * 36)
ED_B = _blob("ssh-ed25519", b"B" * 36)
ECDSA = _blob("ecdsa-sha2-nistp256", b"C" * 40)


def _line(hosts: str, blob: bytes, marker: str = "") -> str:
    key_type = blob[4 : 4 + struct.unpack(">I", blob[:4])[0]].decode()
    text = f"{hosts} {key_type} {base64.b64encode(blob).decode()}"
    return f"{marker} {text}" if marker else text


@pytest.mark.parametrize(
    ("patterns", "name", "expected"),
    [
        ("node1", "node1", True),
        ("node1", "NODE1", True),  # OpenSSH lower-cases both sides
        ("node1", "node10", False),
        ("node2,node1", "node1", True),
        ("node*", "node17", True),
        ("node?", "node17", False),
        ("10.0.0.*,!10.0.0.5", "10.0.0.5", False),  # a negated match vetoes the line
        ("10.0.0.*,!10.0.0.5", "10.0.0.6", True),
        ("!10.0.0.5", "10.0.0.6", False),  # negations alone match nothing
        ("[node1]:2222", "[node1]:2222", True),  # brackets are literal, not a character class
        ("[node1]:2222", "node1", False),
        ("node1", "[node1]:2222", False),
        (kh.hashed_name("node1"), "node1", True),
        (kh.hashed_name("node1"), "node2", False),
        (kh.hashed_name("[node1]:2222"), "[node1]:2222", True),
        ("|1|broken", "node1", False),
    ],
)
def test_host_patterns(patterns: str, name: str, expected: bool) -> None:
    entry = kh.parse_line(_line(patterns, ED_A))
    assert entry is not None
    assert entry.matches(name) is expected


@pytest.mark.parametrize(
    "line",
    [
        "",
        "# a comment",
        "node1 ssh-ed25519",  # no key
        "node1 ssh-ed25519 not*base64",
        f"node1 ssh-rsa {base64.b64encode(ED_A).decode()}",  # type disagrees with the key
        f"@weird node1 ssh-ed25519 {base64.b64encode(ED_A).decode()}",
    ],
)
def test_lines_openssh_would_skip_are_skipped(line: str) -> None:
    assert kh.parse_line(line) is None


KNOWN = [_line("node1", ED_A), _line("node1", ED_B), _line("node2", ECDSA), _line("*", ED_B, "@revoked")]


@pytest.mark.parametrize(
    ("lines", "name", "blob", "verdict", "conflict_line"),
    [
        (KNOWN[:1], "node1", ED_A, "known", None),
        (KNOWN[:2], "node1", ED_B, "known", None),  # either of two listed keys (a rotation)
        (KNOWN[:1], "node1", ED_B, "changed", 1),
        (KNOWN[:1], "node9", ED_B, "unknown", None),
        (KNOWN[2:3], "node2", ED_A, "changed", 1),  # only another type is listed
        (KNOWN, "node1", ED_B, "revoked", 4),  # revoked wins over a listed key
        (KNOWN[3:], "node7", ED_A, "unknown", None),
    ],
)
def test_verdicts(
    tmp_path: Path, lines: list[str], name: str, blob: bytes, verdict: str, conflict_line: int | None
) -> None:
    path = tmp_path / "known_hosts"
    path.write_text("\n".join(lines) + "\n")
    check = kh.check_host_key(kh.read_known_hosts([str(path)]), name, "ssh-ed25519", blob)
    assert check.verdict == verdict
    where = check.conflict.where if check.conflict else None
    assert where == (f"{path}:{conflict_line}" if conflict_line else None)


def test_a_revoked_line_does_not_hide_the_rest_of_the_file(tmp_path: Path) -> None:
    # paramiko's HostKeys.load raises on a @revoked line, losing every key in the file.
    path = tmp_path / "known_hosts"
    path.write_text(_line("*", ED_B, "@revoked") + "\n" + _line("node1", ED_A) + "\n")
    assert kh.check_host_key(kh.read_known_hosts([str(path)]), "node1", "ssh-ed25519", ED_A).verdict == "known"


def test_known_key_types_in_file_order(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    path.write_text("\n".join([_line("node1", ECDSA), _line("node1", ED_A), _line("node1", ED_B)]) + "\n")
    assert kh.known_key_types(kh.read_known_hosts([str(path)]), "node1") == ("ecdsa-sha2-nistp256", "ssh-ed25519")


def test_missing_files_are_skipped(tmp_path: Path) -> None:
    assert kh.read_known_hosts([str(tmp_path / "nope"), str(tmp_path / "no" / "dir")]) == []


@pytest.mark.parametrize("hashed", [True, False])
def test_append_creates_the_folder_and_keeps_lines_whole(tmp_path: Path, hashed: bool) -> None:
    path = tmp_path / "new" / ".ssh" / "known_hosts"
    kh.append_known_host(str(path), "[10.0.0.1]:2222", "ssh-ed25519", ED_A, hashed=hashed)
    assert (path.parent.stat().st_mode & 0o777) == 0o700
    with path.open("a") as handle:
        handle.write(_line("other", ECDSA))  # a last line without its newline
    kh.append_known_host(str(path), "node1", "ssh-ed25519", ED_B, hashed=hashed)
    entries = kh.read_known_hosts([str(path)])
    assert len(entries) == 3 and len(path.read_text().splitlines()) == 3
    check = kh.check_host_key(entries, "[10.0.0.1]:2222", "ssh-ed25519", ED_A)
    assert check.verdict == "known"
    assert kh.check_host_key(entries, "node1", "ssh-ed25519", ED_B).verdict == "known"
    assert entries[0].patterns[0].startswith("|1|") is hashed


def test_fingerprint_and_kind_as_openssh_prints_them() -> None:
    assert kh.fingerprint(b"") == "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU"
    kinds = [kh.key_kind(t) for t in ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp384")]
    assert kinds == ["ED25519", "RSA", "ECDSA"]
