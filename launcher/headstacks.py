"""The SSH head's side of a job-wide stack report: it asks every agent, and keeps their answers.

The head has no ranks of its own. A report (launcher.hangs.StackReporter) asks through
`ask_stacks`, which sends "stacks N" to every running agent; each agent's STACKS frame comes
back through `took`; `stack_answers` says what came and which hosts still owe an answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from launcher.frames import stacks_line
from launcher.protocol import StackAnswer

if TYPE_CHECKING:
    from launcher.snapshot import RankSnapshot

KEPT_REQUESTS = 2  # a stall report's two requests; an answer to an older one is dropped


class Agent(Protocol):
    """What the asking needs of an agent's channel (launcher.channel.AgentChannel)."""

    node_rank: int

    @property
    def running(self) -> bool: ...

    def tell(self, line: bytes) -> None: ...


class AgentStacks:
    """Stack requests to every agent, numbered from 1, and the answers to the latest ones."""

    def __init__(self, names: Sequence[str], agents: Sequence[Agent]) -> None:
        self._names = names  # by node rank
        self._agents = agents
        self._count = 0
        self._asked: dict[int, frozenset[int]] = {}  # request -> the node ranks asked
        self._answers: dict[int, dict[int, tuple[RankSnapshot, ...]]] = {}

    def ask_stacks(self) -> int | None:
        running = [agent for agent in self._agents if agent.running]
        if not running:
            return None
        self._count += 1
        request = self._count
        for agent in running:
            agent.tell(stacks_line(request))
        self._asked[request] = frozenset(agent.node_rank for agent in running)
        self._answers[request] = {}
        for old in [r for r in self._asked if r <= request - KEPT_REQUESTS]:
            del self._asked[old], self._answers[old]
        return request

    def took(self, node_rank: int, payload: bytes) -> None:
        """An agent's STACKS frame; one that answers nothing we still wait for is dropped."""
        try:
            answer = StackAnswer.from_text(payload)
        except ValueError:
            return
        if node_rank in self._asked.get(answer.request, ()):
            self._answers[answer.request][node_rank] = answer.snapshots

    def stack_answers(self, request: int) -> tuple[list[RankSnapshot], list[str]]:
        got = self._answers.get(request, {})
        missing = [f"{self._names[r]} (node {r})" for r in sorted(self._asked.get(request, ())) if r not in got]
        return [s for rank in sorted(got) for s in got[rank]], missing
