"""Tables for the stack report's text (launcher/stackreport.py): ranks, frames, groups, reports."""

from __future__ import annotations

import ast
import re
from dataclasses import replace
from pathlib import Path

import pytest

from ddplaunch.snapshot import ProcessStacks, ProcessState, RankSnapshot, StackFrame, ThreadStack
from ddplaunch.stackreport import (
    StackGroup, compact_ranks, cpu_text, display_path, fit, frame_window, group_snapshots, headline, is_user_frame,
    memory_text, output_text, render_details, render_others, render_report,
)

pytestmark = pytest.mark.unit

SITE = "/opt/conda/lib/python3.11/site-packages"
C10D = StackFrame(f"{SITE}/torch/distributed/distributed_c10d.py", 2501, "all_reduce")
LOGGER = StackFrame(f"{SITE}/torch/distributed/c10d_logger.py", 81, "wrapper")
THREADING = StackFrame("/opt/conda/lib/python3.11/threading.py", 327, "wait")
STEP = StackFrame("/home/ana/proj/train.py", 50, "step")
MAIN = StackFrame("/home/ana/proj/train.py", 88, "main")
MODULE = StackFrame("/home/ana/proj/train.py", 92, "<module>")
LOAD = StackFrame("/home/ana/proj/train.py", 31, "load_batch")
IN_ALL_REDUCE = (C10D, LOGGER, STEP, MAIN, MODULE)
IN_LOAD_BATCH = (LOAD, StackFrame("/home/ana/proj/train.py", 48, "step"), MAIN, MODULE)
GiB = 1 << 30


def snap(
    rank: int,
    frames: tuple[StackFrame, ...] | None = IN_ALL_REDUCE,
    *,
    why_not: str | None = None,
    state: ProcessState = "sleeping",
    cpu: float = 100.0,
    at: float = 1000.0,
    since: float | None = 30.0,
    pid: int | None = None,
    host: str | None = None,
    ranks_per_host: int = 4,
) -> RankSnapshot:
    """Rank `rank` of a job of 4 ranks per host (gpu-a, gpu-b, ...), its main thread at `frames`.

    frames=None: its stack went unread, for why_not.
    """
    pid = 51000 + rank if pid is None else pid
    threads = () if frames is None else (ThreadStack("0x00007f3a2c1ff740", "", True, frames),)
    return RankSnapshot(
        host=host or f"gpu-{'abcdefgh'[rank // ranks_per_host]}", rank=rank, local_rank=rank % ranks_per_host,
        pid=pid, state=state, cpu_s=cpu, rss_bytes=3 * GiB, since_output_s=since, taken_at=at,
        main=ProcessStacks(pid, "python", threads, "none" if frames is None else "faulthandler", why_not),
    )


def summary(groups: list[StackGroup]) -> list[tuple[str, str | None, bool | None]]:
    """Each group as (its ranks, its headline function or why unread, moving)."""
    return [(compact_ranks(g.ranks), where(g), g.moving) for g in groups]


def where(group: StackGroup) -> str | None:
    if group.frames is None:
        return group.why_not
    top = headline(group.frames)
    return None if top is None else top.function


def test_the_renderer_imports_only_the_standard_library_and_the_snapshot_types() -> None:
    """Pure: the supervisor imports it, never the other way (no logs, no supervisor, no rich)."""
    source = Path(__file__).resolve().parents[1] / "launcher" / "stackreport.py"
    tree = ast.parse(source.read_text(encoding="utf-8"))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert imported == {"__future__", "re", "collections.abc", "dataclasses", "ddplaunch.snapshot"}


# -- compact_ranks, is_user_frame, headline ------------------------------------------------------


@pytest.mark.parametrize(
    ("ranks", "text"),
    [
        ([3], "3"),
        ([0, 1, 2, 3, 4, 5, 6], "0-6"),
        ([9, 0, 8, 1, 2, 5, 7], "0-2, 5, 7-9"),
        ([4, 5], "4-5"),
        ([1, 3, 5], "1, 3, 5"),
        ([2, 2, 3], "2-3"),
        ([], ""),
    ],
)
def test_compact_ranks(ranks: list[int], text: str) -> None:
    assert compact_ranks(ranks) == text
    assert compact_ranks(iter(ranks)) == text  # any iterable, read once


