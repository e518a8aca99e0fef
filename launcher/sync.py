"""`--sync`: this directory's copy on every host, brought up to date over SFTP before anything starts.

The planning is ddplaunch.syncplan's (which files, the manifest, the delta); this module does
the I/O on the SSH connections the head already holds: no second login, and no shell command
with a file name in it. Per host: read the record the copy keeps of itself (syncplan.MANIFEST_NAME),
plan the delta, write a record of only what stays, delete, make folders, send (over a few SFTP
channels of the one connection at once: SFTP waits a round trip per file), then write the full
record. Hosts go in parallel, each on its own thread; the first host that fails stops the rest,
and nothing starts anywhere. A copy already up to date costs one read of its record.
"""

from __future__ import annotations

import errno
import os
import posixpath
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddplaunch.errors import LaunchError
from ddplaunch.ship import make_dir, make_dirs
from ddplaunch.syncplan import (
    MANIFEST_NAME, Delta, Entry, FileRecord, Manifest, build_manifest, human_bytes, interim_manifest, manifest_bytes,
    manifest_from_bytes, plan_delta, sha256_file,
)

if TYPE_CHECKING:
    from ddplaunch.options import Options

CHANNELS = 6  # SFTP sessions per host while sending; OpenSSH allows 10 per connection (MaxSessions)
FILES_PER_CHANNEL = 32  # fewer files than this each: not worth another channel's two round trips
CHUNK = 1 << 20
EXECUTABLE_MODE, PLAIN_MODE = 0o755, 0o644

OpenSftp = Callable[[], Any]  # a new paramiko SFTPClient on the host's open connection


class Stopped(Exception):
    """Another host failed, or the user interrupted: this host's sync ends where it is."""


class Unwritable(Exception):
    """The copy's folder cannot be made there (why, in the server's words)."""


@dataclass(frozen=True)
class SyncSource:
    """What goes: this directory's chosen files (syncplan.select_files), and where they land."""

    root: Path
    entries: tuple[Entry, ...]
    remote_dir: str  # SFTP path: relative to the remote home unless absolute
    private: bool  # ddplaunch's cache (folders made 0700) rather than the user's --chdir

    @property
    def shown_dir(self) -> str:
        return self.remote_dir if posixpath.isabs(self.remote_dir) else f"~/{self.remote_dir}"

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.entries)


@dataclass
class HostProgress:
    """One host's counts, written by its sending threads and read by the terminal's refresh."""

    name: str
    planned: Delta | None = None
    files: int = 0
    sent_bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, files: int, sent_bytes: int) -> None:
        with self._lock:
            self.files += files
            self.sent_bytes += sent_bytes

    def line(self) -> str:
        """At a terminal, while it runs: files and bytes so far of what this host lacks."""
        if self.planned is None:
            return f"{self.name}: reading what it holds"
        delta = self.planned
        return (f"{self.name}: {self.files}/{files(len(delta.send))}, "
                f"{human_bytes(self.sent_bytes)}/{human_bytes(delta.send_bytes)}")

    def summary(self) -> str:
        """Once done: what changed there (hosts alike share a line, so the name is left out)."""
        delta = self.planned
        if delta is None:
            return "not synced"
        if not delta.send and not delta.delete:
            return f"up to date ({files(delta.unchanged)})"
        parts = [f"sent {files(len(delta.send))} ({human_bytes(delta.send_bytes)})"]
        if delta.delete:
            parts.append(f"deleted {len(delta.delete)}")
        parts.append(f"{delta.unchanged} unchanged")
        return ", ".join(parts)


def files(count: int) -> str:
    return f"{count} file" if count == 1 else f"{count} files"


class Hasher:
    """sha256 of this directory's files, each read at most once whatever the hosts ask (threads share it)."""

    def __init__(self, root: Path) -> None:
        self._hash = sha256_file(root)
        self._known: dict[str, str] = {}
        self._lock = threading.Lock()

    def __call__(self, rel_path: str) -> str:
        with self._lock:
            known = self._known.get(rel_path)
        if known is None:
            known = self._hash(rel_path)
            with self._lock:
                self._known[rel_path] = known
        return known


# -- one host --------------------------------------------------------------------------------------


