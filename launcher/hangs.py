"""Stack reports during an attempt: on demand (SIGQUIT), on a stall, and just before a failure's stop.

The attempt's loop asks (`on_demand`, `before_stop`), tells what it hears (`heard`, and the
other nodes' requests: `asked`), waits no longer than `due_in()` and then calls `advance()`.
A capture (ddplaunch.stacks) never blocks the loop: the workers' output keeps flowing while
their stacks are read. With other nodes (ddplaunch.protocol.StackAsker) a report is job-wide:
this node's ranks, and the others' answers that came within ANSWER_WAIT_S; the SSH head,
which has no ranks of its own, makes only that second half. What a report says is
ddplaunch.stackreport's; where its full-stacks file goes is decided here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from ddplaunch.options import Stall

if TYPE_CHECKING:
    from ddplaunch.logs import Printer
    from ddplaunch.protocol import StackAsker
    from ddplaunch.snapshot import RankSnapshot
    from ddplaunch.stacks import Target

STALL_GAP_S = 1.0  # between a stall report's two snapshots, to tell a stuck rank from a slow one
FAILURE_CAPTURE_S = 0.5  # the most a failure's stop waits for the others' stacks
ANSWER_WAIT_S = 2.0  # the most a job-wide report waits for the other nodes' stacks
ANSWER_LOOK_S = 0.05  # between looks at their answers (a store holds them: nothing wakes the loop)
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


class Capture(Protocol):
    """One reading of this node's ranks (ddplaunch.stacks.StackCapture)."""

    def start(self) -> None: ...

    def due_in(self) -> float | None: ...

    def poll(self) -> bool: ...

    def snapshots(self) -> Sequence[RankSnapshot]: ...

    def close(self) -> None: ...


NewCapture = Callable[["list[Target]", "float | None"], Capture]  # targets, timeout (None: the default)
Answer = Callable[[int, "Sequence[RankSnapshot]"], None]  # another node's request, answered


@dataclass(frozen=True)
class FirstLook:
    """A stall report's first snapshot, waiting for the second."""

    reason: str
    snapshots: tuple[RankSnapshot, ...]
    unanswered: tuple[str, ...]
    second_at: float


@dataclass
class Report:
    """A report under way: this node's ranks (None until read) and the other nodes' request."""

    purpose: Purpose
    reason: str
    timeout_s: float | None  # this node's capture's; None: the capture's default
    local: tuple[RankSnapshot, ...] | None
    request: int | None  # asked of the other nodes; None: this node's ranks only
    deadline: float  # for the other nodes' answers
    first: FirstLook | None = None  # a stall report's second snapshot: the first one
    next_look: float = 0.0