@pytest.mark.parametrize(
    ("file", "user"),
    [
        ("train.py", True),
        ("/home/ana/proj/train.py", True),
        ("/home/ana/proj/models/attention.py", True),
        ("<string>", True),
        ("/home/ana/torchvision_tricks/aug.py", True),  # "torch" in a name, not a directory
        (f"{SITE}/torch/distributed/distributed_c10d.py", False),
        (f"{SITE}/numpy/core/fromnumeric.py", False),
        ("/usr/lib/python3/dist-packages/yaml/__init__.py", False),
        ("/home/ana/.venv/lib/python3.12/site-packages/datasets/load.py", False),
        ("/home/ana/src/pytorch/torch/nn/modules/module.py", False),  # torch from a checkout
        ("torch/distributed/distributed_c10d.py", False),
        ("/usr/lib/python3.11/threading.py", False),
        ("/opt/conda/lib/python3.11/multiprocessing/connection.py", False),
        ("/home/ana/.pyenv/versions/3.10.14/lib/python3.10/selectors.py", False),
        ("/usr/lib64/python3.9/queue.py", False),
        ("/usr/local/lib/python3.13t/threading.py", False),
        ("<frozen runpy>", False),
        ("<frozen importlib._bootstrap>", False),
    ],
)
def test_is_user_frame(file: str, user: bool) -> None:
    assert is_user_frame(StackFrame(file, 1, "f")) is user


@pytest.mark.parametrize(
    ("frames", "expected"),
    [
        ((C10D, LOGGER, STEP, MAIN, MODULE), STEP),
        ((STEP, MAIN), STEP),
        ((THREADING, C10D), THREADING),  # no user frame: the innermost
        ((), None),
    ],
)
def test_headline_is_the_innermost_user_frame(frames: tuple[StackFrame, ...], expected: StackFrame | None) -> None:
    assert headline(frames) == expected


# -- group_snapshots -----------------------------------------------------------------------------

ALL_REDUCE_BUT_7 = [snap(r, IN_LOAD_BATCH if r == 7 else IN_ALL_REDUCE) for r in range(8)]


@pytest.mark.parametrize(
    ("snapshots", "groups"),
    [
        pytest.param(ALL_REDUCE_BUT_7, [("7", "load_batch", None), ("0-6", "step", None)], id="odd-one-first"),
        pytest.param(ALL_REDUCE_BUT_7[::-1], [("7", "load_batch", None), ("0-6", "step", None)], id="any-order"),
        pytest.param(
            [snap(r, IN_LOAD_BATCH if r in (1, 6) else IN_ALL_REDUCE) for r in range(8)],
            [("1, 6", "load_batch", None), ("0, 2-5, 7", "step", None)],
            id="across-hosts",
        ),
        pytest.param(
            [snap(3, (MAIN,)), snap(2, (STEP,)), snap(1, (STEP,)), snap(0, (LOAD,))],
            [("0", "load_batch", None), ("3", "main", None), ("1-2", "step", None)],
            id="ties-by-lowest-rank",
        ),
        pytest.param(
            [snap(0, (replace(STEP, line=51), MAIN)), snap(1, (STEP, MAIN)), snap(2, (STEP, MAIN))],
            [("0", "step", None), ("1-2", "step", None)],
            id="line-tells-apart",
        ),
        pytest.param(
            [snap(0, (replace(STEP, file="/other/train.py"),)), snap(1, (STEP,)), snap(2, (STEP,))],
            [("0", "step", None), ("1-2", "step", None)],
            id="file-tells-apart",
        ),
        pytest.param(
            [snap(0, (STEP, MAIN)), snap(1, (STEP, MODULE)), snap(2, (STEP, MODULE))],
            [("0", "step", None), ("1-2", "step", None)],
            id="callers-tell-apart",
        ),
        pytest.param(
            [snap(r, None, why_not="process gone" if r == 5 else "no dump in 2 s") for r in range(3, 7)]
            + [snap(r) for r in (0, 1, 2, 7)],
            [("5", "process gone", None), ("3-4, 6", "no dump in 2 s", None), ("0-2, 7", "step", None)],
            id="unread-by-why",
        ),
        pytest.param(
            [snap(0, None), snap(1, None, why_not="py-spy is not installed")],
            [("0", "its stack could not be read", None), ("1", "py-spy is not installed", None)],
            id="unread-without-why",
        ),
        pytest.param([], [], id="none"),
    ],
)
def test_groups(snapshots: list[RankSnapshot], groups: list[tuple[str, str | None, bool | None]]) -> None:
    assert summary(group_snapshots(snapshots)) == groups


def test_a_group_keeps_its_ranks_snapshots_in_rank_order() -> None:
    snapshots = ALL_REDUCE_BUT_7[::-1]
    group = group_snapshots(snapshots)[1]
    assert group.ranks == (0, 1, 2, 3, 4, 5, 6)
    assert group.snapshots == tuple(ALL_REDUCE_BUT_7[:7])
    assert group.frames == IN_ALL_REDUCE and group.why_not is None


