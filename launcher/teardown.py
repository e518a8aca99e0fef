"""When an attempt's workers are stopped, with which signal, and how long to wait: no I/O.

One stop at a time: a graceful signal, then SIGKILL for what is left once the grace is over
(or at once, on a second Ctrl-C). After the whole tree is gone, output still in flight gets a
short drain. A process in uninterruptible sleep (state D: a hung driver, a frozen cgroup)
does not die even from SIGKILL, so the wait after it is bounded too (--kill-timeout): then the
supervisor names what is left and gives up on it. The supervisor sends the signals this
machine decides; the clock is injected.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

from ddplaunch.options import DEFAULT_KILL_TIMEOUT_S

DRAIN_AFTER_DEATH_S = 1.0  # output still in flight when every process of the tree is gone


class Teardown:
    """The stop of one attempt: begun or not, the signal sent, the kill and drain deadlines."""

    def __init__(
        self, grace: float, clock: Callable[[], float] = time.monotonic, kill_timeout: float = DEFAULT_KILL_TIMEOUT_S
    ) -> None:
        self.grace = grace
        self.kill_timeout = kill_timeout
        self.signal_sent: int | None = None  # to the workers; SIGKILL once killed
        self.began_at: float | None = None  # when the stop began (what a rank said before it was its own)
        self._clock = clock
        self._kill_at: float | None = None
        self._drain_until: float | None = None
        self._give_up_at: float | None = None  # the first SIGKILL's time + kill_timeout
        self.gave_up = False  # what SIGKILL left is no longer waited for

    @property
    def stopping(self) -> bool:
        return self.signal_sent is not None

    def begin(self, sig: int) -> bool:
        """Stop gracefully with `sig`, SIGKILL due after the grace; False if already stopping."""
        if self.stopping:
            return False
        self.signal_sent = sig
        self.began_at = self._clock()
        self._kill_at = self.began_at + self.grace
        return True

    def kill_now(self) -> None:
        """SIGKILL is sent now, so it is no longer due later; what it has not ended by
        kill_timeout from the first one is given up on (a second SIGKILL gives no more time)."""
        self.signal_sent = signal.SIGKILL
        self._kill_at = None
        if self._give_up_at is None and not self.gave_up:
            self._give_up_at = self._clock() + self.kill_timeout

    def give_up_due(self) -> bool:
        """kill_timeout has passed since SIGKILL: time to stop waiting for the tree to end."""
        return self._give_up_at is not None and self._clock() >= self._give_up_at

    def give_up(self) -> None:
        """What is left is given up on, once: nothing more is due for it."""
        self.gave_up = True
        self._give_up_at = None

    def kill_due(self) -> bool:
        return self._kill_at is not None and self._clock() >= self._kill_at

    def tree_gone(self) -> None:
        """Every process of the tree has ended: the drain starts now, once."""
        if self._drain_until is None:
            self._drain_until = self._clock() + DRAIN_AFTER_DEATH_S

    def drain_over(self) -> bool:
        return self._drain_until is not None and self._clock() >= self._drain_until

    def due_in(self) -> float | None:
        """Seconds until the next deadline (0 if one has passed); None if none is set."""
        deadlines = [t for t in (self._kill_at, self._drain_until, self._give_up_at) if t is not None]
        return max(0.0, min(deadlines) - self._clock()) if deadlines else None
