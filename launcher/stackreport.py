"""The stack report as text (pure: no I/O): where every rank is, its ranks grouped by the stack
of their main thread; for SIGQUIT, for a stall, for the failure panel, and the full-stacks file.

Drawn like ddplaunch.report's failure panel (`━━` rules, a dim `│` before quoted lines, ANSI
colour only when asked), and for the same reason without rich.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ddplaunch.snapshot import ProcessStacks, RankSnapshot, StackFrame, ThreadStack

LIBRARY_DIRS = frozenset({"site-packages", "dist-packages"})
# A lib/python3.X/ directory is the standard library once site-packages is ruled out: /usr/lib,
# conda, pyenv and uv all lay it out so ("t": a free-threaded build's python3.13t).
STDLIB_DIR = re.compile(r"(^|/)lib(64)?/python\d+(\.\d+)?t?/")
PANEL_WIDTH = 100  # ddplaunch.report's failure panel is at most this wide
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
    """Ranks with their word: "rank 3", "ranks 0-2, 5"."""
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


# -- drawing -------------------------------------------------------------------------------------

HEADINGS = ("rank", "local", "host", "pid", "state", "cpu", "rss", "last line")
FrameOrGap = StackFrame | int  # an int stands for that many frames left out


@dataclass(frozen=True)
class Palette:
    """The ANSI codes the report is drawn with; all empty without colour."""

    rule: str = ""
    bold: str = ""
    dim: str = ""
    stuck: str = ""
    moving: str = ""
    reset: str = ""


def palette(colour: bool) -> Palette:
    """Yellow rules (a report, not a failure's red), red for stuck, green for moving."""
    if not colour:
        return Palette()
    return Palette("\x1b[33m", "\x1b[1m", "\x1b[2m", "\x1b[1;31m", "\x1b[32m", "\x1b[0m")


def display_path(file: str) -> str:
    """A frame's file as the terminal shows it: an installed package's from the package on."""
    parts = file.split("/")
    cut = max((i for i, part in enumerate(parts) if part in LIBRARY_DIRS), default=-1)
    return "/".join(parts[cut + 1 :])


def fit(path: str, room: int) -> str:
    """The path, or its end after "…" when longer than room: the end names the file."""
    room = max(room, 16)
    if len(path) <= room:
        return path
    tail = path[len(path) - room + 1 :]
    # cut at a directory, not inside a name that would then read as another one
    return "…" + (tail[tail.index("/") :] if "/" in tail[:-1] else tail)


def frame_text(frame: StackFrame, room: int) -> str:
    """A frame as Python's tracebacks write it, its path shortened to fit room columns."""
    rest = f", line {frame.line}, in {frame.function}"
    return f'File "{fit(display_path(frame.file), room - len(rest) - 7)}"{rest}'


def frame_window(frames: Sequence[StackFrame], limit: int) -> list[FrameOrGap]:
    """At most limit frames, innermost first, and always the headline frame, with the gaps counted."""
    limit = max(limit, 1)
    if len(frames) <= limit:
        return list(frames)
    top = headline(frames)
    at = frames.index(top) if top is not None else 0
    if at < limit:
        return [*frames[:limit], len(frames) - limit]
    # the user's frame sits below a deep library stack (torch.compile, say): keep the innermost
    # frames, where it waits, and the user's, where it was called from
    window: list[FrameOrGap] = [*frames[: limit - 1], at - limit + 1, frames[at]]
    return window + ([len(frames) - at - 1] if at + 1 < len(frames) else [])


def frame_lines(
    frames: Sequence[StackFrame], limit: int, indent: int, width: int, p: Palette, more: str
) -> list[str]:
    """A stack's lines as the report quotes them; library frames dim, so the user's stand out."""
    pad, bar = " " * indent, f"{p.dim}│{p.reset}"
    lines = []
    for item in frame_window(frames, limit):
        if isinstance(item, int):
            lines.append(f"{pad}{bar} {p.dim}… {plural(item, 'more frame')}{more}{p.reset}")
        else:
            text = frame_text(item, width - indent - 2)
            lines.append(f"{pad}{bar} {text}" if is_user_frame(item) else f"{pad}{bar} {p.dim}{text}{p.reset}")
    return lines


def plural(count: int, noun: str) -> str:
    """A count and its noun: "1 rank", "8 ranks"."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def where_text(group: StackGroup) -> str:
    """A group's place in one phrase: its headline frame, or why its stacks went unread."""
    if group.frames is None:
        return f"stack not read: {group.why_not}"
    top = headline(group.frames)
    if top is None:
        return "no Python frames"
    return f"{top.function} at {top.file.rsplit('/', 1)[-1]}:{top.line}"


def group_title(group: StackGroup, p: Palette) -> str:
    """A group's title line: "ranks 0-6 · stuck · step at train.py:50"."""
    mark = ""
    if group.moving is not None:
        mark = f" · {p.moving}moving{p.reset}" if group.moving else f" · {p.stuck}stuck{p.reset}"
    return f"{p.bold}{ranks_phrase(group.ranks)}{p.reset}{mark} · {p.bold}{where_text(group)}{p.reset}"


def rank_cells(now: RankSnapshot, earlier: RankSnapshot | None, previous: RankSnapshot | None) -> tuple[str, ...]:
    """One rank's row of the table, in the order of HEADINGS."""
    return (
        str(now.rank), str(now.local_rank), now.host, str(now.pid), now.state,
        cpu_text(now, earlier, previous), memory_text(now.rss_bytes), output_text(now.since_output_s),
    )


def table_line(cells: Sequence[str], widths: Sequence[int]) -> str:
    """A table row, its cells padded to their columns' widths."""
    return "  ".join(cell.ljust(w) for cell, w in zip(cells, widths)).rstrip()


def column_widths(rows: Iterable[Sequence[str]]) -> list[int]:
    """Each column's width over the whole report, so that every group's table lines up."""
    widths = [len(heading) for heading in HEADINGS]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row)]
    return widths