def test_a_main_thread_missing_among_threads_is_unread() -> None:
    worker = ThreadStack("0x1", "pt_autograd_0", False, (THREADING,))
    rank = replace(snap(0), main=ProcessStacks(51000, "python", (worker,), "py-spy"))
    (group,) = group_snapshots([rank])
    assert (group.frames, group.why_not) == (None, "no main thread among its threads")


MOVED = (replace(C10D, line=2490),) + IN_ALL_REDUCE[1:]


@pytest.mark.parametrize(
    ("earlier", "later", "groups"),
    [
        pytest.param(ALL_REDUCE_BUT_7, ALL_REDUCE_BUT_7, [("7", "load_batch", False), ("0-6", "step", False)],
                     id="all-stuck"),
        pytest.param(
            [snap(r) for r in range(8)],
            ALL_REDUCE_BUT_7,
            [("7", "load_batch", True), ("0-6", "step", False)],
            id="grouped-by-the-later",
        ),
        pytest.param(
            [snap(r, MOVED if r == 3 else IN_ALL_REDUCE) for r in range(7)],
            [snap(r) for r in range(7)],
            [("0-6", "step", True)],
            id="one-rank-moved-moves-the-group",
        ),
        pytest.param(ALL_REDUCE_BUT_7[:7], ALL_REDUCE_BUT_7, [("7", "load_batch", None), ("0-6", "step", False)],
                     id="no-earlier-for-7"),
        pytest.param(
            [snap(r, pid=60000 + r) for r in range(3)], [snap(r) for r in range(3)], [("0-2", "step", None)],
            id="another-pid-is-not-a-pair",
        ),
        pytest.param(
            [snap(r, host="gpu-z") for r in range(3)], [snap(r) for r in range(3)], [("0-2", "step", None)],
            id="another-host-is-not-a-pair",
        ),
        pytest.param(
            [snap(0), snap(1)], [snap(0), snap(1, None, why_not="process gone")],
            [("0", "step", False), ("1", "process gone", None)],
            id="unread-later",
        ),
        pytest.param(
            [snap(0), snap(1, None)], [snap(0), snap(1)], [("0-1", "step", None)],
            id="unread-earlier-leaves-it-unknown",
        ),
        pytest.param(
            [snap(0, MOVED), snap(1, None)], [snap(0), snap(1)], [("0-1", "step", True)],
            id="one-moved-is-enough",
        ),
    ],
)
def test_stuck_or_moving(
    earlier: list[RankSnapshot], later: list[RankSnapshot], groups: list[tuple[str, str | None, bool | None]]
) -> None:
    assert summary(group_snapshots(later, earlier)) == groups


# -- the facts beside each rank ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "earlier", "previous", "text"),
    [
        pytest.param(snap(0, cpu=100.98, at=1001.0), snap(0, cpu=100.0, at=1000.0), None, "0.98 s in 1.0 s",
                     id="two-snapshots"),
        pytest.param(snap(0, cpu=100.0, at=1001.0), snap(0, cpu=100.0, at=1000.0), None, "0.00 s in 1.0 s",
                     id="two-snapshots-idle"),
        pytest.param(snap(0, cpu=112.5, at=1061.2), None, snap(0, cpu=100.0, at=1000.0), "12.5 s in 61.2 s",
                     id="since-the-last-report"),
        pytest.param(snap(0, cpu=101.0, at=1001.0), snap(0, cpu=100.5, at=1000.0), snap(0, cpu=50.0, at=500.0),
                     "0.50 s in 1.0 s", id="two-snapshots-win"),
        pytest.param(snap(0, cpu=4521.3), None, None, "4521 s since start", id="since-start"),
        pytest.param(snap(0, cpu=3.14159), None, None, "3.14 s since start", id="since-start-small"),
        pytest.param(snap(0, cpu=5.0), None, snap(0, cpu=900.0, at=500.0), "5.00 s since start",
                     id="reused-pid-went-down"),
        pytest.param(snap(0, cpu=5.0, at=1001.0), snap(0, cpu=1.0, pid=4), None, "5.00 s since start",
                     id="another-pid"),
        pytest.param(snap(0, cpu=5.0, at=1001.0), None, snap(0, cpu=1.0, host="gpu-z"), "5.00 s since start",
                     id="another-host"),
        pytest.param(snap(0, cpu=5.0, at=1000.0), snap(0, cpu=1.0, at=1000.0), None, "5.00 s since start",
                     id="not-earlier"),
        pytest.param(snap(0, cpu=907.0, at=1300.0), None, snap(0, cpu=900.0, at=1000.0), "7.00 s in 300 s",
                     id="long-span"),
    ],
)
def test_cpu_text(
    now: RankSnapshot, earlier: RankSnapshot | None, previous: RankSnapshot | None, text: str
) -> None:
    assert cpu_text(now, earlier, previous) == text


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0 KiB"), (512 * 1024, "512 KiB"), (812 * (1 << 20), "812 MiB"), (int(3.14 * GiB), "3.1 GiB"),
     (GiB, "1.0 GiB"), (80 * GiB, "80.0 GiB")],
)
def test_memory_text(size: int, text: str) -> None:
    assert memory_text(size) == text


