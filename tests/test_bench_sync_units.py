"""The bench's sync row (scripts/bench_nodes.py), its pure parts: the generated tree's layout, the
check of the head's "--sync N.N s" line that fails the row, and the row's verdict."""

from __future__ import annotations

import posixpath
import statistics
from pathlib import Path

import pytest
from bench_nodes import (
    SYNC_BYTES, SYNC_FILES, SYNC_LARGE, SYNC_SEED, SyncRow, SyncTree, sync_seconds, tree_layout,
)

pytestmark = pytest.mark.unit

TREE = SyncTree(Path("/bench/synctree"), SYNC_FILES, SYNC_BYTES, 100, ())
HOSTS = "bench1,bench2"


def test_the_tree_is_2000_paths_of_50_mib_in_100_folders_with_skewed_sizes() -> None:
    layout = tree_layout()
    assert len({item.path for item in layout}) == len(layout) == SYNC_FILES
    assert sum(item.size for item in layout) == SYNC_BYTES
    folders = {posixpath.dirname(item.path) for item in layout} - {""}
    assert len(folders | {posixpath.dirname(f) for f in folders} - {""}) == 100
    large = [item.size for item in layout if item.kind == "large"]
    small = [item.size for item in layout if item.kind == "small"]
    assert len(large) == SYNC_LARGE and min(large) > 1 << 20 and sum(large) > 0.8 * SYNC_BYTES
    assert statistics.median(small) < 4096 and max(small) <= 64 << 10
    assert [item.kind for item in layout].count("executable") == 2


def test_the_link_points_at_a_file_of_the_tree_and_counts_its_target_length() -> None:
    (link,) = [item for item in tree_layout() if item.kind == "link"]
    assert link.target in {item.path for item in tree_layout() if item.kind == "small"}
    assert link.size == len(link.target.encode())


def test_the_same_seed_gives_the_same_tree_and_another_seed_another() -> None:
    assert tree_layout(SYNC_SEED) == tree_layout(SYNC_SEED)
    assert tree_layout(SYNC_SEED) != tree_layout(SYNC_SEED + 1)


@pytest.mark.parametrize("series, said, seconds", [
    ("first", ["ddplaunch: --sync 5.5 s: bench1, bench2: sent 2000 files (50.0 MiB), 0 unchanged"], 5.5),
    ("second", ["ddplaunch: --sync 0.1 s: bench1, bench2: up to date (2000 files)"], 0.1),
])
def test_the_head_s_line_gives_the_sync_s_seconds(series: str, said: list[str], seconds: float) -> None:
    assert sync_seconds(series, said, TREE, HOSTS) == seconds


@pytest.mark.parametrize("series, said", [
    ("second", ["ddplaunch: --sync 0.2 s: bench1, bench2: sent 1 file (8 B), 1999 unchanged"]),  # not up to date
    ("second", ["ddplaunch: --sync 0.1 s: bench1, bench2: up to date (1999 files)"]),  # a file missed
    ("second", ["ddplaunch: --sync 0.1 s: bench1: up to date (2000 files)"]),  # a host missing
    ("second", ["ddplaunch: --sync 0.1 s: bench1: up to date (2000 files)",
                "ddplaunch: --sync 0.1 s: bench2: sent 1 file (8 B), 1999 unchanged"]),  # hosts differ
    ("second", []),  # no --sync at all
    ("first", ["ddplaunch: --sync 0.1 s: bench1, bench2: up to date (2000 files)"]),  # a copy was there
    ("first", ["ddplaunch: --sync 5.5 s: bench1: sent 2000 files (50.0 MiB), 0 unchanged"]),  # a host missing
    ("first", ["ddplaunch: --sync 5.5 s: bench1, bench2: sent 1999 files (50.0 MiB), 1 unchanged"]),
    ("first", ["ddplaunch: --sync 5.5 s: bench1, bench2: sent 2000 files (49.9 MiB), 0 unchanged"]),
])
def test_any_other_line_fails_the_row_naming_what_the_head_said(series: str, said: list[str]) -> None:
    with pytest.raises(RuntimeError, match="the head said") as caught:
        sync_seconds(series, said, TREE, HOSTS)
    assert all(line in str(caught.value) for line in said)


def row(plain: float | None, second: float | None, errors: tuple[str, ...] = ()) -> SyncRow:
    series = {"plain": [plain], "first": [5.0], "second": [second]}
    return SyncRow("sync", "sync", series, {"left_behind": [0]}, list(errors))


@pytest.mark.parametrize("plain, second, errors, ok", [
    (1.0, 1.3, (), True),
    (1.0, 1.6, (), False),  # more than SYNC_EXTRA_S over a run without --sync
    (1.0, 1.1, ("rep 2 second: not up to date",), False),  # an error fails the row, whatever the times
    (1.0, None, ("rep 1 second: not up to date",), False),
    (1.0, None, (), None),
])
def test_the_row_passes_only_when_second_is_within_half_a_second_of_plain_and_nothing_failed(
        plain: float, second: float | None, errors: tuple[str, ...], ok: bool | None) -> None:
    assert row(plain, second, errors).ok() is ok
