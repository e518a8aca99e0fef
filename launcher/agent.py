"""The remote end of an SSH launch: a node agent that reports to the head in frames.

It is the same supervisor as on one node, with two differences. Its "terminal" is the SSH
channel back to the head (FramePrinter sends raw worker bytes; the head frames the lines).
And the head's commands arrive on stdin: a stop becomes the signal it names, sent to
ourselves, so it takes the one path every stop takes; end of file (the head died, or the
SSH connection dropped) becomes SIGTERM.
"""

from __future__ import annotations

import os
import signal
import threading

from launcher.frames import (
    BLOCK, DATA, END_OF_STREAM, EVENT, NOTE, encode, encode_exit, encode_ready, parse_command,
)
from launcher.logs import Printer, Stream, _write_all


class HeadGone(Exception):
    """stdin closed before the head said go: nothing was started, nothing to stop."""


class FramePrinter(Printer):
    """Sends everything to the head as frames; keeps each rank's tail for the failure report."""

    def __init__(self, *, world_ranks: list[int], world_size: int, out_fd: int = 1) -> None:
        # No rank is "shown": the base class frames lines for the tails and writes nothing.
        super().__init__(world_ranks=world_ranks, world_size=world_size, colour=False, shown_ranks=frozenset())
        self._fd = out_fd
        self._broken = False

    def feed(self, rank: int, stream: Stream, data: bytes) -> None:
        self._send(encode(DATA, data, rank, stream))
        super().feed(rank, stream, data)

    def end_of_stream(self, rank: int, stream: Stream) -> None:
        self._send(encode(END_OF_STREAM, b"", rank, stream))
        super().end_of_stream(rank, stream)

    def note(self, text: str) -> None:
        self._send(encode(NOTE, text.encode()))

    def log_event(self, text: str) -> None:
        self._send(encode(EVENT, text.encode()))

    def block(self, text: str) -> None:
        self._send(encode(BLOCK, text.encode("utf-8", "replace")))

    def _send(self, data: bytes) -> None:
        if self._broken:
            return
        try:
            _write_all(self._fd, data)
        except OSError:
            self._broken = True  # the head is gone; stdin's end of file stops the workers


def say_exit(code: int, out_fd: int = 1) -> None:
    try:
        _write_all(out_fd, encode_exit(code))
    except OSError:
        pass  # the head is gone; it will call this host lost, which it is


def ssh_server_address(environ: dict[str, str]) -> str | None:
    """The address the head reached this host at (SSH_CONNECTION's third field)."""
    fields = environ.get("SSH_CONNECTION", "").split()
    return fields[2] if len(fields) == 4 else None


def handshake(master_addr: str, master_port: int, stdin_fd: int = 0, out_fd: int = 1) -> tuple[str, int]:
    """Tell the head we are ready (and node 0's address and port), then wait for its go."""
    _write_all(out_fd, encode_ready(master_addr, master_port))
    line = _read_line(stdin_fd)
    command = parse_command(line)
    if command is None or command[0] != "go":
        raise HeadGone
    addr, _, port = command[1].rpartition(" ")
    return addr, int(port)


def _read_line(fd: int) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 1)
        if not chunk:
            return ""
        data += chunk
    return data.decode()


def follow_head(stdin_fd: int = 0) -> threading.Thread:
    """Turn the head's commands (and its disappearance) into signals to ourselves."""

    def run() -> None:
        while True:
            line = _read_line(stdin_fd)
            if not line:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            command = parse_command(line)
            if command is not None and command[0] == "stop" and command[1] in signal.Signals.__members__:
                os.kill(os.getpid(), signal.Signals[command[1]])

    thread = threading.Thread(target=run, name="ddplaunch-head", daemon=True)
    thread.start()
    return thread