@pytest.mark.parametrize(
    ("since", "text"), [(None, "no output yet"), (0.42, "0.4 s ago"), (61.25, "61.2 s ago"), (301.4, "301 s ago")]
)
def test_output_text(since: float | None, text: str) -> None:
    assert output_text(since) == text


# -- drawing pieces ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("file", "shown"),
    [
        (f"{SITE}/torch/distributed/distributed_c10d.py", "torch/distributed/distributed_c10d.py"),
        ("/usr/lib/python3/dist-packages/yaml/__init__.py", "yaml/__init__.py"),
        ("/home/ana/.venv/lib/python3.12/site-packages/x/site-packages/y.py", "y.py"),  # the last one
        ("/usr/lib/python3.11/threading.py", "/usr/lib/python3.11/threading.py"),
        ("/home/ana/proj/train.py", "/home/ana/proj/train.py"),
        ("<frozen runpy>", "<frozen runpy>"),
    ],
)
def test_display_path(file: str, shown: str) -> None:
    assert display_path(file) == shown


@pytest.mark.parametrize(
    ("path", "room", "shown"),
    [
        ("/home/ana/proj/train.py", 40, "/home/ana/proj/train.py"),
        ("/home/ana/proj/train.py", 23, "/home/ana/proj/train.py"),
        ("/home/ana/proj/train.py", 22, "…/ana/proj/train.py"),  # at a directory, not "…ome/ana"
        ("/home/ana/proj/train.py", 17, "…/proj/train.py"),
        ("/home/ana/proj/a_rather_long_module_name.py", 16, "…_module_name.py"),  # no directory left to cut at
        ("/home/ana/proj/train.py", 3, "…/proj/train.py"),  # never under 16 columns
    ],
)
def test_fit_keeps_a_paths_end(path: str, room: int, shown: str) -> None:
    assert fit(path, room) == shown
    assert len(shown) <= max(room, 16)


def lib(n: int) -> StackFrame:
    return StackFrame(f"{SITE}/torch/_dynamo/f{n}.py", n, f"f{n}")


@pytest.mark.parametrize(
    ("frames", "limit", "window"),
    [
        pytest.param(IN_ALL_REDUCE, 8, list(IN_ALL_REDUCE), id="all-fit"),
        pytest.param(IN_ALL_REDUCE, 5, list(IN_ALL_REDUCE), id="just-fit"),
        pytest.param(IN_ALL_REDUCE, 3, [C10D, LOGGER, STEP, 2], id="cut-after-the-headline"),
        pytest.param((*map(lib, range(6)), STEP, MAIN), 3, [lib(0), lib(1), 4, STEP, 1], id="headline-kept"),
        pytest.param((*map(lib, range(6)), STEP), 3, [lib(0), lib(1), 4, STEP], id="headline-outermost"),
        pytest.param(tuple(map(lib, range(6))), 3, [lib(0), lib(1), lib(2), 3], id="no-user-frame"),
        pytest.param(IN_ALL_REDUCE, 0, [2, STEP, 2], id="one-is-the-headline"),
        pytest.param((), 3, [], id="empty"),
    ],
)
def test_frame_window(frames: tuple[StackFrame, ...], limit: int, window: list[StackFrame | int]) -> None:
    assert frame_window(frames, limit) == window


# -- render_report -------------------------------------------------------------------------------

ANSI = re.compile("\x1b\\[[0-9;]*m")


def report(snapshots: list[RankSnapshot], **options: object) -> str:
    """render_report without colour, the reason "SIGQUIT (Ctrl-\\)" unless given."""
    options = {"reason": "SIGQUIT (Ctrl-\\)", "colour": False, **options}
    return render_report(snapshots, **options)  # type: ignore[arg-type]


RANK_ROW = re.compile(r"^    (\d+) ", re.M)

# The golden scene: a stall on two hosts of four ranks; ranks 0-6 wait in all_reduce for rank 7,
# whose main thread waits on a queue that its loader thread stopped filling.
TRAIN = "/home/ana/proj/train.py"
OUTER = (
    StackFrame(TRAIN, 71, "train_epoch"),
    StackFrame(TRAIN, 88, "main"),
    StackFrame(f"{SITE}/torch/distributed/elastic/multiprocessing/errors/__init__.py", 355, "wrapper"),
    StackFrame(TRAIN, 92, "<module>"),
    StackFrame("<frozen runpy>", 88, "_run_code"),
    StackFrame("<frozen runpy>", 198, "_run_module_as_main"),
)
GOLDEN_ALL_REDUCE = (C10D, LOGGER, STEP, *OUTER)
GOLDEN_LOAD_BATCH = (
    THREADING,
    StackFrame("/opt/conda/lib/python3.11/queue.py", 180, "get"),
    LOAD,
    StackFrame(TRAIN, 47, "step"),
    *OUTER,
)


