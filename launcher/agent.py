"""The remote end of an SSH launch: a node agent that reports to the head in frames.

It is the same supervisor as on one node, with two differences. Its "terminal" is the SSH
channel back to the head (FramePrinter sends raw worker bytes; the head frames the lines, and
replay, the head's side of it, turns each frame back into the printer call that sent it).
And the other nodes are reached through the head (HeadLink), not a store, so an agent never
imports torch. The head's commands arrive on stdin, the workers' environment first (before
anything is planned; it is never on a command line): a stop becomes the signal it names, sent
to ourselves, so it takes the one path every stop takes; a stack request is read by the
supervisor's loop, which answers it with a STACKS frame; end of file (the head died, or the
SSH connection dropped) becomes SIGTERM. The agent of the --stdin rank also gets the head's
stdin there, a piece at a time (ddplaunch.stdin_relay). From its first ready on, the agent
beats to the head and watches the head's beats (Heartbeat): a head silent for
--heartbeat-timeout (a network that drops packets closes nothing) is gone, as at end of file.
"""

from __future__ import annotations

import os
import queue
import select
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from ddplaunch.frames import (
    ATTEMPT_END,
    BLOCK,
    DATA,
    END_OF_STREAM,
    EVENT,
    HEARTBEAT,
    NOTE,
    OVER,
    STACKS,
    SUCCEEDED,
    SYNC,
    WANT_STDIN,
    Frame,
    decode_env,
    decode_go,
    decode_stacks_request,
    decode_stdin,
    encode,
    encode_exit,
    encode_ready,
    parse_command,
)
from ddplaunch.heartbeat import Metronome, Silence, beat_interval
from ddplaunch.logs import Printer, Stream
from ddplaunch.protocol import AttemptEnd, EndKind, StackAnswer
from ddplaunch.wakepipe import WakePipe

if TYPE_CHECKING:
    from ddplaunch.snapshot import RankSnapshot

T = TypeVar("T")
PYTHON_NOTE = "ddplaunch-python "  # the NOTE before the first READY: which Python runs here (PythonFacts)


@dataclass(frozen=True)
class PythonFacts:
    """Which Python runs the agent (and so, by default, the workers), and whether it has torch."""

    version: str
    executable: str
    has_torch: bool

    @staticmethod
    def here() -> PythonFacts:
        import importlib.util
        import sys

        try:  # finds, never imports: seconds of start-up the agent does not spend
            has_torch = importlib.util.find_spec("torch") is not None
        except (ImportError, ValueError):
            has_torch = False
        return PythonFacts(sys.version.split()[0], sys.executable, has_torch)  # "3.12.1": platform's import costs more

    def to_note(self) -> str:
        import json

        return PYTHON_NOTE + json.dumps({"version": self.version, "executable": self.executable, "torch": self.has_torch})

    @staticmethod
    def from_note(text: str) -> PythonFacts | None:
        """The facts in a NOTE's text; None for any other note, or one that does not parse."""
        import json

        if not text.startswith(PYTHON_NOTE):
            return None
        try:
            data = json.loads(text[len(PYTHON_NOTE):])
            return PythonFacts(str(data["version"]), str(data["executable"]), bool(data["torch"]))
        except (ValueError, KeyError, TypeError):
            return None


class HeadWire:
    """The agent's stdout, its one line to the head, written by three threads (the supervisor's,
    the stdin pipe's, the heartbeat's): one lock keeps each frame whole.

    No write waits past the head's end. A head that stops reading (a cut network: the SSH
    window fills, then the pipe to sshd) would block a plain write forever, and with it the
    loop that must stop the workers. So each piece goes out only when poll says there is room,
    at most PIPE_BUF bytes (a pipe with room takes that many without blocking), and the poll
    also wakes when the head is declared gone (give_up): from then on every write fails at once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._gone = WakePipe()  # rung once: the head is gone
        self.gone = False

    def send(self, fd: int, data: bytes) -> bool:
        """Write all of `data`; False when the head is gone (before or while writing)."""
        with self._lock:
            view = memoryview(data)
            while view:
                if self.gone or not self._room(fd, None):
                    return False
                view = view[os.write(fd, view[: select.PIPE_BUF]) :]
            return True

    def send_if_free(self, fd: int, data: bytes) -> bool:
        """A small message, now or never: skipped while another frame is being written or the
        pipe is full (the bytes already waiting say as much as a beat). Never blocks."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            if self.gone or not self._room(fd, 0.0):
                return False
            return os.write(fd, data) == len(data)
        finally:
            self._lock.release()

    def give_up(self) -> None:
        """The head is gone: writes under way and to come fail at once."""
        self.gone = True
        self._gone.ring()

    def _room(self, fd: int, timeout: float | None) -> bool:
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        poller.register(self._gone.read_fd, select.POLLIN)
        ready = dict(poller.poll(None if timeout is None else timeout * 1000))
        if self._gone.read_fd in ready or self.gone:
            return False
        return bool(ready.get(fd, 0) & select.POLLOUT)  # POLLERR/POLLHUP: the write says why