class StackReporter:
    """One attempt's stack reports and this node's answers to other nodes: one capture at a
    time, which serves the report under way and every request owed when it starts."""

    def __init__(
        self,
        printer: Printer,
        *,
        stack_dir: str | None,
        report_dir: Callable[[], str],
        stall: Stall,
        targets: Callable[[], list[Target]],
        others: StackAsker | None = None,
        answer: Answer | None = None,
        capture: NewCapture | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._printer = printer
        self._stack_dir = stack_dir
        self._report_dir = report_dir  # made on first use: a job never asked for a report makes none
        self._stall = stall
        self._targets = targets
        self._others = others
        self._answer = answer
        self._new_capture = capture or self._stack_capture
        self._clock = clock
        self._watch = StallWatch(stall.timeout, clock()) if stall.watched else None
        self._capture: Capture | None = None
        self._serves: tuple[bool, tuple[int, ...]] = (False, ())  # the report?, the requests answered
        self._report: Report | None = None
        self._first: FirstLook | None = None
        self._owed: list[int] = []  # requests of other nodes that the next capture answers
        self._previous: dict[tuple[str, int], RankSnapshot] = {}
        self._count = 0

    # -- what the loop asks ---------------------------------------------------------------------

    def on_demand(self, reason: str) -> None:
        if self._busy:
            self._printer.note("a stack report is already being made")
            return
        self._begin("demand", reason)

    def asked(self, requests: Sequence[int]) -> None:
        """Other nodes want this node's stacks: the next capture answers them."""
        self._owed.extend(requests)
        self._next_capture()

    def warm(self) -> None:
        """Import what a capture and its report need while the workers start (they take far
        longer than this), so a failure's stop does not wait for the imports."""
        if self._stack_dir is not None:
            import ddplaunch.stackreport
            import ddplaunch.stacks  # noqa: F401

    def before_stop(self, reason: str) -> bool:
        """Read the other ranks' stacks before they are stopped; False: nothing to read (stop now)."""
        self.close()
        if self._stack_dir is None or not self._targets():
            return False
        self._begin("failure", reason, timeout_s=FAILURE_CAPTURE_S, job_wide=False)
        return True

    def heard(self, last_output: float | None) -> None:
        """The latest output of any rank (a stall is the lack of it)."""
        if self._watch is not None:
            self._watch.heard(last_output)

    def due_in(self) -> float | None:
        now = self._clock()
        report, first = self._report, self._first
        waits = [
            None if self._capture is None else _or_now(self._capture.due_in()),
            None if first is None or report is not None else max(0.0, first.second_at - now),
            None if report is None or report.request is None else
            max(0.0, min(report.next_look, report.deadline) - now),
            None if self._watch is None or self._busy else self._watch.due_in(now),
        ]
        found = [w for w in waits if w is not None]
        return min(found) if found else None

    def advance(self) -> Finished | None:
        """Move on whatever is due; a finished failure's or stall's capture is returned."""
        now = self._clock()
        first = self._first
        if first is not None and self._report is None and now >= first.second_at:
            self._begin("stall", first.reason, first=first)
        self._take_capture()
        report = self._report
        if report is not None and self._ready(report, now):
            return self._finish(report)
        if self._watch is not None and not self._busy:
            silence = self._watch.take_due(now)
            if silence is not None:
                self._begin("stall", f"no rank wrote a line for {silence:.0f} s")
        return None

    def close(self) -> None:
        """Give up any capture under way (the attempt is stopping); safe to call twice."""
        if self._capture is not None:
            self._capture.close()
        self._capture, self._report, self._first, self._owed = None, None, None, []

    @property
    def _busy(self) -> bool:
        return self._report is not None or self._first is not None

    # -- captures -------------------------------------------------------------------------------

    def _begin(self, purpose: Purpose, reason: str, *, timeout_s: float | None = None, job_wide: bool = True,
               first: FirstLook | None = None) -> None:
        request = self._others.ask_stacks() if job_wide and self._others is not None else None
        has_ranks = bool(self._targets())
        self._first = None
        if not has_ranks and request is None:
            return  # every rank has ended, here and (as far as we know) everywhere: nothing to show
        now = self._clock()
        self._report = Report(purpose, reason, timeout_s, None if has_ranks else (), request, now + ANSWER_WAIT_S, first)
        self._next_capture()

    def _next_capture(self) -> None:
        """Unless one runs: a capture for the report under way, and for every request owed."""
        if self._capture is not None:
            return
        report = self._report
        for_report = report is not None and report.local is None
        if not for_report and not self._owed:
            return
        requests, self._owed = tuple(self._owed), []
        targets = self._targets()
        if not targets:
            self._serve(for_report, requests, ())
            return
        capture = self._new_capture(targets, report.timeout_s if report is not None and for_report else None)
        capture.start()
        self._capture, self._serves = capture, (for_report, requests)

    def _take_capture(self) -> None:
        capture = self._capture
        if capture is None or not capture.poll():
            return
        snapshots = tuple(capture.snapshots())
        capture.close()
        self._capture = None
        self._serve(*self._serves, snapshots)
        self._next_capture()  # for what was asked while this one ran

    def _serve(self, for_report: bool, requests: tuple[int, ...], snapshots: tuple[RankSnapshot, ...]) -> None:
        if for_report and self._report is not None and self._report.local is None:
            self._report.local = snapshots
        if self._answer is not None:
            for request in requests:
                self._answer(request, snapshots)

    def _ready(self, report: Report, now: float) -> bool:
        """This node's part is read, and every other node answered or the wait is over."""
        if report.local is None:
            return False
        if report.request is None or self._others is None or now >= report.deadline:
            return True
        if now < report.next_look:
            return False
        report.next_look = now + ANSWER_LOOK_S
        return not self._others.stack_answers(report.request)[1]

    def _finish(self, report: Report) -> Finished | None:
        self._report = None
        assert report.local is not None
        remote: list[RankSnapshot] = []
        unanswered: list[str] = []
        if report.request is not None and self._others is not None:
            remote, unanswered = self._others.stack_answers(report.request)
        snapshots = tuple(sorted((*report.local, *remote), key=lambda s: s.rank))
        if report.purpose == "failure":
            return Finished("failure", snapshots, report.reason)
        if report.purpose == "stall" and report.first is None:  # the first of two: the second comes after a gap
            self._first = FirstLook(report.reason, snapshots, tuple(unanswered), self._clock() + STALL_GAP_S)
            return None
        earlier: tuple[RankSnapshot, ...] = ()
        if report.first is not None:
            earlier = report.first.snapshots
            unanswered = list(dict.fromkeys((*report.first.unanswered, *unanswered)))
        self._show(snapshots, report.reason, earlier, unanswered)
        return Finished("stall", snapshots, report.reason) if report.purpose == "stall" and self._stall.stop else None

    def _stack_capture(self, targets: list[Target], timeout_s: float | None) -> Capture:
        from ddplaunch.stacks import DEFAULT_TIMEOUT_S, StackCapture

        timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
        return StackCapture(targets, self._stack_dir, timeout_s=timeout_s, clock=self._clock)

    def _show(
        self, snapshots: Sequence[RankSnapshot], reason: str, earlier: Sequence[RankSnapshot], unanswered: Sequence[str]
    ) -> None:
        from ddplaunch.stackreport import render_details, render_report

        self._count += 1
        path = self._write_details(render_details(snapshots, reason=reason, earlier=earlier))
        self._printer.block(render_report(
            snapshots, reason=reason, colour=self._printer.colour, earlier=earlier, previous=self._previous,
            details_path=path, unanswered=unanswered,
        ))
        self._previous = {(s.host, s.pid): s for s in snapshots}

    def _write_details(self, text: str) -> str | None:
        try:
            folder = self._report_dir()
            while True:  # the folder may hold an earlier attempt's reports, or the same second's
                path = os.path.join(folder, f"stacks-{self._count}-{time.strftime('%Y%m%d-%H%M%S')}.txt")
                try:
                    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as file:
                        file.write(text)
                    break
                except FileExistsError:
                    self._count += 1
        except OSError as exc:
            self._printer.note(f"could not save the full stacks: {exc}")
            return None
        return path


def _or_now(due: float | None) -> float:
    """A capture says None once it is done (it may be done as it starts): poll it now."""
    return 0.0 if due is None else due
