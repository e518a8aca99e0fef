"""Property tests of every parser of user text, of the frame decoder, and of the command line.

Any text either parses or raises the parser's own typed error (LaunchError, or the
documented one), never another exception; valid inputs, generated here with the value they
mean built independently, parse to that value. Bytes from a host are that host's problem:
nothing escapes AgentChannel.read_out. A random command line with --dry-run exits 0 or 2,
never with a traceback. Examples are kept few so the whole file runs in seconds.
"""

from __future__ import annotations

import base64
import os
import json
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ddplaunch.channel import AgentChannel
from ddplaunch.detect import HostlistError, expand_hostlist, first_host, hostlist_size
from ddplaunch.devices import parse_gpu_ids
from ddplaunch.errors import LaunchError
from ddplaunch.frames import (
    ATTEMPT_END, DATA, EXIT, LAST_KIND, READY, SYNC, FrameError, FrameReader, encode, encode_exit, encode_ready,
)
from ddplaunch.hosts import parse_hostfile, parse_hosts_flag
from ddplaunch.known_hosts import KnownHostKey, check_host_key, parse_line
from ddplaunch.options import parse_local_ranks, parse_ranks

pytestmark = pytest.mark.unit

FEW = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SOME = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text that looks like what people type into these flags, and then anything at all.
NEAR = st.text(alphabet=st.sampled_from("0123456789,-:@[]. _=#\n\tabcxyzGPU²٣!*?|/"), max_size=40)
ANY_TEXT = st.one_of(NEAR, st.text(max_size=40))


# -- --ranks and --local-ranks-filter ---------------------------------------------------------


@FEW
@given(ANY_TEXT, st.integers(1, 64))
@example("0-", 4)
@example("٣", 8)
@example("3-1", 8)
def test_any_ranks_text_parses_or_is_a_launch_error(text: str, world: int) -> None:
    for parse in (parse_ranks, parse_local_ranks):
        try:
            ranks = parse(text, world)
        except LaunchError:
            continue
        assert ranks and all(0 <= rank < world for rank in ranks)


@st.composite
def rank_lists(draw: st.DrawFn) -> tuple[str, int, set[int]]:
    world = draw(st.integers(1, 64))
    parts, expected = [], set()
    for _ in range(draw(st.integers(1, 5))):
        low = draw(st.integers(0, world - 1))
        if draw(st.booleans()):
            high = draw(st.integers(low, world - 1))
            parts.append(f"{low}-{high}")
            expected.update(range(low, high + 1))
        else:
            parts.append(str(low))
            expected.add(low)
    spaced = draw(st.booleans())
    return (", " if spaced else ",").join(parts), world, expected


@FEW
@given(rank_lists())
def test_valid_ranks_mean_the_ranks_written(case: tuple[str, int, set[int]]) -> None:
    text, world, expected = case
    assert parse_ranks(text, world) == expected


# -- --gpu-ids -----------------------------------------------------------------------------------


@FEW
@given(ANY_TEXT)
@example("٣")
def test_any_gpu_ids_text_parses_or_is_a_launch_error(text: str) -> None:
    try:
        ids = parse_gpu_ids(text)
    except LaunchError:
        return
    assert ids and len(set(ids)) == len(ids)
    assert all(i.isascii() and (i.isdigit() or i.startswith(("GPU-", "MIG-"))) for i in ids)


GPU_ID = st.one_of(st.integers(0, 4096).map(str), st.uuids().map(lambda u: f"GPU-{u}"))


@FEW
@given(st.lists(GPU_ID, min_size=1, max_size=8, unique=True), st.booleans())
def test_valid_gpu_ids_are_kept_in_order(ids: list[str], spaced: bool) -> None:
    assert parse_gpu_ids((" , " if spaced else ",").join(ids)) == tuple(ids)


# -- --hosts and hostfiles ---------------------------------------------------------------------


HOST = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,12}", fullmatch=True)
USER = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.$-]{0,8}", fullmatch=True)
PORT = st.integers(20, 65535)
IPV6 = st.ip_addresses(v=6).map(str)


