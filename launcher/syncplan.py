"""What `--sync` would send: which files of a directory go, their manifest, and the delta to a host.

Planning is pure (exclude rules, `needs_hash`, `plan_delta`, `check_size`); the I/O is kept to
three small functions: one `git ls-files` run, `lstat` of the chosen files, and hashing a file.

Exclude semantics (`excludes`, the later `--sync-exclude PATTERN`): a pattern is an
`fnmatch.fnmatchcase` pattern (case-sensitive on every OS, so a host never disagrees with the
head) matched against the whole relative POSIX path *and* against each of its components; a
match on either excludes the file. So `data` drops a directory named data at any depth, `*.ckpt`
drops checkpoints anywhere, `runs/2024*` one path prefix. fnmatch's `*` also matches `/`, so
`runs/*` drops everything under `runs`. The patterns apply inside and outside git alike.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import posixpath
import re
import shlex
import stat
import subprocess
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ddplaunch.errors import LaunchError

DEFAULT_SYNC_MAX_BYTES = 1 << 30
LARGEST_SHOWN = 5
# Outside git: what is rebuilt on the host or belongs to this machine only.
SKIPPED_DIRS = frozenset({".git", "__pycache__"})
SKIPPED_FILES = ("*.pyc",)
VENV_MARKER = "pyvenv.cfg"  # every venv / virtualenv root has one (PEP 405)
HASH_CHUNK = 1 << 20

Kind = Literal["file", "symlink"]


@dataclass(frozen=True)
class Entry:
    """One file chosen to go, as `lstat` saw it (a symlink is sent as a link, never followed)."""

    path: str  # relative to the synced root, POSIX separators
    kind: Kind
    size: int  # a symlink's is the length of its target
    mtime_ns: int
    executable: bool  # the owner's x bit; the only mode bit that is kept
    target: str | None = None  # a symlink's target, as written


@dataclass(frozen=True)
class FileRecord:
    """A manifest row: what a host has (or will have) at one path."""

    kind: Kind
    size: int
    mtime_ns: int
    executable: bool
    target: str | None
    sha256: str | None  # None for symlinks, and for a row whose hash was never needed


Manifest = Mapping[str, FileRecord]


@dataclass(frozen=True)
class Delta:
    """What to do on one host: send these, delete those; the rest is already there."""

    send: tuple[str, ...]
    delete: tuple[str, ...]
    send_bytes: int
    unchanged: int
    unchanged_bytes: int


# -- which files (pure) ----------------------------------------------------------------------------


def is_excluded(rel_path: str, patterns: Sequence[str]) -> bool:
    """True when a pattern matches the whole relative path or any one of its components."""
    parts = rel_path.split("/")
    return any(
        fnmatch.fnmatchcase(rel_path, pattern) or any(fnmatch.fnmatchcase(part, pattern) for part in parts)
        for pattern in patterns
    )


def skipped_outside_git(name: str) -> bool:
    """The fixed rule outside a git work tree, for a file or directory name."""
    return name in SKIPPED_DIRS or any(fnmatch.fnmatchcase(name, pattern) for pattern in SKIPPED_FILES)


def parse_ls_files(output: bytes) -> list[str]:
    """`git ls-files -z` output -> unique relative paths, in order.

    An unmerged file is listed once per stage, and an untracked nested repository as 'dir/':
    the first is deduplicated, the second left for `lstat` to drop as a directory."""
    seen: dict[str, None] = {}
    for raw in output.split(b"\0"):
        if raw:
            seen.setdefault(os.fsdecode(raw).rstrip("/"), None)
    return list(seen)


# -- which files (I/O) -----------------------------------------------------------------------------


def git_listing(root: Path) -> bytes | None:
    """The tracked and untracked-but-not-ignored files under root, or None outside a work tree."""
    try:
        done = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root, capture_output=True, check=False, timeout=60,
        )
    except FileNotFoundError:  # no git here: the directory is synced as a plain one
        return None
    return done.stdout if done.returncode == 0 else None


def stat_entry(root: Path, rel_path: str) -> Entry | None:
    """An Entry for a regular file or symlink; None for a path gone from disk or a directory
    (a submodule or a nested repository: its files are not this tree's)."""
    full = root / rel_path
    try:
        st = full.lstat()
    except FileNotFoundError:  # deleted here but still in the index
        return None
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(full)
        return Entry(rel_path, "symlink", len(os.fsencode(target)), st.st_mtime_ns, False, target)
    if not stat.S_ISREG(st.st_mode):
        return None
    return Entry(rel_path, "file", st.st_size, st.st_mtime_ns, bool(st.st_mode & stat.S_IXUSR))


def walk_plain(root: Path, excludes: Sequence[str] = ()) -> Iterator[str]:
    """Relative paths of a directory that is not a git work tree, fixed skips already applied;
    an excluded directory is not entered at all (it may be a large data set)."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        rel_dir = here.relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        kept: list[str] = []
        for name in dirnames:
            if (here / name).is_symlink():
                filenames.append(name)  # a link to a directory goes as a link
            elif not skipped_outside_git(name) and not is_excluded(prefix + name, excludes) \
                    and not (here / name / VENV_MARKER).exists():
                kept.append(name)
        dirnames[:] = kept  # os.walk descends only into what is left here
        yield from (prefix + name for name in filenames if not skipped_outside_git(name))


def select_files(root: Path, excludes: Sequence[str] = ()) -> list[Entry]:
    """The files of root that `--sync` sends, sorted by path."""
    listing = git_listing(root)
    paths: Iterable[str] = walk_plain(root, excludes) if listing is None else parse_ls_files(listing)
    chosen = (stat_entry(root, path) for path in paths if not is_excluded(path, excludes))
    return sorted((entry for entry in chosen if entry is not None), key=lambda entry: entry.path)


# -- manifest and delta (pure, hashing injected) ---------------------------------------------------


def needs_hash(old: FileRecord | None, new: Entry) -> bool:
    """Hash a file unless the host's row has the same size and mtime (rsync's quick check):
    then its recorded hash is taken as ours, and a tree where nothing changed reads no file."""
    if new.kind != "file":
        return False
    return old is None or old.sha256 is None or (old.size, old.mtime_ns) != (new.size, new.mtime_ns)


def record_of(entry: Entry, old: FileRecord | None, hash_file: Callable[[str], str]) -> FileRecord:
    """The manifest row for entry, hashing only when `needs_hash` says so."""
    if needs_hash(old, entry):
        sha: str | None = hash_file(entry.path)
    else:
        sha = old.sha256 if old is not None and entry.kind == "file" else None
    return FileRecord(entry.kind, entry.size, entry.mtime_ns, entry.executable, entry.target, sha)


def build_manifest(entries: Iterable[Entry], remote: Manifest, hash_file: Callable[[str], str]) -> dict[str, FileRecord]:
    """The local manifest, reusing the host's hashes where size and mtime agree."""
    return {entry.path: record_of(entry, remote.get(entry.path), hash_file) for entry in entries}


