"""Table tests of --hosts and --hostfile parsing (launcher/hosts.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from ddplaunch.errors import LaunchError
from ddplaunch.hosts import HostSpec, parse_hostfile, parse_hosts_flag, read_hostfile

pytestmark = pytest.mark.unit

# -- --hosts -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("node1", [HostSpec("node1", "node1")]),
        ("a,b", [HostSpec("a", "a"), HostSpec("b", "b")]),
        (" a , b ", [HostSpec("a", "a"), HostSpec("b", "b")]),  # space around entries
        ("alice@c", [HostSpec("alice@c", "c", user="alice")]),
        ("c:2222", [HostSpec("c:2222", "c", port=2222)]),
        ("alice@c:2222", [HostSpec("alice@c:2222", "c", user="alice", port=2222)]),
        ("[fe80::1]:22", [HostSpec("[fe80::1]:22", "fe80::1", port=22)]),
        ("alice@[::1]", [HostSpec("alice@[::1]", "::1", user="alice")]),
        ("[::1]", [HostSpec("[::1]", "::1")]),
        ("[fe80::1%eth0]:22", [HostSpec("[fe80::1%eth0]:22", "fe80::1%eth0", port=22)]),  # zone id
        ("10.0.0.1:22", [HostSpec("10.0.0.1:22", "10.0.0.1", port=22)]),
        ("node-1.cluster.example.org", [HostSpec("node-1.cluster.example.org", "node-1.cluster.example.org")]),
        ("gpu_box", [HostSpec("gpu_box", "gpu_box")]),  # an ~/.ssh/config alias
        ("first.last@h", [HostSpec("first.last@h", "h", user="first.last")]),
        ("h:20,h:65535", [HostSpec("h:20", "h", port=20), HostSpec("h:65535", "h", port=65535)]),
        # Same machine, different SSH destinations: two nodes (e.g. two sshd containers).
        ("localhost:2222,localhost:2223", [HostSpec("localhost:2222", "localhost", port=2222),
                                           HostSpec("localhost:2223", "localhost", port=2223)]),
        ("a,bob@a", [HostSpec("a", "a"), HostSpec("bob@a", "a", user="bob")]),
    ],
)
def test_parse_hosts_flag(text: str, expected: list[HostSpec]) -> None:
    assert parse_hosts_flag(text) == tuple(expected)


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("", ["--hosts is empty"]),
        ("  ", ["--hosts is empty"]),
        ("a,,b", ["--hosts", "entry 2 is empty"]),
        ("a,", ["--hosts", "entry 2 is empty"]),
        (",a", ["--hosts", "entry 1 is empty"]),
        ("a,b:http", ["--hosts entry 'b:http'", "not a TCP port"]),
        ("b:0", ["--hosts entry 'b:0'", "not a TCP port"]),
        ("b:65536", ["--hosts entry 'b:65536'", "not a TCP port"]),
        ("b:-1", ["--hosts entry 'b:-1'", "not a TCP port"]),
        ("b:²", ["--hosts entry 'b:²'", "not a TCP port"]),
        ("b:", ["--hosts entry 'b:'", "port after ':' is empty"]),
        ("@b", ["--hosts entry '@b'", "user name before '@' is empty"]),
        ("a@b@c", ["--hosts entry 'a@b@c'", "more than one '@'"]),
        ("a b@c", ["--hosts entry 'a b@c'", "not a user name"]),
        ("alice@", ["--hosts entry 'alice@'", "host name is empty"]),
        (":22", ["--hosts entry ':22'", "host name is empty"]),
        ("-oProxyCommand=x", ["--hosts entry '-oProxyCommand=x'", "not a host name"]),
        ("node 1", ["--hosts entry 'node 1'", "not a host name"]),
        ("fe80::1", ["--hosts entry 'fe80::1'", "needs brackets", "[fe80::1]:22"]),
        ("[fe80::1", ["--hosts entry '[fe80::1'", "never closed"]),
        ("[node1]:22", ["--hosts entry '[node1]:22'", "not an IPv6 address"]),
        ("[::1]22", ["--hosts entry '[::1]22'", "not :PORT"]),
        ("[::1]:", ["--hosts entry '[::1]:'", "port after ':' is empty"]),
        ("[::1]:99999", ["--hosts entry '[::1]:99999'", "not a TCP port"]),
    ],
)
def test_parse_hosts_flag_rejects(text: str, names: list[str]) -> None:
    with pytest.raises(LaunchError) as caught:
        parse_hosts_flag(text)
    message = str(caught.value)
    for name in names:
        assert name in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("text", "entries"),
    [
        ("a,b,a", "entries 1 and 3"),
        ("a,A", "entries 1 and 2"),  # DNS names ignore case
        ("u@a:22,b,u@a:22", "entries 1 and 3"),
        ("[::1]:22,[::1]:22", "entries 1 and 2"),
    ],
)
def test_parse_hosts_flag_rejects_repeats(text: str, entries: str) -> None:
    with pytest.raises(LaunchError) as caught:
        parse_hosts_flag(text)
    message = str(caught.value)
    assert message.startswith("--hosts lists")
    assert entries in message
    assert "node ranks follow the order of --hosts" in message


# -- --hostfile ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("node1\n", [HostSpec("node1", "node1")]),
        ("node1 slots=4\nnode2 slots=4\n", [HostSpec("node1", "node1", slots=4), HostSpec("node2", "node2", slots=4)]),
        (
            "user@node2:2222 slots=2 gpus=1,3",
            [HostSpec("user@node2:2222", "node2", user="user", port=2222, slots=2, gpus=("1", "3"))],
        ),
        ("node1 gpus=0", [HostSpec("node1", "node1", gpus=("0",))]),
        (
            "node1 gpus=GPU-3b2c4d5e-aaaa-bbbb-cccc-0123456789ab,GPU-77",
            [HostSpec("node1", "node1", gpus=("GPU-3b2c4d5e-aaaa-bbbb-cccc-0123456789ab", "GPU-77"))],
        ),
        ("node1 gpus=1,3 slots=2", [HostSpec("node1", "node1", slots=2, gpus=("1", "3"))]),  # any order
        (
            "# the job's machines\n\nnode1 slots=4  # the fast one\n   \n\tnode2\tslots=2\n# end\n",
            [HostSpec("node1", "node1", slots=4), HostSpec("node2", "node2", slots=2)],
        ),
        (
            "node1 slots=4\r\nnode2 slots=4\r\n",  # written on Windows
            [HostSpec("node1", "node1", slots=4), HostSpec("node2", "node2", slots=4)],
        ),
        ("[fe80::1]:22 slots=1", [HostSpec("[fe80::1]:22", "fe80::1", port=22, slots=1)]),
        ("node1#no space before the comment", [HostSpec("node1", "node1")]),
        ("worker-0 slots=4\nworker-1 slots=4", [HostSpec("worker-0", "worker-0", slots=4),
                                                HostSpec("worker-1", "worker-1", slots=4)]),  # DeepSpeed's example
    ],
)
def test_parse_hostfile(text: str, expected: list[HostSpec]) -> None:
    assert parse_hostfile(text, "hosts.txt") == tuple(expected)


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("", ["--hostfile hosts.txt lists no host"]),
        ("# only a comment\n\n   \n", ["--hostfile hosts.txt lists no host"]),
        ("node1 slots=4 max_slots=8", ["--hostfile hosts.txt line 1", "`HOST [slots=N] [gpus=I,J]`", "'max_slots'"]),
        ("node1\nnode2 4", ["--hostfile hosts.txt line 2", "`HOST [slots=N] [gpus=I,J]`", "'4' is a stray word"]),
        ("node1 slots 4", ["line 1", "'slots' is a stray word"]),
        ("slots=4", ["line 1", "must start with the host"]),
        ("node1 slots=0", ["line 1", "slots=0 is not a positive whole number"]),
        ("node1 slots=-2", ["line 1", "slots=-2"]),
        ("node1 slots=four", ["line 1", "slots=four"]),
        ("node1 slots=", ["line 1", "slots= is not a positive whole number"]),
        ("node1 slots=2 slots=4", ["line 1", "sets slots= twice"]),
        ("node1 gpus=", ["line 1", "gpus= has an empty GPU id"]),
        ("node1 gpus=1,,3", ["line 1", "gpus=1,,3 has an empty GPU id"]),
        ("node1 gpus=1,", ["line 1", "empty GPU id"]),
        ("node1 gpus=1,1", ["line 1", "lists GPU 1 twice"]),
        ("node1 slots=2 gpus=1", ["line 1", "slots=2 but gpus=1 lists 1 GPUs"]),
        ("node1 slots=1 gpus=0,1", ["line 1", "slots=1 but gpus=0,1 lists 2 GPUs"]),
        ("\n\nuser@node2:http", ["--hostfile hosts.txt line 3", "'user@node2:http'", "not a TCP port"]),
        ("@node2", ["line 1", "user name before '@' is empty"]),
        ("fe80::1 slots=1", ["line 1", "needs brackets"]),
    ],
)
def test_parse_hostfile_rejects(text: str, names: list[str]) -> None:
    with pytest.raises(LaunchError) as caught:
        parse_hostfile(text, "hosts.txt")
    message = str(caught.value)
    for name in names:
        assert name in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("text", "lines"),
    [
        ("node1 slots=4\nnode2 slots=4\nnode1 slots=2\n", "lines 1 and 3"),
        ("# head\nnode1\n\nnode1\n", "lines 2 and 4"),
        ("u@n:22\nu@N:22", "lines 1 and 2"),
    ],
)
def test_parse_hostfile_rejects_repeats(text: str, lines: str) -> None:
    with pytest.raises(LaunchError) as caught:
        parse_hostfile(text, "hosts.txt")
    message = str(caught.value)
    assert message.startswith(f"--hostfile hosts.txt {lines} both name")
    assert "node ranks follow the line order" in message


def test_read_hostfile(tmp_path: Path) -> None:
    path = tmp_path / "hostfile"
    path.write_text("node1 slots=2\nnode2 slots=2 gpus=0,1\n", encoding="utf-8")
    assert read_hostfile(str(path)) == (
        HostSpec("node1", "node1", slots=2),
        HostSpec("node2", "node2", slots=2, gpus=("0", "1")),
    )


@pytest.mark.parametrize(
    ("name", "setup", "names"),
    [
        ("missing", lambda p: None, ["--hostfile", "missing", "cannot read it", "No such file"]),
        ("adir", lambda p: p.mkdir(), ["--hostfile", "adir", "cannot read it"]),
        ("binary", lambda p: p.write_bytes(b"\xff\xfe\x00node"), ["--hostfile", "binary", "not a UTF-8 text file"]),
        ("empty", lambda p: p.write_text(""), ["--hostfile", "empty", "lists no host"]),
    ],
)
def test_read_hostfile_rejects(
    tmp_path: Path, name: str, setup: Callable[[Path], object], names: list[str]
) -> None:
    path = tmp_path / name
    setup(path)
    with pytest.raises(LaunchError) as caught:
        read_hostfile(str(path))
    message = str(caught.value)
    assert str(path) in message
    for expected in names:
        assert expected in message
    assert "\n" not in message


def test_horovod_slot_counts_are_not_taken_for_ports() -> None:
    with pytest.raises(LaunchError) as caught:
        parse_hosts_flag("node1:4,node2:4")
    message = str(caught.value)
    assert "'node1:4'" in message and "Horovod" in message and "--nproc 4" in message and "slots=4" in message
