"""Worker output: LineFramer, Printer, colour_enabled, and the real CLI end to end.

Every wait here is bounded: subprocesses run with timeouts, pipes are read with deadlines.
"""

from __future__ import annotations

import os
import pty
import random
import re
import signal
from pathlib import Path

import pytest

from helpers_cli import cli_env, launcher_argv, run_cli, write_script
from helpers_screen import Terminal, run_on_terminal, set_size
from ddplaunch.live import PARTIAL_IDLE_S
from ddplaunch.logs import MAX_LINE_BYTES, TAIL_LINES, LineFramer, Printer, colour_enabled, rank_prefixes

pytestmark = pytest.mark.timeout(60)

RUN_TIMEOUT_S = 40
ANSI = b"\x1b["


# =============================================================================================
# helpers
# =============================================================================================


def frame(chunks: list[bytes]) -> list[bytes]:
    """All lines a fresh LineFramer gives for these chunks, flush included."""
    framer = LineFramer()
    lines: list[bytes] = []
    for chunk in chunks:
        lines.extend(framer.feed(chunk))
    lines.extend(framer.flush())
    return lines


def every_split(sample: bytes) -> list[list[bytes]]:
    """The sample cut once at every position (including the ends), and cut into single bytes."""
    splits = [[sample[:i], sample[i:]] for i in range(len(sample) + 1)]
    splits.append([sample[i : i + 1] for i in range(len(sample))])
    return splits


def random_chunkings(sample: bytes, count: int = 50, seed: int = 1234) -> list[list[bytes]]:
    rng = random.Random(seed)
    result = []
    for _ in range(count):
        chunks, pos = [], 0
        while pos < len(sample):
            size = rng.randint(0, 7)  # empty chunks too
            chunks.append(sample[pos : pos + size])
            pos += size
        result.append(chunks)
    return result


def read_available(fd: int) -> bytes:
    """Everything currently in a pipe (the write end may still be open)."""
    os.set_blocking(fd, False)
    data = b""
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


class Pipes:
    """Two os.pipe()s standing in for the launcher's stdout and stderr."""

    def __init__(self) -> None:
        self.out_r, self.out_w = os.pipe()
        self.err_r, self.err_w = os.pipe()

    def out(self) -> bytes:
        return read_available(self.out_r)

    def err(self) -> bytes:
        return read_available(self.err_r)

    def close(self) -> None:
        for fd in (self.out_r, self.out_w, self.err_r, self.err_w):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def pipes():
    p = Pipes()
    yield p
    p.close()


def make_printer(pipes: Pipes, **kwargs) -> Printer:
    kwargs.setdefault("world_ranks", [0])
    kwargs.setdefault("world_size", 1)
    kwargs.setdefault("colour", False)
    return Printer(stdout_fd=pipes.out_w, stderr_fd=pipes.err_w, **kwargs)


def worker_args(script: str, nproc: int, *flags: str) -> list[str]:
    return ["--nproc", str(nproc), "--grace", "5", *flags, script]


def launch(
    tmp_path: Path, script: str, nproc: int, *flags: str, env: dict[str, str] | None = None
) -> tuple[int, bytes, bytes]:
    """Run the real CLI to its end: its exit code, stdout and stderr."""
    result = run_cli(worker_args(script, nproc, *flags), env or cli_env(), cwd=tmp_path, timeout=RUN_TIMEOUT_S)
    return result.code, result.out, result.err


def lines_of(data: bytes) -> list[bytes]:
    assert data == b"" or data.endswith(b"\n"), f"output does not end in a newline: {data[-80:]!r}"
    return data.split(b"\n")[:-1]


def worker_lines(data: bytes, marker: bytes = b"|") -> list[bytes]:
    """Lines with a rank prefix (not the launcher's own notes)."""
    pattern = re.compile(rb"^ *\d+ " + re.escape(marker) + rb" ")
    return [line for line in lines_of(data) if pattern.match(line)]


# =============================================================================================
# A. LineFramer
# =============================================================================================

TQDM = b"\r 10%|#   |\r 20%|##  |\r100%|####|\n"

FRAMER_CASES = [
    pytest.param(b"a\nb\n", [b"a", b"b"], id="lf"),
    pytest.param(b"a\r\nb\r\n", [b"a", b"b"], id="crlf"),
    pytest.param(b"a\r\nb\nc\r\n", [b"a", b"b", b"c"], id="mixed-endings"),
    pytest.param(b"\n\nx\n\n", [b"", b"", b"x", b""], id="empty-lf-lines-kept"),
    # a bare \r goes back to the line's start: a finished line shows its last non-empty part
    pytest.param(TQDM, [b"100%|####|"], id="tqdm-cr-one-line"),
    pytest.param(b"a\r\r\rb\n", [b"b"], id="empty-cr-parts-skipped"),
    pytest.param(b"10%\r20%\r30%\r\n", [b"30%"], id="trailing-cr-then-crlf"),
    pytest.param(b"start\n\r 50%\r100%\ndone\n", [b"start", b"100%", b"done"], id="progress-between-lines"),
    pytest.param(b"\r 10%\r 20%", [b" 20%"], id="unfinished-bar-last-state-at-end"),
    pytest.param(b"\r 50%\r     \r", [], id="bar-cleared-with-blanks-is-no-line"),
    pytest.param(b"\r 50%\r     \rnext\n", [b"next"], id="cleared-bar-then-line"),
    pytest.param(b"a\r\nb\r\r\n\r\n", [b"a", b"b", b""], id="crlf-and-empty-crlf"),
    pytest.param(b"partial", [b"partial"], id="partial-only"),
    pytest.param(b"a\nlast", [b"a", b"last"], id="partial-final-line"),
    pytest.param(b"a\nlast\r", [b"a", b"last"], id="partial-final-line-trailing-cr"),
    pytest.param(b"", [], id="empty"),
    pytest.param("héllo wörld ✓ 日本語\n".encode(), ["héllo wörld ✓ 日本語".encode()], id="utf8"),
    pytest.param(b"bad \xff\xfe bytes\n\xc3\n", [b"bad \xff\xfe bytes", b"\xc3"], id="invalid-utf8"),
    pytest.param(b"\x00nul\ttab\x1b[31mansi\n", [b"\x00nul\ttab\x1b[31mansi"], id="control-bytes"),
]