def same_content(local: FileRecord, remote: FileRecord) -> bool:
    """Equal sizes and hashes; without both hashes, equal sizes and mtimes."""
    if local.size != remote.size:
        return False
    if local.sha256 is not None and remote.sha256 is not None:
        return local.sha256 == remote.sha256
    return local.mtime_ns == remote.mtime_ns


def is_unchanged(local: FileRecord, remote: FileRecord | None) -> bool:
    if remote is None or (local.kind, local.executable, local.target) != (remote.kind, remote.executable, remote.target):
        return False
    return local.kind == "symlink" or same_content(local, remote)


def plan_delta(local: Manifest, remote: Manifest) -> Delta:
    """What a host with `remote` needs to end up with `local`. Paths are sorted; a host applies
    the deletes before the sends, so a file that became a directory (or back) makes way."""
    send = sorted(path for path, record in local.items() if not is_unchanged(record, remote.get(path)))
    kept = [record for path, record in local.items() if is_unchanged(record, remote.get(path))]
    return Delta(
        send=tuple(send),
        delete=tuple(sorted(set(remote) - set(local))),
        send_bytes=sum(local[path].size for path in send),
        unchanged=len(kept),
        unchanged_bytes=sum(record.size for record in kept),
    )


def sha256_file(root: Path) -> Callable[[str], str]:
    """The hasher `build_manifest` takes, reading files under root (the one I/O of this part)."""

    def hash_one(rel_path: str) -> str:
        digest = hashlib.sha256()
        with open(root / rel_path, "rb") as file:
            for chunk in iter(lambda: file.read(HASH_CHUNK), b""):
                digest.update(chunk)
        return digest.hexdigest()

    return hash_one


# -- size cap (pure) -------------------------------------------------------------------------------