def golden_rank(rank: int, later: bool) -> RankSnapshot:
    """Rank `rank` of the golden scene, in its first snapshot or in its second, 1.0 s later."""
    stuck = rank == 7
    snapshot = snap(
        rank,
        GOLDEN_LOAD_BATCH if stuck else GOLDEN_ALL_REDUCE,
        state="sleeping" if stuck else "running",
        cpu=388.5 if stuck else 412.0 + 0.99 * later,
        at=1000.0 + later,
        pid=(51000 if rank < 4 else 48210) + rank % 4,
        since=301.4 + later if rank == 0 else None,  # only rank 0 prints
    )
    return replace(snapshot, rss_bytes=int((2.9 if stuck else 3.1) * GiB))


GOLDEN_EARLIER = [golden_rank(r, later=False) for r in range(8)]
GOLDEN_LATER = [golden_rank(r, later=True) for r in range(8)]

GOLDEN = """\
━━ Where the ranks are: no rank wrote a line for 300 s ━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━
  8 ranks on 2 hosts, grouped by their main thread's stack, most recent call first
  two snapshots per rank: a group is stuck if none of its ranks' stacks changed between them
  full stacks, every thread of every process: /tmp/ddplaunch-51000/stacks-1.txt

  rank 7 · stuck · load_batch at train.py:31
    │ File "/opt/conda/lib/python3.11/threading.py", line 327, in wait
    │ File "/opt/conda/lib/python3.11/queue.py", line 180, in get
    │ File "/home/ana/proj/train.py", line 31, in load_batch
    │ File "/home/ana/proj/train.py", line 47, in step
    │ File "/home/ana/proj/train.py", line 71, in train_epoch
    │ File "/home/ana/proj/train.py", line 88, in main
    │ File "torch/distributed/elastic/multiprocessing/errors/__init__.py", line 355, in wrapper
    │ File "/home/ana/proj/train.py", line 92, in <module>
    │ … 2 more frames, in the full stacks
    rank  local  host   pid    state     cpu              rss      last line
    7     3      gpu-b  48213  sleeping  0.00 s in 1.0 s  2.9 GiB  no output yet

  ranks 0-6 · stuck · step at train.py:50
    │ File "torch/distributed/distributed_c10d.py", line 2501, in all_reduce
    │ File "torch/distributed/c10d_logger.py", line 81, in wrapper
    │ File "/home/ana/proj/train.py", line 50, in step
    │ File "/home/ana/proj/train.py", line 71, in train_epoch
    │ File "/home/ana/proj/train.py", line 88, in main
    │ File "torch/distributed/elastic/multiprocessing/errors/__init__.py", line 355, in wrapper
    │ File "/home/ana/proj/train.py", line 92, in <module>
    │ File "<frozen runpy>", line 88, in _run_code
    │ … 1 more frame, in the full stacks
    rank  local  host   pid    state     cpu              rss      last line
    0     0      gpu-a  51000  running   0.99 s in 1.0 s  3.1 GiB  302 s ago
    1     1      gpu-a  51001  running   0.99 s in 1.0 s  3.1 GiB  no output yet
    2     2      gpu-a  51002  running   0.99 s in 1.0 s  3.1 GiB  no output yet
    3     3      gpu-a  51003  running   0.99 s in 1.0 s  3.1 GiB  no output yet
    4     0      gpu-b  48210  running   0.99 s in 1.0 s  3.1 GiB  no output yet
    5     1      gpu-b  48211  running   0.99 s in 1.0 s  3.1 GiB  no output yet
    6     2      gpu-b  48212  running   0.99 s in 1.0 s  3.1 GiB  no output yet
━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━
"""


def test_golden_stall_report() -> None:
    """The whole layout, pinned: read the text below as the reader of a 100-column terminal would."""
    text = render_report(
        GOLDEN_LATER, reason="no rank wrote a line for 300 s", colour=False, earlier=GOLDEN_EARLIER,
        details_path="/tmp/ddplaunch-51000/stacks-1.txt",
    )
    assert text == GOLDEN
    assert max(map(len, text.splitlines())) <= 100


EIGHT = [snap(r, IN_LOAD_BATCH if r == 7 else IN_ALL_REDUCE) for r in range(8)]


