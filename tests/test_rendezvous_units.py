"""The pure parts of the multi-node rendezvous: job shapes, attempt ends, who is gone (heartbeats)."""

from __future__ import annotations

import pytest

from ddplaunch.protocol import AttemptEnd
from ddplaunch.lifeline import Gone, Hearing, beat_interval
from ddplaunch.rendezvous import JobShape, join_timeout_message, missing_ranks, shape_mismatch, silent_end

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


def test_a_node_that_stops_beating_is_named_silent_once() -> None:
    hearing = Hearing(silence_s=3)
    hearing.expect(1, 100.0)
    hearing.expect(2, 100.0)
    for now in (100.5, 101.5, 102.5, 103.5):  # node 1 beats; node 2 never says a word
        hearing.heard(1, now)
        assert [g.node_rank for g in hearing.silent(now)] == ([2] if now > 103.0 else [])
    assert hearing.silent(103.6) == []  # named once
    assert hearing.silent(106.4) == [] and [g.node_rank for g in hearing.silent(106.6)] == [1]
    assert {rank: gone.why for rank, gone in hearing.gone().items()} == {1: "silent", 2: "silent"}


def test_a_closed_line_is_gone_at_once_and_beats_after_it_change_nothing() -> None:
    hearing = Hearing(silence_s=10)
    hearing.expect(1, 0.0)
    gone = hearing.closed(1)
    assert gone is not None and gone.why == "closed" and gone.evidence(0) == "its connection to node 0 closed"
    assert hearing.closed(1) is None
    hearing.heard(1, 5.0)
    assert hearing.silent(100.0) == [] and set(hearing.gone()) == {1}


def test_the_next_check_is_when_the_first_node_would_go_silent() -> None:
    hearing = Hearing(silence_s=3)
    assert hearing.next_check_in(0.0) == 3  # nobody to hear yet
    hearing.expect(1, 10.0)
    hearing.expect(2, 11.0)
    assert hearing.next_check_in(12.0) == 1.0
    assert hearing.next_check_in(20.0) == 0.0


@pytest.mark.parametrize(("silence", "beat"), [(10.0, 1.0), (2.0, 0.5), (0.4, 0.1)])
def test_four_beats_fit_in_the_silence_limit(silence: float, beat: float) -> None:
    assert beat_interval(silence) == beat


def test_a_silent_node_is_named_with_the_words_every_node_prints() -> None:
    closed = silent_end(Gone(1, "closed", 10), {0: "gpu-a", 1: "gpu-b"}, seen_by=0)
    assert closed.kind == "silent" and closed.exit_code == 1
    assert closed.describe() == (
        "node 1 (gpu-b) went silent: its launcher is gone or unreachable (its connection to node 0 closed)"
    )
    quiet = silent_end(Gone(0, "silent", 3), {0: "gpu-a"}, seen_by=2).describe()
    assert quiet.startswith("node 0 (gpu-a) went silent: its launcher is gone or unreachable")
    assert quiet.endswith("(node 2 heard nothing from it for 3s, --heartbeat-timeout)")
    assert AttemptEnd.from_text(closed.to_text()) == closed
