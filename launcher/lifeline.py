"""A plain TCP line from each node's launcher to node 0's: how a dead or cut launcher is seen.

torch's TCPStore cannot tell: its server never says that a client went away, and under a cut
(packets dropped, nothing closed) its client's get, add, check and compare_set block for good,
whatever timeout the store was given (only wait honours it). So liveness does not ride on store
calls. Instead node 0's launcher listens on a port of its own (the port goes into the store)
and every other node's launcher holds one connection to it, on which it first says its node
rank. A launcher that dies, however (SIGKILL too), has its sockets closed by the kernel: the
other end reads EOF at once. A cut closes nothing, so both ends send a byte every beat and
call the other side silent after --heartbeat-timeout without one.

`Hearing` is the pure bookkeeping (time comes in as numbers); `Lifeline` is the sockets and
the one thread that serves them, which rings the supervisor's pipe when a node is gone.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

BEAT_S = 1.0  # the longest gap between two beats; shorter when the timeout is short
HELLO_LIMIT = 32  # bytes of a hello line ("<node rank>\n") before a connection is not one of ours
TCP_CLOSE, TCP_CLOSE_WAIT = 7, 8  # tcp_info's state once the other end reset or closed

GoneWhy = Literal["closed", "silent"]


@dataclass(frozen=True)
class Gone:
    """A node whose launcher is gone: its connection closed, or nothing came for `silence_s`."""

    node_rank: int
    why: GoneWhy
    silence_s: float

    def evidence(self, seen_by: int) -> str:
        """Why node `seen_by` (whose line it was) calls it gone, in words every node can print."""
        if self.why == "closed":
            return f"its connection to node {seen_by} closed"
        return f"node {seen_by} heard nothing from it for {self.silence_s:g}s, --heartbeat-timeout"


def beat_interval(silence_s: float) -> float:
    """Four beats fit in the silence limit, so one late beat never reads as silence."""
    return min(BEAT_S, silence_s / 4)


class Hearing:
    """When each node was last heard, and which are gone (each named once). Pure."""

    def __init__(self, silence_s: float) -> None:
        self.silence_s = silence_s
        self._last: dict[int, float] = {}
        self._gone: dict[int, Gone] = {}

    def expect(self, rank: int, now: float) -> None:
        """From now on `rank` must be heard (a node that never connects goes silent too)."""
        self._last.setdefault(rank, now)

    def heard(self, rank: int, now: float) -> None:
        if rank not in self._gone:
            self._last[rank] = now

    def closed(self, rank: int) -> Gone | None:
        return self._name(Gone(rank, "closed", self.silence_s))

    def silent(self, now: float) -> list[Gone]:
        late = [rank for rank, last in self._last.items() if now - last > self.silence_s]
        return [gone for rank in late if (gone := self._name(Gone(rank, "silent", self.silence_s)))]

    def next_check_in(self, now: float) -> float:
        """Seconds until the first of the nodes still heard would become silent."""
        waiting = [last + self.silence_s - now for rank, last in self._last.items() if rank not in self._gone]
        return max(0.0, min(waiting)) if waiting else self.silence_s

    def gone(self) -> dict[int, Gone]:
        return dict(self._gone)

    def _name(self, gone: Gone) -> Gone | None:
        if gone.node_rank in self._gone:
            return None
        self._gone[gone.node_rank] = gone
        self._last.pop(gone.node_rank, None)
        return gone


def peer_closed(sock: socket.socket) -> bool:
    """Whether the kernel already saw the other end close or reset (without reading anything):
    so a rank that died of a dead peer can be checked against its cause at once."""
    try:
        state = struct.unpack("B", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1))[0]
    except OSError:
        return True  # a socket the kernel no longer knows is closed
    return bool(state in (TCP_CLOSE, TCP_CLOSE_WAIT))


class _Line:
    """One connection: whose it is (None until a hello says), and its unread hello bytes."""

    def __init__(self, sock: socket.socket, rank: int | None) -> None:
        self.sock = sock
        self.rank = rank
        self.hello = b""


class Lifeline:
    """This launcher's lines to the other launchers: node 0 holds one per node, the others one."""

    def __init__(self, silence_s: float, ring: Callable[[], None], clock: Callable[[], float] = time.monotonic) -> None:
        self.silence_s = silence_s
        self._ring = ring
        self._clock = clock
        self._hearing = Hearing(silence_s)
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._lines: list[_Line] = []
        self._stop_r, self._stop_w = os.pipe()
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- setting up (main thread) -----------------------------------------------------------

    def listen(self) -> int:
        """Node 0: accept the other nodes' lines on a free port; returns it."""
        if socket.has_dualstack_ipv6():
            listener = socket.create_server(("", 0), family=socket.AF_INET6, dualstack_ipv6=True)
        else:
            listener = socket.create_server(("", 0))
        listener.setblocking(False)
        self._listener = listener
        self._start()
        return int(listener.getsockname()[1])

    def expect(self, ranks: list[int]) -> None:
        """Node 0, once every node joined: each of these must connect and keep beating."""
        with self._lock:
            now = self._clock()
            for rank in ranks:
                self._hearing.expect(rank, now)

    def connect(self, addr: str, port: int, node_rank: int, timeout: float) -> None:
        """Another node: one line to node 0's launcher, opened by saying who we are."""
        sock = socket.create_connection((addr, port), timeout=max(0.1, timeout))
        sock.sendall(f"{node_rank}\n".encode())
        sock.setblocking(False)
        with self._lock:
            self._lines.append(_Line(sock, 0))
            self._hearing.expect(0, self._clock())
        self._start()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="ddplaunch-lifeline", daemon=True)
            self._thread.start()

    # -- what the main thread asks ---------------------------------------------------------

    def gone(self) -> dict[int, Gone]:
        """Every node known gone so far, by rank; a connection the kernel saw close counts at
        once, before the thread has read its EOF."""
        with self._lock:
            closed = [line.rank for line in self._lines if line.rank is not None and peer_closed(line.sock)]
            for rank in closed:
                self._hearing.closed(rank)
            return self._hearing.gone()

    def close(self) -> None:
        """Stop the thread and close every line (a second call does nothing)."""
        if self._closed:
            return
        self._closed = True
        os.write(self._stop_w, b"!")
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        with self._lock:
            for line in self._lines:
                line.sock.close()
            self._lines = []
            if self._listener is not None:
                self._listener.close()
                self._listener = None
        os.close(self._stop_r)
        os.close(self._stop_w)

    # -- the thread ------------------------------------------------------------------------

    def _serve(self) -> None:
        beat = beat_interval(self.silence_s)
        next_beat = self._clock()
        while True:
            now = self._clock()
            if now >= next_beat:
                self._beat()
                next_beat = now + beat
            with self._lock:
                wait = min(next_beat - now, self._hearing.next_check_in(now))
                readers = [line.sock for line in self._lines]
                listener = self._listener
            waited = [self._stop_r, *(s.fileno() for s in readers), *([listener.fileno()] if listener else [])]
            try:
                ready = set(select.select(waited, [], [], max(0.0, wait))[0])
            except (OSError, ValueError):
                return  # close() took the sockets from under us: the job is over
            if self._stop_r in ready:
                return
            if listener is not None and listener.fileno() in ready:
                self._accept(listener)
            news = [self._read(line) for line in self._ready_lines(ready)]
            with self._lock:
                news.extend(self._hearing.silent(self._clock()))
            if any(news):
                self._ring()

    def _ready_lines(self, ready: set[int]) -> list[_Line]:
        with self._lock:
            return [line for line in self._lines if line.sock.fileno() in ready]

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, _ = listener.accept()
        except OSError:
            return
        sock.setblocking(False)
        with self._lock:
            self._lines.append(_Line(sock, None))

    def _read(self, line: _Line) -> Gone | None:
        """What one readable line says: beats, its hello, or that the other end closed."""
        try:
            data = line.sock.recv(4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        with self._lock:
            if not data:
                return self._drop(line)
            if line.rank is None:
                return self._hello(line, data)
            self._hearing.heard(line.rank, self._clock())
        return None

    def _hello(self, line: _Line, data: bytes) -> Gone | None:
        line.hello += data
        head, newline, _ = line.hello.partition(b"\n")
        if not newline:
            return self._drop(line) if len(line.hello) > HELLO_LIMIT else None
        if not head.isdigit():  # not one of ours (a port scan, say): let it go
            return self._drop(line)
        line.rank = int(head)
        self._hearing.heard(line.rank, self._clock())
        return None

    def _drop(self, line: _Line) -> Gone | None:
        self._lines.remove(line)
        line.sock.close()
        return None if line.rank is None else self._hearing.closed(line.rank)

    def _beat(self) -> None:
        with self._lock:
            lines = [line for line in self._lines if line.rank is not None]
        for line in lines:
            try:
                line.sock.send(b".")
            except BlockingIOError:
                pass  # a full buffer: the other end has not read for a while; silence will say so
            except OSError:
                pass  # closed: the read side names it