@FEW
@given(ANY_TEXT)
@example("alice\n@node")
@example("node\n:22")
def test_any_hosts_text_parses_or_is_a_launch_error(text: str) -> None:
    try:
        specs = parse_hosts_flag(text)
    except LaunchError:
        return
    for spec in specs:
        assert spec.host and not any(c.isspace() for c in spec.host)
        assert spec.user is None or (spec.user and not any(c.isspace() for c in spec.user))
        assert spec.port is None or 20 <= spec.port <= 65535


@st.composite
def host_entries(draw: st.DrawFn) -> list[tuple[str, tuple[str | None, str, int | None]]]:
    """(text as written, (user, host, port) it means), distinct nodes."""
    entries, seen = [], set()
    for _ in range(draw(st.integers(1, 6))):
        user = draw(st.none() | USER)
        v6 = draw(st.booleans())
        host = draw(IPV6 if v6 else HOST)
        port = draw(st.none() | PORT)
        written = f"[{host}]" if v6 else host
        text = (f"{user}@" if user else "") + written + (f":{port}" if port is not None else "")
        identity = (user, host.lower(), port)
        if identity not in seen:
            seen.add(identity)
            entries.append((text, (user, host, port)))
    return entries


@FEW
@given(host_entries())
def test_valid_hosts_mean_user_host_and_port(entries: list[tuple[str, tuple[str | None, str, int | None]]]) -> None:
    specs = parse_hosts_flag(",".join(text for text, _ in entries))
    assert [(s.user, s.host, s.port) for s in specs] == [meant for _, meant in entries]


@FEW
@given(st.one_of(ANY_TEXT, NEAR.map(lambda text: f"node1 gpus={text}")))
@example("node1 gpus=x")
@example("node1 gpus=٣")
def test_any_hostfile_parses_or_is_a_launch_error(text: str) -> None:
    try:
        specs = parse_hostfile(text, "hosts.txt")
    except LaunchError:
        return
    assert specs and all(s.slots is None or s.slots >= 1 for s in specs)
    for spec in specs:
        if spec.gpus is not None:  # they become that host's --gpu-ids: an error there would come late, remotely
            assert parse_gpu_ids(",".join(spec.gpus)) == spec.gpus


@FEW
@given(host_entries(), st.lists(st.none() | st.integers(1, 16), min_size=6, max_size=6), st.booleans())
def test_valid_hostfile_lines_mean_host_and_slots(
    entries: list[tuple[str, tuple[str | None, str, int | None]]], slots: list[int | None], comments: bool
) -> None:
    lines = ["# the job's hosts", ""] if comments else []
    for (text, _), count in zip(entries, slots):
        lines.append(text + (f" slots={count}" if count is not None else "") + ("  # a node" if comments else ""))
    specs = parse_hostfile("\n".join(lines), "hosts.txt")
    assert [(s.user, s.host, s.port, s.slots) for s in specs] == [
        (*meant, count) for (_, meant), count in zip(entries, slots)
    ]


# -- Slurm host lists ----------------------------------------------------------------------------


@FEW
@given(ANY_TEXT)
@example("a[1-99999999]")
@example("n[١-٣]")
def test_any_slurm_host_list_expands_or_is_a_hostlist_error(text: str) -> None:
    try:
        size = hostlist_size(text)
        first = first_host(text)
        hosts = expand_hostlist(text) if size <= 10_000 else None
    except HostlistError:
        return
    if hosts is not None:
        assert len(hosts) == size and hosts[0] == first


LITERAL = st.from_regex(r"[a-z][a-z0-9.-]{0,5}", fullmatch=True)


@st.composite
def slurm_entries(draw: st.DrawFn) -> tuple[str, list[str]]:
    """One entry `pre[RANGES]post` (or a plain name) and the hosts it names, in order."""
    prefix = draw(LITERAL)
    if draw(st.booleans()):
        return prefix, [prefix]
    suffix = draw(st.just("") | LITERAL)
    items, names = [], []
    for _ in range(draw(st.integers(1, 3))):
        width = draw(st.integers(1, 3))
        low = draw(st.integers(0, 10**width - 1))
        count = draw(st.integers(0, 5))
        low_text = str(low).zfill(width)
        items.append(low_text if count == 0 else f"{low_text}-{low + count}")
        names += [prefix + str(value).zfill(width) + suffix for value in range(low, low + count + 1)]
    return f"{prefix}[{','.join(items)}]{suffix}", names


