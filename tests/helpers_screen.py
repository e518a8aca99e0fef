"""What stays on a terminal: bytes replayed through pyte, a VT100 emulator, as rows of text.

A plain module (not conftest.py) for the tests of the live area and of progress bars at a
terminal. Rows scrolled off the top are kept (pyte's history), so "what a user can scroll
back to" is countable, not only the visible screen.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Sequence
from pathlib import Path

import pyte


class Terminal:
    """A terminal of `columns` x `lines` fed with bytes; `rows()` is everything left on it."""

    def __init__(self, columns: int, lines: int, *, onlcr: bool = False) -> None:
        self.columns = columns
        self._screen = pyte.HistoryScreen(columns, lines, history=100_000)
        self._stream = pyte.ByteStream(self._screen)
        self._onlcr = onlcr  # bytes written to a tty arrive with \n as \r\n; pyte needs that done

    def feed(self, data: bytes) -> None:
        self._stream.feed(data.replace(b"\n", b"\r\n") if self._onlcr else data)

    def rows(self) -> list[str]:
        """Scrolled-off rows, then the screen's, right-stripped, without the empty rows at the end."""
        width = range(self.columns)
        rows = ["".join(line[x].data for x in width).rstrip() for line in self._screen.history.top]
        rows += [line.rstrip() for line in self._screen.display]
        while rows and not rows[-1]:
            rows.pop()
        return rows

    @property
    def cursor(self) -> tuple[int, int]:
        """(column, row on the screen) of the cursor."""
        return self._screen.cursor.x, self._screen.cursor.y


def set_size(fd: int, columns: int, lines: int) -> None:
    """Give a pseudo-terminal a size, as a terminal emulator does for its shell."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))


def run_on_terminal(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: dict[str, str],
    size: tuple[int, int],
    timeout: float,
    until: bytes | None = None,
) -> tuple[int, bytes]:
    """A command with stdout and stderr on one pseudo-terminal of `size` (columns, lines):
    its exit code and every byte it wrote there, read with a deadline. With `until`, reading
    stops once those bytes have come, and the command is stopped (SIGTERM)."""
    master, slave = pty.openpty()
    set_size(slave, *size)
    try:
        proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
        os.close(slave)
        slave = -1
        try:
            data = _read_until_closed(master, proc, time.monotonic() + timeout, until)
            _stop(proc)
            return proc.wait(timeout=10), data
        finally:
            _stop(proc)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


def _read_until_closed(master: int, proc: subprocess.Popen[bytes], deadline: float, until: bytes | None) -> bytes:
    data = b""
    while time.monotonic() < deadline and (until is None or until not in data):
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not chunk:
                break
            data += chunk
        elif proc.poll() is not None:
            break
    return data


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Bounded teardown of a command that overran: SIGTERM (the launcher forwards it), then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=8)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
