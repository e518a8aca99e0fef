"""Stack reports during an attempt: on demand (SIGQUIT), on a stall, and just before a failure's stop.

The attempt's loop asks (`on_demand`, `before_stop`), tells what it hears (`heard`), waits no
longer than `due_in()` and then calls `advance()`. A capture (launcher.stacks) never blocks
the loop: the workers' output keeps flowing while their stacks are read. What a report says
is launcher.stackreport's; where its full-stacks file goes is decided here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from launcher.options import Stall

if TYPE_CHECKING:
    from launcher.logs import Printer
    from launcher.snapshot import RankSnapshot
    from launcher.stacks import StackCapture, Target

STALL_GAP_S = 1.0  # between a stall report's two snapshots, to tell a stuck rank from a slow one
FAILURE_CAPTURE_S = 0.5  # the most a failure's stop waits for the others' stacks
Purpose = Literal["demand", "stall", "failure"]


class StallWatch:
    """When a silent job is due a stall report: after `timeout` of silence, then each time the
    silence has doubled, until a rank writes again. Pure: the clock and the news are given."""

    def __init__(self, timeout: float, since: float) -> None:
        self.timeout = timeout
        self._since = since  # the last output heard (or the attempt's start)
        self._next = timeout  # the silence at which the next report is due

    def heard(self, last_output: float | None) -> None:
        if last_output is not None and last_output > self._since:
            self._since, self._next = last_output, self.timeout

    def due_in(self, now: float) -> float:
        return max(0.0, self._since + self._next - now)

    def take_due(self, now: float) -> float | None:
        """The silence so far if a report is due now (then the next is due at twice it), else None."""
        silence = now - self._since
        if silence < self._next:
            return None
        self._next = 2 * self._next
        return silence


@dataclass(frozen=True)
class Finished:
    """A capture that the loop acts on: the failure's (stop now) or a stall's (stop, if asked)."""

    purpose: Purpose
    snapshots: tuple[RankSnapshot, ...]
    reason: str


class StackReporter:
    """One attempt's stack reports: one capture at a time, a failure's capture first."""

    def __init__(
        self,
        printer: Printer,
        *,
        stack_dir: str | None,
        report_dir: Callable[[], str],
        stall: Stall,
        targets: Callable[[], list[Target]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._printer = printer
        self._stack_dir = stack_dir
        self._report_dir = report_dir  # made on first use: a job never asked for a report makes none
        self._stall = stall
        self._targets = targets
        self._clock = clock
        self._watch = StallWatch(stall.timeout, clock()) if stall.watched else None
        self._capture: StackCapture | None = None
        self._purpose: Purpose | None = None
        self._reason = ""
        self._earlier: tuple[RankSnapshot, ...] = ()
        self._second_at: float | None = None  # a stall report's second snapshot is due then
        self._previous: dict[tuple[str, int], RankSnapshot] = {}
        self._count = 0

    # -- what the loop asks ---------------------------------------------------------------------

    def on_demand(self, reason: str) -> None:
        if self._purpose is not None:
            self._printer.note("a stack report is already being made")
            return
        self._start("demand", reason)

    def before_stop(self, reason: str) -> bool:
        """Read the other ranks' stacks before they are stopped; False: nothing to read (stop now)."""
        self.close()
        targets = self._targets()
        if not targets or self._stack_dir is None:
            return False
        self._start("failure", reason, targets, timeout_s=FAILURE_CAPTURE_S)
        return True

    def heard(self, last_output: float | None) -> None:
        """The latest output of any rank (a stall is the lack of it)."""
        if self._watch is not None:
            self._watch.heard(last_output)

    def due_in(self) -> float | None:
        now = self._clock()
        waits = []
        if self._capture is not None:
            waits.append(self._capture.due_in())
        if self._second_at is not None:
            waits.append(max(0.0, self._second_at - now))
        if self._watch is not None and self._purpose is None:
            waits.append(self._watch.due_in(now))
        found = [w for w in waits if w is not None]
        return min(found) if found else None

    def advance(self) -> Finished | None:
        """Move on whatever is due; a finished failure's or stall's capture is returned."""
        now = self._clock()
        if self._second_at is not None and now >= self._second_at:
            self._second_at = None
            self._start("stall", self._reason)
        if self._capture is not None and self._capture.poll():
            return self._finish(self._capture)
        if self._watch is not None and self._purpose is None:
            silence = self._watch.take_due(now)
            if silence is not None:
                self._start("stall", f"no rank wrote a line for {silence:.0f} s")
        return None

    def close(self) -> None:
        """Give up any capture under way (the attempt is stopping); safe to call twice."""
        if self._capture is not None:
            self._capture.close()
        self._capture, self._purpose, self._second_at, self._earlier = None, None, None, ()

    # -- captures -------------------------------------------------------------------------------

    def _start(self, purpose: Purpose, reason: str, targets: list[Target] | None = None,
               timeout_s: float | None = None) -> None:
        from launcher.stacks import DEFAULT_TIMEOUT_S, StackCapture

        targets = self._targets() if targets is None else targets
        if not targets:
            self.close()  # every rank has ended: nothing to show
            return
        self._purpose, self._reason = purpose, reason
        capture = StackCapture(targets, self._stack_dir, clock=self._clock, timeout_s=timeout_s or DEFAULT_TIMEOUT_S)
        capture.start()
        self._capture = capture

    def _finish(self, capture: StackCapture) -> Finished | None:
        snapshots = tuple(capture.snapshots())
        capture.close()
        self._capture = None
        purpose, reason = self._purpose, self._reason
        assert purpose is not None
        if purpose == "stall" and not self._earlier:
            self._earlier = snapshots  # the first of two: the second comes after a gap
            self._second_at = self._clock() + STALL_GAP_S
            return None
        self._purpose = None
        if purpose == "failure":
            return Finished(purpose, snapshots, reason)
        earlier, self._earlier = self._earlier, ()
        self._show(snapshots, reason, earlier)
        return Finished(purpose, snapshots, reason) if purpose == "stall" and self._stall.stop else None

    def _show(self, snapshots: Sequence[RankSnapshot], reason: str, earlier: Sequence[RankSnapshot]) -> None:
        from launcher.stackreport import render_details, render_report

        self._count += 1
        path = self._write_details(render_details(snapshots, reason=reason, earlier=earlier))
        self._printer.block(render_report(
            snapshots, reason=reason, colour=self._printer.colour, earlier=earlier, previous=self._previous,
            details_path=path,
        ))
        self._previous = {(s.host, s.pid): s for s in snapshots}

    def _write_details(self, text: str) -> str | None:
        try:
            folder = self._report_dir()
            path = os.path.join(folder, f"stacks-{self._count}-{time.strftime('%Y%m%d-%H%M%S')}.txt")
            with open(path, "w", encoding="utf-8") as file:
                file.write(text)
        except OSError as exc:
            self._printer.note(f"could not save the full stacks: {exc}")
            return None
        return path