@pytest.mark.parametrize(
    ("snapshots", "options", "present", "absent"),
    [
        pytest.param(
            [snap(0), snap(1)], {},
            ["━━ Where the ranks are: SIGQUIT (Ctrl-\\) ━━━", "  2 ranks on 1 host, grouped by their main thread's stack",
             "  ranks 0-1 · step at train.py:50\n", "100.0 s since start", '    │ File "/home/ana/proj/train.py", line 50'],
            ["stuck", "moving", "two snapshots", "full stacks", "no answer", " more frame"],
            id="sigquit",
        ),
        pytest.param(
            EIGHT, {}, ["  8 ranks on 2 hosts,", "  rank 7 · load_batch at train.py:31\n", "  ranks 0-6 · step at"], [],
            id="eight-on-two-hosts",
        ),
        pytest.param(
            [snap(0, cpu=112.5, at=1061.2)], {"previous": {("gpu-a", 51000): snap(0)}}, ["  12.5 s in 61.2 s  "],
            ["since start"], id="since-the-last-report",
        ),
        pytest.param(
            [snap(0, cpu=112.5, at=1061.2)], {"previous": {("gpu-a", 99): snap(0, pid=99)}}, ["112.5 s since start"],
            [" in 61.2 s"], id="previous-of-another-process",
        ),
        pytest.param(
            [snap(r, cpu=101.0, at=1001.0) for r in range(3)], {"earlier": [snap(0, MOVED), snap(1), snap(2)]},
            ["  two snapshots per rank: a group is stuck if none", "  ranks 0-2 · moving · step at train.py:50\n",
             "  1.00 s in 1.0 s  "],
            ["stuck ·"], id="moving",
        ),
        pytest.param(
            [snap(0, at=1001.0)], {"earlier": [snap(0)]}, ["  rank 0 · stuck · step at train.py:50\n"], ["moving"],
            id="stuck",
        ),
        pytest.param(
            EIGHT[:4], {"unanswered": ["gpu-b", "gpu-c"]},
            ["  4 ranks on 1 host,", "  no answer in time from gpu-b, gpu-c: where their ranks are is unknown\n"], [],
            id="unanswered",
        ),
        pytest.param(
            [], {"unanswered": ["gpu-a"]}, ["  no rank answered\n", "  no answer in time from gpu-a:"], ["0 ranks"],
            id="nobody-answered",
        ),
        pytest.param(
            [snap(5, None, why_not="no dump within 2 s", state="uninterruptible"), snap(6)], {},
            ["  rank 5 · stack not read: no dump within 2 s\n    rank  local", "  uninterruptible  "], [],
            id="unread",
        ),
        pytest.param([snap(0, since=None)], {}, ["  no output yet\n"], [" s ago"], id="no-output-yet"),
        pytest.param([snap(0, ())], {}, ["  rank 0 · no Python frames\n    rank  local"], ["│"], id="no-python-frames"),
        pytest.param([snap(0, since=4.25)], {}, ["  4.2 s ago\n"], ["no output yet"], id="quiet-for"),
        pytest.param(
            [snap(0)], {"details_path": "/tmp/d/stacks-2.txt", "max_frames": 4},
            ["  full stacks, every thread of every process: /tmp/d/stacks-2.txt\n",
             "    │ … 1 more frame, in the full stacks\n"], [], id="details-path",
        ),
        pytest.param(
            [snap(0)], {"max_frames": 2},
            ['    │ File "torch/distributed/distributed_c10d.py", line 2501, in all_reduce\n    │ … 1 more frame\n'
             '    │ File "/home/ana/proj/train.py", line 50, in step\n    │ … 2 more frames\n'],
            ["in wrapper", "full stacks"], id="max-frames-keep-the-headline",
        ),
    ],
)
def test_report_says(
    snapshots: list[RankSnapshot], options: dict[str, object], present: list[str], absent: list[str]
) -> None:
    text = report(snapshots, **options)
    assert [p for p in present if p not in text] == []
    assert [a for a in absent if a in text] == []
    assert not ANSI.search(text)


def test_every_rank_has_one_row_under_its_group() -> None:
    text = report(EIGHT[::-1])
    assert RANK_ROW.findall(text) == ["7", "0", "1", "2", "3", "4", "5", "6"]
    assert text.index("  rank 7 ·") < text.index("    7     3      gpu-b") < text.index("  ranks 0-6 ·")