@pytest.mark.unit
@pytest.mark.parametrize(("sample", "expected"), FRAMER_CASES)
def test_framer_whole_sample(sample: bytes, expected: list[bytes]) -> None:
    assert frame([sample]) == expected


@pytest.mark.unit
@pytest.mark.parametrize(("sample", "expected"), FRAMER_CASES)
def test_framer_every_split_point(sample: bytes, expected: list[bytes]) -> None:
    for chunks in every_split(sample):
        assert frame(chunks) == expected, chunks


@pytest.mark.unit
@pytest.mark.parametrize(("sample", "expected"), FRAMER_CASES)
def test_framer_random_chunkings(sample: bytes, expected: list[bytes]) -> None:
    for chunks in random_chunkings(sample):
        assert frame(chunks) == expected, chunks


@pytest.mark.unit
def test_framer_crlf_split_across_two_feeds() -> None:
    framer = LineFramer()
    first = framer.feed(b"a\r")
    second = framer.feed(b"\nb\n")
    assert first + second == [b"a", b"b"]
    assert framer.flush() == []


# feed -> (whole lines, what the unfinished line shows, its newest complete update, a progress line?)
UPDATE_STEPS = [
    (b"\r  0%|", [], b"  0%|", None, True),  # the text after the last \r may still grow
    (b"   |", [], b"  0%|   |", None, True),
    (b"\r 10%|#  |", [], b" 10%|#  |", b"  0%|   |", True),
    (b"\r 20%|## |\r 30%|###|", [], b" 30%|###|", b" 20%|## |", True),  # only the newest
    (b"", [], b" 30%|###|", None, True),  # taken once
    (b"\r", [], b" 30%|###|", None, True),  # maybe half of \r\n: no update yet
    (b"\r40%", [], b"40%", b" 30%|###|", True),
    (b"\nnext", [b"40%"], b"next", None, False),  # the line ended: its updates are done
    (b"\r", [], b"next", None, False),
    (b"\n", [b"next"], b"", None, False),
    (b"\r\r\r", [], b"", None, True),  # empty parts: no update, nothing to show
    (b"x\r\ry", [], b"y", b"x", True),
]


@pytest.mark.unit
def test_framer_tells_the_unfinished_line_and_its_updates() -> None:
    framer = LineFramer()
    for data, lines, display, update, carriage_return in UPDATE_STEPS:
        assert framer.feed(data) == lines, data
        assert (framer.display, framer.take_update(), framer.carriage_return) == (display, update, carriage_return), data
    assert framer.flush() == [b"y"]
    assert (framer.display, framer.take_update(), framer.carriage_return) == (b"", None, False)
    framer.feed(b"\r 5%\r 6%")  # an update left untaken ...
    assert framer.feed(b"\n") == [b" 6%"]
    assert framer.take_update() is None  # ... is gone with its line: the line itself says more


@pytest.mark.unit
def test_framer_long_bar_stays_small() -> None:
    """An hour of updates keeps only the newest: memory stays bounded, no 1 MiB pieces of updates."""
    framer = LineFramer()
    for i in range(50_000):
        assert framer.feed(f"\r{i:6d}/50000 |{'#' * 40}|".encode()) == []
    assert framer.display == b" 49999/50000 |" + b"#" * 40 + b"|"
    assert framer.feed(b"\n") == [b" 49999/50000 |" + b"#" * 40 + b"|"]


@pytest.mark.unit
def test_framer_whole_lines_returned_at_once_partial_waits() -> None:
    framer = LineFramer()
    assert framer.feed(b"one\ntwo\nthr") == [b"one", b"two"]
    assert framer.feed(b"ee") == []
    assert framer.flush() == [b"three"]
    assert framer.flush() == []  # flushed once only


@pytest.mark.unit
def test_framer_utf8_character_split_across_feeds_arrives_intact() -> None:
    text = "✓日本語é"
    data = (text + "\n").encode()
    framer = LineFramer()
    lines = []
    for byte in data:
        lines.extend(framer.feed(bytes([byte])))
    assert lines == [text.encode()]
    assert lines[0].decode("utf-8") == text