def hosts_phrase(snapshots: Sequence[RankSnapshot]) -> str:
    """How many ranks answered, and on how many hosts: "8 ranks on 2 hosts"."""
    return f"{plural(len(snapshots), 'rank')} on {plural(len({s.host for s in snapshots}), 'host')}"


# -- the report ----------------------------------------------------------------------------------


def render_report(
    snapshots: Sequence[RankSnapshot],
    *,
    reason: str,
    colour: bool,
    width: int = 100,
    earlier: Sequence[RankSnapshot] = (),
    previous: Mapping[tuple[str, int], RankSnapshot] = {},
    details_path: str | None = None,
    unanswered: Sequence[str] = (),
    max_frames: int = 8,
) -> str:
    """Where every rank is, for the terminal: its groups, their stacks, a row of facts per rank.

    earlier: the first of two snapshots per rank (a stall's); previous: the last report's, by
    (host, pid), for the CPU used since it.
    """
    p = palette(colour)
    pairs = by_host_rank(earlier)
    rows = {
        (s.host, s.rank): rank_cells(s, earlier_of(s, pairs), previous.get((s.host, s.pid))) for s in snapshots
    }
    widths = column_widths(rows.values())
    more = ", in the full stacks" if details_path else ""
    lines = header_lines(snapshots, reason, bool(earlier), details_path, unanswered, width, p)
    for group in group_snapshots(snapshots, earlier):
        lines += ["", f"  {group_title(group, p)}"]
        lines += frame_lines(group.frames, max_frames, 4, width, p, more) if group.frames is not None else []
        lines.append(f"    {p.dim}{table_line(HEADINGS, widths)}{p.reset}")
        lines += [f"    {table_line(rows[(s.host, s.rank)], widths)}" for s in group.snapshots]
    lines.append(f"{p.rule}{'━' * width}{p.reset}")
    return "\n".join(lines) + "\n"


def header_lines(
    snapshots: Sequence[RankSnapshot], reason: str, two: bool, details_path: str | None, unanswered: Sequence[str],
    width: int, p: Palette,
) -> list[str]:
    """The report's title rule and what a reader needs before the groups."""
    title = f" Where the ranks are: {reason} "
    lines = [f"{p.rule}{p.bold}━━{title}{'━' * max(3, width - len(title) - 2)}{p.reset}"]
    if snapshots:
        lines.append(f"  {hosts_phrase(snapshots)}, grouped by their main thread's stack, most recent call first")
    else:
        lines.append("  no rank answered")
    if two:
        lines.append("  two snapshots per rank: a group is stuck if none of its ranks' stacks changed between them")
    if details_path:
        lines.append(f"  full stacks, every thread of every process: {details_path}")
    if unanswered:
        lines.append(f"  no answer in time from {', '.join(unanswered)}: where their ranks are is unknown")
    return lines


