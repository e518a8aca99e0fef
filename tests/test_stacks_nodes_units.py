"""Job-wide stack reports, the pure parts: the answer's text, the head's command and frame, the
head's bookkeeping of who answered, and a report's gathering of this node's ranks and the
others' answers (a scripted capture and a scripted clock stand in for /proc and time)."""

from __future__ import annotations

import json
import os
import select
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from ddplaunch.frames import (
    STACKS, SYNC, FrameReader, decode_stacks_request, encode, go_line, parse_command, stacks_line,
)
from ddplaunch.hangs import ANSWER_WAIT_S, STALL_GAP_S, StackReporter
from ddplaunch.headstacks import AgentStacks
from ddplaunch.options import Stall
from ddplaunch.protocol import StackAnswer
from ddplaunch.snapshot import ProcessStacks, RankSnapshot, StackFrame, ThreadStack

pytestmark = pytest.mark.unit


def snap(host: str, rank: int, function: str = "step", line: int = 10) -> RankSnapshot:
    frames = (StackFrame("/work/train.py", line, function),)
    main = ProcessStacks(1000 + rank, "python", (ThreadStack("0x1", "", True, frames),), "faulthandler")
    return RankSnapshot(host, rank, rank % 2, 1000 + rank, "sleeping", 1.0, 1 << 20, 0.5, 5.0, main)


# -- what travels ---------------------------------------------------------------------------------


def test_a_stack_answer_is_json_with_its_request_and_every_snapshot() -> None:
    answer = StackAnswer(3, (snap("a", 0), snap("a", 1, "wait")))
    data = json.loads(answer.to_text())
    assert data["request"] == 3
    assert [s["rank"] for s in data["snapshots"]] == [0, 1]
    assert data["snapshots"][1]["main"]["threads"][0]["frames"] == [["/work/train.py", 10, "wait"]]
    assert StackAnswer.from_text(answer.to_text().encode()) == answer  # as a frame carries it


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"request": 1}', '{"request": "x", "snapshots": []}',
                                  '{"request": 1, "snapshots": [{"host": "a"}]}'])
def test_what_is_not_a_stack_answer_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a stack answer"):
        StackAnswer.from_text(text)


@pytest.mark.parametrize(("argument", "number"), [("12", 12), ("0", 0), ("²", None), ("-1", None), ("", None),
                                                    ("1 2", None)])
def test_the_stacks_command_carries_a_plain_request_number(argument: str, number: int | None) -> None:
    assert parse_command(f"stacks {argument}\n") == ("stacks", argument.strip())
    assert decode_stacks_request(argument) == number
    assert stacks_line(7) == b"stacks 7\n"


def test_the_head_reads_a_stacks_frame_among_the_others() -> None:
    payload = StackAnswer(1, (snap("a", 0),)).to_text().encode()
    frames = FrameReader().feed(SYNC + encode(STACKS, payload) + encode(3, b"a note"))
    assert [(f.kind, f.payload) for f in frames] == [(STACKS, payload), (3, b"a note")]


# -- the head's side: who was asked, who answered ----------------------------------------------


@dataclass
class FakeAgent:
    node_rank: int
    running: bool = True
    told: list[bytes] = field(default_factory=list)

    def tell(self, line: bytes) -> None:
        self.told.append(line)


def test_the_head_asks_every_running_agent_and_names_those_that_owe_an_answer() -> None:
    agents = [FakeAgent(0), FakeAgent(1), FakeAgent(2, running=False)]
    asker = AgentStacks(["host1", "host2", "host3"], agents)
    assert asker.ask_stacks() == 1
    assert [a.told for a in agents] == [[b"stacks 1\n"], [b"stacks 1\n"], []]
    assert asker.stack_answers(1) == ([], ["host1 (node 0)", "host2 (node 1)"])  # the ended one was not asked
    asker.took(1, StackAnswer(1, (snap("host2", 2), snap("host2", 3))).to_text().encode())
    asker.took(0, b"garbage")
    asker.took(2, StackAnswer(1, (snap("host3", 4),)).to_text().encode())  # not asked: dropped
    found, missing = asker.stack_answers(1)
    assert [s.rank for s in found] == [2, 3] and missing == ["host1 (node 0)"]


