"""--stdin over SSH: the head relays its stdin to the agent of the chosen rank, a piece at a time.

An agent's own stdin is the head's command line, so it cannot pass fd 0 on: the head sends
its stdin (ForwardedStdin) as "stdin" lines (ddplaunch.frames) to the agent of the chosen
rank, which writes them into a pipe that is that rank's stdin (StdinPipe). The agent asks
for a few pieces (WANT_STDIN), and for one more each time one is in the pipe: no side holds
more than those few, and a rank that never reads blocks neither the head's loop nor the
agent's.
"""

from __future__ import annotations

import os
import queue
import selectors
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from ddplaunch.frames import STDIN_EOF_LINE, stdin_line
from ddplaunch.logs import _write_all
from ddplaunch.stdin import launcher_stdin

if TYPE_CHECKING:
    from ddplaunch.channel import AgentChannel

PIECE_BYTES = 1 << 16
PIECES_IN_FLIGHT = 4  # asked for and not yet in the pipe: one round trip per piece is too slow for a file


class ForwardedStdin:
    """The head's side: its stdin, read a piece at a time, as many as the chosen rank's agent asked for."""

    def __init__(self, selector: selectors.BaseSelector, note: Callable[[str], None], fd: int = 0) -> None:
        self._selector = selector  # the head's loop; this object is the key's data for fd
        self._note = note
        self._source = fd
        self._fd: int | None = None  # None once at its end, or when there is nothing to forward
        self._agent: AgentChannel | None = None
        self._asked = 0  # pieces the agent has room for

    def want(self, agent: AgentChannel, rank: int) -> None:
        """The agent has room: forward the next piece when our stdin has one."""
        if self._agent is None:  # the first ask decides, once, whether there is anything to read
            self._fd = launcher_stdin(rank, self._note, self._source)
        self._agent = agent
        if self._fd is None:
            agent.tell(STDIN_EOF_LINE)
            return
        self._asked += 1
        if self._fd in self._selector.get_map():
            return  # already waiting for our stdin
        try:
            self._selector.register(self._fd, selectors.EVENT_READ, self)
        except PermissionError:
            self.forward()  # a file or /dev/null: always readable, and epoll refuses it

    def forward(self) -> None:
        """Our stdin is readable: send what it has; its end of file closes the rank's stdin."""
        fd, agent = self._fd, self._agent
        assert fd is not None and agent is not None
        try:
            data = os.read(fd, PIECE_BYTES)
        except BlockingIOError:
            return  # a non-blocking stdin that another reader emptied first: wait again
        except OSError:
            data = b""
        self._asked -= 1
        if not data:
            self._fd = None
        if fd in self._selector.get_map() and (not data or not self._asked):
            self._selector.unregister(fd)  # at its end, or until the agent asks again
        agent.tell(stdin_line(data) if data else STDIN_EOF_LINE)


class StdinPipe:
    """The agent's side: a pipe that is the chosen rank's stdin in every attempt, so a restarted
    rank reads on where the last one stopped. A thread writes the head's pieces into it, in
    order, and asks for another once a piece is in; the end of the pieces (None) closes it."""

    def __init__(self, pieces: queue.SimpleQueue[bytes | None], ask: Callable[[], None]) -> None:
        self.read_fd, self._write_fd = os.pipe()  # neither is inherited: the rank gets a dup2 of read_fd
        self._pieces = pieces
        self._ask = ask
        threading.Thread(target=self._write, name="ddplaunch-stdin", daemon=True).start()

    def _write(self) -> None:
        for _ in range(PIECES_IN_FLIGHT):
            self._ask()
        while (piece := self._pieces.get()) is not None:
            try:
                _write_all(self._write_fd, piece)  # blocks while the rank does not read: only here
            except OSError:
                break
            self._ask()
        os.close(self._write_fd)  # the rank reads end of file
