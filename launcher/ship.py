"""The head ships its own agent: a zip of this very code, written once per host into a cache.

A host then needs only Python 3.10 or newer, and head and agents can never differ in version.
build_agent_zip is pure (the same code gives the same bytes: sorted entries, fixed times),
and the zip's name is the hash of those bytes, so a cached copy is reused only when it is
this code. The remote command finds the copy itself (ddplaunch.fanout.remote_command): when
it is missing it exits NO_AGENT, and only then does the head upload it (upload_all), over
the SSH connection already open (SFTP on the same transport), then start the agent again.
So a cached launch costs no extra round trip.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import shlex
import stat
import threading
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ddplaunch

# Relative to the remote home: the shell's $HOME, and the directory an SFTP session starts in.
REMOTE_CACHE = ".cache/ddplaunch"
CACHE_VARIABLE = "DDPLAUNCH_AGENT_CACHE"  # another remote cache directory (tests, shared homes)
ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can say: the bytes depend on the code only
MIN_PYTHON = (3, 10)
OLD_PYTHON = 123  # the zip's exit code on a Python older than MIN_PYTHON
UPLOAD_THREADS = 16

# The zip's entry point. It must parse on any Python, so that an old one says why it cannot run.
MAIN = f"""\
import sys
if sys.version_info < {MIN_PYTHON!r}:
    sys.stderr.write("Python %s at %s is too old: ddplaunch's agent needs Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer; "
                     "pass --python PATH to a newer Python on that host.\\n" % (sys.version.split()[0], sys.executable))
    sys.exit({OLD_PYTHON})
import runpy
runpy.run_module("ddplaunch", run_name="__main__", alter_sys=True)
"""


@dataclass(frozen=True)
class AgentZip:
    """The agent as shipped: its bytes, and the name they give it."""

    data: bytes

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.data).hexdigest()[:16]

    @property
    def name(self) -> str:
        return f"agent-{self.digest}.zip"

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class AgentPlace:
    """Where a host keeps the zip: `cache` is relative to the remote home unless absolute."""

    cache: str
    name: str
    size: int

    @property
    def sftp_path(self) -> str:
        return posixpath.join(self.cache, self.name)

    @property
    def shell_path(self) -> str:
        """The path as a shell word; a relative one is under "$HOME" (the only word not quoted)."""
        quoted = shlex.quote(self.sftp_path)
        return quoted if posixpath.isabs(self.cache) else f'"$HOME"/{quoted}'

    @property
    def shown(self) -> str:
        return self.sftp_path if posixpath.isabs(self.cache) else f"~/{self.sftp_path}"


def remote_cache(environ: dict[str, str]) -> str:
    """The hosts' cache directory: DDPLAUNCH_AGENT_CACHE (on the head), else ~/.cache/ddplaunch."""
    chosen = environ.get(CACHE_VARIABLE, "").strip()
    if chosen.startswith("~/"):
        return chosen[2:]
    return chosen or REMOTE_CACHE


def place_of(agent: AgentZip, environ: dict[str, str]) -> AgentPlace:
    return AgentPlace(remote_cache(environ), agent.name, agent.size)


# -- the zip (pure) -----------------------------------------------------------------------------


def package_files(package_dir: Path) -> list[tuple[str, Path]]:
    """Every .py of the package (its bootstrap and its cli.py included), by archive name, sorted:
    the package's folder is `launcher` in the repository and `ddplaunch` when installed, and is
    `ddplaunch` in the zip."""
    return sorted(
        (f"ddplaunch/{path.relative_to(package_dir).as_posix()}", path)
        for path in package_dir.rglob("*.py")
        if "__pycache__" not in path.relative_to(package_dir).parts
    )


def build_agent_zip(package_dir: Path | None = None, *, bytecode: bool = True) -> AgentZip:
    """The head's own code as a runnable zip: `python ZIP --agent ...` is `python -m ddplaunch --agent ...`.

    Beside each module, its bytecode for the head's Python (zip_bytecode), when it has one:
    zipimport never writes any, so without it an agent compiles every module it imports,
    each time it starts (~60 ms). A host's Python of another version skips it (its magic
    number differs) and compiles from the source."""
    package_dir = package_dir or Path(ddplaunch.__file__).resolve().parent
    entries: list[tuple[str, str | bytes]] = [("__main__.py", MAIN)]
    for name, path in package_files(package_dir):
        source = path.read_bytes()
        entries.append((name, source))
        compiled = zip_bytecode(path, source) if bytecode else None
        if compiled is not None:
            entries.append((name[: -len(".py")] + ".pyc", compiled))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries:
            info = zipfile.ZipInfo(name, ZIP_TIME)
            # Stored: deflate would cost the head ~40 ms on every run, to send 0.6 MB instead of
            # 1.4 MB once per version.
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            archive.writestr(info, data)
    return AgentZip(buffer.getvalue())