@pytest.mark.unit
@pytest.mark.parametrize(
    ("length", "chunk"),
    [
        pytest.param(MAX_LINE_BYTES * 2 + 5, 1 << 16, id="2max+5-64k-chunks"),
        pytest.param(MAX_LINE_BYTES * 3, 1 << 16, id="3max-64k-chunks"),
        pytest.param(MAX_LINE_BYTES * 2 + 5, 100_003, id="2max+5-odd-chunks"),
        pytest.param(MAX_LINE_BYTES + 1, 1 << 16, id="max+1-64k-chunks"),
        pytest.param(MAX_LINE_BYTES * 2 + 5, MAX_LINE_BYTES * 3, id="2max+5-one-chunk"),
    ],
)
def test_framer_long_line_cut_into_pieces(length: int, chunk: int) -> None:
    """The line's bytes in chunks, its newline in a later feed (as a worker's print() does)."""
    body = b"y" * length
    lines = frame([body[i : i + chunk] for i in range(0, len(body), chunk)] + [b"\n"])
    assert b"".join(lines) == body
    assert all(0 < len(line) <= MAX_LINE_BYTES for line in lines), [len(x) for x in lines]
    assert len(lines) == -(-length // MAX_LINE_BYTES)


@pytest.mark.unit
def test_framer_long_partial_line_cut_before_newline() -> None:
    framer = LineFramer()
    lines = framer.feed(b"z" * (MAX_LINE_BYTES + 10))  # no newline yet: memory stays bounded
    assert lines == [b"z" * MAX_LINE_BYTES]
    assert framer.feed(b"\n") == [b"z" * 10]


@pytest.mark.unit
def test_framer_line_of_exactly_max_is_not_cut() -> None:
    assert frame([b"q" * MAX_LINE_BYTES + b"\n"]) == [b"q" * MAX_LINE_BYTES]


@pytest.mark.unit
def test_framer_line_of_exactly_max_with_crlf_split_across_reads() -> None:
    framer = LineFramer()
    assert framer.feed(b"q" * MAX_LINE_BYTES + b"\r") == []
    assert framer.feed(b"\n") == [b"q" * MAX_LINE_BYTES]


@pytest.mark.unit
def test_framer_cr_before_crlf_is_one_line() -> None:
    assert frame([b"a\r\r\n", b"b\n"]) == [b"a", b"b"]


@pytest.mark.unit
@pytest.mark.parametrize(
    "chunks",
    [
        pytest.param(lambda d: [d], id="one-feed"),
        pytest.param(lambda d: [d[i : i + 4096] for i in range(0, len(d), 4096)], id="4k-chunks"),
        pytest.param(lambda d: [d[i : i + 65536] for i in range(0, len(d), 65536)], id="64k-chunks"),
    ],
)
def test_framer_long_line_cut_whatever_the_chunking(chunks) -> None:
    data = b"w" * (MAX_LINE_BYTES * 2 + 10) + b"\n"
    lines = frame(chunks(data))
    assert [len(line) for line in lines] == [MAX_LINE_BYTES, MAX_LINE_BYTES, 10]


# =============================================================================================
# A. Printer
# =============================================================================================


@pytest.mark.unit
@pytest.mark.parametrize(
    ("world_size", "rank", "out_prefix", "err_prefix"),
    [
        (1, 0, b"0 | ", b"0 ! "),
        (2, 1, b"1 | ", b"1 ! "),
        (10, 0, b"0 | ", b"0 ! "),
        (10, 9, b"9 | ", b"9 ! "),
        (11, 3, b" 3 | ", b" 3 ! "),
        (100, 0, b" 0 | ", b" 0 ! "),
        (100, 7, b" 7 | ", b" 7 ! "),
        (100, 99, b"99 | ", b"99 ! "),
        (101, 5, b"  5 | ", b"  5 ! "),
    ],
)
def test_printer_prefix_and_padding(pipes: Pipes, world_size, rank, out_prefix, err_prefix) -> None:
    printer = make_printer(pipes, world_ranks=[rank], world_size=world_size)
    printer.feed(rank, 1, b"hello\nworld\n")
    printer.feed(rank, 2, b"oops\n")
    printer.close()
    assert pipes.out() == out_prefix + b"hello\n" + out_prefix + b"world\n"
    assert pipes.err() == err_prefix + b"oops\n"


@pytest.mark.unit
def test_printer_partial_line_waits_for_newline_or_end(pipes: Pipes) -> None:
    printer = make_printer(pipes)
    printer.feed(0, 1, b"par")
    assert pipes.out() == b""
    printer.feed(0, 1, b"tial\nnext")
    assert pipes.out() == b"0 | partial\n"
    printer.end_of_stream(0, 1)
    assert pipes.out() == b"0 | next\n"
    printer.end_of_stream(0, 2)  # nothing pending on stderr: nothing written
    assert pipes.err() == b""
    printer.close()


@pytest.mark.unit
def test_printer_streams_framed_separately(pipes: Pipes) -> None:
    printer = make_printer(pipes)
    printer.feed(0, 1, b"out-")
    printer.feed(0, 2, b"err-")
    printer.feed(0, 1, b"line\n")
    printer.feed(0, 2, b"line\n")
    printer.close()
    assert pipes.out() == b"0 | out-line\n"
    assert pipes.err() == b"0 ! err-line\n"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("rank", "out_prefix", "err_prefix"),
    [
        (0, b"\x1b[36m0 |\x1b[0m ", b"\x1b[1;36m0 !\x1b[0m "),
        (1, b"\x1b[32m1 |\x1b[0m ", b"\x1b[1;32m1 !\x1b[0m "),
    ],
)
def test_printer_colour_on(pipes: Pipes, rank, out_prefix, err_prefix) -> None:
    printer = make_printer(pipes, world_ranks=[0, 1], world_size=2, colour=True)
    printer.feed(rank, 1, b"a\n")
    printer.feed(rank, 2, b"b\n")
    printer.note("hi")
    printer.close()
    assert pipes.out() == out_prefix + b"a\n"
    assert pipes.err() == err_prefix + b"b\n" + b"\x1b[2mddplaunch:\x1b[0m hi\n"


@pytest.mark.unit
def test_printer_colour_off_has_no_ansi(pipes: Pipes) -> None:
    printer = make_printer(pipes, world_ranks=list(range(12)), world_size=12, colour=False)
    for rank in range(12):
        printer.feed(rank, 1, b"a\n")
        printer.feed(rank, 2, b"b\n")
    printer.note("hi")
    printer.close()
    out, err = pipes.out(), pipes.err()
    assert ANSI not in out and ANSI not in err
    assert out.startswith(b" 0 | a\n") and out.endswith(b"11 | a\n")
    assert err.endswith(b"11 ! b\nddplaunch: hi\n")


@pytest.mark.unit
def test_rank_prefixes_colours_differ_per_rank() -> None:
    prefixes = {rank_prefixes(rank, 8, True)[0] for rank in range(8)}
    assert len(prefixes) == 8
    assert rank_prefixes(3, 8, False) == (b"3 | ", b"3 ! ")


@pytest.mark.unit
def test_printer_note_plain(pipes: Pipes) -> None:
    printer = make_printer(pipes)
    printer.note("something happened")
    printer.close()
    assert pipes.err() == b"ddplaunch: something happened\n"
    assert pipes.out() == b""