def remote_path(source: SyncSource, rel_path: str) -> str:
    return posixpath.join(source.remote_dir, rel_path)


def read_manifest(sftp: Any, source: SyncSource) -> dict[str, FileRecord]:
    """The host's record of its copy; empty when there is none (a first sync, or a new folder)."""
    try:
        with sftp.open(remote_path(source, MANIFEST_NAME), "rb") as file:
            return manifest_from_bytes(file.read())
    except OSError:
        return {}


def write_manifest(sftp: Any, source: SyncSource, manifest: Manifest) -> None:
    """Whole or not at all: written beside, then renamed over."""
    final = remote_path(source, MANIFEST_NAME)
    temp = f"{final}.{os.getpid()}-{os.urandom(4).hex()}.part"  # hosts sharing a home write at once
    with sftp.open(temp, "wb") as file:
        file.set_pipelined(True)
        file.write(manifest_bytes(manifest))
    sftp.posix_rename(temp, final)


def plan_host(sftp: Any, source: SyncSource, hasher: Hasher) -> tuple[dict[str, FileRecord], dict[str, FileRecord], Delta]:
    """(host's record, this directory's manifest, the delta): hashing only what the record cannot vouch for."""
    remote = read_manifest(sftp, source)
    local = build_manifest(source.entries, remote, hasher)
    return remote, local, plan_delta(local, remote)


def delete_paths(sftp: Any, source: SyncSource, paths: Sequence[str], keep_dirs: set[str]) -> None:
    """Files and links gone here go there too, then the folders that held only them (deepest first)."""
    for rel_path in paths:
        try:
            sftp.remove(remote_path(source, rel_path))
        except FileNotFoundError:
            pass
    emptied = {parent for rel_path in paths for parent in parents_of(rel_path)} - keep_dirs
    for folder in sorted(emptied, key=lambda path: (-path.count("/"), path)):
        try:
            sftp.rmdir(remote_path(source, folder))
        except OSError:
            pass  # not empty: it holds something that is not ours


def parents_of(rel_path: str) -> Iterator[str]:
    """'a/b/c.py' -> 'a/b', 'a'."""
    parent = posixpath.dirname(rel_path)
    while parent:
        yield parent
        parent = posixpath.dirname(parent)


def send_one(sftp: Any, source: SyncSource, rel_path: str, record: FileRecord, old: FileRecord | None,
             progress: HostProgress) -> None:
    """One file or link: a link is made as a link; a file is written in place (the record
    written before the sends does not list it, so a sync cut short resends it)."""
    target = remote_path(source, rel_path)
    if old is not None and (old.kind == "symlink" or record.kind == "symlink"):
        _remove_quietly(sftp, target)  # writing through an old link would write where it points
    if record.kind == "symlink":
        assert record.target is not None
        try:
            sftp.symlink(record.target, target)
        except OSError:  # something not in our record is in the way
            _remove_quietly(sftp, target)
            sftp.symlink(record.target, target)
        progress.add(1, record.size)
        return
    with open(source.root / rel_path, "rb") as local, sftp.open(target, "wb") as remote:
        remote.set_pipelined(True)
        for chunk in iter(lambda: local.read(CHUNK), b""):
            remote.write(chunk)
            progress.add(0, len(chunk))
    if record.executable or (old is not None and old.executable):
        sftp.chmod(target, EXECUTABLE_MODE if record.executable else PLAIN_MODE)
    progress.add(1, 0)


def _remove_quietly(sftp: Any, path: str) -> None:
    try:
        sftp.remove(path)
    except OSError:
        pass