def test_colour_only_adds_ansi_codes() -> None:
    options = {"reason": "stall", "earlier": GOLDEN_EARLIER, "details_path": "/tmp/s.txt"}
    coloured = render_report(GOLDEN_LATER, colour=True, **options)  # type: ignore[arg-type]
    assert "\x1b[1;31mstuck\x1b[0m" in coloured
    assert '\x1b[2m│\x1b[0m \x1b[2mFile "torch/distributed/distributed_c10d.py"' in coloured  # a library frame: dim
    assert '\x1b[2m│\x1b[0m File "/home/ana/proj/train.py", line 50, in step\n' in coloured  # the user's: not
    assert ANSI.sub("", coloured) == render_report(GOLDEN_LATER, colour=False, **options)  # type: ignore[arg-type]


def test_moving_is_green_in_colour() -> None:
    coloured = render_report([snap(0, at=1001.0)], reason="x", colour=True, earlier=[snap(0, MOVED)])
    assert "\x1b[32mmoving\x1b[0m" in coloured


def test_frames_fit_the_width() -> None:
    deep = (StackFrame("/home/ana/experiments/2026-12-01/big_run/src/train.py", 50, "step"), MAIN)
    text = report([snap(0, deep)], width=60)
    lines = text.splitlines()
    assert lines[-1] == "━" * 60 and lines[0].startswith("━━ ") and len(lines[0]) == 60
    frames = [line for line in lines if line.startswith("    │ File")]
    assert len(frames) == 2 and max(map(len, frames)) <= 60
    assert frames[0] == '    │ File "…/big_run/src/train.py", line 50, in step'


# -- render_others -------------------------------------------------------------------------------

OTHERS = [snap(r, IN_LOAD_BATCH if r == 7 else IN_ALL_REDUCE) for r in range(8) if r != 3]  # 3 failed


@pytest.mark.parametrize(
    ("snapshots", "max_frames", "lines"),
    [
        pytest.param(
            OTHERS, 3,
            [
                "  where the other ranks were just before they were told to stop (most recent call first):",
                "    rank 7 · load_batch at train.py:31",
                '      │ File "/home/ana/proj/train.py", line 31, in load_batch',
                '      │ File "/home/ana/proj/train.py", line 48, in step',
                '      │ File "/home/ana/proj/train.py", line 88, in main',
                "      │ … 1 more frame",
                "    ranks 0-2, 4-6 · step at train.py:50",
                '      │ File "torch/distributed/distributed_c10d.py", line 2501, in all_reduce',
                '      │ File "torch/distributed/c10d_logger.py", line 81, in wrapper',
                '      │ File "/home/ana/proj/train.py", line 50, in step',
                "      │ … 2 more frames",
            ],
            id="headline-and-a-few-frames",
        ),
        pytest.param(
            [snap(0), snap(1), snap(2, None, why_not="process gone")], 1,
            [
                "  where the other ranks were just before they were told to stop (most recent call first):",
                "    rank 2 · stack not read: process gone",
                "    ranks 0-1 · step at train.py:50",
                "      │ … 2 more frames",
                '      │ File "/home/ana/proj/train.py", line 50, in step',
                "      │ … 2 more frames",
            ],
            id="unread-and-one-frame",
        ),
        pytest.param([], 3, [], id="no-others"),
    ],
)
def test_render_others(snapshots: list[RankSnapshot], max_frames: int, lines: list[str]) -> None:
    assert render_others(snapshots, colour=False, max_frames=max_frames) == lines


def test_render_others_in_colour() -> None:
    coloured = render_others(OTHERS, colour=True)
    assert coloured[0].startswith("  \x1b[2mwhere the other ranks") and "\x1b[1mrank 7\x1b[0m" in coloured[1]
    assert [ANSI.sub("", line) for line in coloured] == render_others(OTHERS, colour=False)


# -- render_details ------------------------------------------------------------------------------

AUTOGRAD = ThreadStack("0x00007f3a1bfff640", "pt_autograd_0", False, (THREADING,))
NATIVE = ThreadStack("0x00007f3a0affe640", "", False, ())  # a thread with no Python frames
PREFETCH = ThreadStack("0x00007f39f9ffd640", "prefetch", False, (
    StackFrame("/opt/conda/lib/python3.11/queue.py", 140, "put"), StackFrame("/home/ana/proj/data.py", 12, "fill"),
))
WORKER = ProcessStacks(51100, "pt_data_worker", (ThreadStack("0x1a2b", "MainThread", True, (
    StackFrame(f"{SITE}/torch/utils/data/_utils/worker.py", 308, "_worker_loop"),
    StackFrame("/home/ana/proj/data.py", 40, "__getitem__"),
)),), "py-spy")
UNREAD_WORKER = ProcessStacks(51101, "pt_data_worker", (), "none", "py-spy: permission denied")


