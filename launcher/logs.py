"""Worker output: whole lines, rank prefixes, colours, per-rank files. One printer owns the terminal.

Lines stay bytes end to end: splitting only at ASCII \\n and \\r can never cut a UTF-8
character, and invalid UTF-8 passes through untouched. Decoding (with "replace") happens only
where text is drawn, in the failure report.
"""

from __future__ import annotations

import errno
import os
import time
from collections import deque
from collections.abc import Callable
from typing import Literal

Stream = Literal[1, 2]  # the worker's stdout or stderr, as file descriptor numbers
MAX_LINE_BYTES = 1 << 20  # a longer line is cut into pieces, each with its prefix
TAIL_LINES = 20
_COLOURS = (36, 32, 33, 35, 34, 96, 92, 93, 95, 94)


class LineFramer:
    """Turns one byte stream into whole lines.

    `\\n` and `\\r\\n` end a line; a bare `\\r` (a tqdm progress update) ends one too, so
    progress bars show up as they move instead of as one huge line at the end.
    """

    __slots__ = ("_partial",)

    def __init__(self) -> None:
        self._partial = b""

    def feed(self, data: bytes) -> list[bytes]:
        data = self._partial + data
        if b"\r" in data:
            lines, self._partial = _split_with_cr(data)
        else:
            lines = data.split(b"\n")
            self._partial = lines.pop()
        if len(data) > MAX_LINE_BYTES:  # only then can a line be too long
            lines = [piece for line in lines for piece in _pieces(line)]
            hold = b"\r" if self._partial.endswith(b"\r") else b""  # a held \r is not content
            *done, rest = _pieces(self._partial[: len(self._partial) - len(hold)])
            lines.extend(done)
            self._partial = rest + hold
        return lines

    def flush(self) -> list[bytes]:
        """The last line of a stream that ended without a newline."""
        partial, self._partial = self._partial.rstrip(b"\r"), b""
        return [partial] if partial else []


def _split_with_cr(data: bytes) -> tuple[list[bytes], bytes]:
    hold = b""
    if data.endswith(b"\r"):  # may be the first half of \r\n: decide on the next read
        data, hold = data[:-1], b"\r"
    segments = data.replace(b"\r\n", b"\n").split(b"\n")
    last = segments.pop()
    lines: list[bytes] = []
    for segment in segments:
        parts = segment.split(b"\r")
        lines.extend(part for part in parts[:-1] if part)
        if parts[-1] or len(parts) == 1:  # "a\r\r\n" is one line: the \r already ended it
            lines.append(parts[-1])
    parts = last.split(b"\r")
    lines.extend(part for part in parts[:-1] if part)
    return lines, parts[-1] + hold


def _pieces(line: bytes) -> list[bytes]:
    """`line` cut into MAX_LINE_BYTES pieces; an empty line stays one empty piece."""
    return [line[i : i + MAX_LINE_BYTES] for i in range(0, max(len(line), 1), MAX_LINE_BYTES)]


def colour_enabled(no_color_flag: bool, environ: dict[str, str] | os._Environ[str], fd: int) -> bool:
    """Colour only on a terminal, and never with --no-color or NO_COLOR set (no-color.org)."""
    if no_color_flag or environ.get("NO_COLOR", "") != "":
        return False
    try:
        return os.isatty(fd)
    except OSError:
        return False


def rank_prefixes(rank: int, world_size: int, colour: bool) -> tuple[bytes, bytes]:
    """(stdout prefix, stderr prefix): rank padded to one width; `!` marks stderr."""
    width = len(str(max(0, world_size - 1)))
    label = f"{rank:>{width}}"
    if not colour:
        return f"{label} | ".encode(), f"{label} ! ".encode()
    code = _COLOURS[rank % len(_COLOURS)]
    return (
        f"\x1b[{code}m{label} |\x1b[0m ".encode(),
        f"\x1b[1;{code}m{label} !\x1b[0m ".encode(),
    )