def zip_bytecode(path: Path, source: bytes) -> bytes | None:
    """The module's bytecode from this Python's own cache (compiled there first if need be, once),
    as an unchecked hash-based .pyc: zipimport would find a timestamp one stale against the
    zip's fixed times, and the zip's name already pins source and bytecode together. Reused
    rather than compiled here, so that the same code gives the same bytes on every run.
    None when there is none to be had (a read-only install without bytecode)."""
    import importlib.util

    cached = Path(importlib.util.cache_from_source(str(path)))
    data = _fresh_pyc(cached, path, source)
    if data is None:
        import py_compile

        try:
            py_compile.compile(str(path), doraise=True)
        except (OSError, py_compile.PyCompileError):
            return None
        data = _fresh_pyc(cached, path, source)
    if data is None:
        return None
    unchecked_hash_based = (0b01).to_bytes(4, "little")
    return importlib.util.MAGIC_NUMBER + unchecked_hash_based + importlib.util.source_hash(source) + data[16:]


def _fresh_pyc(cached: Path, path: Path, source: bytes) -> bytes | None:
    """The .pyc at `cached` when it is this Python's and matches the source, else None."""
    import importlib.util

    try:
        data = cached.read_bytes()
        stats = path.stat()
    except OSError:
        return None
    if len(data) < 16 or data[:4] != importlib.util.MAGIC_NUMBER:
        return None
    flags = int.from_bytes(data[4:8], "little")
    if flags & 0b01:  # hash-based
        return data if data[8:16] == importlib.util.source_hash(source) else None
    mtime, size = int.from_bytes(data[8:12], "little"), int.from_bytes(data[12:16], "little")
    fresh = mtime == int(stats.st_mtime) & 0xFFFFFFFF and size == len(source) & 0xFFFFFFFF
    return data if fresh else None


def build_in_background() -> Callable[[], AgentZip]:
    """Start build_agent_zip on a thread (its few ms of reading overlap the SSH logins); the
    function returned waits for it and gives the zip, or raises what the build raised."""
    done: list[AgentZip | BaseException] = []

    def build() -> None:
        try:
            done.append(build_agent_zip())
        except BaseException as exc:  # given to the caller, on its thread
            done.append(exc)

    thread = threading.Thread(target=build, name="ddplaunch-agent-zip", daemon=True)
    thread.start()

    def result() -> AgentZip:
        thread.join()
        outcome = done[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return result


# -- the upload (over SFTP, on connections already open) ----------------------------------------


def upload(sftp: Any, agent: AgentZip, place: AgentPlace) -> bool:
    """Write the zip into the host's cache, unless a file of that name and size is there: to a
    name of its own first, then renamed over, so two heads racing each leave a whole file.
    True when it wrote."""
    make_dirs(sftp, place.cache, 0o700)
    try:
        if sftp.stat(place.sftp_path).st_size == agent.size:
            return False
    except OSError:
        pass
    temp = f"{place.sftp_path}.{os.getpid()}-{os.urandom(4).hex()}.part"
    try:
        with sftp.open(temp, "wb") as remote:
            remote.set_pipelined(True)
            remote.write(agent.data)
        sftp.posix_rename(temp, place.sftp_path)  # atomic, and it replaces (SFTP's plain rename does not)
    except BaseException:
        try:
            sftp.remove(temp)
        except OSError:
            pass
        raise
    return True


def make_dirs(sftp: Any, path: str, mode: int) -> None:
    """Each missing folder of `path` over SFTP (relative to the remote home unless absolute):
    the agent's cache here (0700, as XDG asks of ~/.cache), and --sync's copies (ddplaunch.sync)."""
    parts = [part for part in path.split("/") if part]
    prefix = "/" if posixpath.isabs(path) else ""
    for depth in range(1, len(parts) + 1):
        make_dir(sftp, prefix + "/".join(parts[:depth]), mode)


def make_dir(sftp: Any, folder: str, mode: int) -> None:
    """One folder whose parent exists; one that is there already is fine."""
    try:
        sftp.mkdir(folder, mode)
    except OSError:
        if not _is_dir(sftp, folder):
            raise


def _is_dir(sftp: Any, path: str) -> bool:
    try:
        return stat.S_ISDIR(sftp.stat(path).st_mode)
    except OSError:
        return False


def upload_all(
    hosts: Sequence[tuple[str, Callable[[], Any]]], agent: AgentZip, place: AgentPlace
) -> dict[str, str | bool]:
    """upload() to every (name, open_sftp) at once, a bounded pool of threads; per host, True
    when it wrote, False when the copy was there, or why it failed (a sentence)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(open_sftp: Callable[[], Any]) -> str | bool:
        try:
            sftp = open_sftp()
            try:
                return upload(sftp, agent, place)
            finally:
                sftp.close()
        except Exception as exc:  # paramiko's SSHException and IOError alike: said per host
            return f"could not write ddplaunch's agent to {place.shown} there ({exc or type(exc).__name__})"

    with ThreadPoolExecutor(max_workers=max(1, min(UPLOAD_THREADS, len(hosts)))) as pool:
        results = list(pool.map(one, [open_sftp for _, open_sftp in hosts]))
    return {name: result for (name, _), result in zip(hosts, results)}