def full_rank(rank: int, at: float = 1001.0, frames: tuple[StackFrame, ...] = IN_ALL_REDUCE) -> RankSnapshot:
    """A rank with three threads and two DataLoader workers, one of them unread."""
    base = snap(rank, frames, at=at, cpu=101.0 if at > 1000 else 100.0)
    main = ThreadStack("0x00007f3a2c1ff740", "", True, frames)
    return replace(base, main=replace(base.main, threads=(main, AUTOGRAD, NATIVE, PREFETCH)),
                   children=(WORKER, UNREAD_WORKER))


def test_details_hold_every_thread_of_every_process() -> None:
    text = render_details([full_rank(1), full_rank(0)], reason="SIGQUIT (Ctrl-\\)")
    for rank in (full_rank(0), full_rank(1)):
        block = text[text.index(f"━━ rank {rank.rank} ·") :]
        for process in (rank.main, *rank.children):
            assert f"process {process.pid} {process.command} (" in block
            for thread in process.threads:
                assert thread.ident in block
                for frame in thread.frames:
                    assert f'    File "{frame.file}", line {frame.line}, in {frame.function}\n' in block
    assert text.index("━━ rank 0 ·") < text.index("━━ rank 1 ·")
    assert text.count("process 51101 pt_data_worker (its child) · not read: py-spy: permission denied\n") == 2
    assert not ANSI.search(text)


def test_details_of_one_rank_exactly() -> None:
    text = render_details([full_rank(0)], reason="no rank wrote a line for 300 s", earlier=[full_rank(0, at=1000.0)])
    assert text == """\
ddplaunch stacks: no rank wrote a line for 300 s
1 rank on 1 host; every thread of every process, most recent call first

where the ranks are, smallest group first:
  rank 0 · stuck · step at train.py:50

━━ rank 0 · local rank 0 · host gpu-a · pid 51000
sleeping · cpu 1.00 s in 1.0 s · rss 3.0 GiB · last line 30.0 s ago
main thread: the same stack as 1.0 s earlier
process 51000 python (the rank) · stacks from faulthandler
  thread 0x00007f3a2c1ff740 (main)
    File "/opt/conda/lib/python3.11/site-packages/torch/distributed/distributed_c10d.py", line 2501, in all_reduce
    File "/opt/conda/lib/python3.11/site-packages/torch/distributed/c10d_logger.py", line 81, in wrapper
    File "/home/ana/proj/train.py", line 50, in step
    File "/home/ana/proj/train.py", line 88, in main
    File "/home/ana/proj/train.py", line 92, in <module>
  thread 0x00007f3a1bfff640 "pt_autograd_0"
    File "/opt/conda/lib/python3.11/threading.py", line 327, in wait
  thread 0x00007f3a0affe640
    no Python frames
  thread 0x00007f39f9ffd640 "prefetch"
    File "/opt/conda/lib/python3.11/queue.py", line 140, in put
    File "/home/ana/proj/data.py", line 12, in fill
process 51100 pt_data_worker (its child) · stacks from py-spy
  thread 0x1a2b "MainThread" (main)
    File "/opt/conda/lib/python3.11/site-packages/torch/utils/data/_utils/worker.py", line 308, in _worker_loop
    File "/home/ana/proj/data.py", line 40, in __getitem__
process 51101 pt_data_worker (its child) · not read: py-spy: permission denied
"""


@pytest.mark.parametrize(
    ("now", "earlier", "lines"),
    [
        pytest.param(full_rank(0), [], [], id="one-snapshot"),
        pytest.param(full_rank(0), [full_rank(0, at=1000.0)], ["main thread: the same stack as 1.0 s earlier"],
                     id="same"),
        pytest.param(
            full_rank(0), [full_rank(0, at=1000.0, frames=(LOAD, MAIN))],
            ["main thread: moved; 1.0 s earlier it was at", '    File "/home/ana/proj/train.py", line 31, in load_batch',
             '    File "/home/ana/proj/train.py", line 88, in main'],
            id="moved",
        ),
    ],
)
def test_details_say_whether_the_main_thread_moved(
    now: RankSnapshot, earlier: list[RankSnapshot], lines: list[str]
) -> None:
    text = render_details([now], reason="r", earlier=earlier).splitlines()
    facts = text.index("━━ rank 0 · local rank 0 · host gpu-a · pid 51000") + 1
    assert text[facts + 1 : text.index("process 51000 python (the rank) · stacks from faulthandler")] == lines


def test_details_without_output_or_stacks() -> None:
    rank = snap(4, None, why_not="process gone", state="zombie", since=None)
    text = render_details([rank], reason="r")
    assert "\nzombie · cpu 100.0 s since start · rss 3.0 GiB · no output yet\n" in text
    assert "\nprocess 51004 python (the rank) · not read: process gone\n" in text
    assert "  rank 4 · stack not read: process gone\n" in text