@pytest.mark.unit
def test_printer_shown_ranks_filter(pipes: Pipes, tmp_path: Path) -> None:
    printer = make_printer(
        pipes, world_ranks=[0, 1, 2, 3], world_size=4, shown_ranks=frozenset({0, 3}), log_dir=tmp_path
    )
    for rank in range(4):
        printer.feed(rank, 1, f"out {rank}\n".encode())
        printer.feed(rank, 2, f"err {rank}\n".encode())
    printer.close()
    assert pipes.out() == b"0 | out 0\n3 | out 3\n"
    assert pipes.err() == b"0 ! err 0\n3 ! err 3\n"
    for rank in range(4):  # the files get all ranks
        assert (tmp_path / f"rank{rank}.log").read_bytes() == f"out {rank}\nerr {rank}\n".encode()


@pytest.mark.unit
def test_printer_log_dir_gets_raw_lines(pipes: Pipes, tmp_path: Path) -> None:
    log_dir = tmp_path / "logs" / "nested"
    printer = make_printer(pipes, world_ranks=[0, 1], world_size=2, colour=True, log_dir=log_dir)
    printer.feed(1, 1, b"plain\r\n\r 50%\r100%\n")
    printer.feed(1, 2, b"bad \xff\n")
    printer.feed(1, 1, b"no newline")
    printer.end_of_stream(1, 1)
    printer.note("a note")
    printer.log_event("only in the file")
    printer.block("\x1b[31mreport\x1b[0m\n")
    printer.close()
    # raw, \r included; a stream that ended without a newline gets one (the next run appends)
    assert (log_dir / "rank1.log").read_bytes() == b"plain\r\n\r 50%\r100%\nbad \xff\nno newline\n"
    assert (log_dir / "rank0.log").read_bytes() == b""
    launcher_log = (log_dir / "launcher.log").read_text()
    assert re.search(r"^\S+ a note$", launcher_log, re.M)
    assert re.search(r"^\S+ only in the file$", launcher_log, re.M)
    assert "report\n" in launcher_log and "\x1b" not in launcher_log
    err = pipes.err()
    assert b"only in the file" not in err
    assert b"a note" in err and b"\x1b[31mreport\x1b[0m\n" in err


@pytest.mark.unit
def test_printer_log_dir_appends(pipes: Pipes, tmp_path: Path) -> None:
    for text in (b"first\n", b"second\n"):
        printer = make_printer(pipes, log_dir=tmp_path)
        printer.feed(0, 1, text)
        printer.close()
    assert (tmp_path / "rank0.log").read_bytes() == b"first\nsecond\n"


@pytest.mark.unit
def test_printer_tail_keeps_last_lines_decoded(pipes: Pipes) -> None:
    printer = make_printer(pipes)
    for i in range(30):
        printer.feed(0, 1 if i % 2 else 2, f"line {i}\n".encode())
    printer.feed(0, 1, b"bad \xff\xfe end\n")
    printer.close()
    tail = printer.tail(0)
    assert len(tail) == TAIL_LINES == 20
    assert tail == [f"line {i}" for i in range(11, 30)] + ["bad \ufffd\ufffd end"]


@pytest.mark.unit
def test_printer_tail_keeps_last_lines_of_one_big_feed(pipes: Pipes) -> None:
    printer = make_printer(pipes)
    printer.feed(0, 1, b"".join(f"{i}\n".encode() for i in range(100)))
    printer.close()
    assert printer.tail(0) == [str(i) for i in range(80, 100)]
    assert make_printer(pipes, world_ranks=[5], world_size=6).tail(5) == []


@pytest.mark.unit
def test_printer_closed_reader_does_not_raise(pipes: Pipes, tmp_path: Path) -> None:
    printer = make_printer(pipes, log_dir=tmp_path)
    os.close(pipes.out_r)
    os.close(pipes.err_r)
    for i in range(3):
        printer.feed(0, 1, f"out {i}\n".encode())
        printer.feed(0, 2, f"err {i}\n".encode())
        printer.feed(0, 1, b"x" * 200_000 + b"\n")  # more than a pipe holds
    printer.note("still fine")
    printer.block("report\n")
    printer.end_of_stream(0, 1)
    printer.close()
    log = (tmp_path / "rank0.log").read_bytes()
    assert log.startswith(b"out 0\nerr 0\n") and log.count(b"\n") == 9


@pytest.mark.unit
def test_printer_closed_reader_signal_default_sigpipe_ignored(pipes: Pipes) -> None:
    # Python ignores SIGPIPE; a write to a closed pipe is EPIPE, which silences the sink.
    assert signal.getsignal(signal.SIGPIPE) in (signal.SIG_IGN, signal.Handlers.SIG_IGN)
    printer = make_printer(pipes)
    os.close(pipes.out_r)
    printer.feed(0, 1, b"a\n")
    printer.feed(0, 2, b"b\n")  # stderr still works
    printer.close()
    assert pipes.err() == b"0 ! b\n"


# =============================================================================================
# A. Printer: progress lines, off a terminal and at one
# =============================================================================================


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def bar(step: int, total: int = 300) -> bytes:
    return f"{100 * step // total:3d}%|{step}/{total}|".encode()


@pytest.mark.unit
def test_printer_off_terminal_thins_updates_per_rank_and_stream(pipes: Pipes) -> None:
    """Updates every 0.1 s for 12 s: one at the start, one per THIN_S, then the last state."""
    clock = Clock()
    printer = make_printer(pipes, world_ranks=[0, 1], world_size=2, clock=clock)
    for step in range(121):
        for rank in (0, 1):
            printer.feed(rank, 2, b"\r" + bar(step, 120))
        if step % 40 == 0:
            printer.feed(0, 1, f"step {step}\n".encode())  # whole lines: every one
        clock.now += 0.1
    for rank in (0, 1):
        printer.feed(rank, 2, b"\n")
    printer.close()
    assert pipes.out() == b"".join(f"0 | step {step}\n".encode() for step in (0, 40, 80, 120))
    shown = [step for step in (0, 50, 100)]  # t = 0, 5.0, 10.0 (each the newest complete update)
    expected = [b"%d ! " % rank + bar(step, 120) for step in shown for rank in (0, 1)]
    expected += [b"%d ! " % rank + bar(120, 120) for rank in (0, 1)]
    assert lines_of(pipes.err()) == expected