@FEW
@given(st.lists(slurm_entries(), min_size=1, max_size=4))
def test_valid_slurm_host_lists_name_each_host_with_its_padding(entries: list[tuple[str, list[str]]]) -> None:
    text = ",".join(written for written, _ in entries)
    expected = [name for _, names in entries for name in names]
    assert expand_hostlist(text) == expected
    assert hostlist_size(text) == len(expected) and first_host(text) == expected[0]


# -- known_hosts lines ---------------------------------------------------------------------------


@FEW
@given(ANY_TEXT, st.text(max_size=20))
@example("node ssh-ed25519 AAAA", "node")
@example("|1|x|y ssh-rsa AAAAB3NzaC1yc2E=", "node")
def test_any_known_hosts_line_is_an_entry_or_skipped(line: str, name: str) -> None:
    entry = parse_line(line, "known_hosts", 1)
    if entry is not None:
        check_host_key([entry], name, entry.key_type, entry.blob)


KEY_TYPE = st.from_regex(r"[a-z][a-z0-9@.-]{0,24}", fullmatch=True)


@FEW
@given(st.lists(HOST, min_size=1, max_size=3, unique_by=str.lower), KEY_TYPE, st.binary(max_size=64),
       st.sampled_from([None, "@revoked", "@cert-authority"]), st.booleans())
def test_valid_known_hosts_lines_mean_their_hosts_and_key(
    hosts: list[str], key_type: str, rest: bytes, marker: str | None, comment: bool
) -> None:
    blob = struct.pack(">I", len(key_type)) + key_type.encode() + rest
    line = " ".join([*([marker] if marker else []), ",".join(hosts), key_type, base64.b64encode(blob).decode()])
    entry = parse_line(line + (" alice@laptop" if comment else ""), "known_hosts", 7)
    assert entry == KnownHostKey("known_hosts", 7, tuple(hosts), key_type, blob, marker)
    verdict = {None: "known", "@revoked": "revoked", "@cert-authority": "unknown"}[marker]
    for host in hosts:
        assert check_host_key([entry], host.upper(), key_type, blob).verdict == verdict


# -- frames from a host ----------------------------------------------------------------------


def _channel() -> AgentChannel:
    return AgentChannel(0, client=None, post=lambda event: None)


FRAME = st.builds(
    lambda kind, rank, stream, payload: struct.pack("!BiBI", kind, rank, stream, len(payload)) + payload,
    st.integers(0, 255), st.integers(-(2**31), 2**31 - 1), st.integers(0, 255), st.binary(max_size=40),
)
GARBAGE = st.lists(st.one_of(st.binary(max_size=60), FRAME, st.just(SYNC)), max_size=8)


@FEW
@given(GARBAGE, st.integers(1, 64))
def test_frame_reader_fed_anything_gives_frames_or_a_frame_error(pieces: list[bytes], cut: int) -> None:
    data = SYNC + b"".join(pieces)
    reader = FrameReader()
    try:
        for at in range(0, len(data), cut):
            for frame in reader.feed(data[at : at + cut]):
                assert 1 <= frame.kind <= LAST_KIND
    except FrameError:
        pass


