"""One agent's channel with a scripted SSH session: typed events in order, and what became of the agent."""

from __future__ import annotations

import queue

import pytest

from ddplaunch.channel import AgentChannel, ChannelEvent
from ddplaunch.frames import READY, SYNC, encode_exit, encode_ready

pytestmark = pytest.mark.unit


class Session:
    """Stands in for a paramiko channel: scripted reads, recorded writes."""

    def __init__(self, out: list[bytes], err: list[bytes], status: int) -> None:
        self.out, self.err, self.status = list(out), list(err), status
        self.sent: list[bytes] = []
        self.command = ""
        self.shut = False

    def exec_command(self, command: str) -> None:
        self.command = command

    def recv(self, size: int) -> bytes:
        return self.out.pop(0) if self.out else b""

    def recv_stderr(self, size: int) -> bytes:
        return self.err.pop(0) if self.err else b""

    def recv_exit_status(self) -> int:
        return self.status

    def sendall(self, data: bytes) -> None:
        self.sent.append(data)

    def shutdown_write(self) -> None:
        self.shut = True


class Client:
    def __init__(self, session: Session) -> None:
        self.session = session
        self.closed = False

    def get_transport(self) -> Client:
        return self

    def open_session(self) -> Session:
        return self.session

    def close(self) -> None:
        self.closed = True


def run_channel(out: list[bytes], status: int, err: list[bytes] = ()) -> tuple[AgentChannel, list[ChannelEvent]]:
    """Start a channel on a scripted session and take its events until both pumps are done."""
    events: queue.SimpleQueue[ChannelEvent] = queue.SimpleQueue()
    channel = AgentChannel(3, Client(Session(out, list(err), status)), events.put)
    channel.start("cd /work && exec agent")
    taken: list[ChannelEvent] = []
    while not (channel.closed and any(e.kind == "err" and not e.data for e in taken)):
        event = events.get(timeout=10)
        taken.append(event)
        if event.kind == "exit":
            channel.exited(event.status)
    return channel, taken


HELLO = SYNC + encode_ready("10.0.0.1", 29500)


@pytest.mark.parametrize(
    ("out", "status", "lost", "exit_code"),
    [
        ([HELLO, encode_exit(3)], -1, False, 3),  # SSH's status went missing; the agent's word stands
        ([HELLO, encode_exit(0)], 143, False, 0),  # the agent's word wins over SSH's
        ([HELLO], -1, True, -1),  # no word, no status: killed, or the connection dropped
        ([HELLO], 0, False, 0),
        ([b"Welcome!\n"], 120, False, 120),  # the preflight shell line's own exit
    ],
)
def test_what_became_of_the_agent(out: list[bytes], status: int, lost: bool, exit_code: int) -> None:
    channel, events = run_channel(out, status)
    frames = [frame for event in events if event.kind == "out" for frame in channel.read_out(event.data)]
    assert [f.kind for f in frames] == ([READY] if out[0] == HELLO else [])  # its EXIT stays with the channel
    assert (channel.closed, channel.lost, channel.exit_code) == (True, lost, exit_code)


def test_events_are_typed_and_the_exit_comes_after_stdout_ends() -> None:
    _, events = run_channel([HELLO], 0, err=[b"warn\n"])
    assert all(e.node_rank == 3 for e in events)
    out = [e for e in events if e.kind == "out"]
    assert [e.data for e in out] == [HELLO, b""]
    assert [e.data for e in events if e.kind == "err"] == [b"warn\n", b""]
    (ended,) = [e for e in events if e.kind == "exit"]
    assert ended.status == 0 and events.index(out[-1]) < events.index(ended)


def test_what_the_agent_printed_outside_frames_explains_a_failed_start() -> None:
    # The reader holds back the last bytes before the sync mark (it may be cut across reads).
    banner = b"Welcome to gpu-07, a shared machine!\nconda: base activated\n"
    err = [b"Traceback\n", b"ModuleNotFoundError: No module named 'launcher'\n"]
    channel, events = run_channel([banner], 1, err=err)
    for event in events:
        if event.kind == "out":
            channel.read_out(event.data)
        elif event.kind == "err":
            channel.read_err(event.data)
    said = ["Traceback", "ModuleNotFoundError: No module named 'launcher'", "Welcome to gpu-07, a shared machine!"]
    assert channel.said_outside_frames()[:3] == said


def test_a_closed_channel_is_told_nothing_and_not_shut_again() -> None:
    session = Session([HELLO], [], 0)
    client = Client(session)
    channel = AgentChannel(0, client, lambda event: None)
    channel.tell(b"go a 1\n")  # not started: nothing to tell
    channel.start("agent")
    channel.tell(b"go a 1\n")
    channel.exited(0)
    channel.tell(b"stop SIGINT\n")
    channel.shutdown_write()
    channel.close()
    assert session.command == "agent"
    assert (session.sent, session.shut, client.closed) == ([b"go a 1\n"], False, True)