def human_bytes(count: int) -> str:
    """1536 -> '1.5 KiB': binary units, as the cap itself is given."""
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{count} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def check_size(entries: Sequence[Entry], cap_bytes: int = DEFAULT_SYNC_MAX_BYTES) -> None:
    """Refuse a tree over the cap before anything is sent, naming what makes it large."""
    total = sum(entry.size for entry in entries)
    if total <= cap_bytes:
        return
    largest = sorted(entries, key=lambda entry: (-entry.size, entry.path))[:LARGEST_SHOWN]
    shown = ", ".join(f"{entry.path} ({human_bytes(entry.size)})" for entry in largest)
    raise LaunchError(
        f"--sync would copy {human_bytes(total)} in {len(entries)} files, over the cap of "
        f"{human_bytes(cap_bytes)}. The largest: {shown}. Leave them out with --sync-exclude PATTERN "
        f"(or .gitignore), or raise the cap with --sync-max-size."
    )


# -- the host's record of what it holds (pure) -----------------------------------------------------

MANIFEST_NAME = ".ddplaunch-sync.json"  # in the synced directory itself: gone with it, never stale
MANIFEST_VERSION = 1


def manifest_bytes(manifest: Manifest) -> bytes:
    """The record a host keeps of what it was sent: compact JSON, one row per path."""
    rows = {
        path: [r.kind, r.size, r.mtime_ns, r.executable, r.target, r.sha256]
        for path, r in sorted(manifest.items())
    }
    return json.dumps({"version": MANIFEST_VERSION, "files": rows}, separators=(",", ":")).encode()


def manifest_from_bytes(data: bytes) -> dict[str, FileRecord]:
    """A host's record back; anything unreadable counts as an empty one (everything is sent again)."""
    try:
        document = json.loads(data)
        if document.get("version") != MANIFEST_VERSION:
            return {}
        return {str(path): _record(row) for path, row in document["files"].items()}
    except (ValueError, TypeError, KeyError, AttributeError):
        return {}


def _record(row: Sequence[object]) -> FileRecord:
    kind, size, mtime_ns, executable, target, sha = row
    if kind not in ("file", "symlink") or not isinstance(size, int) or not isinstance(mtime_ns, int):
        raise ValueError(row)
    return FileRecord(
        "file" if kind == "file" else "symlink", size, mtime_ns, bool(executable),
        None if target is None else str(target), None if sha is None else str(sha),
    )


def interim_manifest(remote: Manifest, local: Manifest, delta: Delta) -> dict[str, FileRecord]:
    """What a host may claim while its delta is applied: only the rows that stay as they are.
    Written before the first change, so a sync cut short leaves no row that lies."""
    changing = set(delta.send) | set(delta.delete)
    return {path: local[path] for path in remote if path in local and path not in changing}


# -- where the copy goes, and what runs there (pure) ----------------------------------------------

SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """--sync-max-size: bytes, or a number with K, M, G or T (binary: 1G is 1 GiB; KiB, MB... too)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if match is None or (match.group(2) == "" and text.strip().upper().endswith("IB")):
        raise LaunchError(
            f"--sync-max-size {text!r}: give a size such as 500M, 2G or 1073741824 (bytes; K, M, G, T are "
            "binary units)."
        )
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()])


def default_remote_dir(cache: str, head_host: str, root: str) -> str:
    """This directory's copy on a host: one per head host and directory, under the per-user
    cache (relative to the remote home unless the cache is absolute), readable by its name."""
    tag = hashlib.sha256(f"{head_host}:{root}".encode()).hexdigest()[:8]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", f"{head_host}-{posixpath.basename(root) or 'root'}")
    return posixpath.join(cache, "sync", f"{name}-{tag}")


def script_in_copy(script: str, root: str, synced: Sequence[str]) -> str:
    """The script's path as the workers on a host see it (relative to the copy); an error when
    the copy would not hold it, which the host would otherwise report as a missing file."""
    relative = script
    if posixpath.isabs(script):
        relative = posixpath.relpath(script, root)
        if relative == ".." or relative.startswith("../"):
            raise LaunchError(
                f"--sync copies {root} to the hosts, and {script} is outside it. Run ddplaunch from a "
                "directory that holds the script, or drop --sync and put it at that path on every host."
            )
    relative = posixpath.normpath(relative)
    if relative not in synced and not any(path.startswith(relative.rstrip("/") + "/") for path in synced):
        raise LaunchError(
            f"--sync would not send {script}: it is ignored by git, left out by --sync-exclude, or not "
            f"in {root}. Commit or un-ignore it (git check-ignore -v {shlex.quote(relative)} says why), "
            "or change --sync-exclude."
        )
    return relative
