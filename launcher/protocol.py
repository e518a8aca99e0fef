"""The attempt protocol every multi-node mode shares (pure: no I/O, no torch).

How an attempt ended (AttemptEnd), the other nodes as one node's supervisor sees them
(Peers: a TCPStore in ddplaunch.rendezvous, the SSH head in ddplaunch.agent), and the SSH
head's referee, which decides each attempt's end for every node from what the nodes say.
A job-wide stack report asks the other nodes for their ranks' stacks (StackAsker) under a
request number; each node answers it with a StackAnswer.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, get_args

from ddplaunch.snapshot import RankSnapshot

# "lost": the SSH head lost a host's agent; "silent": a static node's launcher is gone (its
# line to node 0 closed, or nothing came for --heartbeat-timeout): ddplaunch.lifeline
EndKind = Literal["success", "failed", "stopped", "stalled", "error", "lost", "silent"]
END_KINDS: tuple[EndKind, ...] = get_args(EndKind)


@dataclass(frozen=True)
class AttemptEnd:
    """Why an attempt ended, as the first node to say so wrote it."""

    kind: EndKind
    node_rank: int
    host: str
    detail: str
    exit_code: int = 1

    def to_text(self) -> str:
        return json.dumps([self.kind, self.node_rank, self.host, self.detail, self.exit_code])

    @staticmethod
    def from_text(text: str) -> AttemptEnd:
        """The end another node wrote; ValueError for text that is not one (a kind we do not know)."""
        kind, node_rank, host, detail, exit_code = json.loads(text)
        if kind not in END_KINDS:
            raise ValueError(f"not an attempt's end: unknown kind {kind!r}")
        return AttemptEnd(kind, int(node_rank), str(host), str(detail), int(exit_code))

    def describe(self) -> str:
        if self.kind == "success":
            return "every node's workers finished"
        if self.node_rank == NOT_A_NODE:
            return f"{self.host}: {self.detail}"
        if self.kind == "silent":
            return f"node {self.node_rank} ({self.host}) went silent: {self.detail}"
        return f"node {self.node_rank} ({self.host}): {self.detail}"


NOT_A_NODE = -1  # an end that no node said: the SSH head's (a stall), or lost contact with node 0


@dataclass(frozen=True)
class StackAnswer:
    """One node's answer to a stack request: its ranks as they were (none: its ranks are gone)."""

    request: int
    snapshots: tuple[RankSnapshot, ...]

    def to_text(self) -> str:
        return json.dumps({"request": self.request, "snapshots": [s.to_json() for s in self.snapshots]})

    @staticmethod
    def from_text(text: str | bytes) -> StackAnswer:
        """ValueError for anything that is not an answer (another version's, or cut short)."""
        try:
            data = json.loads(text)
            return StackAnswer(int(data["request"]), tuple(RankSnapshot.from_json(s) for s in data["snapshots"]))
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise ValueError(f"not a stack answer: {exc!r}") from None


class StackAsker(Protocol):
    """The other nodes, as a job-wide stack report asks them (the SSH head asks every agent)."""

    def ask_stacks(self) -> int | None:
        """Ask every other node for its ranks' stacks; the request's number (None: nobody asked)."""
        ...

    def stack_answers(self, request: int) -> tuple[list[RankSnapshot], list[str]]:
        """The ranks of the nodes that answered so far, and the nodes still owing an answer."""
        ...


class Peers(StackAsker, Protocol):
    """The other nodes of a multi-node job (ddplaunch.rendezvous.NodeLink, ddplaunch.agent.HeadLink).

    Besides the attempt's end they carry stack requests: `stack_requests` are the numbers
    another node (or the head) asked under since the last call, `answer_stacks` answers one.
    """

    @property
    def fd(self) -> int: ...

    def publish(self, end: AttemptEnd) -> AttemptEnd: ...

    def report_success(self) -> None: ...

    def take(self) -> AttemptEnd | None: ...

    def join(self, attempt: int, interrupted: Callable[[], bool]) -> None: ...

    def end_attempt(
        self, interrupted: Callable[[], bool], closing: str = "", note: Callable[[str], None] = lambda text: None
    ) -> list[str]:
        """Our workers are gone. `closing`: our word to the other nodes about it (processes
        that would not die), "" for none; returns theirs, each naming its node."""
        ...

    def local_end(self, kind: EndKind, detail: str, exit_code: int) -> AttemptEnd: ...

    def stack_requests(self) -> list[int]: ...

    def answer_stacks(self, request: int, snapshots: Sequence[RankSnapshot]) -> None: ...

    def close(self) -> None: ...


@dataclass
class Referee:
    """The SSH head's call on how the current attempt ended, made once for every node.

    Each method takes one piece of news and returns the end every host must now be told (its
    text), or None when there is nothing to tell. The referee only decides; the head talks.
    """

    nnodes: int
    # The current attempt: its end (the first word, as written), the nodes whose workers all
    # succeeded, the nodes that are over.
    end: str | None = None
    succeeded: set[int] = field(default_factory=set)
    over: set[int] = field(default_factory=set)

    def node_ended(self, end_text: str) -> str | None:
        """A node says how the attempt ended: the first node to say so speaks for all."""
        if self.end is not None:
            return None
        self.end = end_text
        return end_text

    def node_succeeded(self, node_rank: int, host: str) -> str | None:
        self.succeeded.add(node_rank)
        if len(self.succeeded) < self.nnodes:
            return None
        return self.node_ended(AttemptEnd("success", node_rank, host, "", 0).to_text())

    def node_over(self, node_rank: int) -> None:
        self.over.add(node_rank)
        if len(self.over) == self.nnodes:  # every node stopped: the next attempt is fresh
            self.end, self.succeeded, self.over = None, set(), set()

    def host_ended(
        self, node_rank: int, host: str, *, lost: bool, exit_code: int | None, every_host_closed: bool,
        why: str | None = None,
    ) -> str | None:
        """A host's agent ended. After its attempt's end is known that is routine; anything
        else is abnormal, and ends the attempt for the others as "lost" (`why`: the head knows
        more than that the host is gone, e.g. it fell silent)."""
        if self.end is not None or every_host_closed:
            return None
        if lost:
            why, code = why or "its connection or its agent ended without a word (killed, or the network failed)", 1
        else:
            code = exit_code or 1
            why = f"its ddplaunch exited (code {code}) while the others ran"
        return self.node_ended(AttemptEnd("lost", node_rank, host, why, code).to_text())


def job_exit_code(exit_codes: Sequence[int | None], any_lost: bool) -> int:
    """The head's exit code: the first host's failing code (-1 or None: no code came), else 1
    when a host was lost, else 0."""
    return next((code for code in exit_codes if code not in (0, -1, None)), 1 if any_lost else 0)
