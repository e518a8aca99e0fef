"""The SSH head's stack reports: job-wide, from the agents' answers (the head runs no rank).

HeadReports keeps one StackReporter (ddplaunch.hangs) per attempt, from its go until its end
is told: SIGQUIT asks for a report, a stall of the whole job's output gets one. A report
asks through AgentStacks, which sends "stacks N" to every running agent; each agent's STACKS
frame comes back through `took`; `stack_answers` says what came and which hosts still owe one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from ddplaunch.frames import stacks_line
from ddplaunch.hangs import StackReporter
from ddplaunch.options import Stall
from ddplaunch.protocol import StackAnswer

if TYPE_CHECKING:
    from ddplaunch.logs import Printer
    from ddplaunch.snapshot import RankSnapshot

KEPT_REQUESTS = 2  # a stall report's two requests; an answer to an older one is dropped


class Agent(Protocol):
    """What the asking needs of an agent's channel (ddplaunch.channel.AgentChannel)."""

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


class HeadReports:
    """The head's stack reports for the current attempt; None of them between attempts."""

    def __init__(self, asker: AgentStacks, stall: Stall, report_dir: Callable[[], str]) -> None:
        self.asker = asker
        self._stall = stall
        self._report_dir = report_dir  # one for the job: every attempt's reports in one folder
        self._reporter: StackReporter | None = None

    def begin_attempt(self, printer: Printer) -> None:
        """The agents were told go: a new attempt, watched for a stall from now."""
        self.end_attempt()
        self._reporter = StackReporter(
            printer, stack_dir=None, report_dir=self._report_dir, stall=self._stall,
            targets=list, others=self.asker,  # the head runs no rank: list() is its targets
        )

    def end_attempt(self) -> None:
        """The attempt's end is told (or the head is closing): no report until the next go."""
        if self._reporter is not None:
            self._reporter.close()
        self._reporter = None

    def on_demand(self, name: str, printer: Printer) -> None:
        if self._reporter is None:
            printer.note(f"got {name}: no stack report (the workers are being stopped)")
            return
        printer.log_event(f"got {name}: asking every host for its ranks' stacks")
        self._reporter.on_demand(f"{name} (Ctrl-\\ or kill -QUIT {os.getpid()})")

    def due_in(self) -> float | None:
        return None if self._reporter is None else self._reporter.due_in()

    def advance(self, last_output: float | None) -> str | None:
        """Move the report under way on; why the job stalled, when --stall-action stop ends it."""
        if self._reporter is None:
            return None
        self._reporter.heard(last_output)
        finished = self._reporter.advance()
        return finished.reason if finished is not None and finished.purpose == "stall" else None
