"""Threads' stacks from what faulthandler wrote or py-spy printed (pure: text in, ThreadStacks out).

faulthandler writes, for each thread, innermost frame first:

    Current thread 0x00007f3a2c1ff740 (most recent call first):
      File "/job/train.py", line 12 in wait_elsewhere
      File "/job/train.py", line 30 in <module>

`Thread 0x...` for the other threads, `  <no Python frame>` for a thread outside Python, and
`  ...` where it stopped after 100 frames (those outer frames are lost). It escapes non-ASCII
characters as \\xNN, \\uNNNN or \\UNNNNNNNN and prints `???` for an unknown file or line.

Under a --warm rank's script lie the frames of the warm interpreter it was forked from (BOOT's
"<string>", then ddplaunch/zygote.py's main, become_rank, _run_script): both parsers drop
them, so a warm rank's stack reads as a cold one's.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import PurePosixPath
from typing import Any

from ddplaunch.snapshot import StackFrame, ThreadStack
from ddplaunch.zygote import BOOT_FILENAME

_THREAD_LINE = re.compile(r"(?:Current thread|Thread) (0x[0-9a-fA-F]+)(?: \[(.*)\])? \(most recent call first\):")
_FRAME_LINE = re.compile(r'  File (?:"(?P<file>.*)"|\?\?\?), line (?P<line>\d+|\?\?\?) in (?P<function>.*)')
_ESCAPE = re.compile(r"\\(?:x([0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8}))")
# ddplaunch.zygote, wherever the package is: a checkout's venv, site-packages, an agent's zip
_ZYGOTE_TAIL = ("ddplaunch", "zygote.py")


def unescape(text: str) -> str:
    """Undo faulthandler's escapes of non-ASCII characters (it writes a backslash as is)."""
    return _ESCAPE.sub(lambda m: chr(int(next(g for g in m.groups() if g is not None), 16)), text)


def parse_frame(line: str) -> StackFrame | None:
    """One `  File "...", line N in f` line; None for any other line."""
    match = _FRAME_LINE.fullmatch(line)
    if match is None:
        return None
    file = match["file"]
    number = match["line"]
    return StackFrame(
        "???" if file is None else unescape(file),
        int(number) if number.isdecimal() else 0,  # isdecimal: only what int() accepts
        unescape(match["function"]),
    )


def without_zygote_frames(frames: Sequence[StackFrame]) -> tuple[StackFrame, ...]:
    """`frames` (innermost first) less the warm interpreter's outermost ones: the run of
    ddplaunch/zygote.py frames that ends the stack, and BOOT's "<string>" frame beyond them.
    A "<string>" frame anywhere else is the user's (`python -c`, exec) and stays, and so do
    the zygote's frames when they are all there is (a rank caught before its script began)."""
    end = len(frames)
    if end and frames[end - 1].file == BOOT_FILENAME:
        end -= 1
    zygote_end = end
    while end and PurePosixPath(frames[end - 1].file).parts[-2:] == _ZYGOTE_TAIL:
        end -= 1
    return tuple(frames[:end]) if 0 < end < zygote_end else tuple(frames)


def parse_faulthandler(text: str, main_ident: str | None) -> tuple[ThreadStack, ...]:
    """Every thread block in `text`, in the order written; the one named `main_ident` is main.

    Lines that belong to no block (the bootstrap's own lines, a `...` for threads beyond
    faulthandler's limit, "  Garbage-collecting") are skipped.
    """
    return tuple(
        ThreadStack(
            ident, name, main_ident is not None and int(ident, 16) == int(main_ident, 16), without_zygote_frames(frames),
        )
        for ident, name, frames in _thread_blocks(text.splitlines())
    )


def _thread_blocks(lines: list[str]) -> Iterator[tuple[str, str, tuple[StackFrame, ...]]]:
    current: tuple[str, str] | None = None
    frames: list[StackFrame] = []
    for line in lines:
        header = _THREAD_LINE.fullmatch(line)
        if header is not None:
            if current is not None:
                yield current[0], current[1], tuple(frames)
            current, frames = (header[1], header[2] or ""), []
        elif current is not None:
            frame = parse_frame(line)
            if frame is not None:
                frames.append(frame)
    if current is not None:
        yield current[0], current[1], tuple(frames)


def thread_ident(value: int) -> str:
    """A thread id as faulthandler prints it, so both sources name a thread alike."""
    return f"0x{value:016x}"


def parse_py_spy(data: Any, pid: int) -> tuple[ThreadStack, ...]:
    """`py-spy dump --json --pid PID`'s threads; the main thread is the one whose tid is the pid.

    py-spy names a frame by its qualified name on Python 3.11+ ("Thread.run"); the last part
    is what faulthandler prints ("run"), so ranks read either way group together.
    """
    return tuple(_py_spy_thread(thread, pid) for thread in data)


def _py_spy_thread(thread: Any, pid: int) -> ThreadStack:
    os_thread = thread.get("os_thread_id")
    name = thread.get("thread_name") or ""
    is_main = os_thread == pid if os_thread is not None else name == "MainThread"
    frames = [
        StackFrame(str(f["filename"]), int(f["line"]), str(f["name"]).rsplit(".", 1)[-1])
        for f in thread["frames"]
    ]
    return ThreadStack(thread_ident(int(thread["thread_id"])), str(name), is_main, without_zygote_frames(frames))