@pytest.mark.unit
def test_printer_off_terminal_bar_cut_by_its_stream_ending(pipes: Pipes) -> None:
    clock = Clock()
    printer = make_printer(pipes, clock=clock)
    for step in range(5):
        printer.feed(0, 2, b"\r" + bar(step))
    printer.end_of_stream(0, 2)
    assert pipes.err() == b"0 ! " + bar(0) + b"\n0 ! " + bar(4) + b"\n"
    assert printer.tail(0) == [bar(4).decode()]  # the report shows where it stopped, once
    printer.close()


@pytest.mark.unit
def test_printer_rank_log_holds_raw_bytes_lines_whole(pipes: Pipes, tmp_path: Path) -> None:
    printer = make_printer(pipes, log_dir=tmp_path)
    printer.feed(0, 2, b"\r 0%|")
    printer.feed(0, 1, b"out ")  # stdout and stderr share the file: no line is cut by the other
    printer.feed(0, 2, b"\r 50%|\r100%|")
    printer.feed(0, 1, b"line\n")
    printer.feed(0, 2, b"\n")
    printer.feed(0, 1, b"no newline")
    printer.end_of_stream(0, 1)
    printer.feed(0, 1, b"the next attempt\n")  # appends to the same file
    printer.close()
    log = (tmp_path / "rank0.log").read_bytes()
    assert log == b"out line\n\r 0%|\r 50%|\r100%|\nno newline\nthe next attempt\n"


@pytest.fixture
def pty_pair():
    master, slave = pty.openpty()
    set_size(slave, 60, 12)
    yield master, slave
    os.close(master)
    os.close(slave)


class AtTerminal:
    """A Printer writing to a pseudo-terminal (stdout too, unless told), on a fake clock; what
    it wrote is replayed through pyte."""

    def __init__(self, master: int, slave: int, **kwargs) -> None:
        self.clock = Clock()
        self._master = master
        self.screen = Terminal(60, 12)
        kwargs.setdefault("world_ranks", [0, 1])
        kwargs.setdefault("world_size", 2)
        kwargs.setdefault("stdout_fd", slave)
        self.printer = Printer(colour=False, stderr_fd=slave, clock=self.clock, **kwargs)

    def rows(self, after: float = 0.0) -> list[str]:
        """The screen once `after` seconds have passed and the loop has ticked the printer."""
        self.clock.now += after
        self.printer.tick()
        self.screen.feed(read_available(self._master))
        return self.screen.rows()


@pytest.fixture
def at_terminal(pty_pair):
    return lambda **kwargs: AtTerminal(*pty_pair, **kwargs)


@pytest.mark.unit
def test_printer_at_a_terminal_bars_live_lines_above(at_terminal) -> None:
    """stdout and stderr on one terminal: one live area; 2 bars x 100 updates leave 2 lines."""
    term = at_terminal()
    printer = term.printer
    for step in range(101):
        for rank in (0, 1):
            printer.feed(rank, 2, b"\r" + bar(step, 100))
        if step % 50 == 0:
            printer.feed(1, 1, f"step {step}\n".encode())
            printer.note(f"note {step}")
        term.rows(after=0.01)
    assert term.rows(after=1) == [
        "1 | step 0", "ddplaunch: note 0", "1 | step 50", "ddplaunch: note 50", "1 | step 100",
        "ddplaunch: note 100", "0 ! 100%|100/100|", "1 ! 100%|100/100|",
    ]
    printer.end_of_stream(1, 2)  # rank 1's bar ends: its last state scrolls up, once
    printer.feed(0, 1, b"after\n")
    last_four = ["ddplaunch: note 100", "1 ! 100%|100/100|", "0 | after", "0 ! 100%|100/100|"]
    assert term.rows(after=1)[-4:] == last_four
    printer.close()  # rank 0's bar never ended (a lost host): it comes out as a line too
    assert term.rows()[-4:] == last_four


@pytest.mark.unit
def test_printer_terminal_stderr_piped_stdout(at_terminal, pipes: Pipes) -> None:
    """Only stderr is a terminal: its bars are live; stdout (a pipe) gets plain lines, no codes."""
    term = at_terminal(world_ranks=[0], world_size=1, stdout_fd=pipes.out_w)
    for step in range(3):
        term.printer.feed(0, 2, b"\r" + bar(step))
        term.printer.feed(0, 1, b"\rout %d" % step)  # a \r line on the pipe: thinned, not drawn
        term.rows(after=1)
    term.printer.feed(0, 1, b"\n")
    assert term.rows() == ["0 ! " + bar(2).decode()]
    assert pipes.out() == b"0 | out 0\n0 | out 2\n"
    term.printer.close()


@pytest.mark.unit
def test_printer_at_a_terminal_prompt_shows_after_idle(at_terminal) -> None:
    term = at_terminal()
    term.printer.feed(0, 1, b"> /tmp/train.py(3)<module>()\n(Pdb) ")
    assert term.rows() == ["0 | > /tmp/train.py(3)<module>()"]
    due = term.printer.due_in()
    assert due == pytest.approx(PARTIAL_IDLE_S)
    assert term.rows(after=due) == ["0 | > /tmp/train.py(3)<module>()", "0 | (Pdb)"]
    assert term.screen.cursor == (len("0 | (Pdb) "), 1)
    term.printer.close()


# =============================================================================================
# A. colour_enabled
# =============================================================================================