def test_the_head_keeps_the_answers_to_its_two_latest_requests_only() -> None:
    agents = [FakeAgent(0)]
    asker = AgentStacks(["host1"], agents)
    assert [asker.ask_stacks() for _ in range(3)] == [1, 2, 3]
    asker.took(0, StackAnswer(1, (snap("host1", 0),)).to_text().encode())  # too late for request 1
    asker.took(0, StackAnswer(2, (snap("host1", 0),)).to_text().encode())
    assert asker.stack_answers(1) == ([], [])
    assert [s.rank for s in asker.stack_answers(2)[0]] == [0]
    assert asker.stack_answers(3)[1] == ["host1 (node 0)"]


def test_no_running_agent_no_request() -> None:
    assert AgentStacks(["host1"], [FakeAgent(0, running=False)]).ask_stacks() is None


# -- a report's gathering ------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeCapture:
    """Stands in for ddplaunch.stacks.StackCapture: done when the test says so."""

    def __init__(self, targets: list[SimpleNamespace], timeout_s: float | None, host: str) -> None:
        self.targets, self.timeout_s, self.host = targets, timeout_s, host
        self.started = self.finished = self.closed = False

    def start(self) -> None:
        self.started = True

    def due_in(self) -> float | None:
        return None if self.finished else 0.005

    def poll(self) -> bool:
        return self.finished

    def snapshots(self) -> list[RankSnapshot]:
        return [snap(self.host, t.rank) for t in self.targets]

    def close(self) -> None:
        self.closed = True


class FakePrinter:
    colour = False

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.blocks: list[str] = []

    def note(self, text: str) -> None:
        self.notes.append(text)

    def block(self, text: str) -> None:
        self.blocks.append(text)


class Node:
    """One node's reporter, with its ranks, its captures and the other nodes (an AgentStacks)."""

    def __init__(self, tmp_path: object, ranks: Sequence[int], asker: AgentStacks | None = None,
                 stall: Stall = Stall(0.0)) -> None:
        self.clock, self.printer = Clock(), FakePrinter()
        self.ranks = list(ranks)
        self.captures: list[FakeCapture] = []
        self.answered: list[tuple[int, list[int]]] = []
        self.reporter = StackReporter(
            self.printer, stack_dir="/nowhere", report_dir=lambda: str(tmp_path), stall=stall,  # type: ignore[arg-type]
            targets=lambda: [SimpleNamespace(rank=r) for r in self.ranks],  # type: ignore[misc]
            others=asker, answer=lambda request, snaps: self.answered.append((request, [s.rank for s in snaps])),
            capture=self._capture, clock=self.clock,
        )

    def _capture(self, targets: list[SimpleNamespace], timeout_s: float | None) -> FakeCapture:
        self.captures.append(FakeCapture(targets, timeout_s, "node-a"))
        return self.captures[-1]

    def finish_capture(self) -> None:
        self.captures[-1].finished = True

    def step(self, seconds: float = 0.0) -> object:
        self.clock.now += seconds
        return self.reporter.advance()


def answer(asker: AgentStacks, node_rank: int, request: int, host: str, ranks: Sequence[int]) -> None:
    asker.took(node_rank, StackAnswer(request, tuple(snap(host, r, "wait", 20) for r in ranks)).to_text().encode())


def test_a_job_wide_report_shows_this_nodes_ranks_and_the_others_answers(tmp_path: object) -> None:
    agents = [FakeAgent(1)]
    asker = AgentStacks(["", "node-b"], agents)
    node = Node(tmp_path, [0, 1], asker)
    node.reporter.on_demand("SIGQUIT")
    assert agents[0].told == [b"stacks 1\n"] and node.captures[0].started
    node.finish_capture()
    node.step(0.1)
    assert node.printer.blocks == []  # node-b has not answered yet
    answer(asker, 1, 1, "node-b", [2, 3])
    node.step(0.1)
    (report,) = node.printer.blocks
    assert "4 ranks on 2 hosts" in report and "no answer in time" not in report
    assert "ranks 0-1" in report and "ranks 2-3" in report and "train.py:20" in report


