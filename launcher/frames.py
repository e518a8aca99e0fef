"""The byte format a remote node agent speaks to the head over SSH (pure: no I/O).

Agent to head (its stdout): a sync mark, then frames of a 10-byte header (kind, rank, stream,
length) and a payload. Worker output travels as raw bytes, so the head frames lines exactly
as on one node and one printer owns the head's terminal. Head to agent (its stdin): text
lines; first, before the agent plans anything, "env BASE64" (the workers' --env and forwarded
variables as JSON pairs: here, no value is on a command line, where `ps` shows it to every
user of the host); then "go ADDR PORT" (start an attempt), "end JSON" (the attempt's end,
decided by the head for every node), "stop SIGNAME", "stacks N" (read every rank's stack and answer request N
with a STACKS frame, ddplaunch.protocol.StackAnswer's text), and for the --stdin rank's agent "stdin BASE64" (a piece of
the head's stdin, sent only when that agent asked with WANT_STDIN) and "stdin-eof"; end of
file means the head is gone, and the agent stops its workers. Each side beats to the other
every HEARTBEAT_INTERVAL_S (faster for a short timeout), in every phase: the agent a
HEARTBEAT frame, the head a "beat" line; a side that hears nothing at all for
--heartbeat-timeout calls the other gone (ddplaunch.heartbeat), as at end of file.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

HEADER = struct.Struct("!BiBI")
DATA, END_OF_STREAM, NOTE, EVENT, BLOCK, READY, EXIT = 1, 2, 3, 4, 5, 6, 7
ATTEMPT_END, SUCCEEDED, OVER = 8, 9, 10  # an attempt's end as this node saw it; all ok here; all gone here
WANT_STDIN = 11  # the agent of the --stdin rank has room for the next piece of the head's stdin
STACKS = 12  # an answer to "stacks N": this node's ranks' snapshots
HEARTBEAT = 13  # the agent is alive; says nothing else (any bytes count as its word)
LAST_KIND = HEARTBEAT
MAX_PAYLOAD = 1 << 24  # a corrupt header must not make the head allocate gigabytes
# The agent's first bytes. A login shell's rc file may print to stdout before the agent
# starts (a banner, `conda activate` noise); the head skips everything before this mark.
SYNC = b"\x00ddplaunch-frames-v1\x00"


class FrameError(ValueError):
    """The agent's stdout is not frames: it printed something else (a shell's message)."""


@dataclass(frozen=True)
class Frame:
    kind: int
    rank: int
    stream: int
    payload: bytes

    @property
    def text(self) -> str:
        return self.payload.decode("utf-8", "replace")


def encode(kind: int, payload: bytes, rank: int = -1, stream: int = 0) -> bytes:
    return HEADER.pack(kind, rank, stream, len(payload)) + payload


def encode_ready(master_addr: str, master_port: int) -> bytes:
    """READY, with node 0's address and port (from node 0; the others' are not used)."""
    return encode(READY, json.dumps({"addr": master_addr, "port": master_port}).encode())


def decode_ready(frame: Frame) -> tuple[str, int]:
    """FrameError when the payload is not READY's JSON (AgentChannel checks before the head reads)."""
    try:
        found = json.loads(frame.payload)
        addr, port = found["addr"], found["port"]
    except (ValueError, KeyError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
        raise FrameError(f"READY {frame.payload[:80]!r}: {exc}") from None
    if not isinstance(addr, str) or type(port) is not int or not 0 <= port <= 65535:
        raise FrameError(f"READY {frame.payload[:80]!r}: not an address and a port")
    return addr, port


def decode_exit(frame: Frame) -> int:
    """EXIT's exit code; FrameError when it is not one."""
    text = frame.payload.decode("ascii", "replace").strip()
    if not text.lstrip("-").isdigit() or not text.isascii():
        raise FrameError(f"EXIT {frame.payload[:80]!r}: not an exit code")
    return int(text)


class FrameReader:
    """Cuts a byte stream into frames; bytes of a frame not yet complete wait for the next read."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._synced = False
        self.noise = b""  # what came before the agent's first frame
        self.failed = False  # after garbage nothing more is read: no frame boundary can be trusted

    def feed(self, data: bytes) -> list[Frame]:
        """The frames `data` completes; FrameError once, at the first bytes that are no frame."""
        if self.failed:
            return []  # and kept nowhere: a host sending garbage must not fill the head's memory
        self._buffer += data
        if not self._synced and not self._sync():
            return []
        frames: list[Frame] = []
        while len(self._buffer) >= HEADER.size:
            kind, rank, stream, length = HEADER.unpack_from(self._buffer)
            if not DATA <= kind <= LAST_KIND or length > MAX_PAYLOAD:
                garbage = bytes(self._buffer[:200]).decode("utf-8", "replace")
                self.give_up()
                raise FrameError(garbage)
            end = HEADER.size + length
            if len(self._buffer) < end:
                break
            frames.append(Frame(kind, rank, stream, bytes(self._buffer[HEADER.size : end])))
            del self._buffer[:end]
        return frames

    def give_up(self) -> None:
        """Read no more: the stream broke here (garbage, or a frame its reader cannot use)."""
        self.failed = True
        self._buffer = bytearray()

    def _sync(self) -> bool:
        at = self._buffer.find(SYNC)
        if at < 0:
            keep = len(SYNC) - 1  # the mark may be cut across two reads
            cut = max(0, len(self._buffer) - keep)
            self.noise += bytes(self._buffer[:cut])
            del self._buffer[:cut]
            return False
        self.noise += bytes(self._buffer[:at])
        del self._buffer[: at + len(SYNC)]
        self._synced = True
        return True

    @property
    def pending(self) -> bytes:
        return bytes(self._buffer)


def encode_exit(code: int) -> bytes:
    """The agent's last words: its exit code. SSH's own exit status can go missing when a
    channel closes fast (paramiko then reads -1), and a missing status means a lost host."""
    return encode(EXIT, str(code).encode())


def go_line(master_addr: str, master_port: int) -> bytes:
    return f"go {master_addr} {master_port}\n".encode()


def decode_go(argument: str) -> tuple[str, int]:
    """A go command's argument -> (address, port). The port is the last word: an IPv6
    address has colons but no spaces."""
    addr, _, port = argument.rpartition(" ")
    return addr, int(port)


def parse_command(line: str) -> tuple[str, str] | None:
    """A head's command line -> (verb, argument); None for anything else."""
    verb, _, argument = line.strip().partition(" ")
    return (verb, argument) if verb in ("go", "stop", "end", "stdin", "stdin-eof", "stacks", "env", "beat") else None


BEAT_LINE = b"beat\n"  # the head is alive; says nothing else (any line counts as its word)


def end_line(end_text: str) -> bytes:
    return f"end {end_text}\n".encode()


def stacks_line(request: int) -> bytes:
    return f"stacks {request}\n".encode()


def decode_stacks_request(argument: str) -> int | None:
    """A stacks command's argument -> its request number; None when it is not one."""
    return int(argument) if argument.isascii() and argument.isdigit() else None


STDIN_EOF_LINE = b"stdin-eof\n"


def stdin_line(data: bytes) -> bytes:
    """A piece of the head's stdin for the chosen rank, in base64: any byte fits on one line."""
    return b"stdin " + base64.b64encode(data) + b"\n"


def decode_stdin(argument: str) -> bytes:
    """A stdin command's argument -> its bytes; nothing when it is not base64."""
    try:
        return base64.b64decode(argument, validate=True)
    except binascii.Error:
        return b""


def env_line(env: Sequence[tuple[str, str]]) -> bytes:
    """The workers' variables for an agent, before anything else it reads. JSON keeps every value
    exact (ensure_ascii: a value Python holds with surrogates, from a non-UTF-8 environment,
    too); base64 keeps the line one line."""
    return b"env " + base64.b64encode(json.dumps([list(pair) for pair in env]).encode()) + b"\n"


def decode_env(argument: str) -> tuple[tuple[str, str], ...] | None:
    """An env command's argument -> its (name, value) pairs; None when it is not one."""
    try:
        pairs = json.loads(base64.b64decode(argument, validate=True))
    except (binascii.Error, ValueError):
        return None
    if not isinstance(pairs, list) or not all(
        isinstance(pair, list) and len(pair) == 2 and all(isinstance(part, str) for part in pair) for pair in pairs
    ):
        return None
    return tuple((name, value) for name, value in pairs)
