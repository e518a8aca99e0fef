"""paramiko's SFTPClient, the calls ddplaunch makes, on this machine's disk: the upload of the
agent (ddplaunch.ship) and --sync (ddplaunch.sync) tested without a server, faults injected."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path


class LocalFile(io.FileIO):
    def set_pipelined(self, pipelined: bool) -> None:
        pass


class LocalSftp:
    """`home` is where a relative path starts, as an SFTP session starts in the remote home.
    Counts the files opened for writing; `fail_on(path)` makes an operation on a path raise."""

    def __init__(self, home: Path, fail_on: Callable[[str, str], bool] | None = None) -> None:
        self.home = home
        self.writes = 0
        self.written: list[str] = []
        self.closed = False
        self._fail_on = fail_on or (lambda op, path: False)

    def _path(self, path: str, op: str = "") -> Path:
        if self._fail_on(op, path):
            raise PermissionError(13, "Permission denied", path)
        return self.home / path  # an absolute path stays itself

    def stat(self, path: str) -> os.stat_result:
        return self._path(path).stat()

    def mkdir(self, path: str, mode: int = 0o777) -> None:
        self._path(path, "mkdir").mkdir(mode)

    def rmdir(self, path: str) -> None:
        self._path(path, "rmdir").rmdir()

    def open(self, path: str, mode: str) -> LocalFile:
        target = self._path(path, "open" if "r" in mode else "write")
        if "w" in mode:
            self.writes += 1
            self.written.append(path)
        return LocalFile(target, mode)

    def posix_rename(self, old: str, new: str) -> None:
        self._path(old).rename(self._path(new))

    def remove(self, path: str) -> None:
        self._path(path, "remove").unlink()

    def symlink(self, source: str, dest: str) -> None:
        os.symlink(source, self._path(dest, "symlink"))

    def chmod(self, path: str, mode: int) -> None:
        self._path(path, "chmod").chmod(mode)

    def close(self) -> None:
        self.closed = True