_WIRE = HeadWire()  # one per agent process: stdout is its only line to the head
HEARTBEAT_FRAME = encode(HEARTBEAT, b"")


class Heartbeat:
    """The agent's side of the heartbeats, from its first ready to its exit.

    A thread sends a HEARTBEAT frame every beat_interval and watches the head's word:
    every line from the head counts (the reader calls heard()), its "beat" every interval
    among them. Silent for the whole timeout, the head is gone (the network or its host is
    down): the wire gives up, so no write blocks on it, and the action given to when_silent
    runs once: the stop that stdin's end of file makes.
    """

    def __init__(
        self, timeout: float, out_fd: int = 1, *, wire: HeadWire = _WIRE, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.silence = Silence(timeout, clock)
        self._beats = Metronome(beat_interval(timeout), clock)
        self._out_fd = out_fd
        self._wire = wire
        self._lock = threading.Lock()
        self._on_silence: Callable[[], None] | None = None
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="ddplaunch-heartbeat", daemon=True).start()

    def heard(self) -> None:
        self.silence.heard()

    @property
    def gone(self) -> bool:
        return self._wire.gone

    def when_silent(self, action: Callable[[], None]) -> None:
        """Run `action` once when the head falls silent; at once if it already has."""
        with self._lock:
            if not self._wire.gone:
                self._on_silence = action
                return
        action()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(min(self._beats.due_in(), self.silence.due_in())):
            if self.silence.over:
                self._give_up()
                return
            if self._beats.take():
                self._wire.send_if_free(self._out_fd, HEARTBEAT_FRAME)

    def _give_up(self) -> None:
        # If the head is only slow, not gone, this says why the workers stop (if it fits now).
        why = f"nothing heard from the head for {self.silence.timeout:g} s: stopping this node's workers"
        self._wire.send_if_free(self._out_fd, encode(NOTE, why.encode()))
        with self._lock:
            self._wire.give_up()
            action = self._on_silence
        if action is not None:
            action()


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
        if not self._broken:
            self._broken = not send_to_head(data, self._fd)


def replay(frame: Frame, printer: Printer, host_name: str) -> None:
    """The head's side of FramePrinter: a frame becomes the printer call that sent it."""
    if frame.kind == DATA:
        printer.add_ranks([frame.rank])
        printer.feed(frame.rank, frame.stream, frame.payload)  # type: ignore[arg-type]
    elif frame.kind == END_OF_STREAM:
        printer.add_ranks([frame.rank])
        printer.end_of_stream(frame.rank, frame.stream)  # type: ignore[arg-type]
    elif frame.kind == NOTE:
        printer.note(f"{host_name}: {frame.text}")
    elif frame.kind == EVENT:
        printer.log_event(f"{host_name}: {frame.text}")
    elif frame.kind == BLOCK:
        printer.block(frame.text)


def send_to_head(data: bytes, out_fd: int = 1) -> bool:
    """Write to the head; False when it is gone (stdin's end of file, or the head's silence,
    then stops the workers)."""
    try:
        return _WIRE.send(out_fd, data)
    except OSError:
        return False


def say_hello(out_fd: int = 1) -> None:
    """The agent's first bytes: the mark after which the head reads frames."""
    send_to_head(SYNC, out_fd)


def say_exit(code: int, out_fd: int = 1) -> None:
    send_to_head(encode_exit(code), out_fd)  # if the head is gone, it calls this host lost, which it is


