"""The stack report as text (pure: no I/O): where every rank is, its ranks grouped by the stack
of their main thread; for SIGQUIT, for a stall, for the failure panel, and the full-stacks file.

Drawn like launcher.report's failure panel (`━━` rules, a dim `│` before quoted lines, ANSI
colour only when asked), and for the same reason without rich.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from launcher.snapshot import StackFrame

LIBRARY_DIRS = frozenset({"site-packages", "dist-packages"})
# A lib/python3.X/ directory is the standard library once site-packages is ruled out: /usr/lib,
# conda, pyenv and uv all lay it out so ("t": a free-threaded build's python3.13t).
STDLIB_DIR = re.compile(r"(^|/)lib(64)?/python\d+(\.\d+)?t?/")


# -- ranks and frames ----------------------------------------------------------------------------


def compact_ranks(ranks: Iterable[int]) -> str:
    """Ranks as sorted runs: 0, 1, 2, 5, 7, 8, 9 -> "0-2, 5, 7-9"."""
    runs: list[list[int]] = []
    for rank in sorted(set(ranks)):
        if runs and rank == runs[-1][1] + 1:
            runs[-1][1] = rank
        else:
            runs.append([rank, rank])
    return ", ".join(str(first) if first == last else f"{first}-{last}" for first, last in runs)


def ranks_phrase(ranks: Sequence[int]) -> str:
    """"rank 3" or "ranks 0-2, 5"."""
    return f"{'rank' if len(set(ranks)) == 1 else 'ranks'} {compact_ranks(ranks)}"


def is_user_frame(frame: StackFrame) -> bool:
    """Whether a frame is in the user's code: not in an installed package, the standard library or torch."""
    if frame.file.startswith("<frozen "):
        return False
    directories = frame.file.split("/")[:-1]
    # torch counts as a library even when built from a checkout, outside site-packages
    if LIBRARY_DIRS.intersection(directories) or "torch" in directories:
        return False
    return STDLIB_DIR.search(frame.file) is None


def headline(frames: Sequence[StackFrame]) -> StackFrame | None:
    """The frame that names a stack: its innermost in the user's code, else its innermost."""
    return next((f for f in frames if is_user_frame(f)), frames[0] if frames else None)
