"""What an attempt's loop waits on, told apart by type; worker output goes to the one printer.

The inputs are the signal inbox's wake-up pipe, the link to the other nodes (multi-node) and
each worker's stdout and stderr. The loop decides what a wake-up means; reading a pipe and
closing it at its end (or when the attempt ends) is done here.
"""

from __future__ import annotations

import os
import selectors
from dataclasses import dataclass

from ddplaunch.logs import Printer, Stream
from ddplaunch.workers import Pipes

READ_CHUNK = 1 << 16


@dataclass(frozen=True)
class SignalWake:
    """The selector's key for the inbox's wake-up pipe: the loop takes the inbox every round."""


@dataclass(frozen=True)
class PeerNews:
    """The selector's key for news from the other nodes."""


@dataclass(frozen=True)
class WorkerOutput:
    """The selector's key for one worker's stdout or stderr."""

    rank: int
    stream: Stream


Source = SignalWake | PeerNews | WorkerOutput  # what woke the loop


class Inputs:
    """One selector over the inbox, the other nodes and the workers' open pipes."""

    def __init__(self, printer: Printer, inbox_fd: int, peers_fd: int | None) -> None:
        self._printer = printer
        self._selector = selectors.DefaultSelector()
        self._selector.register(inbox_fd, selectors.EVENT_READ, SignalWake())
        if peers_fd is not None:
            self._selector.register(peers_fd, selectors.EVENT_READ, PeerNews())

    def add_worker(self, rank: int, pipes: Pipes) -> None:
        self._selector.register(pipes.stdout, selectors.EVENT_READ, WorkerOutput(rank, 1))
        self._selector.register(pipes.stderr, selectors.EVENT_READ, WorkerOutput(rank, 2))

    def select(self, timeout: float | None) -> list[tuple[int, Source]]:
        """The inputs ready to read, as file descriptor and what it is; [] at the timeout.

        The printer's live area is redrawn here when due, so the wait ends in time for it too.
        """
        self._printer.tick()
        timeout = sooner(timeout, self._printer.due_in())
        return [(key.fd, key.data) for key, _ in self._selector.select(timeout)]

    def read(self, fd: int, output: WorkerOutput) -> None:
        try:
            data = os.read(fd, READ_CHUNK)
        except InterruptedError:
            return
        if data:
            self._printer.feed(output.rank, output.stream, data)
            return
        self._close_pipe(fd, output)

    def pipes_open(self) -> bool:
        return bool(self._open_pipes())

    def close(self) -> None:
        for fd, output in self._open_pipes().items():
            self._close_pipe(fd, output)
        self._selector.close()

    def _open_pipes(self) -> dict[int, WorkerOutput]:
        keys = self._selector.get_map().values()
        return {key.fd: key.data for key in keys if isinstance(key.data, WorkerOutput)}

    def _close_pipe(self, fd: int, output: WorkerOutput) -> None:
        self._selector.unregister(fd)
        os.close(fd)
        self._printer.end_of_stream(output.rank, output.stream)


def sooner(timeout: float | None, other: float | None) -> float | None:
    """The shorter of two waits, None being forever."""
    if timeout is None:
        return other
    return timeout if other is None else min(timeout, other)