def ssh_server_address(environ: dict[str, str]) -> str | None:
    """The address the head reached this host at (SSH_CONNECTION's third field)."""
    fields = environ.get("SSH_CONNECTION", "").split()
    return fields[2] if len(fields) == 4 else None


def handshake(
    master_addr: str, master_port: int, stdin_fd: int = 0, out_fd: int = 1, beats: Heartbeat | None = None
) -> tuple[str, int]:
    """Tell the head we are ready (and node 0's address and port), then wait for its go:
    HeadGone at end of file, or when the head is silent for the heartbeat timeout. Before the
    first ready, which Python this is (the head says so per host, and warns of one without torch)."""
    send_to_head(encode(NOTE, PythonFacts.here().to_note().encode()) + encode_ready(master_addr, master_port), out_fd)
    while True:
        command = parse_command(_read_line(stdin_fd, beats))
        if command is None or command[0] not in ("go", "beat"):
            raise HeadGone
        if command[0] == "go":
            return decode_go(command[1])


def receive_env(stdin_fd: int = 0) -> tuple[tuple[str, str], ...]:
    """The workers' --env and forwarded variables: the head's first line, which an agent reads
    before it plans anything (they never travel on a command line)."""
    from ddplaunch.errors import LaunchError

    command = parse_command(_read_line(stdin_fd, None))
    while command is not None and command[0] == "beat":  # the head may beat before it is ready
        command = parse_command(_read_line(stdin_fd, None))
    env = decode_env(command[1]) if command is not None and command[0] == "env" else None
    if env is None:  # the line itself is not repeated: it may hold secrets
        raise LaunchError("the head's first line was not the workers' environment (an env line); is "
                          "ddplaunch the same version here and on the head?")
    return env


def _read_line(fd: int, beats: Heartbeat | None) -> str:
    """One line, a byte at a time (what follows is HeadLink's); "" at end of file or silence."""
    data = b""
    while not data.endswith(b"\n"):
        if beats is not None and not _readable_before_silence(fd, beats):
            return ""
        chunk = os.read(fd, 1)
        if not chunk:
            return ""
        data += chunk
    if beats is not None:
        beats.heard()
    return data.decode()


def _readable_before_silence(fd: int, beats: Heartbeat) -> bool:
    while not beats.gone and not beats.silence.over:
        if select.select([fd], [], [], beats.silence.due_in())[0]:
            return True
    return False


