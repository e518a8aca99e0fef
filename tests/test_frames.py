"""The agent-to-head byte format: frames survive any cut into reads; rc-file noise is skipped."""

from __future__ import annotations

import pytest

from ddplaunch.frames import (
    BLOCK, DATA, END_OF_STREAM, NOTE, READY, SYNC, FrameError, FrameReader, decode_ready, encode, encode_ready,
    decode_go, go_line, parse_command, WANT_STDIN, decode_stdin, stdin_line, STDIN_EOF_LINE,
)

pytestmark = pytest.mark.unit

STREAM = (
    SYNC
    + encode_ready("10.0.0.1", 29500)
    + encode(DATA, b"hello\nwor", 3, 1)
    + encode(DATA, b"ld \xff\xfe\n", 3, 2)
    + encode(END_OF_STREAM, b"", 3, 1)
    + encode(NOTE, "ünï".encode())
    + encode(BLOCK, b"")
)


def kinds(frames: list) -> list[tuple[int, int, int, bytes]]:
    return [(f.kind, f.rank, f.stream, f.payload) for f in frames]


def test_frames_decode_whole() -> None:
    frames = FrameReader().feed(STREAM)
    assert [f.kind for f in frames] == [READY, DATA, DATA, END_OF_STREAM, NOTE, BLOCK]
    assert decode_ready(frames[0]) == ("10.0.0.1", 29500)
    assert frames[2].payload == b"ld \xff\xfe\n" and frames[2].stream == 2 and frames[2].rank == 3
    assert frames[4].text == "ünï"


@pytest.mark.parametrize("size", [1, 2, 3, 7, 10, 11, 64])
def test_any_cut_into_reads_gives_the_same_frames(size: int) -> None:
    whole = kinds(FrameReader().feed(STREAM))
    reader = FrameReader()
    pieces = [reader.feed(STREAM[i : i + size]) for i in range(0, len(STREAM), size)]
    assert kinds([f for piece in pieces for f in piece]) == whole
    assert reader.pending == b""


def test_login_shell_noise_before_the_first_frame_is_kept_aside() -> None:
    noise = b"Welcome to gpu-07!\nconda: base activated\n"
    reader = FrameReader()
    frames = [f for i in range(0, len(noise + STREAM), 5) for f in reader.feed((noise + STREAM)[i : i + 5])]
    assert kinds(frames) == kinds(FrameReader().feed(STREAM))
    assert reader.noise == noise


def test_garbage_after_the_mark_is_an_error_not_a_huge_allocation() -> None:
    with pytest.raises(FrameError):
        FrameReader().feed(SYNC + encode_ready("a", 1) + b"\xff" * 20)


@pytest.mark.parametrize(
    ("line", "parsed"),
    [
        ("go 10.0.0.1 29500\n", ("go", "10.0.0.1 29500")),
        ("stop SIGINT\n", ("stop", "SIGINT")),
        ("rm -rf /\n", None),
        ("", None),
        ("stdin aGk=\n", ("stdin", "aGk=")),
        (STDIN_EOF_LINE.decode(), ("stdin-eof", "")),
        ("stdinx aGk=\n", None),
    ],
)
def test_head_commands(line: str, parsed: tuple[str, str] | None) -> None:
    assert parse_command(line) == parsed


def test_go_line_round_trips_an_ipv6_address() -> None:
    command = parse_command(go_line("fd00::1", 29500).decode())
    assert command is not None and command[0] == "go"
    assert decode_go(command[1]) == ("fd00::1", 29500)  # the agent's own parser


@pytest.mark.parametrize(
    "data",
    [b"p x+1\n", b"", b"\x00\xff\n\r\x03 no newline", bytes(range(256)) * 300],
    ids=["pdb-line", "empty", "control-bytes", "77kB"],
)
def test_a_stdin_piece_is_one_line_and_arrives_byte_exact(data: bytes) -> None:
    line = stdin_line(data)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    command = parse_command(line.decode())
    assert command is not None and command[0] == "stdin"
    assert decode_stdin(command[1]) == data  # the agent's own parser


@pytest.mark.parametrize("argument", ["not base64!", "aGk", "aGk=\x00"])
def test_a_stdin_piece_that_is_not_base64_is_nothing(argument: str) -> None:
    assert decode_stdin(argument) == b""


def test_the_agents_ask_for_stdin_is_a_frame_the_head_reads() -> None:
    (frame,) = FrameReader().feed(SYNC + encode(WANT_STDIN, b"", 5))
    assert (frame.kind, frame.rank) == (WANT_STDIN, 5)


def test_exit_frame_carries_the_agents_code() -> None:
    from ddplaunch.frames import EXIT, encode_exit

    (frame,) = FrameReader().feed(SYNC + encode_ready("a", 1) + encode_exit(143))[1:]
    assert (frame.kind, frame.text) == (EXIT, "143")


class Recorder:
    """Stands in for the head's printer: the calls it gets."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    def add_ranks(self, ranks: list[int]) -> None:
        self.calls.append(("add_ranks", *ranks))

    def __getattr__(self, name: str):  # feed, end_of_stream, note, log_event, block
        return lambda *args: self.calls.append((name, *args))


def test_printer_calls_cross_to_the_head_as_the_same_calls() -> None:
    import os

    from ddplaunch.agent import FramePrinter, replay

    read_fd, write_fd = os.pipe()
    sender = FramePrinter(world_ranks=[4], world_size=8, out_fd=write_fd)
    sender.feed(4, 2, b"tqdm 10%\r")
    sender.end_of_stream(4, 2)
    sender.note("restarting")
    sender.log_event("started rank 4")
    sender.block("Root Cause\n")
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        frames = FrameReader().feed(SYNC + pipe.read())
    head = Recorder()
    for frame in frames:
        replay(frame, head, "gpu-b")  # type: ignore[arg-type]
    assert head.calls == [
        ("add_ranks", 4), ("feed", 4, 2, b"tqdm 10%\r"), ("add_ranks", 4), ("end_of_stream", 4, 2),
        ("note", "gpu-b: restarting"), ("log_event", "gpu-b: started rank 4"), ("block", "Root Cause\n"),
    ]
