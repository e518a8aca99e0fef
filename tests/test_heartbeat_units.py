"""Heartbeats between the SSH head and its agents: the silence arithmetic (pure, a fake clock),
then the agent's side on real pipes: its beats, a write to a head that stopped reading, and a
head that falls silent while the agent waits for its go or runs."""

from __future__ import annotations

import os
import select
import signal
import threading
import time

import pytest

from ddplaunch.frames import (
    BEAT_LINE, HEARTBEAT, LAST_KIND, NOTE, SYNC, FrameError, FrameReader, encode, go_line, parse_command,
)
from ddplaunch.heartbeat import Metronome, Silence

pytestmark = pytest.mark.unit

WAIT_S = 5.0  # bound on every wait for a thread; the silences below are a fraction of it


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- pure: when a peer is gone, when our next beat is due -------------------------------------


@pytest.mark.parametrize(
    ("heard_at", "now", "silent_for", "due_in", "over"),
    [
        (100.0, 100.0, 0.0, 10.0, False),  # a fresh watch counts as hearing
        (100.0, 109.5, 9.5, 0.5, False),
        (100.0, 110.0, 10.0, 0.0, True),  # the whole timeout: gone
        (100.0, 125.0, 25.0, 0.0, True),  # due_in never goes negative
        (108.0, 117.0, 9.0, 1.0, False),  # each word starts the count again
    ],
)
def test_silence_counts_from_the_last_word(heard_at: float, now: float, silent_for: float, due_in: float, over: bool) -> None:
    clock = Clock()
    silence = Silence(10.0, clock)
    clock.now = heard_at
    silence.heard()
    clock.now = now
    assert (silence.silent_for(), silence.due_in(), silence.over) == (silent_for, due_in, over)


def test_the_metronome_beats_at_once_then_every_interval() -> None:
    clock = Clock()
    beats = Metronome(2.0, clock)
    assert beats.due_in() == 0.0 and beats.take()
    assert not beats.take() and beats.due_in() == 2.0
    clock.now += 1.5
    assert not beats.take() and beats.due_in() == 0.5
    clock.now += 0.7  # late (a busy loop): the next one is an interval from now, not from then
    assert beats.take() and beats.due_in() == 2.0


@pytest.mark.parametrize(("timeout", "interval"), [(10.0, 2.0), (60.0, 2.0), (3.0, 0.75), (2.0, 0.5)])
def test_a_short_timeout_beats_faster_so_a_late_beat_is_not_silence(timeout: float, interval: float) -> None:
    from ddplaunch.heartbeat import beat_interval

    assert beat_interval(timeout) == interval


# -- the byte protocol: one more frame kind, one more verb -------------------------------------


def test_heartbeats_are_part_of_the_protocol_and_nothing_past_them() -> None:
    assert LAST_KIND == HEARTBEAT == 13
    (frame,) = FrameReader().feed(SYNC + encode(HEARTBEAT, b""))
    assert (frame.kind, frame.payload) == (HEARTBEAT, b"")
    with pytest.raises(FrameError):
        FrameReader().feed(SYNC + encode(HEARTBEAT + 1, b""))
    assert parse_command(BEAT_LINE.decode()) == ("beat", "")


# -- the agent's line to its head: writes that never wait for a dead head ----------------------