def send_all(first: Any, open_sftp: OpenSftp, source: SyncSource, local: Manifest, remote: Manifest,
             delta: Delta, progress: HostProgress, stop: threading.Event) -> None:
    """The delta's sends, largest first, over `first` and up to CHANNELS - 1 more SFTP sessions
    of the same connection (a host that refuses more gets fewer)."""
    work: queue.SimpleQueue[str] = queue.SimpleQueue()
    for rel_path in sorted(delta.send, key=lambda path: (-local[path].size, path)):
        work.put(rel_path)
    wanted = min(CHANNELS, 1 + (len(delta.send) - 1) // FILES_PER_CHANNEL) if delta.send else 1
    sessions = [first]
    try:
        for _ in range(wanted - 1):
            try:
                sessions.append(open_sftp())
            except Exception:  # MaxSessions, or a channel refused: go on with what is open
                break
        failures: list[BaseException] = []

        def drain(sftp: Any) -> None:
            try:
                while not stop.is_set() and not failures:
                    try:
                        rel_path = work.get_nowait()
                    except queue.Empty:
                        return
                    send_one(sftp, source, rel_path, local[rel_path], remote.get(rel_path), progress)
            except BaseException as exc:  # told on the host's thread
                failures.append(exc)

        threads = [threading.Thread(target=drain, args=(sftp,), daemon=True) for sftp in sessions[1:]]
        for thread in threads:
            thread.start()
        drain(first)
        for thread in threads:
            thread.join()
        if failures:
            raise failures[0]
        if stop.is_set():
            raise Stopped()
    finally:
        for sftp in sessions[1:]:
            sftp.close()


def sync_host(open_sftp: OpenSftp, source: SyncSource, hasher: Hasher, progress: HostProgress,
              stop: threading.Event) -> None:
    """Bring one host's copy up to date; raises with the reason (an OSError names the path)."""
    sftp = open_sftp()
    try:
        try:
            make_dirs(sftp, source.remote_dir, 0o700 if source.private else 0o755)
        except OSError as exc:
            raise Unwritable(exc.strerror or str(exc) or "refused") from None
        remote, local, delta = plan_host(sftp, source, hasher)
        progress.planned = delta
        if delta.send or delta.delete:
            write_manifest(sftp, source, interim_manifest(remote, local, delta))
            delete_paths(sftp, source, delta.delete, keep_dirs={p for path in local for p in parents_of(path)})
            # shallowest first, under a root that exists: one mkdir each, not one per ancestor
            for folder in sorted({p for path in delta.send for p in parents_of(path)}, key=lambda p: p.count("/")):
                make_dir(sftp, remote_path(source, folder), 0o755)
            send_all(sftp, open_sftp, source, local, remote, delta, progress, stop)
        if local != remote:  # a touched file of the same content: its new time, so the next run reads nothing
            write_manifest(sftp, source, local)
    finally:
        sftp.close()


def peek_host(open_sftp: OpenSftp, source: SyncSource, hasher: Hasher) -> Delta:
    """For --dry-run: what a sync would do on this host; nothing is written there."""
    sftp = open_sftp()
    try:
        return plan_host(sftp, source, hasher)[2]
    finally:
        sftp.close()


# -- every host ------------------------------------------------------------------------------------


def why_failed(source: SyncSource, exc: BaseException) -> str:
    """A host's failure, in words that name the folder and the fix."""
    fix = "pass --chdir DIR to a folder you can write on every host."
    if isinstance(exc, Unwritable):
        return f"cannot make the folder {source.shown_dir} for --sync there ({exc}); {fix}"
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write the copy at {source.shown_dir} there ({exc.strerror or 'permission denied'}); {fix}"
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return f"--sync to {source.shown_dir} failed: {exc.strerror or exc}{where}"
    return f"--sync to {source.shown_dir} failed: {exc or type(exc).__name__}"


def sync_hosts(hosts: Sequence[tuple[str, OpenSftp]], source: SyncSource,
               on_tick: Callable[[Sequence[HostProgress]], None], tick_s: float = 0.1) -> tuple[list[HostProgress], dict[str, str]]:
    """Every host at once, each on a thread; `on_tick` sees the counts while they run. Returns
    each host's progress and, by host, why it failed (the first failure stops the others)."""
    hasher = Hasher(source.root)
    stop = threading.Event()
    progress = [HostProgress(name) for name, _ in hosts]
    failed: dict[str, str] = {}

    def one(open_sftp: OpenSftp, state: HostProgress) -> None:
        try:
            sync_host(open_sftp, source, hasher, state, stop)
        except Stopped:
            pass
        except Exception as exc:  # paramiko's SSHException and OSError alike: said per host
            failed[state.name] = why_failed(source, exc)
            stop.set()

    threads = [threading.Thread(target=one, args=(open_sftp, state), name=f"ddplaunch-sync-{state.name}", daemon=True)
               for (_, open_sftp), state in zip(hosts, progress)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(tick_s)
                on_tick(progress)
    except BaseException:
        stop.set()  # Ctrl-C: the threads end at their next file; the head closes the connections
        raise
    return progress, failed


def summaries(progress: Sequence[HostProgress]) -> list[str]:
    """One line per outcome, hosts alike together: 'host1, host2: up to date (2000 files)'."""
    by_text: dict[str, list[str]] = {}
    for state in progress:
        by_text.setdefault(state.summary(), []).append(state.name)
    return [f"{', '.join(names)}: {text}" for text, names in by_text.items()]


# -- from the options ------------------------------------------------------------------------------


def source_of(options: Options, environ: dict[str, str], cwd: str) -> SyncSource | None:
    """--sync's plan, before any host is contacted: the files (within the size cap) and the
    folder they go to. None without --sync; its companions alone are a mistake."""
    import socket

    from ddplaunch.ship import remote_cache
    from ddplaunch.syncplan import DEFAULT_SYNC_MAX_BYTES, check_size, default_remote_dir, parse_size, select_files

    if not options.sync:
        given = [flag for flag, value in (("--sync-exclude", options.sync_exclude),
                                          ("--sync-max-size", options.sync_max_size)) if value]
        if given:
            raise LaunchError(f"{' and '.join(given)} only mean something with --sync: add --sync, or drop them.")
        return None
    cap = DEFAULT_SYNC_MAX_BYTES if options.sync_max_size is None else parse_size(options.sync_max_size)
    root = Path(cwd)
    entries = tuple(entry for entry in select_files(root, options.sync_exclude) if entry.path != MANIFEST_NAME)
    check_size(entries, cap)
    if options.chdir:
        chosen = options.chdir[2:] if options.chdir.startswith("~/") else options.chdir
        return SyncSource(root, entries, chosen.rstrip("/") or "/", private=False)
    remote = default_remote_dir(remote_cache(environ), socket.gethostname(), str(root))
    return SyncSource(root, entries, remote, private=True)


def script_for_copy(options: Options, source: SyncSource) -> str:
    """The script as the workers in the copy name it. A Python script must be in the copy; so
    must a --no-python program given by a path here (one found on PATH is the host's own)."""
    from ddplaunch.syncplan import script_in_copy

    script = options.script
    if options.module or (options.no_python and "/" not in script):
        return script
    if options.no_python and posixpath.isabs(script) and not script.startswith(str(source.root) + "/"):
        return script  # a program of the host's own, such as /bin/echo
    return script_in_copy(script, str(source.root), [entry.path for entry in source.entries])


def dry_run_lines(source: SyncSource, deltas: Sequence[tuple[str, Delta]], shown_paths: int = 20) -> list[str]:
    """--dry-run --sync: per host (hosts alike together), what would be sent and deleted there."""
    lines = ["", f"--sync: {source.root} ({files(len(source.entries))}, {human_bytes(source.total_bytes)}) to "
             f"{source.shown_dir} on every host, where the job then runs; what each host lacks:"]
    by_delta: dict[Delta, list[str]] = {}
    for name, delta in deltas:
        by_delta.setdefault(delta, []).append(name)
    for delta, names in by_delta.items():
        if not delta.send and not delta.delete:
            lines.append(f"  {', '.join(names)}: nothing, up to date ({files(delta.unchanged)})")
            continue
        lines.append(f"  {', '.join(names)}: would send {files(len(delta.send))} ({human_bytes(delta.send_bytes)}), "
                     f"delete {len(delta.delete)}; {delta.unchanged} unchanged")
        listed = [f"    send    {path}" for path in delta.send] + [f"    delete  {path}" for path in delta.delete]
        lines += listed[:shown_paths]
        if len(listed) > shown_paths:
            lines.append(f"    ... and {len(listed) - shown_paths} more")
    return lines


def peek_hosts(hosts: Sequence[tuple[str, OpenSftp]], source: SyncSource) -> list[tuple[str, Delta]]:
    """peek_host on every host at once."""
    from concurrent.futures import ThreadPoolExecutor

    hasher = Hasher(source.root)
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(hosts)))) as pool:
        deltas = list(pool.map(lambda open_sftp: peek_host(open_sftp, source, hasher), [o for _, o in hosts]))
    return [(name, delta) for (name, _), delta in zip(hosts, deltas)]
