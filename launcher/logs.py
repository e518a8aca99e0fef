"""Worker output: whole lines, rank prefixes, colours, per-rank files. One printer owns the terminal.

Lines stay bytes end to end: splitting only at ASCII \\n and \\r can never cut a UTF-8
character, and invalid UTF-8 passes through untouched. Decoding (with "replace") happens only
where text is drawn, in the failure report.
"""

from __future__ import annotations

import errno
import math
import os
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Literal

from ddplaunch.live import LiveArea, is_terminal, same_terminal, terminal_size
from ddplaunch.secrets import scrub

Stream = Literal[1, 2]  # the worker's stdout or stderr, as file descriptor numbers
STREAMS: tuple[Stream, Stream] = (1, 2)
# A longer line is cut into pieces, each with its prefix: a rank that writes without newlines
# (200 MB of 'x') never makes the launcher hold more than this of its unfinished line. Per rank
# the launcher keeps at most, beside one READ_CHUNK being read: 2 streams x (the framer's
# unfinished line + rankN.log's) + TAIL_LINES cut lines = 24 x 64 KiB = 1.5 MiB. The terminal
# needs no buffer: a slow reader holds the launcher in its write, so the worker waits on its
# pipe, and rankN.log gets every byte, cut or not.
MAX_LINE_BYTES = 1 << 16
TAIL_LINES = 20
THIN_S = 5.0  # off a terminal, a progress line's updates: at most one per this, per rank and stream
_COLOURS = (36, 32, 33, 35, 34, 96, 92, 93, 95, 94)
PRIVATE_DIR = 0o700  # a folder ddplaunch makes for output: its owner's only (an existing one keeps its mode)
TRACEBACK_START = b"Traceback (most recent call last):"
_CHAINED = (b"During handling of the above exception", b"The above exception was the direct cause")
_RANK_TAG = re.compile(rb"^\[rank\d+\]:\s?")  # torch prefixes its ranks' uncaught tracebacks with it


class LineFramer:
    """Turns one byte stream into whole lines, and says what its unfinished line shows now.

    `\\n` and `\\r\\n` end a line. A bare `\\r` goes back to the line's start, as at a terminal:
    what follows replaces what came before (a tqdm update), so a finished line is its last
    non-empty part, and a bar of 300 updates is one line. Until its line ends, `display` is
    what the line shows now and `take_update()` gives the newest update a later `\\r` completed
    (only those: the text after the last `\\r` may still be arriving).
    """

    __slots__ = ("_partial", "_held", "update")

    def __init__(self) -> None:
        # The unfinished line, kept short: its newest complete update, `\\r`, and the text after
        # it (or just that text while the line has had no `\\r`). A bar an hour long stays small.
        self._partial = b""
        self._held = False  # the stream's last byte was `\\r`: maybe half of `\\r\\n`, decide next read
        self.update: bytes | None = None  # read it with take_update(); here for a cheap `is None`

    def feed(self, data: bytes) -> list[bytes]:
        data = self._partial + b"\r" + data if self._held else self._partial + data
        if b"\r" in data:
            lines = self._feed_with_cr(data)
        else:
            lines = data.split(b"\n")
            self._partial = lines.pop()
        if len(data) > MAX_LINE_BYTES:  # only then can a line be too long
            lines = [piece for line in lines for piece in _pieces(line)]
            if len(self._partial) > MAX_LINE_BYTES:
                *done, self._partial = _pieces(self._partial.rpartition(b"\r")[2])
                lines.extend(done)
        return lines

    def _feed_with_cr(self, data: bytes) -> list[bytes]:
        self._held = data.endswith(b"\r")
        if self._held:
            data = data[:-1]
        segments = data.replace(b"\r\n", b"\n").split(b"\n")
        parts = segments.pop().split(b"\r")  # the unfinished line, by carriage returns
        if segments:
            self.update = None  # the line it belonged to has ended
        old_parts = 0 if segments else self._partial.count(b"\r")  # complete before this read
        fresh = _last_content(parts[old_parts:-1])
        if fresh:
            self.update = fresh
        self._partial = _last_content(parts[:-1]) + b"\r" + parts[-1] if len(parts) > 1 else parts[-1]
        return [_last_content(segment.split(b"\r")) for segment in segments]

    @property
    def display(self) -> bytes:
        """What the unfinished line shows now; b"" when there is none."""
        done, cr, text = self._partial.partition(b"\r")
        return (text or done) if cr else done

    @property
    def carriage_return(self) -> bool:
        """The unfinished line has gone back to its start at least once: a progress line."""
        return b"\r" in self._partial

    def take_update(self) -> bytes | None:
        """The newest complete update of the unfinished line, once; None when there is no new one."""
        update, self.update = self.update, None
        return update

    def flush(self) -> list[bytes]:
        """The last line of a stream that ended without a newline (a cleared bar is no line)."""
        text, cleared = self.display, self.carriage_return or self._held
        self._partial, self._held, self.update = b"", False, None
        if not text or (cleared and text.isspace()):
            return []
        return [text]


