"""The pure parts of the multi-node rendezvous: job shapes, attempt ends, heartbeats."""

from __future__ import annotations

import pytest

from launcher.protocol import AttemptEnd
from launcher.rendezvous import (
    JobShape, Pulse, join_timeout_message, missing_ranks, shape_mismatch, silence_limit,
)

pytestmark = pytest.mark.unit

BASE = JobShape(nnodes=2, nproc=4, max_restarts=1, run_id="abc")


@pytest.mark.parametrize(
    ("mine", "given", "problem"),
    [
        (BASE, False, None),
        (JobShape(2, 4, 1, "other"), False, None),  # a default run id adopts node 0's
        (JobShape(2, 4, 1, "other"), True, "this node has --run-id other but node 0 has abc"),
        (JobShape(3, 4, 1, "abc"), False, "this node has --nnodes 3 but node 0 has --nnodes 2"),
        (JobShape(2, 8, 1, "abc"), False, "this node has --nproc 8 but node 0 has --nproc 4"),
        (JobShape(2, 4, 0, "abc"), False, "this node has --max-restarts 0 but node 0 has --max-restarts 1"),
    ],
)
def test_shape_mismatch(mine: JobShape, given: bool, problem: str | None) -> None:
    found = shape_mismatch(mine, BASE, given)
    assert (found is None) if problem is None else (found is not None and found.startswith(problem))


def test_texts_round_trip() -> None:
    assert JobShape.from_text(BASE.to_text()) == BASE
    end = AttemptEnd("failed", 1, "gpu-b", "rank 5 failed (exit code 7)", 7)
    assert AttemptEnd.from_text(end.to_text()) == end
    assert end.describe() == "node 1 (gpu-b): rank 5 failed (exit code 7)"
    assert AttemptEnd("success", 0, "a", "", 0).describe() == "every node's workers finished"


def test_join_timeout_names_the_missing_ranks_and_who_came() -> None:
    missing = missing_ranks(4, lambda r: r in (0, 2))
    assert missing == [1, 3]
    text = join_timeout_message(missing, {0: "gpu-a", 2: "gpu-c"}, 30, "10.0.0.1:29500")
    assert text.startswith("node rank(s) 1, 3 never joined the rendezvous at 10.0.0.1:29500 within --join-timeout 30s")
    assert "(joined: 0 (gpu-a), 2 (gpu-c))" in text


class FakeStore:
    def __init__(self) -> None:
        self.counters: dict[str, int] = {}

    def add(self, key: str, amount: int) -> int:
        self.counters[key] = self.counters.get(key, 0) + amount
        return self.counters[key]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_node_zero_names_a_node_whose_heartbeat_stops() -> None:
    store, clock = FakeStore(), Clock()
    hosts = {0: "a", 1: "b", 2: "c"}
    head = Pulse(0, hosts, watch_others=True, silence_s=5, clock=clock)
    others = [Pulse(r, hosts, watch_others=False, silence_s=5, clock=clock) for r in (1, 2)]
    for _ in range(20):  # 10 s of everyone beating
        clock.now += 0.5
        for pulse in others:
            assert pulse.tick(store) is None
        assert head.tick(store) is None
    verdict = None
    for _ in range(20):  # node 2 goes silent
        clock.now += 0.5
        others[0].tick(store)
        verdict = verdict or head.tick(store)
    assert verdict is not None
    assert (verdict.kind, verdict.node_rank, verdict.host) == ("lost", 2, "c")
    assert "stopped answering for 5s" in verdict.detail


def test_nodes_other_than_zero_only_beat() -> None:
    store, clock = FakeStore(), Clock()
    pulse = Pulse(1, {0: "a", 1: "b"}, watch_others=False, silence_s=1, clock=clock)
    for _ in range(10):
        clock.now += 1
        assert pulse.tick(store) is None
    assert store.counters == {"ddplaunch/beat/1": 10}


@pytest.mark.parametrize(("value", "limit"), [(None, 10.0), ("2.5", 2.5), ("0", 10.0), ("x", 10.0)])
def test_silence_limit(value: str | None, limit: float) -> None:
    assert silence_limit({} if value is None else {"DDPLAUNCH_NODE_SILENCE_S": value}) == limit