def full_pipe() -> tuple[int, int]:
    """A pipe no one reads, filled: the agent's stdout once the SSH window is shut."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    try:
        while True:
            os.write(write_fd, b"x" * 65536)
    except BlockingIOError:
        pass
    os.set_blocking(write_fd, True)  # as the agent's stdout is
    return read_fd, write_fd


def test_a_write_to_a_head_that_stopped_reading_gives_up_when_the_head_is_declared_gone() -> None:
    from ddplaunch.agent import HeadWire

    wire = HeadWire()
    read_fd, write_fd = full_pipe()
    result: list[bool] = []
    writer = threading.Thread(target=lambda: result.append(wire.send(write_fd, b"a frame" * 1000)))
    writer.start()
    writer.join(0.3)
    assert writer.is_alive(), "the write waits while the head may still read"
    assert not wire.send_if_free(write_fd, b"beat"), "a beat never waits behind a blocked frame"
    wire.give_up()
    writer.join(WAIT_S)
    assert not writer.is_alive() and result == [False]
    assert not wire.send(write_fd, b"later")  # and every later write fails at once
    os.close(read_fd), os.close(write_fd)


def test_a_beat_is_skipped_not_waited_for_when_the_pipe_is_full() -> None:
    from ddplaunch.agent import HeadWire

    wire = HeadWire()
    read_fd, write_fd = full_pipe()
    started = time.monotonic()
    assert not wire.send_if_free(write_fd, b"beat")
    assert time.monotonic() - started < 1.0
    os.read(read_fd, 1 << 20)
    assert wire.send_if_free(write_fd, b"beat") and wire.send(write_fd, b"frame")
    os.close(read_fd), os.close(write_fd)


# -- the agent's heartbeat: beats out, the head's word in, its silence -------------------------


def test_the_agent_beats_at_once_and_calls_a_silent_head_gone_once() -> None:
    from ddplaunch.agent import HeadWire, Heartbeat

    read_fd, write_fd = os.pipe()
    gone = threading.Event()
    calls: list[float] = []
    wire = HeadWire()
    started = time.monotonic()
    beats = Heartbeat(1.0, write_fd, wire=wire)
    beats.when_silent(lambda: (calls.append(time.monotonic() - started), gone.set()))
    assert select.select([read_fd], [], [], WAIT_S)[0], "no beat came"
    (frame,) = FrameReader().feed(SYNC + os.read(read_fd, 100))
    assert frame.kind == HEARTBEAT
    for _ in range(3):  # the head's word keeps it alive past its timeout
        time.sleep(0.3)
        beats.heard()
    assert not gone.is_set()
    assert gone.wait(WAIT_S)
    assert len(calls) == 1 and 1.9 <= calls[0] < 0.9 + 1.0 + 1.0
    assert wire.gone and not wire.send(write_fd, b"x")
    *beats_sent, last = FrameReader().feed(SYNC + os.read(read_fd, 1 << 16))
    assert {f.kind for f in beats_sent} == {HEARTBEAT} and len(beats_sent) >= 3  # every 0.25 s
    assert last.kind == NOTE and last.text == "nothing heard from the head for 1 s: stopping this node's workers"
    late: list[int] = []
    beats.when_silent(lambda: late.append(1))  # attached after the silence: runs at once
    assert late == [1]
    os.close(read_fd), os.close(write_fd)


def test_an_agent_waiting_for_go_skips_beats_and_gives_up_on_a_silent_head() -> None:
    from ddplaunch.agent import HeadGone, HeadWire, Heartbeat, handshake

    head_reads, agent_out = os.pipe()
    agent_in, head_writes = os.pipe()
    beats = Heartbeat(0.4, agent_out, wire=HeadWire())
    os.write(head_writes, BEAT_LINE + BEAT_LINE + go_line("10.0.0.1", 29500))
    assert handshake("10.0.0.2", 0, agent_in, agent_out, beats) == ("10.0.0.1", 29500)
    beats.stop()
    beats = Heartbeat(0.4, agent_out, wire=HeadWire())
    os.write(head_writes, BEAT_LINE)
    started = time.monotonic()
    with pytest.raises(HeadGone):
        handshake("10.0.0.2", 0, agent_in, agent_out, beats)  # a beat, then nothing
    assert 0.3 <= time.monotonic() - started < WAIT_S
    for fd in (head_reads, agent_out, agent_in, head_writes):
        os.close(fd)


def test_a_running_agent_takes_the_heads_silence_as_its_end_of_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """HeadLink's stop for a head gone silent is the one for end of file: SIGTERM to itself
    (recorded here instead), once, and whoever waits for a go stops waiting."""
    from ddplaunch.agent import HeadLink, HeadWire, Heartbeat

    killed: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: killed.append((pid, sig)))
    head_reads, agent_out = os.pipe()
    agent_in, head_writes = os.pipe()  # never closed: only the silence can end it
    beats = Heartbeat(1.0, agent_out, wire=HeadWire())
    link = HeadLink(1, "host2", ("10.0.0.1", 29500), pick_port=False, stdin_fd=agent_in, out_fd=agent_out, beats=beats)
    for _ in range(3):
        time.sleep(0.3)
        os.write(head_writes, BEAT_LINE)  # every line from the head counts
    assert not beats.gone
    with pytest.raises(KeyboardInterrupt):  # the go it waits for will not come
        link.join(1, lambda: False)
    assert killed == [(os.getpid(), signal.SIGTERM)]
    assert beats.gone
    os.close(head_reads)


# -- the head's side, before its go: a ready host that falls silent ---------------------------


class Session:
    """Stands in for a paramiko channel: says `out`, then nothing until closed."""

    def __init__(self, out: bytes) -> None:
        self.out = [out] if out else []
        self.sent: list[bytes] = []
        self.closed = threading.Event()

    def exec_command(self, command: str) -> None:
        pass

    def recv(self, size: int) -> bytes:
        if self.out:
            return self.out.pop(0)
        self.closed.wait(WAIT_S)
        return b""

    recv_stderr = recv

    def recv_exit_status(self) -> int:
        return -1

    def send_ready(self) -> bool:
        return True

    def sendall(self, data: bytes) -> None:
        self.sent.append(data)

    def shutdown_write(self) -> None:
        pass


class Client:
    def __init__(self, session: Session) -> None:
        self.session = session

    def get_transport(self) -> Client:
        return self

    def open_session(self) -> Session:
        return self.session

    def close(self) -> None:
        self.session.closed.set()


def test_the_head_gives_up_before_its_go_on_a_ready_host_that_fell_silent() -> None:
    """Host a says ready, then nothing (cut off); host b is still starting. Without its go no
    worker runs anywhere: the head names a and stops, within the timeout, not READY_TIMEOUT_S."""
    from ddplaunch.channel import AgentChannel
    from ddplaunch.errors import LaunchError
    from ddplaunch.fanout import Host
    from ddplaunch.frames import encode_ready
    from ddplaunch.head import Head
    from ddplaunch.hosts import HostSpec
    from ddplaunch.options import Options
    from ddplaunch.ssh import SshTarget

    names = ("a", "b")
    hosts = [Host(rank, HostSpec(n, n), SshTarget(n, n, 22, "u", ())) for rank, n in enumerate(names)]
    fields = {name: None for name in Options.__dataclass_fields__}
    options = Options(**{**fields, "script": "train.py", "script_args": (), "heartbeat_timeout": 0.5})
    head = Head(options, hosts, [], "/work")
    sessions = [Session(SYNC + encode_ready("10.0.0.1", 29500)), Session(b"")]
    head.agents[:] = [AgentChannel(h.node_rank, Client(s), head._post) for h, s in zip(hosts, sessions)]
    head._start_agents()
    started = time.monotonic()
    with pytest.raises(LaunchError, match=r"lost a \(node 0\): nothing heard from it for 0.5 s; nothing was started"):
        head._await_ready()
    assert 0.5 <= time.monotonic() - started < WAIT_S
    assert sessions[0].closed.is_set() and not sessions[1].closed.is_set()  # a's session dropped
    assert all(BEAT_LINE in s.sent for s in sessions)  # the head beat to both meanwhile
    sessions[1].closed.set()  # b ends too
    head._close()


@pytest.mark.parametrize(("dead_link_s", "user_timeout_ms", "keepalive_s"), [(20.0, 20000, 5), (62.0, 62000, 15)])
def test_tcp_gives_up_on_a_silent_link_no_sooner_than_asked(dead_link_s: float, user_timeout_ms: int, keepalive_s: int) -> None:
    """The head asks for --heartbeat-timeout plus a beat (at least ssh.DEAD_LINK_S), so that a
    longer timeout is not cut short by the kernel dropping the connection first."""
    import socket

    from ddplaunch.ssh import _notice_dead_links

    with socket.socket() as sock:
        _notice_dead_links(sock, dead_link_s)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == user_timeout_ms
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == keepalive_s


def test_a_wake_pipe_rung_after_close_writes_nowhere() -> None:
    """An SSH pump thread may post its channel's end as the head closes: the closed pipe's
    numbers may already name other files, so a late ring must write nothing anywhere."""
    from ddplaunch.wakepipe import WakePipe

    wake = WakePipe()
    wake.close()
    reused_read, reused_write = os.pipe()  # the lowest free numbers: likely the closed ones
    try:
        os.set_blocking(reused_read, False)
        wake.ring()
        wake.close()  # twice is harmless
        with pytest.raises(BlockingIOError):
            os.read(reused_read, 1)
    finally:
        os.close(reused_read)
        os.close(reused_write)
