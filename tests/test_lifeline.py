"""The lifeline between launchers, over real loopback sockets: a line that closes is gone at
once, a line that stops beating is silent after the limit, and a beating one never is."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from ddplaunch.lifeline import Lifeline, peer_closed

WAIT_S = 5.0  # bound on every wait; what is asserted is tighter


class Node0:
    """Node 0's lifeline, with its rings counted as the supervisor's pipe would see them."""

    def __init__(self, silence_s: float) -> None:
        self.rang = threading.Event()
        self.line = Lifeline(silence_s, self.rang.set)
        self.port = self.line.listen()

    def wait_gone(self, rank: int) -> float:
        """Seconds until `rank` is named gone (the ring, then the verdict)."""
        start = time.monotonic()
        while rank not in self.line.gone():
            assert self.rang.wait(WAIT_S - (time.monotonic() - start)), f"node {rank} never named"
            self.rang.clear()
        return time.monotonic() - start


@pytest.fixture
def node0() -> Iterator[Node0]:
    node = Node0(silence_s=0.6)
    yield node
    node.line.close()


def raw_node(port: int, rank: int) -> socket.socket:
    """Another launcher's end, by hand: it says its rank and then does what the test says."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    sock.sendall(f"{rank}\n".encode())
    return sock


def test_a_line_that_closes_is_gone_at_once(node0: Node0) -> None:
    node0.line.expect([1])
    sock = raw_node(node0.port, 1)
    sock.close()  # what the kernel does for a SIGKILLed launcher
    assert node0.wait_gone(1) < 0.3
    assert node0.line.gone()[1].why == "closed"


def test_a_line_that_stops_beating_is_silent_after_the_limit(node0: Node0) -> None:
    node0.line.expect([1])
    sock = raw_node(node0.port, 1)  # open, but never a beat: a cut closes nothing
    try:
        took = node0.wait_gone(1)
        assert 0.5 < took < 1.5 and node0.line.gone()[1].why == "silent"
    finally:
        sock.close()


def test_a_node_that_never_connects_is_silent_too(node0: Node0) -> None:
    node0.line.expect([2])
    assert node0.wait_gone(2) < 1.5


def test_two_beating_launchers_never_go_silent_and_see_each_other_close(node0: Node0) -> None:
    node0.line.expect([1])
    rang = threading.Event()
    node1 = Lifeline(0.6, rang.set)
    node1.connect("127.0.0.1", node0.port, 1, timeout=WAIT_S)
    try:
        time.sleep(1.5)  # more than twice the limit: beats both ways keep both sides heard
        assert node0.line.gone() == {} and node1.gone() == {}
    finally:
        node0.line.close()
    assert rang.wait(WAIT_S) and node1.gone()[0].why == "closed"
    node1.close()


def test_a_connection_that_is_not_ours_is_let_go(node0: Node0) -> None:
    sock = socket.create_connection(("127.0.0.1", node0.port), timeout=WAIT_S)
    try:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert sock.recv(16) == b""  # node 0 closed it, and named nobody
        assert node0.line.gone() == {}
    finally:
        sock.close()


def test_the_kernel_says_a_peer_closed_before_anything_is_read() -> None:
    """What lets a rank that died of a dead peer be checked against its cause at once."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        near = socket.create_connection(server.getsockname(), timeout=WAIT_S)
        far, _ = server.accept()
        try:
            assert not peer_closed(near)
            far.close()
            deadline = time.monotonic() + WAIT_S  # the FIN crosses loopback within microseconds
            while not peer_closed(near):
                assert time.monotonic() < deadline
            assert near.recv(1) == b""  # and only now is the EOF read
        finally:
            near.close()