# -- the failure panel's part ----------------------------------------------------------------------


def render_others(snapshots: Sequence[RankSnapshot], *, colour: bool, max_frames: int = 3) -> list[str]:
    """Lines for the failure panel: where the other ranks were just before they were told to stop.

    The same groups as the report's, each its title and a few frames; no lines without snapshots.
    """
    if not snapshots:
        return []
    p = palette(colour)
    heading = "where the other ranks were just before they were told to stop (most recent call first):"
    lines = [f"  {p.dim}{heading}{p.reset}"]
    for group in group_snapshots(snapshots):
        lines.append(f"    {group_title(group, p)}")
        lines += frame_lines(group.frames, max_frames, 6, PANEL_WIDTH, p, "") if group.frames is not None else []
    return lines


# -- the full-stacks file --------------------------------------------------------------------------


def render_details(snapshots: Sequence[RankSnapshot], *, reason: str, earlier: Sequence[RankSnapshot] = ()) -> str:
    """The full-stacks file: every thread of every process of every rank, with its facts; no colour."""
    pairs = by_host_rank(earlier)
    lines = [
        f"ddplaunch stacks: {reason}",
        f"{hosts_phrase(snapshots)}; every thread of every process, most recent call first",
        "",
        "where the ranks are, smallest group first:",
    ]
    lines += [f"  {group_title(group, Palette())}" for group in group_snapshots(snapshots, earlier)]
    for snapshot in sorted(snapshots, key=lambda s: (s.rank, s.host)):
        lines += ["", *rank_details(snapshot, earlier_of(snapshot, pairs))]
    return "\n".join(lines) + "\n"


def rank_details(now: RankSnapshot, before: RankSnapshot | None) -> list[str]:
    """One rank's part of the full-stacks file: its facts, then each of its processes."""
    quiet = "no output yet" if now.since_output_s is None else f"last line {output_text(now.since_output_s)}"
    lines = [
        f"━━ rank {now.rank} · local rank {now.local_rank} · host {now.host} · pid {now.pid}",
        f"{now.state} · cpu {cpu_text(now, before)} · rss {memory_text(now.rss_bytes)} · {quiet}",
    ]
    lines += movement_lines(now, before)
    lines += process_lines(now.main, "the rank")
    for child in now.children:
        lines += process_lines(child, "its child")
    return lines


def movement_lines(now: RankSnapshot, before: RankSnapshot | None) -> list[str]:
    """Whether the main thread moved between the two snapshots; if it did, where it was first."""
    changed = stack_changed(now, before)
    if before is None or changed is None:
        return []
    span = span_text(now.taken_at - before.taken_at)
    if not changed:
        return [f"main thread: the same stack as {span} s earlier"]
    return [f"main thread: moved; {span} s earlier it was at", *map(details_frame, before.main_frames or ())]


def process_lines(process: ProcessStacks, role: str) -> list[str]:
    """A process's heading and every thread's frames, innermost first."""
    heading = f"process {process.pid} {process.command} ({role})"
    if not process.threads:
        return [f"{heading} · not read: {process.why_not or 'no stacks'}"]
    lines = [f"{heading} · stacks from {process.source}"]
    for thread in process.threads:
        frames = [details_frame(frame) for frame in thread.frames] or ["    no Python frames"]
        lines += [f"  {thread_heading(thread)}", *frames]
    return lines


def thread_heading(thread: ThreadStack) -> str:
    """A thread's heading in the file: 'thread 0x7f3a2c1ff740 "pt_autograd_0" (main)'."""
    name = f' "{thread.name}"' if thread.name else ""
    return f"thread {thread.ident}{name}{' (main)' if thread.is_main else ''}"


def details_frame(frame: StackFrame) -> str:
    """A frame for the file: its whole path, as Python's tracebacks write it."""
    return f'    File "{frame.file}", line {frame.line}, in {frame.function}'
