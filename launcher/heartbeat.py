"""How long a peer has said nothing, and when it is gone (pure: the clock is injected).

The SSH head and each agent beat to each other every HEARTBEAT_INTERVAL_S (ddplaunch.options;
faster for a short timeout: beat_interval) and count every byte from the other side as its
word. A packet-dropping network closes no connection (TCP gives up only after minutes, or
after the head's dead-link timeout with data unanswered), so silence is the only sign: a
side that hears nothing for --heartbeat-timeout calls the other gone. Each side keeps one
Silence per peer and asks it when to look again.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ddplaunch.options import HEARTBEAT_INTERVAL_S

BEATS_PER_TIMEOUT = 4  # a timeout shorter than 4 intervals beats faster: jitter is not silence


def beat_interval(timeout: float) -> float:
    """How often each side beats: every HEARTBEAT_INTERVAL_S, or faster for a short timeout
    (--heartbeat-timeout 2 beats every 0.5 s), so that a late beat or two is not silence."""
    return min(HEARTBEAT_INTERVAL_S, timeout / BEATS_PER_TIMEOUT)


class Silence:
    """The time since a peer's last word; past `timeout`, the peer is gone."""

    def __init__(self, timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout = timeout
        self._clock = clock
        self._last = clock()  # a fresh watch counts as hearing: the peer has just started

    def heard(self) -> None:
        """The peer said something (anything: a beat, a line, a frame)."""
        self._last = self._clock()

    def silent_for(self) -> float:
        return self._clock() - self._last

    @property
    def over(self) -> bool:
        """Silent for the whole timeout: the network or the peer's host is down."""
        return self.silent_for() >= self.timeout

    def due_in(self) -> float:
        """Seconds until the peer is gone unless it speaks (0 once it is)."""
        return max(0.0, self.timeout - self.silent_for())


class Metronome:
    """When our own next beat is due: every `interval`, the first at once."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._next = clock()

    def due_in(self) -> float:
        return max(0.0, self._next - self._clock())

    def take(self) -> bool:
        """Whether a beat is due now; if so, the next one is an interval away."""
        now = self._clock()
        if now < self._next:
            return False
        self._next = now + self.interval
        return True