@FEW
@given(GARBAGE, st.integers(1, 64))
@example([encode(READY, b"not json")], 64)
@example([encode(READY, b'{"addr": 1}')], 64)
@example([encode(EXIT, b"\xff")], 64)
@example([encode(EXIT, b"zero")], 64)
@example([encode(ATTEMPT_END, b"[1, 2]")], 64)
@example([encode(DATA, b"x\n", 0, 9)], 64)
@example([encode(DATA, b"x\n", -5, 1)], 64)
@example([struct.pack("!BiBI", DATA, 0, 1, 2**31)], 64)
def test_read_out_never_raises_and_lets_only_usable_frames_through(pieces: list[bytes], cut: int) -> None:
    channel = _channel()
    data = SYNC + b"".join(pieces)
    for at in range(0, len(data), cut):
        for frame in channel.read_out(data[at : at + cut]):
            assert frame.kind != EXIT
            if frame.kind == READY:
                found = json.loads(frame.payload)
                assert isinstance(found["addr"], str) and isinstance(found["port"], int)
            if frame.kind == DATA:
                assert frame.rank >= 0 and frame.stream in (1, 2)
    assert channel.said_exit is None or isinstance(channel.said_exit, int)
    assert len(channel.stderr_tail) <= 20


def test_read_out_keeps_good_frames_and_names_the_first_bad_one() -> None:
    channel = _channel()
    good = SYNC + encode_ready("10.0.0.1", 29500) + encode(DATA, b"hi\n", 0, 1)
    assert [f.kind for f in channel.read_out(good)] == [READY, DATA]
    assert channel.read_out(encode(READY, b"{oops") + encode(DATA, b"later\n", 0, 1)) == []
    assert channel.read_out(encode_exit(0)) == []  # nothing more is read from a host that sent garbage
    assert channel.said_exit is None and len(channel.stderr_tail) == 1 and "READY" in channel.stderr_tail[0]


# -- random command lines ----------------------------------------------------------------------


def _option_names() -> list[tuple[str, bool]]:
    import ddplaunch.cli as cli

    names = []
    for param in cli.command.params:
        opts = getattr(param, "opts", [])
        if not opts or param.name in ("agent", "host_name", "dry_run") or "--help" in opts or "--version" in opts:
            continue
        names.append((opts[0], bool(getattr(param, "is_flag", False))))
    return names


OPTIONS = _option_names()
VALUE = st.one_of(
    st.integers(-3, 300).map(str), st.sampled_from(["auto", "gpu", "cpu", "none", "0,1", "0-3", "1:3", "node1,node2",
                                                     "127.0.0.1", "3", "1.5", "nan", "inf", "SIGTERM,USR1", "c10d",
                                                     "etcd", "", "a=b", "x" * 3, "0:3,1:2", "stop", "report"]),
    st.text(alphabet="0123456789,-:.=abc@[]", max_size=12),
)


@SOME
@given(chosen=st.lists(st.tuples(st.sampled_from(OPTIONS), VALUE), max_size=5))
@example(chosen=[(("--nproc", False), "99999999"), (("--force", True), "")])
@example(chosen=[(("--hosts", False), "a,b"), (("--nproc", False), "2")])
def test_random_command_lines_with_dry_run_exit_0_or_2_without_a_traceback(
    chosen: list[tuple[tuple[str, bool], str]], tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from click.testing import CliRunner

    import ddplaunch.cli as cli

    base = tmp_path_factory.getbasetemp()
    script = base / "train.py"
    script.write_text("print('hi')\n")
    (base / "empty-bin").mkdir(exist_ok=True)
    args = ["--dry-run"]
    for (name, is_flag), value in chosen:
        args += [name] if is_flag else [name, value]
    # No nvidia-smi on PATH (a GPU box would run it at every example), a HOME of no ~/.ssh, and
    # none of the caller's torchrun or cluster variables.
    env: dict[str, str | None] = {
        key: None for key in os.environ if key.startswith(("PET_", "SLURM_", "OMPI_", "MASTER_", "TORCH"))
    }
    env.update({"DDPLAUNCH_CLUSTER": "none", "PATH": str(base / "empty-bin"), "HOME": str(base),
                "CUDA_VISIBLE_DEVICES": None})
    result = CliRunner().invoke(cli.command, [*args, str(script)], env=env)
    assert result.exit_code in (0, 2), (args, result.output, result.exc_info)
    assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.exc_info)
    assert "Traceback" not in result.output


def test_the_command_line_property_draws_from_the_real_options() -> None:
    names = {name for name, _ in OPTIONS}
    assert {"--nproc", "--gpu-ids", "--hosts", "--ranks", "--heartbeat-timeout"} <= names