def _last_content(parts: list[bytes]) -> bytes:
    """What a line shows after these carriage-return parts: the last non-empty one."""
    for part in reversed(parts):
        if part:
            return part
    return b""


def _pieces(line: bytes) -> list[bytes]:
    """`line` cut into MAX_LINE_BYTES pieces; an empty line stays one empty piece."""
    return [line[i : i + MAX_LINE_BYTES] for i in range(0, max(len(line), 1), MAX_LINE_BYTES)]


def colour_enabled(no_color_flag: bool, environ: Mapping[str, str], fd: int) -> bool:
    """Colour only on a terminal, and never with --no-color or NO_COLOR set (no-color.org)."""
    if no_color_flag or environ.get("NO_COLOR", "") != "":
        return False
    try:
        return os.isatty(fd)
    except OSError:
        return False


def terminal_colour(no_color_flag: bool, environ: Mapping[str, str]) -> bool:
    """Colour for this launch: the launcher's own prefixes, and workers told they may colour
    (ddplaunch.plan.terminal_env). Only when both stdout and stderr are terminals."""
    return colour_enabled(no_color_flag, environ, 1) and colour_enabled(no_color_flag, environ, 2)


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


class _RankLog:
    """rankN.log: the rank's bytes as it wrote them, `\\r` included, each stream's lines kept whole
    (stdout and stderr share the file, so a line waits for its newline before it goes in)."""

    def __init__(self, path: str) -> None:
        self.fd = _open_append(path)
        self._partial = {1: b"", 2: b""}
        self._cut = {1: False, 2: False}  # a line past the limit went in unfinished: its end still owes "\n"

    def write(self, stream: Stream, data: bytes) -> None:
        pending = self._partial[stream]
        if pending:
            data = pending + data
        end = data.rfind(b"\n") + 1
        if end == len(data):  # the read ended with a line: the common case
            self._partial[stream] = b""
        elif end == 0 and len(data) <= MAX_LINE_BYTES:
            self._partial[stream] = data
            return
        else:
            end = end or len(data)  # a line past the limit goes in as it comes
            self._partial[stream] = data[end:]
            data = data[:end]
        self._cut[stream] = not data.endswith(b"\n")
        _write_all(self.fd, data)

    def end(self, stream: Stream) -> None:
        """The stream ended: its last line goes in, with the newline it lacked."""
        if self._partial[stream] or self._cut[stream]:
            _write_all(self.fd, self._partial[stream] + b"\n")
            self._partial[stream] = b""
            self._cut[stream] = False

    def close(self) -> None:
        try:
            for stream in STREAMS:
                self.end(stream)
        finally:
            os.close(self.fd)


class _RankOutput:
    """Per rank: a framer per stream, the last lines (for the failure report), its log file."""

    def __init__(
        self, rank: int, prefixes: tuple[bytes, bytes], shown: dict[int, bool], log: _RankLog | None
    ) -> None:
        self.rank = rank
        self.framers = {1: LineFramer(), 2: LineFramer()}
        self.prefixes = prefixes
        self.shown = shown  # per stream: whether its lines reach the terminal
        self.log = log
        self.tail: deque[bytes] = deque(maxlen=TAIL_LINES)
        self.updated = {1: -math.inf, 2: -math.inf}  # off a terminal: when an update last went out
        self.last_output: float | None = None  # when its last bytes arrived (a stall is the lack of them)
        self.exceptions = Exceptions()


class Exceptions:
    """The uncaught exceptions a rank's stderr shows, from Python's own traceback layout, so a
    rank that failed on its own is told apart from one that was only stopped."""

    def __init__(self) -> None:
        self.inside = False  # between a traceback's first line and its exception line
        self.raised: list[tuple[float, str]] = []  # when each exception line arrived, and the line

    def scan(self, lines: list[bytes], now: float) -> None:
        for line in lines:
            text = _RANK_TAG.sub(b"", line, count=1)
            if text.startswith(TRACEBACK_START):
                self.inside = True
            elif self.inside and text and not text[:1].isspace() and not text.startswith(_CHAINED):
                self.inside = False
                self.raised.append((now, text.decode("utf-8", "replace").strip()))