@pytest.fixture
def tty_fd():
    master, slave = pty.openpty()
    yield slave
    os.close(master)
    os.close(slave)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("flag", "environ", "expected"),
    [
        (False, {}, True),
        (False, {"NO_COLOR": "1"}, False),
        (False, {"NO_COLOR": "anything"}, False),
        (False, {"NO_COLOR": ""}, True),  # no-color.org: only a non-empty value counts
        (True, {}, False),
        (True, {"NO_COLOR": "1"}, False),
    ],
)
def test_colour_enabled_on_a_tty(tty_fd: int, flag: bool, environ: dict, expected: bool) -> None:
    assert colour_enabled(flag, environ, tty_fd) is expected


@pytest.mark.unit
@pytest.mark.parametrize("flag", [False, True])
def test_colour_enabled_not_on_a_pipe(pipes: Pipes, flag: bool) -> None:
    assert colour_enabled(flag, {}, pipes.out_w) is False


@pytest.mark.unit
def test_colour_enabled_regular_file_and_bad_fd(tmp_path: Path) -> None:
    with open(tmp_path / "f", "wb") as f:
        assert colour_enabled(False, {}, f.fileno()) is False
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    assert colour_enabled(False, {}, w) is False


# =============================================================================================
# B. End to end: the real CLI
# =============================================================================================

MANY_LINES = 100_000
MANY_LINES_WORKER = f"""
import os
rank = int(os.environ["RANK"])
for i in range({MANY_LINES}):
    print(f"{{rank}}:{{i}}:" + "x" * 40)
"""


@pytest.mark.parametrize("with_log_dir", [False, True], ids=["terminal", "terminal+log-dir"])
def test_e2e_many_lines_arrive_whole_and_in_order(tmp_path: Path, with_log_dir: bool) -> None:
    script = write_script(tmp_path / "worker.py", MANY_LINES_WORKER)
    log_dir = tmp_path / "logs"
    flags = ("--log-dir", str(log_dir)) if with_log_dir else ()
    code, out, err = launch(tmp_path, script, 4, *flags)
    assert code == 0, err[-2000:]
    pattern = re.compile(rb"^(\d) \| (\d):(\d+):" + b"x" * 40 + rb"$")
    seen: dict[int, list[int]] = {rank: [] for rank in range(4)}
    bad = []
    for line in lines_of(out):
        match = pattern.match(line)
        if match is None or match[1] != match[2]:
            bad.append(line)
            continue
        seen[int(match[1])].append(int(match[3]))
    assert bad == [], f"{len(bad)} torn/interleaved lines, e.g. {bad[:3]!r}"
    for rank in range(4):
        assert len(seen[rank]) == MANY_LINES, rank
        assert seen[rank] == list(range(MANY_LINES)), f"rank {rank} out of order"
    assert b" | " not in err and b" ! " not in err
    if with_log_dir:
        for rank in range(4):
            expected = b"".join(f"{rank}:{i}:".encode() + b"x" * 40 + b"\n" for i in range(MANY_LINES))
            assert (log_dir / f"rank{rank}.log").read_bytes() == expected, rank
        assert (log_dir / "launcher.log").is_file()


def test_e2e_sigkill_after_printing_keeps_last_lines(tmp_path: Path) -> None:
    script = write_script(
        tmp_path / "worker.py",
        """
        import os, signal
        for i in range(1000):
            print(f"line {i}")
        os.kill(os.getpid(), signal.SIGKILL)
        """,
    )
    code, out, err = launch(tmp_path, script, 1)
    assert code == 137, err[-2000:]
    assert lines_of(out) == [f"0 | line {i}".encode() for i in range(1000)]
    assert b"SIGKILL" in err
    # the failure report shows the rank's last lines
    assert b"line 999" in err and b"line 980" in err
    assert err.rstrip().endswith(b"ddplaunch: exit code 137")


def test_e2e_partial_final_line_then_exit_code(tmp_path: Path) -> None:
    script = write_script(
        tmp_path / "worker.py",
        """
        import os, sys
        print("before")
        sys.stdout.write("no newline at end")
        os._exit(3)
        """,
    )
    code, out, err = launch(tmp_path, script, 1)
    assert code == 3, err[-2000:]
    assert out == b"0 | before\n0 | no newline at end\n"
    assert b"exit code 3" in err
    assert b"no newline at end" in err  # also in the report's tail


def test_e2e_long_line(tmp_path: Path) -> None:
    script = write_script(
        tmp_path / "worker.py",
        """
        import sys
        sys.stdout.write("L" * 2_000_000)
        sys.stdout.flush()
        sys.stdout.write("\\n")
        print("after")
        """,
    )
    code, out, err = launch(tmp_path, script, 1)
    assert code == 0, err[-2000:]
    lines = lines_of(out)
    assert lines[-1] == b"0 | after"
    pieces = lines[:-1]
    assert all(p.startswith(b"0 | ") for p in pieces)
    body = [p[4:] for p in pieces]
    assert b"".join(body) == b"L" * 2_000_000
    full, rest = divmod(2_000_000, MAX_LINE_BYTES)
    assert [len(b) for b in body] == [MAX_LINE_BYTES] * full + [rest]


def test_e2e_line_just_over_max_is_cut(tmp_path: Path) -> None:
    script = write_script(
        tmp_path / "worker.py",
        f"""
        import sys
        sys.stdout.buffer.write(b"L" * {MAX_LINE_BYTES + 10} + b"\\n")
        """,
    )
    code, out, err = launch(tmp_path, script, 1)
    assert code == 0, err[-2000:]
    assert [len(line) - 4 for line in lines_of(out)] == [MAX_LINE_BYTES, 10]


def test_e2e_progress_bar(tmp_path: Path) -> None:
    script = write_script(
        tmp_path / "worker.py",
        """
        import sys, time
        for pct in (0, 25, 50, 75, 100):
            bar = "#" * (pct // 25)
            sys.stdout.write(f"\\r{pct:3d}%|{bar:<4}|")
            sys.stdout.flush()
            time.sleep(0.02)
        sys.stdout.write("\\n")
        sys.stdout.flush()
        print("done")
        """,
    )
    code, out, err = launch(tmp_path, script, 1)
    assert code == 0, err[-2000:]
    # off a terminal: the first update, then none for THIN_S, then the bar's last state
    assert lines_of(out) == [b"0 |   0%|    |", b"0 | 100%|####|", b"0 | done"]
    assert b"\r" not in out


