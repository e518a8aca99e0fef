"""The attempt protocol: attempt ends as text, and the SSH head's referee replaying scripted news."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ddplaunch.protocol import END_KINDS, AttemptEnd, Referee, job_exit_code

pytestmark = pytest.mark.unit

HOSTS = ("gpu-a", "gpu-b", "gpu-c")
FAILED = AttemptEnd("failed", 1, "gpu-b", "rank 3 failed (exit code 7)", 7)
STOPPED = AttemptEnd("stopped", 0, "gpu-a", "ddplaunch got SIGINT", 130)
WITHOUT_A_WORD = "its connection or its agent ended without a word (killed, or the network failed)"

News = Callable[[Referee], str | None]


def ended(end: AttemptEnd) -> News:
    return lambda referee: referee.node_ended(end.to_text())


def succeeded(rank: int) -> News:
    return lambda referee: referee.node_succeeded(rank, HOSTS[rank])


def over(rank: int) -> News:
    return lambda referee: referee.node_over(rank)


def host_ended(rank: int, code: int | None = 0, *, lost: bool = False, every_host_closed: bool = False) -> News:
    return lambda referee: referee.host_ended(
        rank, HOSTS[rank], lost=lost, exit_code=code, every_host_closed=every_host_closed
    )


def lost(rank: int, detail: str, code: int = 1) -> AttemptEnd:
    return AttemptEnd("lost", rank, HOSTS[rank], detail, code)


@pytest.mark.parametrize(
    ("nnodes", "script"),
    [
        pytest.param(2, [(ended(FAILED), FAILED), (ended(STOPPED), None)], id="the first node's word wins"),
        pytest.param(
            3,
            [(succeeded(0), None), (succeeded(0), None), (succeeded(2), None),
             (succeeded(1), AttemptEnd("success", 1, "gpu-b", "", 0))],
            id="every node succeeded: success, named by the last to say so",
        ),
        pytest.param(
            2, [(ended(FAILED), FAILED), (succeeded(0), None), (succeeded(1), None)],
            id="success after the end is known is not told",
        ),
        pytest.param(
            2,
            [(ended(FAILED), FAILED), (over(0), None), (ended(STOPPED), None), (over(1), None),
             (ended(STOPPED), STOPPED)],
            id="every node over: the next attempt is fresh",
        ),
        pytest.param(
            2, [(succeeded(0), None), (over(0), None), (over(1), None), (succeeded(1), None)],
            id="a fresh attempt forgets who succeeded",
        ),
        pytest.param(
            3, [(host_ended(2, 3), lost(2, "its ddplaunch exited (code 3) while the others ran", 3))],
            id="an agent that exits while the others run ends the attempt",
        ),
        pytest.param(
            2, [(host_ended(1, 0), lost(1, "its ddplaunch exited (code 1) while the others ran", 1))],
            id="even with code 0, which becomes 1",
        ),
        pytest.param(
            2, [(host_ended(1, None, lost=True), lost(1, WITHOUT_A_WORD)), (host_ended(0, 1), None)],
            id="a lost host ends the attempt once",
        ),
        pytest.param(2, [(ended(FAILED), FAILED), (host_ended(1, 7), None)], id="an end after the known end is routine"),
        pytest.param(2, [(host_ended(0, 0, every_host_closed=True), None)], id="the last host to close tells no one"),
    ],
)
def test_referee_replays_news(nnodes: int, script: list[tuple[News, AttemptEnd | None]]) -> None:
    referee = Referee(nnodes)
    for news, expected in script:
        told = news(referee)
        assert (None if told is None else AttemptEnd.from_text(told)) == expected


def test_referee_relays_a_nodes_end_byte_for_byte() -> None:
    text = '["failed", 1, "gpu-b", "r\\u00e9sum\\u00e9", 7]'  # not as json.dumps would write it again
    assert Referee(2).node_ended(text) == text


@pytest.mark.parametrize(
    ("codes", "any_lost", "expected"),
    [
        ([0, 0], False, 0),
        ([0, 7, 3], False, 7),  # the first failing host's code
        ([-1, 143], True, 143),  # a code beats a lost host
        ([0, -1], True, 1),
        ([None, 0], True, 1),
        ([0, -1], False, 0),
        ([], False, 0),
    ],
)
def test_job_exit_code(codes: list[int | None], any_lost: bool, expected: int) -> None:
    assert job_exit_code(codes, any_lost) == expected


def test_every_kind_round_trips() -> None:
    assert END_KINDS == ("success", "failed", "stopped", "stalled", "error", "lost", "silent")
    for kind in END_KINDS:
        end = AttemptEnd(kind, 2, "gpu-c", "why", 3)
        assert AttemptEnd.from_text(end.to_text()) == end


@pytest.mark.parametrize(
    "text",
    ['["finished", 0, "a", "", 0]', '["failed", 0, "a", ""]', "not json", '["failed", "x", "a", "", 1]'],
)
def test_from_text_rejects_what_is_not_an_end(text: str) -> None:
    with pytest.raises(ValueError):
        AttemptEnd.from_text(text)


def test_a_verdict_that_comes_after_a_nodes_attempt_ended_is_not_the_next_attempts() -> None:
    """An agent whose own news ended its attempt (its worker failed; it said so) does not wait
    for the head's verdict. That "end" line comes before the head's next go, and must not end
    the next attempt as soon as it starts (it did: a restart over SSH then failed at random)."""
    import os

    from ddplaunch.agent import HeadLink
    from ddplaunch.frames import end_line, go_line

    head_reads, agent_out = os.pipe()
    agent_in, head_writes = os.pipe()  # never closed: at its end of file the link SIGTERMs us
    link = HeadLink(1, "gpu-b", ("10.0.0.1", 29500), pick_port=False, stdin_fd=agent_in, out_fd=agent_out)
    os.write(head_writes, end_line(FAILED.to_text()) + go_line("10.0.0.1", 29501))
    link.join(1, lambda: False)
    assert (link.master_addr, link.master_port) == ("10.0.0.1", 29501)
    assert link.take() is None
    os.close(head_reads)
