"""Tables for the stack report's text (launcher/stackreport.py): ranks, frames, groups, reports."""

from __future__ import annotations

from dataclasses import replace

import pytest

from launcher.snapshot import ProcessStacks, ProcessState, RankSnapshot, StackFrame, ThreadStack
from launcher.stackreport import (
    StackGroup, compact_ranks, cpu_text, group_snapshots, headline, is_user_frame, memory_text, output_text,
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
    return [
        (compact_ranks(g.ranks), g.why_not if g.frames is None else getattr(headline(g.frames), "function", None), g.moving)
        for g in groups
    ]


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
        pytest.param(snap(0, cpu=5.0, at=1001.0), snap(0, cpu=1.0, pid=4), None, "5.00 s since start", id="another-pid"),
        pytest.param(snap(0, cpu=5.0, at=1001.0), None, snap(0, cpu=1.0, host="gpu-z"), "5.00 s since start",
                     id="another-host"),
        pytest.param(snap(0, cpu=5.0, at=1000.0), snap(0, cpu=1.0, at=1000.0), None, "5.00 s since start",
                     id="not-earlier"),
        pytest.param(snap(0, cpu=907.0, at=1300.0), None, snap(0, cpu=900.0, at=1000.0), "7.00 s in 300 s",
                     id="long-span"),
    ],
)
def test_cpu_text(now: RankSnapshot, earlier: RankSnapshot | None, previous: RankSnapshot | None, text: str) -> None:
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
