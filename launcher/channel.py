"""One host's agent over SSH, in fabric's Remote shape: start, pump, tell, shut, close, and what became of it.

Two pump threads per channel post one typed event each time they read (ChannelEvent) onto
the head's queue; everything else runs on the head's thread, in the order the events came,
so a channel is closed only after every byte it sent before its exit has been read. Every
byte from the agent counts as its word (ddplaunch.heartbeat): from its first ready on, an agent
silent for the heartbeat timeout is abandoned (a cut network closes nothing by itself).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from ddplaunch.frames import (
    ATTEMPT_END, BEAT_LINE, DATA, END_OF_STREAM, EXIT, READY, Frame, FrameError, FrameReader, decode_exit, decode_ready,
)
from ddplaunch.heartbeat import Silence

READ_BYTES = 1 << 16
ERR_AFTER_OUT_S = 5.0  # stderr ends with the channel; a dropped link ends both at once anyway
STDERR_TAIL = 20  # lines of the agent's stderr kept to explain an agent that never said ready


@dataclass(frozen=True)
class ChannelEvent:
    """What a pump saw: bytes from the agent's stdout ("out") or stderr ("err"), b"" when that
    stream ended; or, after stdout's end, the SSH exit status ("exit"; -1 when none came)."""

    node_rank: int
    kind: Literal["out", "err", "exit"]
    data: bytes = b""
    status: int = -1