class _Sink:
    """A file descriptor written whole; a closed reader (e.g. `| head`) silences it, no crash."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.open = True

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while self.open and view:
            try:
                view = view[os.write(self.fd, view) :]
            except InterruptedError:
                continue
            except BlockingIOError:
                time.sleep(0.001)  # someone made our terminal non-blocking; wait for room
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.EBADF, errno.EIO):
                    self.open = False
                else:
                    raise


class _RankOutput:
    """Per rank: a framer per stream, the last lines (for the failure report), its log file."""

    def __init__(self, prefixes: tuple[bytes, bytes], shown: dict[int, bool], log_fd: int | None) -> None:
        self.framers = {1: LineFramer(), 2: LineFramer()}
        self.prefixes = prefixes
        self.shown = shown  # per stream: whether its lines reach the terminal
        self.log_fd = log_fd
        self.tail: deque[bytes] = deque(maxlen=TAIL_LINES)


class Printer:
    """The one owner of the terminal: worker lines, the launcher's notes, the report."""

    def __init__(
        self,
        *,
        world_ranks: list[int],
        world_size: int,
        colour: bool,
        shown_ranks: frozenset[int] | None = None,
        log_dir: str | None = None,
        stdout_fd: int = 1,
        stderr_fd: int = 2,
        shows: Callable[[int, int], bool] | None = None,
    ) -> None:
        """`shows(rank, stream)`: whether that stream of that rank reaches the terminal (on top
        of `shown_ranks`); the files get every line whatever it says."""
        self.colour = colour
        self._out = {1: _Sink(stdout_fd), 2: _Sink(stderr_fd)}
        self._world_size = world_size
        self._shown_ranks = shown_ranks
        self._shows = shows
        self._log_dir = log_dir
        self._launcher_log: int | None = None
        if log_dir is not None:
            os.makedirs(log_dir, exist_ok=True)
            self._launcher_log = _open_append(os.path.join(log_dir, "launcher.log"))
        self._ranks: dict[int, _RankOutput] = {}
        self.add_ranks(world_ranks)

    def add_ranks(self, world_ranks: list[int]) -> None:
        """Ranks whose output this printer takes (a multi-node agent learns its own late)."""
        log_dir = self._log_dir
        for rank in world_ranks:
            if rank in self._ranks:
                continue
            rank_shown = self._shown_ranks is None or rank in self._shown_ranks
            self._ranks[rank] = _RankOutput(
                rank_prefixes(rank, self._world_size, self.colour),
                {s: rank_shown and (self._shows is None or self._shows(rank, s)) for s in (1, 2)},
                _open_append(os.path.join(log_dir, f"rank{rank}.log")) if log_dir is not None else None,
            )

    def feed(self, rank: int, stream: Stream, data: bytes) -> None:
        """Bytes read from a worker's pipe; whole lines go out at once, the rest waits."""
        output = self._ranks[rank]
        self._emit(output, stream, output.framers[stream].feed(data))

    def end_of_stream(self, rank: int, stream: Stream) -> None:
        """The pipe closed: a last line without newline still goes out."""
        output = self._ranks[rank]
        self._emit(output, stream, output.framers[stream].flush())

    def _emit(self, output: _RankOutput, stream: Stream, lines: list[bytes]) -> None:
        if not lines:
            return
        output.tail.extend(lines[-TAIL_LINES:])
        if output.log_fd is not None:
            _write_all(output.log_fd, b"\n".join(lines) + b"\n")
        if output.shown[stream]:
            prefix = output.prefixes[stream - 1]
            self._out[stream].write(prefix + (b"\n" + prefix).join(lines) + b"\n")

    def tail(self, rank: int) -> list[str]:
        """The last lines a rank printed (both streams), decoded for display."""
        return [line.decode("utf-8", "replace") for line in self._ranks[rank].tail]

    def note(self, text: str) -> None:
        """One line of the launcher's own, on stderr and in launcher.log."""
        self.log_event(text)
        label = "\x1b[2mddplaunch:\x1b[0m " if self.colour else "ddplaunch: "
        self._out[2].write(f"{label}{text}\n".encode())

    def log_event(self, text: str) -> None:
        """An event for launcher.log only (when --log-dir is set)."""
        if self._launcher_log is not None:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            _write_all(self._launcher_log, f"{stamp} {text}\n".encode())

    def block(self, text: str) -> None:
        """A pre-rendered block (the failure report) to stderr, and to launcher.log."""
        self._out[2].write(text.encode("utf-8", "replace"))
        if self._launcher_log is not None:
            _write_all(self._launcher_log, _strip_ansi(text).encode("utf-8", "replace"))

    def close(self) -> None:
        fds = [o.log_fd for o in self._ranks.values()] + [self._launcher_log]
        for fd in fds:
            if fd is not None:
                os.close(fd)
        for output in self._ranks.values():
            output.log_fd = None
        self._launcher_log = None


def terminal_printer(
    *,
    no_color: bool,
    world_ranks: list[int],
    world_size: int,
    shown_ranks: frozenset[int] | None,
    log_dir: str | None,
    shows: Callable[[int, int], bool] | None = None,
) -> Printer:
    """The printer of a launcher that owns this terminal: in colour only when both stdout and
    stderr are terminals, and --no-color and NO_COLOR are not set."""
    colour = colour_enabled(no_color, os.environ, 1) and colour_enabled(no_color, os.environ, 2)
    return Printer(
        world_ranks=world_ranks, world_size=world_size, colour=colour, shown_ranks=shown_ranks, log_dir=log_dir,
        shows=shows,
    )


def _open_append(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _strip_ansi(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)
