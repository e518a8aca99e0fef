"""The pure parts of --sync planning: exclude matching, ls-files parsing, when to hash, the delta
to a host, and the size cap's message."""

from __future__ import annotations

import pytest

from ddplaunch.errors import LaunchError
from ddplaunch.syncplan import (
    DEFAULT_SYNC_MAX_BYTES, Entry, FileRecord, build_manifest, check_size, is_excluded, needs_hash, parse_ls_files,
    plan_delta, skipped_outside_git,
)

pytestmark = pytest.mark.unit


def rec(size: int = 10, mtime: int = 1, sha: str | None = "a", exe: bool = False) -> FileRecord:
    return FileRecord("file", size, mtime, exe, None, sha)


def link(target: str) -> FileRecord:
    return FileRecord("symlink", len(target), 1, False, target, None)


@pytest.mark.parametrize(("path", "patterns", "excluded"), [
    ("data/x.bin", ["data"], True),  # a component, at the top
    ("a/data/x.bin", ["data"], True),  # a component, at any depth
    ("a/database.py", ["data"], False),  # a component must match whole
    ("a/b/model.ckpt", ["*.ckpt"], True),
    ("runs/2024-01/log.txt", ["runs/2024*"], True),  # the whole path
    ("runs/2023/log.txt", ["runs/2024*"], False),
    ("runs/a/b/c.txt", ["runs/*"], True),  # fnmatch's * crosses '/'
    ("Data/x", ["data"], False),  # case-sensitive on every OS
    ("train.py", [], False),
    ("train.py", ["*.ckpt", "train.py"], True),  # any one pattern is enough
])
def test_excludes_match_the_whole_path_or_any_component(path: str, patterns: list[str], excluded: bool) -> None:
    assert is_excluded(path, patterns) is excluded


@pytest.mark.parametrize(("name", "skipped"), [
    (".git", True), ("__pycache__", True), ("m.pyc", True), ("m.py", False), (".gitignore", False), ("git", False),
])
def test_the_fixed_skips_outside_git(name: str, skipped: bool) -> None:
    assert skipped_outside_git(name) is skipped


def test_ls_files_output_is_split_on_nul_deduplicated_and_undecorated() -> None:
    raw = b"a.py\0dir/with space\nnewline.txt\0conflict.py\0conflict.py\0nested/\0"
    assert parse_ls_files(raw) == ["a.py", "dir/with space\nnewline.txt", "conflict.py", "nested"]
    assert parse_ls_files(b"") == []


FILE = Entry("f", "file", 10, 1, False)


@pytest.mark.parametrize(("old", "new", "hashed"), [
    (None, FILE, True),  # a new file
    (rec(), FILE, False),  # the quick check: same size and mtime
    (rec(mtime=2), FILE, True),  # touched: only the hash tells
    (rec(size=11), FILE, True),
    (rec(sha=None), FILE, True),  # the host's row has no hash to reuse
    (None, Entry("l", "symlink", 3, 1, False, "abc"), False),  # a link has no content to hash
])
def test_a_file_is_hashed_only_when_the_quick_check_fails(old: FileRecord | None, new: Entry, hashed: bool) -> None:
    assert needs_hash(old, new) is hashed


def test_a_manifest_reuses_the_hosts_hash_and_reads_only_what_changed() -> None:
    read: list[str] = []

    def hasher(path: str) -> str:
        read.append(path)
        return "h-" + path

    entries = [Entry("same", "file", 10, 1, False), Entry("touched", "file", 10, 2, False),
               Entry("l", "symlink", 1, 1, False, "x")]
    manifest = build_manifest(entries, {"same": rec(sha="old"), "touched": rec(sha="old")}, hasher)
    assert read == ["touched"]
    assert manifest["same"].sha256 == "old"
    assert manifest["touched"].sha256 == "h-touched"
    assert manifest["l"] == FileRecord("symlink", 1, 1, False, "x", None)


@pytest.mark.parametrize(("local", "remote", "sent"), [
    (rec(), None, True),  # new here
    (rec(), rec(), False),
    (rec(mtime=2), rec(), False),  # touched, same hash: not resent
    (rec(mtime=2, sha="b"), rec(), True),  # same size, other content
    (rec(size=11, sha=None), rec(), True),
    (rec(mtime=2, sha=None), rec(sha=None), True),  # no hashes: mtime decides
    (rec(exe=True), rec(), True),  # chmod +x only
    (link("a"), link("a"), False),
    (link("b"), link("a"), True),  # retargeted
    (link("a"), rec(size=1), True),  # file became a link
])
def test_plan_delta_sends_what_differs_in_content_mode_or_target(
    local: FileRecord, remote: FileRecord | None, sent: bool,
) -> None:
    delta = plan_delta({"p": local}, {} if remote is None else {"p": remote})
    assert delta.send == (("p",) if sent else ())
    assert delta.unchanged == (0 if sent else 1)
    assert delta.send_bytes == (local.size if sent else 0)
    assert delta.unchanged_bytes == (0 if sent else local.size)
    assert delta.delete == ()


def test_plan_delta_deletes_what_is_gone_here_and_counts_the_rest() -> None:
    local = {"b": rec(size=5), "a": rec(size=7), "new": rec(size=3)}
    remote = {"a": rec(size=7), "b": rec(size=5), "old/x": rec(), "gone": rec()}
    delta = plan_delta(local, remote)
    assert delta.send == ("new",)
    assert delta.delete == ("gone", "old/x")
    assert (delta.send_bytes, delta.unchanged, delta.unchanged_bytes) == (3, 2, 12)


def test_a_second_run_with_nothing_changed_sends_nothing() -> None:
    manifest = {f"f{i}": rec(size=i) for i in range(50)}
    delta = plan_delta(manifest, dict(manifest))
    assert (delta.send, delta.delete, delta.unchanged) == ((), (), 50)


def sized(sizes: dict[str, int]) -> list[Entry]:
    return [Entry(path, "file", size, 1, False) for path, size in sizes.items()]


@pytest.mark.parametrize("total", [0, 100])
def test_a_tree_at_or_under_the_cap_passes(total: int) -> None:
    check_size(sized({"a": total}), cap_bytes=100)


def test_the_default_cap_is_one_gib() -> None:
    assert DEFAULT_SYNC_MAX_BYTES == 1024 ** 3
    check_size(sized({"a": DEFAULT_SYNC_MAX_BYTES}))
    with pytest.raises(LaunchError):
        check_size(sized({"a": DEFAULT_SYNC_MAX_BYTES, "b": 1}))


def test_over_the_cap_names_total_cap_flags_and_the_five_largest() -> None:
    sizes = {"small.py": 10, "a.bin": 3 << 20, "b.bin": 2 << 20, "c.bin": 1536, "d.bin": 1536, "e.bin": 2048,
             "f.bin": 1024}
    with pytest.raises(LaunchError) as caught:
        check_size(sized(sizes), cap_bytes=1 << 20)
    message = str(caught.value)
    assert "5.0 MiB in 7 files" in message
    assert "cap of 1.0 MiB" in message
    assert "--sync-max-size" in message and "--sync-exclude" in message
    assert "a.bin (3.0 MiB), b.bin (2.0 MiB), e.bin (2.0 KiB), c.bin (1.5 KiB), d.bin (1.5 KiB)." in message
    assert "f.bin" not in message and "small.py" not in message