def test_e2e_utf8_byte_by_byte_and_invalid_utf8(tmp_path: Path) -> None:
    script = write_script(
        tmp_path / "worker.py",
        """
        import sys
        for byte in "héllo wörld ✓ 日本語\\n".encode("utf-8"):
            sys.stdout.buffer.write(bytes([byte]))
            sys.stdout.buffer.flush()
        sys.stdout.buffer.write(b"bad \\xff\\xfe bytes\\n")
        sys.stdout.buffer.flush()
        sys.stderr.buffer.write(b"err \\xc3 half\\n")
        sys.stderr.buffer.flush()
        """,
    )
    code, out, err = launch(tmp_path, script, 1, env=cli_env(PYTHONIOENCODING="utf-8"))
    assert code == 0, err[-2000:]
    assert out == "0 | héllo wörld ✓ 日本語\n".encode() + b"0 | bad \xff\xfe bytes\n"
    assert b"0 ! err \xc3 half\n" in err


def test_e2e_stderr_lines_distinguishable(tmp_path: Path) -> None:
    script = write_script(
        tmp_path / "worker.py",
        """
        import os, sys
        rank = os.environ["RANK"]
        for i in range(3):
            print(f"out {rank} {i}")
            print(f"err {rank} {i}", file=sys.stderr)
        """,
    )
    code, out, err = launch(tmp_path, script, 2)
    assert code == 0, err[-2000:]
    out_lines, err_lines = lines_of(out), lines_of(err)
    for rank in range(2):
        assert [l for l in out_lines if l.startswith(f"{rank} ".encode())] == [
            f"{rank} | out {rank} {i}".encode() for i in range(3)
        ]
        assert [l for l in err_lines if l.startswith(f"{rank} ".encode())] == [
            f"{rank} ! err {rank} {i}".encode() for i in range(3)
        ]
    assert len(out_lines) == 6  # stdout holds worker stdout lines only
    assert b"err" not in out and b" ! " not in out
    assert b" | " not in err and b"out " not in err
    others = [l for l in err_lines if not re.match(rb"^\d ! ", l)]
    assert others and all(l.startswith(b"ddplaunch: ") for l in others)


def test_e2e_ranks_filter_terminal_but_files_complete(tmp_path: Path) -> None:
    script = write_script(
        tmp_path / "worker.py",
        """
        import os, sys
        rank = os.environ["RANK"]
        for i in range(500):
            print(f"r{rank} line {i}")
        print(f"r{rank} to stderr", file=sys.stderr)
        """,
    )
    log_dir = tmp_path / "logs"
    code, out, err = launch(tmp_path, script, 4, "--ranks", "0,3", "--log-dir", str(log_dir))
    assert code == 0, err[-2000:]
    expected_out = [f"{rank} | r{rank} line {i}".encode() for rank in (0, 3) for i in range(500)]
    assert sorted(lines_of(out)) == sorted(expected_out)
    for rank in (0, 3):  # in order per rank
        assert [l for l in lines_of(out) if l.startswith(f"{rank} |".encode())] == [
            f"{rank} | r{rank} line {i}".encode() for i in range(500)
        ]
    assert b"r1" not in out + err and b"r2" not in out + err
    assert b"0 ! r0 to stderr\n" in err and b"3 ! r3 to stderr\n" in err
    for rank in range(4):
        lines = (log_dir / f"rank{rank}.log").read_bytes().split(b"\n")[:-1]
        assert sorted(lines) == sorted(
            [f"r{rank} line {i}".encode() for i in range(500)] + [f"r{rank} to stderr".encode()]
        ), rank
        assert [l for l in lines if b"line" in l] == [f"r{rank} line {i}".encode() for i in range(500)]
    assert (log_dir / "launcher.log").is_file()


def test_e2e_print_without_flush_arrives_while_worker_alive(start, tmp_path: Path) -> None:
    script = write_script(
        tmp_path / "worker.py",
        """
        import time
        print("ready")
        time.sleep(30)
        """,
    )
    run = start(*worker_args(script, 1))
    assert run.wait_line("0 | ready", timeout=5) == "0 | ready"
    assert run.proc.poll() is None, "launcher ended early: the worker should still be sleeping"
    run.signal(signal.SIGTERM)
    assert run.wait(timeout=10) == 128 + signal.SIGTERM
    assert "got SIGTERM" in run.err


COLOUR_WORKER = """
import sys
print("to stdout")
print("to stderr", file=sys.stderr)
"""


@pytest.mark.parametrize(
    ("env_extra", "flags"),
    [
        pytest.param({"NO_COLOR": "1"}, (), id="NO_COLOR=1"),
        pytest.param({}, (), id="plain"),
        pytest.param({}, ("--no-color",), id="--no-color"),
    ],
)
def test_e2e_piped_output_has_no_colour(tmp_path: Path, env_extra: dict, flags: tuple) -> None:
    script = write_script(tmp_path / "worker.py", COLOUR_WORKER)
    code, out, err = launch(tmp_path, script, 2, *flags, env=cli_env(**env_extra))
    assert code == 0, err[-2000:]
    assert ANSI not in out and ANSI not in err
    assert b"0 | to stdout\n" in out and b"1 ! to stderr\n" in err


def run_on_pty(
    tmp_path: Path, script: str, nproc: int, *flags: str, env: dict[str, str], size: tuple[int, int] = (100, 30)
) -> tuple[int, bytes]:
    """The launcher with stdout and stderr on one pseudo-terminal of `size` (columns, lines)."""
    argv = launcher_argv(*worker_args(script, nproc, *flags))
    return run_on_terminal(argv, cwd=tmp_path, env=env, size=size, timeout=RUN_TIMEOUT_S)


