"""The bottom of a terminal: each rank's unfinished line (a progress bar, a prompt), redrawn in place.

Whole lines scroll above the live area; the area itself is one line per rank and stream whose
current line is a carriage-return line (shown at once) or a partial line that has waited
PARTIAL_IDLE_S (a prompt such as pdb's `(Pdb) `; a line merely split across two reads is
finished long before that). Whole lines are written in one go with the erasing of the area
and its drawing again below them, so it never flickers; a bar that only moved is redrawn at
most once per REDRAW_S. The cursor is left at the end of the area's last line, where a prompt
wants it.

Pure but for what it is given: the write function, the terminal's size and the clock.
"""

from __future__ import annotations

import os
from collections.abc import Callable

REDRAW_S = 0.1  # tqdm's own default refresh: redrawing faster shows nothing new
PARTIAL_IDLE_S = 0.2  # a partial line this old is waiting for something (input), not torn
RESET = b"\x1b[0m"
WRAP_OFF, WRAP_ON = b"\x1b[?7l", b"\x1b[?7h"  # a line wider than the screen is clipped, never wrapped
ERASE_DOWN = b"\x1b[J"


class LiveArea:
    """The live lines of one terminal; see the module's docstring."""

    def __init__(
        self,
        write: Callable[[bytes], None],
        size: Callable[[], tuple[int, int]],
        clock: Callable[[], float],
    ) -> None:
        self._write = write
        self._size = size
        self._clock = clock
        # (rank, stream) -> (prefixed line, carriage-return line?, when its stream last said something)
        self._entries: dict[tuple[int, int], tuple[bytes, bool, float]] = {}
        self._drawn: list[bytes] = []  # the lines on screen now, top to bottom
        self._next_draw = 0.0
        self._changed = False

    def pending(self, key: tuple[int, int], prefix: bytes, text: bytes, carriage_return: bool) -> None:
        """A stream's unfinished line is now `text` (b"" or blanks: it has none). Drawn later."""
        self._changed = True
        if not text or text.isspace():  # tqdm's leave=False clears its bar with blanks
            self._entries.pop(key, None)
            return
        line = prefix + text + RESET if b"\x1b" in text else prefix + text
        self._entries[key] = (line, carriage_return, self._clock())

    def above(self, data: bytes, write: Callable[[bytes], None]) -> None:
        """Whole lines, written through `write` (stdout or stderr), above the area: erase it,
        write them, draw it again. That draw is due anyway, so it shows the newest state."""
        if not self._drawn:
            write(data)  # nothing on screen (a new line waits for refresh): the lines as they are
            return
        now = self._clock()
        erase = self._erase()
        paint = self._draw(self._frame(now), now)
        if write == self._write:  # the same terminal and fd (bound methods are equal, not identical)
            write(erase + data + paint)
            return
        if erase:
            self._write(erase)
        write(data)
        if paint:
            self._write(paint)

    def refresh(self) -> None:
        """Redraw if the area would show something else, at most once per REDRAW_S."""
        if not self._entries and not self._drawn:
            self._changed = False
            return
        now = self._clock()
        if now < self._next_draw:
            return  # due_in() tells the loop when to come back
        frame = self._frame(now)
        if frame != self._drawn:
            erase = self._erase()
            self._write(erase + self._draw(frame, now))
        self._changed = False

    def due_in(self) -> float | None:
        """Seconds until refresh() has something to draw; None: nothing until new output."""
        now = self._clock()
        shown_at = (since + PARTIAL_IDLE_S for _, cr, since in self._entries.values() if not cr)
        times = [t for t in shown_at if t > now]  # partial lines still waiting to be shown
        if self._changed:
            times.append(self._next_draw)
        return max(0.0, min(times) - now) if times else None

    def close(self) -> None:
        """Leave the screen as if the area had never been there."""
        self._entries.clear()
        if self._drawn:
            self._write(self._erase())
            self._drawn = []

    def _draw(self, frame: list[bytes], now: float) -> bytes:
        """The bytes that draw `frame` (after an erase), which is from then on what is drawn."""
        self._drawn = frame
        self._changed = False
        if not frame:
            return b""
        self._next_draw = now + REDRAW_S
        return WRAP_OFF + b"\n".join(frame) + WRAP_ON

    def _frame(self, now: float) -> list[bytes]:
        """The lines to show: carriage-return lines, then partial lines that waited long enough."""
        ordered = sorted(self._entries.items())
        bars = [line for _, (line, cr, _) in ordered if cr]
        waiting = [line for _, (line, cr, since) in ordered if not cr and now - since >= PARTIAL_IDLE_S]
        lines = bars + waiting  # a prompt last: the cursor stays after it
        room = max(1, self._size()[1] - 1)  # the area may never fill the screen: erasing climbs it
        if len(lines) <= room:
            return lines
        if room == 1:
            return lines[-1:]
        hidden = len(lines) - room + 1
        return lines[: room - 1] + [f"ddplaunch: {hidden} more live lines not shown".encode()]

    def _erase(self) -> bytes:
        """From the end of the area's last line: back to its first line, and erase to the bottom."""
        if not self._drawn:
            return b""
        up = len(self._drawn) - 1
        return b"\r" + (b"\x1b[%dA" % up if up else b"") + ERASE_DOWN


def terminal_size(fd: int) -> Callable[[], tuple[int, int]]:
    """The terminal's (columns, lines) now, asked at each draw so a resize is followed."""

    def size() -> tuple[int, int]:
        try:
            columns, lines = os.get_terminal_size(fd)
        except OSError:
            return 80, 24
        return columns or 80, lines or 24

    return size


def is_terminal(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def same_terminal(fd_a: int, fd_b: int) -> bool:
    """Both file descriptors reach one terminal (the usual case for stdout and stderr)."""
    try:
        a, b = os.fstat(fd_a), os.fstat(fd_b)
    except OSError:
        return False
    return (a.st_rdev, a.st_dev) == (b.st_rdev, b.st_dev)
