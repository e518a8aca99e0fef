"""The stack report as text (pure: no I/O): where every rank is, its ranks grouped by the stack
of their main thread; for SIGQUIT, for a stall, for the failure panel, and the full-stacks file.

Drawn like launcher.report's failure panel (`━━` rules, a dim `│` before quoted lines, ANSI
colour only when asked), and for the same reason without rich.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from launcher.snapshot import RankSnapshot, StackFrame

LIBRARY_DIRS = frozenset({"site-packages", "dist-packages"})
# A lib/python3.X/ directory is the standard library once site-packages is ruled out: /usr/lib,
# conda, pyenv and uv all lay it out so ("t": a free-threaded build's python3.13t).
STDLIB_DIR = re.compile(r"(^|/)lib(64)?/python\d+(\.\d+)?t?/")
MiB = 1 << 20
GiB = 1 << 30


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


# -- groups --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StackGroup:
    """Ranks whose main threads stand at the same frames, or whose stacks went unread for one reason."""

    ranks: tuple[int, ...]  # ascending
    frames: tuple[StackFrame, ...] | None  # the main thread's, innermost first; None: unread
    why_not: str | None  # why unread, when frames is None
    snapshots: tuple[RankSnapshot, ...]  # one per rank, in the order of ranks (the later of two)
    moving: bool | None  # with two snapshots: did a rank's stack change? None: one, or cannot tell


def why_unread(snapshot: RankSnapshot) -> str:
    """Why a rank's main-thread stack is missing, in the words the report shows."""
    if snapshot.main.why_not:
        return snapshot.main.why_not
    return "no main thread among its threads" if snapshot.main.threads else "its stack could not be read"


def stack_key(snapshot: RankSnapshot) -> tuple[StackFrame, ...] | str:
    """What ranks are grouped by: the main thread's frames (file, line, function), or why unread."""
    frames = snapshot.main_frames
    return why_unread(snapshot) if frames is None else frames


Pairs = Mapping[tuple[str, int], RankSnapshot]


def by_host_rank(earlier: Sequence[RankSnapshot]) -> dict[tuple[str, int], RankSnapshot]:
    """The first snapshots by (host, rank), to pair each second snapshot with its first."""
    return {(e.host, e.rank): e for e in earlier}


def earlier_of(snapshot: RankSnapshot, pairs: Pairs) -> RankSnapshot | None:
    """The first of a rank's two snapshots: the same host and rank, and the same process."""
    before = pairs.get((snapshot.host, snapshot.rank))
    # a restarted rank keeps its rank but not its pid: its old stack says nothing about the new one
    return before if before is not None and before.pid == snapshot.pid else None


def stack_changed(snapshot: RankSnapshot, before: RankSnapshot | None) -> bool | None:
    """Whether a rank's main-thread stack differs from its earlier snapshot's; None: cannot tell."""
    if before is None or before.main_frames is None or snapshot.main_frames is None:
        return None
    return before.main_frames != snapshot.main_frames


def group_moving(changes: Sequence[bool | None]) -> bool | None:
    """A group moves if any rank moved, is stuck if every rank is known not to have; else unknown."""
    if any(change is True for change in changes):
        return True
    return False if changes and all(change is False for change in changes) else None


def group_snapshots(snapshots: Sequence[RankSnapshot], earlier: Sequence[RankSnapshot] = ()) -> list[StackGroup]:
    """The ranks grouped by their main thread's stack (unread ones by why), smallest group first.

    A group of few ranks is the likely culprit: seven ranks in all_reduce wait for the eighth.
    Unread groups sort among the others by the same rule, since a rank whose dump never came
    (uninterruptible in the kernel, say) is as often as not the one the rest wait for.
    """
    members: dict[tuple[StackFrame, ...] | str, list[RankSnapshot]] = {}
    for snapshot in snapshots:
        members.setdefault(stack_key(snapshot), []).append(snapshot)
    pairs = by_host_rank(earlier)
    groups = [_group(key, sorted(group, key=lambda s: s.rank), pairs) for key, group in members.items()]
    return sorted(groups, key=lambda g: (len(g.ranks), g.ranks[0]))


def _group(key: tuple[StackFrame, ...] | str, members: list[RankSnapshot], pairs: Pairs) -> StackGroup:
    changes = [stack_changed(s, earlier_of(s, pairs)) for s in members] if pairs else []
    return StackGroup(
        ranks=tuple(s.rank for s in members),
        frames=None if isinstance(key, str) else key,
        why_not=key if isinstance(key, str) else None,
        snapshots=tuple(members),
        moving=group_moving(changes),
    )


# -- the facts beside each rank ------------------------------------------------------------------


def cpu_seconds_text(seconds: float) -> str:
    """CPU seconds to the precision that matters at their size: 0.98, 12.3, 4521."""
    if seconds < 10:
        return f"{seconds:.2f}"
    return f"{seconds:.1f}" if seconds < 1000 else f"{seconds:.0f}"


def span_text(seconds: float) -> str:
    """Wall-clock seconds: 1.0, 61.2, 301."""
    return f"{seconds:.1f}" if seconds < 100 else f"{seconds:.0f}"


def memory_text(size: int) -> str:
    """A resident size in binary units: 512 KiB, 812 MiB, 3.1 GiB."""
    if size < MiB:
        return f"{size // 1024} KiB"
    return f"{size / MiB:.0f} MiB" if size < GiB else f"{size / GiB:.1f} GiB"


def output_text(since_output_s: float | None) -> str:
    """How long ago a rank wrote its last line."""
    return "no output yet" if since_output_s is None else f"{span_text(since_output_s)} s ago"


def cpu_text(now: RankSnapshot, earlier: RankSnapshot | None = None, previous: RankSnapshot | None = None) -> str:
    """The CPU a rank used: since its first snapshot, else since the last report, else since start."""
    base = next((b for b in (earlier, previous) if b is not None and same_process(b, now)), None)
    if base is None:
        return f"{cpu_seconds_text(now.cpu_s)} s since start"
    return f"{cpu_seconds_text(now.cpu_s - base.cpu_s)} s in {span_text(now.taken_at - base.taken_at)} s"


def same_process(before: RankSnapshot, now: RankSnapshot) -> bool:
    """Whether an older snapshot is of the same process as a newer one, so their CPU counts subtract."""
    # a pid is reused, possibly by the restarted rank itself: a CPU count that went down is another process
    same = (before.host, before.pid) == (now.host, now.pid)
    return same and before.cpu_s <= now.cpu_s and before.taken_at < now.taken_at