def test_a_node_that_does_not_answer_in_time_is_named(tmp_path: object) -> None:
    agents = [FakeAgent(0), FakeAgent(1)]
    asker = AgentStacks(["host1", "host2"], agents)
    head = Node(tmp_path, [], asker)  # the SSH head: no rank of its own
    head.reporter.on_demand("SIGQUIT")
    answer(asker, 0, 1, "host1", [0, 1])
    head.step(0.5)
    assert head.printer.blocks == [] and head.captures == []
    due = head.reporter.due_in()
    assert due is not None and due <= 0.05  # it looks again soon; it never sleeps past the deadline
    head.step(ANSWER_WAIT_S - 0.5)
    (report,) = head.printer.blocks
    assert "no answer in time from host2 (node 1)" in report
    assert "2 ranks on 1 host" in report


def test_a_request_is_answered_by_the_next_capture_even_while_a_report_waits(tmp_path: object) -> None:
    agents = [FakeAgent(1)]
    asker = AgentStacks(["", "node-b"], agents)
    node = Node(tmp_path, [0, 1], asker)
    node.reporter.asked([7])
    assert len(node.captures) == 1
    node.reporter.on_demand("SIGQUIT")  # the capture under way started before it: the next one is its
    node.reporter.asked([8])
    node.finish_capture()
    node.step()
    assert node.answered == [(7, [0, 1])] and len(node.captures) == 2
    node.finish_capture()
    node.step()
    assert node.answered == [(7, [0, 1]), (8, [0, 1])]  # the report's capture answered 8 too
    node.reporter.asked([9])  # the report waits for node-b: an answer must not wait for it
    assert len(node.captures) == 3
    node.finish_capture()
    node.step()
    assert node.answered[-1] == (9, [0, 1]) and node.printer.blocks == []


def test_a_node_whose_ranks_have_ended_answers_none_at_once(tmp_path: object) -> None:
    node = Node(tmp_path, [])
    node.reporter.asked([4])
    assert node.answered == [(4, [])] and node.captures == []


def test_a_stall_asks_every_node_twice_a_gap_apart_and_shows_both(tmp_path: object) -> None:
    agents = [FakeAgent(0), FakeAgent(1)]
    asker = AgentStacks(["host1", "host2"], agents)
    head = Node(tmp_path, [], asker, stall=Stall(5.0, stop=True))
    head.reporter.heard(head.clock.now)
    assert head.step(4.9) is None and agents[0].told == []
    head.step(0.1)
    assert agents[0].told == [b"stacks 1\n"]
    for node_rank, host in enumerate(["host1", "host2"]):
        answer(asker, node_rank, 1, host, [2 * node_rank, 2 * node_rank + 1])
    head.step(0.1)
    assert agents[0].told == [b"stacks 1\n"] and head.printer.blocks == []  # the second look comes later
    head.step(STALL_GAP_S)
    assert agents[1].told == [b"stacks 1\n", b"stacks 2\n"]
    for node_rank, host in enumerate(["host1", "host2"]):
        answer(asker, node_rank, 2, host, [2 * node_rank, 2 * node_rank + 1])
    finished = head.step(0.1)
    (report,) = head.printer.blocks
    assert "two snapshots per rank" in report and "no rank wrote a line for 5 s" in report
    assert finished is not None and finished.purpose == "stall" and len(finished.snapshots) == 4


# -- the agent's side: the head's line becomes a request, the answer a frame --------------------


def test_the_agent_takes_the_heads_stack_request_and_answers_in_a_frame() -> None:
    from ddplaunch.agent import HeadLink

    head_reads, agent_out = os.pipe()
    agent_in, head_writes = os.pipe()  # never closed: at its end of file the link SIGTERMs us
    link = HeadLink(1, "host2", ("10.0.0.1", 29500), pick_port=False, stdin_fd=agent_in, out_fd=agent_out)
    os.write(head_writes, b"stacks x\n" + stacks_line(4))
    assert select.select([link.fd], [], [], 5.0)[0] == [link.fd]  # the loop wakes
    assert link.stack_requests() == [4]
    assert link.take() is None and link.stack_requests() == []
    link.answer_stacks(4, [snap("host2", 2)])
    (frame,) = FrameReader().feed(SYNC + os.read(head_reads, 1 << 16))
    assert frame.kind == STACKS and StackAnswer.from_text(frame.payload) == StackAnswer(4, (snap("host2", 2),))
    os.write(head_writes, stacks_line(5) + go_line("10.0.0.1", 29501))
    link.join(1, lambda: False)
    assert link.stack_requests() == []  # asked between attempts: the head has given up on it
    os.close(head_reads)