class HeadLink:
    """The other nodes, through the head (ddplaunch.protocol.Peers): no store, no torch.

    A node says how its attempt ended (or that its workers all succeeded) in a frame; the
    head decides the attempt's end for every node, first word wins, and sends it back as
    "end JSON". Between attempts each node says ready again and waits for the head's go,
    with node 0's fresh port. A thread reads the head's lines: ends and stack requests wake
    the supervisor's loop through a pipe, stops become signals to ourselves, end of file
    becomes SIGTERM, and so does the head's silence (`beats`). An agent never asks for stacks
    itself: its head asks every agent.
    """

    def __init__(
        self, node_rank: int, hostname: str, master: tuple[str, int], *, pick_port: bool, stdin_fd: int = 0,
        out_fd: int = 1, beats: Heartbeat | None = None,
    ) -> None:
        self.node_rank = node_rank
        self.hostname = hostname
        self.master_addr, self.master_port = master
        self._pick_port = pick_port and node_rank == 0
        self._out_fd = out_fd
        self._wake = WakePipe()
        self._ends: queue.SimpleQueue[AttemptEnd] = queue.SimpleQueue()
        self._stack_requests: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._gos: queue.SimpleQueue[tuple[str, int] | None] = queue.SimpleQueue()
        # The head's stdin, for the --stdin rank's pipe; queued from the first line on, so no
        # piece is lost while the pipe is being made.
        self._stdin: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._beats = beats
        self._gone_once = threading.Lock()  # taken once, never released: the head goes only once
        threading.Thread(target=self._follow, args=(stdin_fd,), name="ddplaunch-head", daemon=True).start()
        if beats is not None:
            beats.when_silent(self._head_gone)

    @property
    def fd(self) -> int:
        return self._wake.read_fd

    def _follow(self, stdin_fd: int) -> None:
        commands = open(stdin_fd, "rb", closefd=False)  # buffered: a stdin line can be 90 kB
        while True:
            line = commands.readline().decode()
            if not line:
                self._head_gone()
                return
            if self._beats is not None:
                self._beats.heard()
            command = parse_command(line)
            if command is None:
                continue
            verb, argument = command
            if verb == "stop" and argument in signal.Signals.__members__:
                os.kill(os.getpid(), signal.Signals[argument])
            elif verb == "end":
                self._ends.put(AttemptEnd.from_text(argument))
                self._wake.ring()
            elif verb == "stacks" and (request := decode_stacks_request(argument)) is not None:
                self._stack_requests.put(request)
                self._wake.ring()
            elif verb == "go":
                self._gos.put(decode_go(argument))
            elif verb == "stdin" and (data := decode_stdin(argument)):
                self._stdin.put(data)
            elif verb == "stdin-eof":
                self._stdin.put(None)

    def _head_gone(self) -> None:
        """Its end of file or its silence: whoever waits for a go stops waiting, and the
        supervisor stops the workers as on any SIGTERM (once: a second would kill at once)."""
        if not self._gone_once.acquire(blocking=False):
            return
        self._gos.put(None)
        os.kill(os.getpid(), signal.SIGTERM)

    def open_stdin(self, rank: int) -> int:
        """The pipe that `rank` reads in every attempt, fed with the head's stdin."""
        from ddplaunch.stdin_relay import StdinPipe

        return StdinPipe(self._stdin, lambda: self._send(encode(WANT_STDIN, b"", rank))).read_fd

    def _send(self, data: bytes) -> None:
        send_to_head(data, self._out_fd)

    def local_end(self, kind: EndKind, detail: str, exit_code: int) -> AttemptEnd:
        return AttemptEnd(kind, self.node_rank, self.hostname, detail, exit_code)

    def publish(self, end: AttemptEnd) -> AttemptEnd:
        self._send(encode(ATTEMPT_END, end.to_text().encode()))
        return end  # ours for now; the head's verdict arrives through take()

    def report_success(self) -> None:
        self._send(encode(SUCCEEDED, b""))

    def take(self) -> AttemptEnd | None:
        self._wake.drain()
        try:
            return self._ends.get_nowait()
        except queue.Empty:
            return None

    def end_attempt(
        self, interrupted: Callable[[], bool], closing: str = "", note: Callable[[str], None] = lambda text: None
    ) -> list[str]:
        self._send(encode(OVER, b""))
        return []  # our closing word went to the head as a note already, as every note does

    def stack_requests(self) -> list[int]:
        self._wake.drain()
        return _take_all(self._stack_requests)

    def answer_stacks(self, request: int, snapshots: Sequence[RankSnapshot]) -> None:
        self._send(encode(STACKS, StackAnswer(request, tuple(snapshots)).to_text().encode()))

    def ask_stacks(self) -> int | None:
        return None  # the head asks every agent

    def stack_answers(self, request: int) -> tuple[list[RankSnapshot], list[str]]:
        return [], []

    def join(self, attempt: int, interrupted: Callable[[], bool]) -> None:
        """Ready again (node 0 with a fresh port, unless one was given); wait for the go."""
        from ddplaunch.ports import pick_free_port

        port = pick_free_port() if self._pick_port else self.master_port
        self._send(encode_ready(self.master_addr, port))
        while True:
            if interrupted():
                raise KeyboardInterrupt
            try:
                go = self._gos.get(timeout=0.25)
            except queue.Empty:
                continue
            if go is None:
                raise KeyboardInterrupt  # the head is gone
            self.master_addr, self.master_port = go
            self._forget_ends()
            return

    def _forget_ends(self) -> None:
        """The head's word on the last attempt, if this node's attempt ended before it came (on
        its own news): it was sent before this go, so it is queued by now, and it is stale. So
        is a stack request that came between the attempts: the head has given up on it."""
        _take_all(self._ends)
        _take_all(self._stack_requests)

    def close(self) -> None:
        pass


def _take_all(items: queue.SimpleQueue[T]) -> list[T]:
    taken = []
    while True:
        try:
            taken.append(items.get_nowait())
        except queue.Empty:
            return taken
