"""The stop machine, replayed on a fake clock: what is sent, when SIGKILL is due, when to wake."""

from __future__ import annotations

import signal
from dataclasses import dataclass

import pytest

from ddplaunch.teardown import DRAIN_AFTER_DEATH_S, Teardown

pytestmark = pytest.mark.unit

GRACE = 5.0
KILL_TIMEOUT = 2.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Seen:
    """What the machine says after a step; the defaults are an attempt nobody is stopping."""

    sent: str | None = None
    kill_due: bool = False
    due_in: float | None = None
    drain_over: bool = False
    give_up_due: bool = False
    gave_up: bool = False


def seen(teardown: Teardown) -> Seen:
    sent = None if teardown.signal_sent is None else signal.Signals(teardown.signal_sent).name
    return Seen(sent, teardown.kill_due(), teardown.due_in(), teardown.drain_over(), teardown.give_up_due(), teardown.gave_up)


def act(teardown: Teardown, action: str) -> None:
    if action.startswith("begin "):
        teardown.begin(signal.Signals[action.removeprefix("begin ")])
    elif action == "kill now":
        teardown.kill_now()
    elif action == "give up":
        teardown.give_up()
    elif action == "tree gone":
        teardown.tree_gone()
    else:
        assert action == "look", action


# Each step: at this time, do this, then the machine says that.
SCENARIOS: dict[str, list[tuple[float, str, Seen]]] = {
    "nothing begun: nothing is ever due": [
        (0.0, "look", Seen()),
        (1e6, "look", Seen()),
    ],
    "a graceful stop, then SIGKILL due when the grace is over": [
        (10.0, "begin SIGTERM", Seen("SIGTERM", due_in=GRACE)),
        (14.5, "look", Seen("SIGTERM", due_in=0.5)),
        (15.0, "look", Seen("SIGTERM", kill_due=True, due_in=0.0)),
        (17.0, "look", Seen("SIGTERM", kill_due=True, due_in=0.0)),
        (17.0, "kill now", Seen("SIGKILL", due_in=KILL_TIMEOUT)),
        (99.0, "look", Seen("SIGKILL", due_in=0.0, give_up_due=True)),
    ],
    "a second begin keeps the first signal and its deadline": [
        (0.0, "begin SIGTERM", Seen("SIGTERM", due_in=GRACE)),
        (3.0, "begin SIGINT", Seen("SIGTERM", due_in=2.0)),
        (5.0, "look", Seen("SIGTERM", kill_due=True, due_in=0.0)),
    ],
    "a second Ctrl-C kills before the grace is over, and nothing is due after": [
        (0.0, "begin SIGINT", Seen("SIGINT", due_in=GRACE)),
        (1.0, "kill now", Seen("SIGKILL", due_in=KILL_TIMEOUT)),
        (GRACE, "look", Seen("SIGKILL", due_in=0.0, give_up_due=True)),
    ],
    "killed with no graceful stop first: a later begin sends nothing": [
        (0.0, "kill now", Seen("SIGKILL", due_in=KILL_TIMEOUT)),
        (1.0, "begin SIGTERM", Seen("SIGKILL", due_in=KILL_TIMEOUT - 1.0)),
        (GRACE + 1.0, "look", Seen("SIGKILL", due_in=0.0, give_up_due=True)),
    ],
    "after SIGKILL the wait is bounded: a process that would not die is given up on": [
        (0.0, "begin SIGTERM", Seen("SIGTERM", due_in=GRACE)),
        (GRACE, "kill now", Seen("SIGKILL", due_in=KILL_TIMEOUT)),
        (GRACE + KILL_TIMEOUT - 0.5, "look", Seen("SIGKILL", due_in=0.5)),
        (GRACE + KILL_TIMEOUT, "look", Seen("SIGKILL", due_in=0.0, give_up_due=True)),
        (GRACE + KILL_TIMEOUT, "give up", Seen("SIGKILL", gave_up=True)),
        (99.0, "kill now", Seen("SIGKILL", gave_up=True)),
    ],
    "a second SIGKILL (Ctrl-C again) gives no more time": [
        (0.0, "kill now", Seen("SIGKILL", due_in=KILL_TIMEOUT)),
        (1.5, "kill now", Seen("SIGKILL", due_in=KILL_TIMEOUT - 1.5)),
        (KILL_TIMEOUT, "look", Seen("SIGKILL", due_in=0.0, give_up_due=True)),
    ],
    "the drain starts when the tree is gone, once": [
        (0.0, "tree gone", Seen(due_in=DRAIN_AFTER_DEATH_S)),
        (0.5, "tree gone", Seen(due_in=0.5)),
        (1.0, "look", Seen(due_in=0.0, drain_over=True)),
    ],
    "the nearer of the kill and drain deadlines wakes the loop": [
        (0.0, "begin SIGTERM", Seen("SIGTERM", due_in=GRACE)),
        (4.5, "tree gone", Seen("SIGTERM", due_in=0.5)),
        (5.0, "look", Seen("SIGTERM", kill_due=True, due_in=0.0)),
        (5.0, "kill now", Seen("SIGKILL", due_in=0.5)),
        (5.5, "look", Seen("SIGKILL", due_in=0.0, drain_over=True)),
        (5.0 + KILL_TIMEOUT, "look", Seen("SIGKILL", due_in=0.0, drain_over=True, give_up_due=True)),
    ],
}


@pytest.mark.parametrize("steps", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_scenario(steps: list[tuple[float, str, Seen]]) -> None:
    clock = FakeClock()
    teardown = Teardown(GRACE, clock, KILL_TIMEOUT)
    for at, action, expected in steps:
        clock.now = at
        act(teardown, action)
        assert seen(teardown) == expected, f"at {at}, after {action!r}"


def test_begin_says_whether_the_signal_is_to_be_sent() -> None:
    teardown = Teardown(GRACE, FakeClock())
    assert not teardown.stopping
    assert teardown.begin(signal.SIGINT) is True
    assert teardown.stopping
    assert teardown.begin(signal.SIGTERM) is False
    teardown.kill_now()
    assert teardown.begin(signal.SIGTERM) is False


def test_no_grace_makes_sigkill_due_at_once() -> None:
    teardown = Teardown(0.0, FakeClock())
    teardown.begin(signal.SIGTERM)
    assert teardown.kill_due()
