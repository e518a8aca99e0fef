"""--sync without a server: the pure parts (the host's record, sizes, the remote folder, the
script's path in the copy, what a run and a dry run say) by tables, and one host's sync
(ddplaunch.sync.sync_host) against this machine's disk through a fake SFTP client, where
faults can be injected: deletes before sends, a file that became a folder, a link that became
a file, an exec bit lost, and a sync cut short that leaves no row that lies."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
from helpers_sftp import LocalSftp

from ddplaunch.errors import LaunchError
from ddplaunch.job import refuse_sync_without_hosts
from ddplaunch.sync import (
    HostProgress, SyncSource, dry_run_lines, source_of, summaries, sync_host, why_failed, Hasher, Unwritable,
)
from ddplaunch.syncplan import (
    MANIFEST_NAME, Delta, FileRecord, default_remote_dir, interim_manifest, manifest_bytes, manifest_from_bytes,
    parse_size, script_in_copy, select_files,
)
from helpers_cli import head_options

pytestmark = pytest.mark.unit

FILE = FileRecord("file", 3, 10, False, None, "ab" * 32)
LINK = FileRecord("symlink", 5, 11, False, "a/b.py", None)


# -- the host's record ----------------------------------------------------------------------------


def test_a_record_reads_back_and_anything_unreadable_is_an_empty_one() -> None:
    manifest = {"a.py": FILE, "dir/link": LINK, "run.sh": FileRecord("file", 0, 1, True, None, None)}
    assert manifest_from_bytes(manifest_bytes(manifest)) == manifest
    for garbage in (b"", b"{", b"[]", b'{"version": 2, "files": {}}', b'{"version": 1, "files": {"a": [1]}}',
                    b'{"version": 1, "files": {"a": ["dir", 1, 1, false, null, null]}}'):
        assert manifest_from_bytes(garbage) == {}, garbage


def test_the_record_written_before_changes_lists_only_rows_that_stay() -> None:
    remote = {"keep.py": FILE, "change.py": FILE, "gone.py": FILE}
    local = {"keep.py": FILE, "change.py": FileRecord("file", 4, 12, False, None, "cd" * 32), "new.py": FILE}
    delta = Delta(send=("change.py", "new.py"), delete=("gone.py",), send_bytes=7, unchanged=1, unchanged_bytes=3)
    assert interim_manifest(remote, local, delta) == {"keep.py": FILE}


# -- sizes, folders, the script ---------------------------------------------------------------------


@pytest.mark.parametrize(("text", "size"), [
    ("1024", 1024), ("1K", 1024), ("500M", 500 << 20), ("2G", 2 << 30), ("2GiB", 2 << 30), ("1.5g", 3 << 29),
    ("3 MB", 3 << 20), ("1T", 1 << 40),
])
def test_sync_max_size_reads_binary_units(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "big", "-1G", "1X", "1 iB", "G"])
def test_a_bad_sync_max_size_names_the_flag_and_the_form(text: str) -> None:
    with pytest.raises(LaunchError, match=r"--sync-max-size .*500M, 2G"):
        parse_size(text)


def test_the_default_copy_is_one_per_head_host_and_directory_readable_by_name() -> None:
    first = default_remote_dir(".cache/ddplaunch", "gpu-box", "/home/me/nanoGPT")
    assert first.startswith(".cache/ddplaunch/sync/gpu-box-nanoGPT-") and len(first.rsplit("-", 1)[1]) == 8
    assert first == default_remote_dir(".cache/ddplaunch", "gpu-box", "/home/me/nanoGPT")  # stable
    assert first != default_remote_dir(".cache/ddplaunch", "laptop", "/home/me/nanoGPT")
    assert first != default_remote_dir(".cache/ddplaunch", "gpu-box", "/tmp/nanoGPT")
    odd = default_remote_dir("/scratch/c", "box", "/home/me/my proj;$(x)")
    assert odd.startswith("/scratch/c/sync/box-my_proj___x_-")


SYNCED = ["train.py", "pkg/__main__.py", "pkg/model.py", "tools/run.sh"]


@pytest.mark.parametrize(("script", "expected"), [
    ("train.py", "train.py"), ("./train.py", "train.py"), ("/home/me/proj/train.py", "train.py"),
    ("pkg", "pkg"), ("/home/me/proj/tools/run.sh", "tools/run.sh"),
])
def test_the_script_is_named_as_the_copy_holds_it(script: str, expected: str) -> None:
    assert script_in_copy(script, "/home/me/proj", SYNCED) == expected


@pytest.mark.parametrize(("script", "message"), [
    ("/home/me/other/train.py", "outside it"),
    ("ignored.py", "would not send ignored.py: it is ignored by git, left out by --sync-exclude"),
    ("../proj2/x.py", "would not send"),
])
def test_a_script_the_copy_would_not_hold_is_refused_before_any_host_is_contacted(script: str, message: str) -> None:
    with pytest.raises(LaunchError, match=message):
        script_in_copy(script, "/home/me/proj", SYNCED)


def test_sync_companions_need_sync_and_sync_needs_hosts(tmp_path: Path) -> None:
    with pytest.raises(LaunchError, match="--sync-exclude only mean something with --sync"):
        source_of(head_options(sync_exclude=("data",)), {}, str(tmp_path))
    for given in ({"sync": True}, {"sync_max_size": "1G"}):
        with pytest.raises(LaunchError, match="copies this directory to the hosts of --hosts or --hostfile"):
            refuse_sync_without_hosts(head_options(**given))
    refuse_sync_without_hosts(head_options())


def test_the_size_cap_and_chdir_are_read_before_any_host_is_contacted(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"\0" * 3000)
    (tmp_path / MANIFEST_NAME).write_text("{}")  # a copy's own record never goes (nested syncs)
    with pytest.raises(LaunchError, match=r"over the cap of 2.0 KiB\. The largest: model\.bin \(2\.9 KiB\)"):
        source_of(head_options(sync=True, sync_max_size="2K"), {}, str(tmp_path))
    source = source_of(head_options(sync=True, chdir="~/work/proj/"), {}, str(tmp_path))
    assert source is not None and (source.remote_dir, source.shown_dir, source.private) == ("work/proj", "~/work/proj", False)
    assert [entry.path for entry in source.entries] == ["model.bin"]
    cached = source_of(head_options(sync=True), {"DDPLAUNCH_AGENT_CACHE": "/scratch/dd"}, str(tmp_path))
    assert cached is not None and cached.private and cached.remote_dir.startswith("/scratch/dd/sync/")


# -- what it says ------------------------------------------------------------------------------------


def delta(send: int, delete: int = 0, unchanged: int = 0) -> Delta:
    return Delta(tuple(f"s{i}.py" for i in range(send)), tuple(f"d{i}.py" for i in range(delete)), 2048 * send,
                 unchanged, 0)


def test_hosts_alike_share_a_line_and_each_outcome_is_said_once() -> None:
    states = [HostProgress("a", delta(0, unchanged=5)), HostProgress("b", delta(0, unchanged=5)),
              HostProgress("c", delta(1, 2, 4))]
    assert summaries(states) == ["a, b: up to date (5 files)", "c: sent 1 file (2.0 KiB), deleted 2, 4 unchanged"]
    assert HostProgress("c", delta(3)).line() == "c: 0/3 files, 0 B/6.0 KiB"


def test_a_dry_run_lists_per_host_what_would_go_and_stops_listing_at_a_count(tmp_path: Path) -> None:
    source = SyncSource(tmp_path, (), ".cache/ddplaunch/sync/x", private=True)
    lines = dry_run_lines(source, [("a", delta(30, 1, 2)), ("b", delta(30, 1, 2)), ("c", delta(0, unchanged=2))])
    assert "  a, b: would send 30 files (60.0 KiB), delete 1; 2 unchanged" in lines
    assert "    send    s0.py" in lines and "    ... and 11 more" in lines and "  c: nothing, up to date (2 files)" in lines
    assert "to ~/.cache/ddplaunch/sync/x on every host" in lines[1]


def test_a_failure_names_the_folder_and_the_fix(tmp_path: Path) -> None:
    source = SyncSource(tmp_path, (), "/data/proj", private=False)
    assert why_failed(source, Unwritable("Permission denied")) == (
        "cannot make the folder /data/proj for --sync there (Permission denied); pass --chdir DIR to a folder "
        "you can write on every host.")
    assert "cannot write the copy at /data/proj there (Permission denied)" in why_failed(
        source, PermissionError(13, "Permission denied", "/data/proj/x"))
    assert why_failed(source, OSError(28, "No space left on device", "/data/proj/big")) == (
        "--sync to /data/proj failed: No space left on device (/data/proj/big)")


# -- one host's sync, on this machine's disk -------------------------------------------------------------


def tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if text.startswith("->"):
            path.symlink_to(text[2:])
        else:
            path.write_text(text)


def sync(here: Path, home: Path, sftp: LocalSftp | None = None) -> HostProgress:
    source = SyncSource(here, tuple(select_files(here)), "copy", private=True)
    progress = HostProgress("h")
    client = sftp or LocalSftp(home)
    sync_host(lambda: client, source, Hasher(here), progress, threading.Event())
    return progress


def contents(root: Path) -> dict[str, str]:
    found = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[rel] = "->" + os.readlink(path)
        elif path.is_file() and rel != MANIFEST_NAME:
            found[rel] = path.read_text()
    return found


def test_a_host_ends_with_this_tree_whatever_it_held(tmp_path: Path) -> None:
    here, home = tmp_path / "here", tmp_path / "home"
    tree(here, {"a.py": "1", "thing": "a file", "link": "->a.py", "run.sh": "#!/bin/sh", "old/x.py": "x"})
    (here / "run.sh").chmod(0o755)
    home.mkdir()
    first = sync(here, home)
    assert first.planned is not None and len(first.planned.send) == 5 and first.files == 5
    assert contents(home / "copy") == contents(here)
    assert stat.S_IMODE((home / "copy" / "run.sh").stat().st_mode) & 0o100
    assert stat.S_IMODE((home / "copy").stat().st_mode) == 0o700  # ddplaunch's cache: private

    # A file became a folder, a link became a file, a folder emptied, an exec bit dropped.
    (here / "thing").unlink()
    tree(here, {"thing/inner.py": "in"})
    (here / "link").unlink()
    tree(here, {"link": "now a file"})
    (here / "old" / "x.py").unlink()
    (here / "old").rmdir()
    (here / "run.sh").chmod(0o644)
    target_of_old_link = (home / "copy" / "a.py").read_text()
    second = sync(here, home)
    assert second.planned is not None and second.planned.delete == ("old/x.py", "thing")
    assert contents(home / "copy") == contents(here)
    assert (home / "copy" / "a.py").read_text() == target_of_old_link  # not written through the old link
    assert not (home / "copy" / "old").exists()
    assert not stat.S_IMODE((home / "copy" / "run.sh").stat().st_mode) & 0o111

    untouched = LocalSftp(home)
    assert sync(here, home, untouched).summary() == "up to date (4 files)" and untouched.writes == 0


def test_a_sync_cut_short_sends_again_what_it_may_not_have_finished(tmp_path: Path) -> None:
    here, home = tmp_path / "here", tmp_path / "home"
    tree(here, {"a.py": "1", "b.py": "2"})
    home.mkdir()
    sync(here, home)
    (here / "a.py").write_text("one, changed")
    broken = LocalSftp(home, fail_on=lambda op, path: op == "write" and path.endswith("a.py"))
    with pytest.raises(PermissionError):
        sync(here, home, broken)
    record = manifest_from_bytes((home / "copy" / MANIFEST_NAME).read_bytes())
    assert set(record) == {"b.py"}  # a.py may be half written: it is not claimed
    (here / "a.py").write_text("1")  # even back to the content the host had before
    assert sync(here, home).summary() == "sent 1 file (1 B), 1 unchanged"
    assert (home / "copy" / "a.py").read_text() == "1"


def test_a_folder_that_cannot_be_made_is_unwritable(tmp_path: Path) -> None:
    here, home = tmp_path / "here", tmp_path / "home"
    tree(here, {"a.py": "1"})
    home.mkdir()
    with pytest.raises(Unwritable, match="Permission denied"):
        sync(here, home, LocalSftp(home, fail_on=lambda op, path: op == "mkdir"))
