"""The live area (ddplaunch.live) as a state machine: scripted feeds, a fake clock and terminal
size, its bytes replayed through a VT100 emulator (pyte); what stays on screen is asserted.
"""

from __future__ import annotations

import pytest

from helpers_screen import Terminal
from ddplaunch.live import PARTIAL_IDLE_S, REDRAW_S, LiveArea

pytestmark = pytest.mark.unit

COLUMNS, LINES = 40, 8


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Rig:
    """A LiveArea writing into an emulated terminal, on a clock the test moves."""

    def __init__(self, columns: int = COLUMNS, lines: int = LINES) -> None:
        self.clock = Clock()
        self.terminal = Terminal(columns, lines, onlcr=True)
        self.writes: list[bytes] = []
        self.area = LiveArea(self._write, lambda: (columns, lines), self.clock)

    def _write(self, data: bytes) -> None:
        self.writes.append(data)
        self.terminal.feed(data)

    def run(self, steps: list[tuple]) -> None:
        for step in steps:
            kind, *args = step
            if kind == "bar":  # (rank, stream) and its carriage-return line now
                key, text = args
                self.area.pending(key, _prefix(key), text, True)
            elif kind == "partial":  # a line without newline, no \r
                key, text = args
                self.area.pending(key, _prefix(key), text, False)
            elif kind == "lines":
                self.area.above(args[0], self._write)
            elif kind == "wait":
                self.clock.now += args[0]
            self.area.refresh()

    def settle(self) -> None:
        """What the supervisor's loop does when nothing else comes: wait as told, then refresh."""
        for _ in range(10):
            due = self.area.due_in()
            if due is None:
                return
            self.clock.now += due
            self.area.refresh()
        raise AssertionError("the live area keeps asking to be woken: a busy loop")


def _prefix(key: tuple[int, int]) -> bytes:
    rank, stream = key
    return f"{rank} {'|' if stream == 1 else '!'} ".encode()


R0, R1, R2 = (0, 2), (1, 2), (2, 2)
LATER = REDRAW_S + 0.01

SCREEN_CASES = [
    pytest.param(
        [("bar", R0, b"10%"), ("wait", LATER), ("bar", R0, b"20%"), ("wait", LATER), ("bar", R0, b"100%")],
        ["0 ! 100%"],
        id="one-bar-redrawn-in-place",
    ),
    pytest.param(
        [("bar", R0, b"10%"), ("bar", R1, b"30%"), ("wait", LATER), ("lines", b"0 | a\n1 | b\n"), ("wait", LATER),
         ("bar", R0, b"60%"), ("wait", LATER), ("lines", b"0 | c\n")],
        ["0 | a", "1 | b", "0 | c", "0 ! 60%", "1 ! 30%"],
        id="lines-scroll-above-two-bars",
    ),
    pytest.param(
        [("bar", R0, b"10%"), ("wait", LATER)] + [("lines", f"0 | line {i}\n".encode()) for i in range(20)],
        [f"0 | line {i}" for i in range(20)] + ["0 ! 10%"],
        id="bar-never-left-in-scrollback",
    ),
    pytest.param(
        [("bar", R1, b"50%"), ("partial", R0, b"(Pdb) "), ("wait", PARTIAL_IDLE_S)],
        ["1 ! 50%", "0 ! (Pdb)"],
        id="prompt-after-idle-and-last",
    ),
    pytest.param(
        # the printer hands the area the new unfinished line (none) before the finished one
        [("partial", R0, b"half a li"), ("partial", R0, b""), ("lines", b"0 | half a line\n")],
        ["0 | half a line"],
        id="torn-line-never-shown",
    ),
    pytest.param(
        [("bar", R0, b"50%"), ("wait", LATER), ("bar", R0, b"    "), ("wait", LATER)],
        [],
        id="bar-cleared-with-blanks",
    ),
    pytest.param(
        [("bar", (rank, 2), f"{rank}0%".encode()) for rank in range(10)],
        [f"{rank} ! {rank}0%" for rank in range(6)] + ["ddplaunch: 4 more live lines not shown"],
        id="more-bars-than-screen",
    ),
    pytest.param(
        [("bar", R0, b"#" * 100), ("wait", LATER), ("lines", b"0 | x\n")],
        ["0 | x", "0 ! " + "#" * (COLUMNS - 4)],
        id="wide-bar-clipped-not-wrapped",
    ),
]