# at a terminal: coloured, unless NO_COLOR or --no-color
TERMINAL_COLOUR_CASES = [
    pytest.param({}, (), True, id="tty"),
    pytest.param({"NO_COLOR": "1"}, (), False, id="tty+NO_COLOR=1"),
    pytest.param({}, ("--no-color",), False, id="tty+--no-color"),
]


@pytest.mark.parametrize(("env_extra", "flags", "coloured"), TERMINAL_COLOUR_CASES)
def test_e2e_colour_on_a_terminal(tmp_path: Path, env_extra: dict, flags: tuple, coloured: bool) -> None:
    script = write_script(tmp_path / "worker.py", COLOUR_WORKER)
    code, data = run_on_pty(tmp_path, script, 2, *flags, env=cli_env(**env_extra))
    assert code == 0, data[-2000:]
    assert b"to stdout" in data and b"to stderr" in data
    if coloured:
        assert b"\x1b[36m0 |\x1b[0m to stdout" in data
        assert b"\x1b[1;32m1 !\x1b[0m to stderr" in data
    else:
        assert ANSI not in data
        assert b"0 | to stdout" in data and b"1 ! to stderr" in data


# =============================================================================================
# B. Progress bars and colour in workers' own output, at a terminal and off one
# =============================================================================================

TQDM_WORKER = """
import os, time
from tqdm import tqdm
rank = int(os.environ["RANK"])
print(f"hello from {rank}")
for i in tqdm(range(300), mininterval=0.01):
    time.sleep(0.004)
    if i % 100 == 50:
        print(f"rank {rank} step {i}")
print(f"bye from {rank}")
"""


def test_e2e_tqdm_at_a_terminal_leaves_one_full_width_bar_per_rank(tmp_path: Path) -> None:
    """What stays on screen (scrollback included), replayed through a VT100 emulator: under
    torchrun 2 bar lines, under plain python 1; before this, 65 here, each 10 columns wide."""
    script = write_script(tmp_path / "worker.py", TQDM_WORKER)
    columns = 100
    code, data = run_on_pty(tmp_path, script, 2, env=cli_env(), size=(columns, 30))
    assert code == 0, data[-2000:]
    screen = Terminal(columns, 30)
    screen.feed(data)
    rows = screen.rows()
    bars = [row for row in rows if "/300" in row]
    assert [bar[:9] for bar in sorted(bars)] == ["0 ! 100%|", "1 ! 100%|"], rows
    assert all(columns - 3 <= len(bar) <= columns for bar in bars), bars  # as wide as the terminal allows
    for rank in (0, 1):  # the whole lines, in their order, above
        mine = [row for row in rows if row.startswith(f"{rank} | ")]
        assert mine == [f"{rank} | hello from {rank}"] + [f"{rank} | rank {rank} step {i}" for i in (50, 150, 250)] + [
            f"{rank} | bye from {rank}"
        ]


def test_e2e_tqdm_through_a_pipe_is_thinned_and_logged_raw(tmp_path: Path) -> None:
    script = write_script(tmp_path / "worker.py", TQDM_WORKER)
    log_dir = tmp_path / "logs"
    code, out, err = launch(tmp_path, script, 2, "--log-dir", str(log_dir))
    assert code == 0, err[-2000:]
    for rank in (0, 1):
        bars = [line for line in lines_of(err) if line.startswith(b"%d ! " % rank)]
        # the first update, one more per THIN_S the run took (none, unless the machine is slow),
        # the last state: not 300
        assert 2 <= len(bars) <= 5 and b"300/300" in bars[-1], bars
        assert len(bars[-1]) < 100  # no terminal: no width given, tqdm's own default
        raw = (log_dir / f"rank{rank}.log").read_bytes()
        assert raw.count(b"\r") >= 100 and b"300/300" in raw  # every update, as written
    assert b"\r" not in out + err


RICH_WORKER = """
import os
from rich.console import Console
Console().print("[red]red text[/red]")
print("COLUMNS=" + os.environ.get("COLUMNS", "-"), "FORCE_COLOR=" + os.environ.get("FORCE_COLOR", "-"))
"""


@pytest.mark.parametrize(("env_extra", "flags", "coloured"), TERMINAL_COLOUR_CASES)
def test_e2e_workers_colour_at_a_terminal(tmp_path: Path, env_extra: dict, flags: tuple, coloured: bool) -> None:
    """rich in a worker colours at a terminal, as under torchrun, though it writes to a pipe."""
    script = write_script(tmp_path / "worker.py", RICH_WORKER)
    code, data = run_on_pty(tmp_path, script, 1, *flags, env=cli_env(**env_extra), size=(90, 30))
    assert code == 0, data[-2000:]
    assert b"COLUMNS=86 " in data  # the terminal's width less the prefix
    if coloured:
        assert b"\x1b[31mred text\x1b[0m" in data and b"FORCE_COLOR=1" in data
    else:
        assert b"0 | red text" in data and b"FORCE_COLOR=-" in data


PROMPT_WORKER = """
import sys, time
print("> train.py(3)<module>()")
sys.stdout.write("(Pdb) ")  # a prompt: no newline, and nothing more until someone answers
sys.stdout.flush()
time.sleep(60)
"""


def test_e2e_a_prompt_without_newline_shows_at_a_terminal(tmp_path: Path) -> None:
    """pdb's `(Pdb) ` never ends its line: it shows, prefixed, with the cursor after it."""
    script = write_script(tmp_path / "worker.py", PROMPT_WORKER)
    argv = launcher_argv(*worker_args(script, 1))
    code, data = run_on_terminal(argv, cwd=tmp_path, env=cli_env(), size=(80, 24), timeout=20, until=b"(Pdb) ")
    assert b"(Pdb) " in data, data[-2000:]
    screen = Terminal(80, 24)
    screen.feed(data)
    assert screen.rows()[-2:] == ["0 | > train.py(3)<module>()", "0 | (Pdb)"]
    assert screen.cursor == (len("0 | (Pdb) "), len(screen.rows()) - 1)
    assert code == 128 + signal.SIGTERM  # the test stopped it