class Printer:
    """The one owner of the terminal: worker lines, the launcher's notes, the report.

    At a terminal, each rank's unfinished line (a progress bar, a prompt) lives in a live area
    at the bottom (ddplaunch.live) and whole lines scroll above it. Elsewhere (a file, a pipe,
    CI) a progress line's updates are thinned to one per THIN_S per rank and stream; its last
    state comes out when its line ends. Whole lines are never thinned.
    """

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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`shows(rank, stream)`: whether that stream of that rank reaches the terminal (on top
        of `shown_ranks`); the files get every line whatever it says."""
        self.colour = colour
        self._out = {1: _Sink(stdout_fd), 2: _Sink(stderr_fd)}
        self._clock = clock
        self._live = self._live_areas()
        self._world_size = world_size
        self._shown_ranks = shown_ranks
        self._shows = shows
        self._log_dir = log_dir
        self._files_failed = False  # a write to log_dir failed: no file is written after that
        self._launcher_log: int | None = None
        if log_dir is not None:
            os.makedirs(log_dir, mode=PRIVATE_DIR, exist_ok=True)
            self._launcher_log = _open_append(os.path.join(log_dir, "launcher.log"))
        self._ranks: dict[int, _RankOutput] = {}
        self.last_any: float | None = None  # when any rank's last bytes arrived
        self.add_ranks(world_ranks)

    def _live_areas(self) -> dict[Stream, LiveArea | None]:
        """A live area per terminal among stdout and stderr: one, shared, when they are the same."""
        out_fd, err_fd = self._out[1].fd, self._out[2].fd
        err = LiveArea(self._out[2].write, terminal_size(err_fd), self._clock) if is_terminal(err_fd) else None
        if not is_terminal(out_fd):
            return {1: None, 2: err}
        if err is not None and same_terminal(out_fd, err_fd):
            return {1: err, 2: err}
        return {1: LiveArea(self._out[1].write, terminal_size(out_fd), self._clock), 2: err}

    def add_ranks(self, world_ranks: list[int]) -> None:
        """Ranks whose output this printer takes (a multi-node agent learns its own late)."""
        log_dir = None if self._files_failed else self._log_dir
        for rank in world_ranks:
            if rank in self._ranks:
                continue
            rank_shown = self._shown_ranks is None or rank in self._shown_ranks
            self._ranks[rank] = _RankOutput(
                rank,
                rank_prefixes(rank, self._world_size, self.colour),
                {s: rank_shown and (self._shows is None or self._shows(rank, s)) for s in (1, 2)},
                _RankLog(os.path.join(log_dir, f"rank{rank}.log")) if log_dir is not None else None,
            )

    def feed(self, rank: int, stream: Stream, data: bytes) -> None:
        """Bytes read from a worker's pipe; whole lines go out at once, the rest waits."""
        output = self._ranks[rank]
        output.last_output = self.last_any = self._clock()
        if output.log is not None:
            self._to_files(output.log.write, stream, data)
        framer = output.framers[stream]
        lines = framer.feed(data)
        area = self._live[stream]
        if area is None:
            if lines:
                self._emit(output, stream, lines)
            if framer.update is not None:  # a progress line moved on
                self._thinned(output, stream, framer.take_update())
            return
        if output.shown[stream]:  # the area learns the new unfinished line before the lines go above it
            area.pending((rank, stream), output.prefixes[stream - 1], framer.display, framer.carriage_return)
        if lines:
            self._emit(output, stream, lines)
        area.refresh()

    def end_of_stream(self, rank: int, stream: Stream) -> None:
        """The pipe closed: a last line without newline still goes out (a bar: its last state)."""
        output = self._ranks[rank]
        if output.log is not None:
            self._to_files(output.log.end, stream)
        area = self._live[stream]
        if area is not None:
            area.pending((rank, stream), b"", b"", False)
        self._emit(output, stream, output.framers[stream].flush())
        self._refresh(stream)

    def _emit(self, output: _RankOutput, stream: Stream, lines: list[bytes]) -> None:
        if not lines:
            return
        output.tail.extend(lines[-TAIL_LINES:])
        if stream == 2 and (output.exceptions.inside or any(TRACEBACK_START in line for line in lines)):
            output.exceptions.scan(lines, self._clock())
        if output.shown[stream]:
            prefix = output.prefixes[stream - 1]
            self._write(stream, prefix + (b"\n" + prefix).join(lines) + b"\n")

    def _thinned(self, output: _RankOutput, stream: Stream, update: bytes | None) -> None:
        """Off a terminal: a progress update, unless one of this stream went out under THIN_S ago."""
        now = self._clock()
        if update is not None and output.shown[stream] and now - output.updated[stream] >= THIN_S:
            output.updated[stream] = now
            self._out[stream].write(output.prefixes[stream - 1] + update + b"\n")

    def _write(self, stream: Stream, data: bytes) -> None:
        area = self._live[stream]
        if area is None:
            self._out[stream].write(data)
        else:
            area.above(data, self._out[stream].write)

    def _refresh(self, stream: Stream) -> None:
        area = self._live[stream]
        if area is not None:
            area.refresh()

    def tick(self) -> None:
        """The loop woke (due_in() passed, or anything else): redraw the live area if it is due."""
        for area in self._areas():
            area.refresh()

    def due_in(self) -> float | None:
        """Seconds until tick() has something to draw; None: nothing until more output."""
        times = [t for t in (area.due_in() for area in self._areas()) if t is not None]
        return min(times) if times else None

    def _areas(self) -> list[LiveArea]:
        return list({id(a): a for a in self._live.values() if a is not None}.values())

    def tail(self, rank: int) -> list[str]:
        """The last lines a rank printed (both streams), decoded for display."""
        return [line.decode("utf-8", "replace") for line in self._ranks[rank].tail]

    def last_output(self, rank: int) -> float | None:
        """When the rank's last bytes arrived (this printer's clock); None: none yet."""
        return self._ranks[rank].last_output

    def exceptions_raised(self, rank: int) -> list[tuple[float, str]]:
        """The uncaught exceptions the rank's stderr showed: when each arrived, and its line."""
        return list(self._ranks[rank].exceptions.raised)

    def note(self, text: str) -> None:
        """One line of the launcher's own, on stderr and in launcher.log."""
        self.log_event(text)
        label = "\x1b[2mddplaunch:\x1b[0m " if self.colour else "ddplaunch: "
        self._write(2, f"{label}{text}\n".encode())
        self._refresh(2)

    def log_event(self, text: str) -> None:
        """An event for launcher.log only (when --log-dir is set)."""
        if self._launcher_log is not None:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            self._to_files(_write_all, self._launcher_log, f"{stamp} {scrub(text)}\n".encode())  # ddplaunch.secrets: no token in a file

    def block(self, text: str) -> None:
        """A pre-rendered block (the failure report) to stderr, and to launcher.log."""
        self._write(2, text.encode("utf-8", "replace"))
        self._refresh(2)
        if self._launcher_log is not None:
            self._to_files(_write_all, self._launcher_log, _strip_ansi(text).encode("utf-8", "replace"))

    def close(self) -> None:
        """Unfinished lines come out as lines (a host lost over SSH never ends its streams)."""
        for output in self._ranks.values():
            for stream in STREAMS:
                self._emit(output, stream, output.framers[stream].flush())
            log, output.log = output.log, None
            if log is not None:
                self._to_files(log.close)
        for area in self._areas():
            area.close()
        self._close_files()

    def _to_files(self, write: Callable[..., None], *args: object) -> None:
        """A write to the log directory. The first that fails (disk full, a read-only or lost
        mount) ends every file there, said once; the workers and the terminal go on."""
        try:
            write(*args)
        except OSError as exc:
            if not self._files_failed:
                self._files_failed = True
                self._close_files()
                self.note(self._files_failed_text(exc))

    def _files_failed_text(self, exc: OSError) -> str:
        every = all(all(output.shown.values()) for output in self._ranks.values())
        shown = "every line" if every else "every line of the ranks it shows"
        why = exc.strerror or str(exc)
        return f"cannot write to --log-dir {self._log_dir} ({why}): the files stop here; the terminal still shows {shown}"

    def _close_files(self) -> None:
        for output in self._ranks.values():
            if output.log is not None:
                _close_quietly(output.log.fd)
                output.log = None
        if self._launcher_log is not None:
            _close_quietly(self._launcher_log)
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
    """The printer of a launcher that owns this terminal (in colour as `terminal_colour` says)."""
    return Printer(
        world_ranks=world_ranks, world_size=world_size, colour=terminal_colour(no_color, os.environ),
        shown_ranks=shown_ranks, log_dir=log_dir,
        shows=shows,
    )


def _open_append(path: str) -> int:
    # owner only: a rank's output may hold what its script printed of its secrets
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:  # a full disk may fail the close too; the fd is released all the same
        pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _strip_ansi(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)
