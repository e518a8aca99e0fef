"""Which files --sync picks from a real directory: a real git work tree (tracked, untracked,
ignored, deleted, exec bit, symlink), a plain directory with the fixed skips, and the excludes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from ddplaunch.syncplan import Entry, build_manifest, plan_delta, select_files, sha256_file

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", "-c", "init.defaultBranch=main"]


def git(root: Path, *args: str) -> None:
    subprocess.run([*GIT, *args], cwd=root, check=True, capture_output=True, timeout=30)


def write(root: Path, rel: str, text: str = "x") -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def by_path(entries: list[Entry]) -> dict[str, Entry]:
    return {entry.path: entry for entry in entries}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q")
    write(root, ".gitignore", "*.log\nbuild/\n")
    write(root, "train.py", "print(1)\n")
    write(root, "pkg/model.py", "m = 1\n")
    write(root, "run.sh", "#!/bin/sh\n").chmod(0o755)
    write(root, "deleted.py")
    (root / "latest").symlink_to("pkg/model.py")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "base")
    (root / "deleted.py").unlink()  # in the index, gone from disk
    write(root, "notes.md")  # untracked, not ignored
    write(root, "out.log")  # ignored
    write(root, "build/lib.so")  # ignored directory
    return root


def test_a_git_tree_sends_tracked_and_untracked_files_but_not_ignored_or_deleted(repo: Path) -> None:
    entries = by_path(select_files(repo))
    assert sorted(entries) == [".gitignore", "latest", "notes.md", "pkg/model.py", "run.sh", "train.py"]
    assert entries["run.sh"].executable and not entries["train.py"].executable
    assert entries["latest"] == Entry("latest", "symlink", len("pkg/model.py"), entries["latest"].mtime_ns, False,
                                      "pkg/model.py")
    assert entries["train.py"].kind == "file" and entries["train.py"].size == len("print(1)\n")


def test_a_subdirectory_of_a_work_tree_lists_paths_relative_to_itself(repo: Path) -> None:
    assert [entry.path for entry in select_files(repo / "pkg")] == ["model.py"]


def test_excludes_apply_inside_git(repo: Path) -> None:
    assert sorted(by_path(select_files(repo, ["pkg", "*.md"]))) == [".gitignore", "latest", "run.sh", "train.py"]


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    root = tmp_path / "plain"
    write(root, "train.py")
    write(root, "data/a.bin", "abc")
    write(root, ".git/HEAD")
    write(root, "pkg/__pycache__/m.cpython-312.pyc")
    write(root, "pkg/m.py")
    write(root, "pkg/stale.pyc")
    write(root, ".venv/pyvenv.cfg")
    write(root, ".venv/lib/site.py")
    write(root, "env2/pyvenv.cfg")  # a venv under any name
    write(root, "tool.sh").chmod(0o755)
    (root / "data_link").symlink_to("data")  # a link to a directory goes as a link
    return root


def test_a_plain_directory_skips_git_caches_bytecode_and_virtualenvs(plain: Path) -> None:
    entries = by_path(select_files(plain))
    assert sorted(entries) == ["data/a.bin", "data_link", "pkg/m.py", "tool.sh", "train.py"]
    assert entries["data_link"].kind == "symlink" and entries["data_link"].target == "data"
    assert entries["tool.sh"].executable


def test_excludes_apply_outside_git(plain: Path) -> None:
    assert sorted(by_path(select_files(plain, ["data", "tool.*"]))) == ["data_link", "pkg/m.py", "train.py"]
    assert sorted(by_path(select_files(plain, ["data/*"]))) == ["data_link", "pkg/m.py", "tool.sh", "train.py"]


def test_a_touched_file_is_hashed_and_not_resent_an_edited_one_is(plain: Path) -> None:
    first = build_manifest(select_files(plain), {}, sha256_file(plain))
    assert plan_delta(first, first).send == ()
    os.utime(plain / "train.py", ns=(1, 1))  # same bytes, new mtime
    write(plain, "pkg/m.py", "y")  # same size, new bytes
    os.utime(plain / "pkg/m.py", ns=(2, 2))  # a coarse clock must not hide the edit
    (plain / "data/a.bin").unlink()
    second = build_manifest(select_files(plain), first, sha256_file(plain))
    delta = plan_delta(second, first)
    assert delta.send == ("pkg/m.py",)
    assert delta.delete == ("data/a.bin",)
    assert second["train.py"].sha256 == first["train.py"].sha256