class AgentChannel:
    """The line to one host's agent: its SSH session, and what the agent said about itself."""

    def __init__(self, node_rank: int, client: Any, post: Callable[[ChannelEvent], None]) -> None:
        self.node_rank = node_rank
        self._client = client  # a connected paramiko.SSHClient
        self._post = post
        self._channel: Any = None
        self.frames = FrameReader()
        self.stderr_tail: list[str] = []
        self.exit_status: int | None = None  # SSH's, -1 when none came
        self.said_exit: int | None = None  # the agent's own EXIT frame
        self.silence: Silence | None = None  # watched from the agent's first ready on
        self.silent = False  # abandoned: nothing heard from it for the heartbeat timeout
        self._sending = threading.Lock()  # the head's thread and its beats' share the channel: whole lines
        self._session = 0  # counts start()s: a pump of an earlier session posts nothing more

    # -- the transport ------------------------------------------------------------------------

    def start(self, command: str) -> None:
        channel = self._client.get_transport().open_session()
        channel.exec_command(command)
        with self._sending:
            self._session += 1
            self._channel = channel
        err_done = threading.Event()
        for stream in ("out", "err"):
            threading.Thread(target=self._pump, args=(stream, channel, self._session, err_done), daemon=True).start()

    def start_again(self, command: str) -> None:
        """The command once more, on a new session, after its first one ended before ready
        (the head has just sent the agent it lacked): what that one said is forgotten. Forgotten
        after the start, on the head's thread, which reads the new session's events only later:
        until then the channel counts as closed, so no beat goes to the old one."""
        self.start(command)
        self.frames = FrameReader()
        self.stderr_tail = []
        self.exit_status = self.said_exit = None

    def open_sftp(self) -> Any:
        """An SFTP session on the same connection: no second login."""
        return self._client.open_sftp()

    def _pump(self, stream: Literal["out", "err"], channel: Any, session: int, err_done: threading.Event) -> None:
        """A thread per channel stream: bytes and the end go on the head's queue; the exit only
        after stderr's last bytes (what an agent said before it died explains its exit)."""
        recv = channel.recv if stream == "out" else channel.recv_stderr
        while True:
            try:
                data = recv(READ_BYTES)
            except OSError:
                data = b""
            if session != self._session:
                return  # its session was replaced (start_again): the new one speaks now
            self._post(ChannelEvent(self.node_rank, stream, data))
            if not data:
                break
        if stream == "err":
            err_done.set()
        else:
            err_done.wait(ERR_AFTER_OUT_S)
            status = channel.recv_exit_status()
            if session == self._session:
                self._post(ChannelEvent(self.node_rank, "exit", status=status))

    def tell(self, line: bytes) -> None:
        with self._sending:
            self._send(line)

    def _send(self, line: bytes) -> None:
        if self.running:
            try:
                self._channel.sendall(line)
            except OSError:
                pass  # the agent is going; its end reaches the head as an event

    def shutdown_write(self) -> None:
        """Closing our side is the agent's signal to stop (end of file)."""
        if self.running:
            try:
                self._channel.shutdown_write()
            except OSError:
                pass

    def beat(self) -> None:
        """The head's heartbeat, from the beats' thread. It never waits: skipped while a line is
        being sent, or when the SSH window is shut (the agent has not read for a while, and
        its own silence will tell)."""
        if not self._sending.acquire(blocking=False):
            return
        try:
            if self.running and self._channel.send_ready():
                self._send(BEAT_LINE)
        finally:
            self._sending.release()

    def watch(self, timeout: float) -> None:
        """From now on, silence for `timeout` means the agent is gone (the first call counts)."""
        if self.silence is None:
            self.silence = Silence(timeout)

    @property
    def went_silent(self) -> bool:
        return self.running and self.silence is not None and self.silence.over

    def abandon(self) -> None:
        """Silent too long: closed now, lost, its session dropped (its pumps then end). The
        close sends nothing that waits for the dead link: paramiko's packetizer closes first."""
        self.silent = True
        self.exit_status = -1
        self._client.close()

    def close(self) -> None:
        self._client.close()

    # -- the agent's events, taken on the head's thread ----------------------------------------

    def read_out(self, data: bytes) -> list[Frame]:
        """The frames completed by this piece of the agent's stdout, less its own EXIT, kept here."""
        if not data:
            return []  # the exit event follows
        self._heard()
        good: list[Frame] = []
        try:
            for frame in self.frames.feed(data):
                check_frame(frame)
                if frame.kind == EXIT:
                    self.said_exit = decode_exit(frame)
                else:
                    good.append(frame)
        except FrameError as exc:
            # Garbage from one host is that host's error, named among what it said outside
            # frames; nothing after it is read. The frames before it were good.
            self.frames.give_up()
            self.stderr_tail = (self.stderr_tail + [str(exc)])[-STDERR_TAIL:]
        return good

    def read_err(self, data: bytes) -> list[str]:
        if not data:
            return []
        self._heard()
        lines = data.decode("utf-8", "replace").splitlines()
        self.stderr_tail = (self.stderr_tail + lines)[-STDERR_TAIL:]
        return lines

    def _heard(self) -> None:
        if self.silence is not None:
            self.silence.heard()

    def exited(self, status: int) -> None:
        if not self.silent:  # abandoned, it stays lost whatever the dropped session says
            self.exit_status = status

    def said_outside_frames(self) -> list[str]:
        """What the agent, or the shell before it, printed that is not frames: stderr, then stdout."""
        return self.stderr_tail + self.frames.noise.decode("utf-8", "replace").splitlines()

    # -- what became of it --------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._channel is not None and not self.closed

    @property
    def closed(self) -> bool:
        return self.exit_status is not None

    @property
    def lost(self) -> bool:
        """Ended without its agent saying how: killed, or the connection dropped."""
        return self.closed and self.said_exit is None and self.exit_status in (-1, None)

    @property
    def exit_code(self) -> int | None:
        return self.said_exit if self.said_exit is not None else self.exit_status


def check_frame(frame: Frame) -> None:
    """FrameError for a frame whose head-side reader would fail on it: a stream that is not
    stdout or stderr, a negative rank, READY or ATTEMPT_END text that does not decode."""
    if frame.kind in (DATA, END_OF_STREAM) and (frame.rank < 0 or frame.stream not in (1, 2)):
        raise FrameError(f"output of rank {frame.rank} stream {frame.stream}: no such rank or stream")
    if frame.kind == READY:
        decode_ready(frame)
    elif frame.kind == ATTEMPT_END:
        from ddplaunch.protocol import AttemptEnd

        try:
            AttemptEnd.from_text(frame.text)
        except (ValueError, TypeError, OverflowError) as exc:  # json's 1e400 is inf: int() overflows
            raise FrameError(f"ATTEMPT_END {frame.payload[:80]!r}: {exc}") from None