@pytest.mark.parametrize(("steps", "rows"), SCREEN_CASES)
def test_screen_after_feeds(steps: list[tuple], rows: list[str]) -> None:
    rig = Rig()
    rig.run(steps)
    rig.settle()
    assert rig.terminal.rows() == rows


def test_cursor_waits_after_a_prompt() -> None:
    rig = Rig()
    rig.run([("lines", b"0 | hello\n"), ("partial", R0, b"(Pdb) "), ("wait", PARTIAL_IDLE_S)])
    assert rig.terminal.rows() == ["0 | hello", "0 ! (Pdb)"]
    assert rig.terminal.cursor == (len("0 ! (Pdb) "), 1)


def test_redraws_at_most_once_per_interval_and_the_loop_is_told_when() -> None:
    rig = Rig()
    rig.run([("bar", R0, b"1%")])
    drawn = len(rig.writes)
    for pct in range(2, 50):
        rig.run([("bar", R0, f"{pct}%".encode()), ("wait", REDRAW_S / 100)])
    assert len(rig.writes) == drawn, "redrawn before REDRAW_S passed"
    due = rig.area.due_in()
    assert due is not None and 0 < due < REDRAW_S
    rig.run([("wait", due)])
    assert rig.terminal.rows() == ["0 ! 49%"]
    assert rig.area.due_in() is None  # nothing changed: no wake-ups, no polling


def test_partial_line_due_after_idle() -> None:
    rig = Rig()
    rig.run([("partial", R0, b"Password: ")])
    assert rig.terminal.rows() == []
    assert rig.area.due_in() == pytest.approx(PARTIAL_IDLE_S)
    rig.run([("wait", PARTIAL_IDLE_S)])
    assert rig.terminal.rows() == ["0 ! Password:"]
    assert rig.area.due_in() is None


def test_lines_alone_pass_through_untouched() -> None:
    """No live line: whole lines are written as they are, one write each (the hot path)."""
    rig = Rig()
    rig.run([("lines", b"0 | a\n"), ("lines", b"0 | b\n")])
    assert rig.writes == [b"0 | a\n", b"0 | b\n"]


def test_lines_through_another_stream_erase_first() -> None:
    """stdout lines on the terminal whose area stderr's bars share: erase, then the lines."""
    rig = Rig()
    rig.run([("bar", R0, b"10%")])
    other: list[bytes] = []

    def to_stdout(data: bytes) -> None:
        other.append(data)
        rig.terminal.feed(data)

    rig.area.above(b"0 | out\n", to_stdout)
    assert other == [b"0 | out\n"]
    rig.clock.now += LATER
    rig.area.refresh()
    assert rig.terminal.rows() == ["0 | out", "0 ! 10%"]


def test_close_erases_the_area() -> None:
    rig = Rig()
    rig.run([("lines", b"0 | kept\n"), ("bar", R0, b"10%"), ("bar", R1, b"20%")])
    rig.area.close()
    assert rig.terminal.rows() == ["0 | kept"]


def test_lines_through_the_areas_own_stream_come_with_the_erase_and_redraw_in_one_write() -> None:
    """One write, so the terminal never shows the area erased and the lines not yet there."""
    rig = Rig()
    rig.run([("bar", R0, b"10%"), ("bar", R1, b"20%"), ("wait", LATER)])
    rig.writes.clear()
    rig.area.above(b"0 | x\n", rig._write)
    assert rig.writes == [b"\r\x1b[1A\x1b[J0 | x\n\x1b[?7l0 ! 10%\n1 ! 20%\x1b[?7h"]


@pytest.mark.parametrize(
    ("steps", "rows"),
    [
        pytest.param(
            [("bar", R0, b"10%"), ("wait", LATER), ("bar", R0, b"11%"), ("lines", b"0 | a\n"), ("lines", b"0 | b\n")],
            ["0 | a", "0 | b", "0 ! 11%"],
            id="lines-under-REDRAW_S-keep-the-bar-and-show-its-newest-state",
        ),
        pytest.param(
            [("bar", R0, b"99%"), ("wait", LATER), ("bar", R0, b""), ("lines", b"0 ! 100%\n")],
            ["0 ! 100%"],
            id="a-finished-bar-is-never-shown-twice",
        ),
    ],
)
def test_screen_at_once_without_waiting(steps: list[tuple], rows: list[str]) -> None:
    """What a user sees right after lines arrive, before any throttled redraw: no flicker."""
    rig = Rig()
    rig.run(steps)
    assert rig.terminal.rows() == rows
