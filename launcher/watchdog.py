"""The guard that outlives a SIGKILLed launcher and stops its workers.

A launcher killed with SIGKILL runs no code, so torchrun leaves every worker running. Here a
small process, forked before any worker starts, holds the read end of a pipe. The launcher
writes the process group of each worker it starts. The kernel closes the write end when the
launcher dies, however it dies; the guard then reads EOF and stops those groups (SIGTERM, then
SIGKILL after a second), and every process whose environment carries this run's job id
(DDPLAUNCH_JOB_ID, inherited by all descendants): that finds a grandchild that left its
worker's process group with setsid. Once they are gone (or --kill-timeout after SIGKILL, for
a process stuck in the kernel) it removes the launcher's private temp dir, whose path it was
told too. A launcher that cleaned up itself says "done" first, and the guard leaves quietly.
Only the groups it was told about and processes carrying its own random id are touched, never
processes found by name; only the folders it was told about are removed.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field

from ddplaunch.options import DEFAULT_KILL_TIMEOUT_S
from ddplaunch.prctl import PR_SET_NAME, prctl

GUARD_GRACE_S = 1.0
_POLL_S = 0.02


class Watchdog:
    """The launcher's side of the pipe to the guard process."""

    def __init__(self, write_fd: int) -> None:
        self._fd: int | None = write_fd

    @classmethod
    def start(cls, job_marker: bytes | None = None, kill_timeout: float = DEFAULT_KILL_TIMEOUT_S) -> Watchdog:
        """Fork the guard. Call before any thread or worker exists.

        `job_marker` is the exact `NAME=value` entry every worker's environment carries;
        `kill_timeout`: how long the guard waits for them after SIGKILL before it gives up.
        """
        read_fd, write_fd = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the forked guard
            _become_guard(read_fd, write_fd, job_marker, kill_timeout)
        os.close(read_fd)
        os.waitpid(child, 0)  # the middle process exits at once; the guard is not our child
        return cls(write_fd)

    def watch(self, pgid: int) -> None:
        self._send(f"+{pgid}\n")

    def unwatch(self, pgid: int) -> None:
        self._send(f"-{pgid}\n")

    def remove_after(self, path: str) -> None:
        """Should the launcher die, remove this folder (its own) once the workers are stopped."""
        self._send(f"rm {os.fsencode(path).hex()}\n")  # hex: any byte of a path, newline included

    def stand_down(self) -> None:
        """Clean exit: the launcher has stopped everything itself."""
        self._send("done\n")
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _send(self, line: str) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, line.encode())
        except OSError:  # the guard is gone; nothing better to do than carry on
            os.close(self._fd)
            self._fd = None


def _become_guard(read_fd: int, write_fd: int, job_marker: bytes | None, kill_timeout: float) -> None:  # pragma: no cover
    try:
        os.setsid()  # out of the terminal's process group: Ctrl-C is the launcher's to handle
        if os.fork() != 0:
            os._exit(0)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_IGN)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)  # never hold the launcher's stdout pipe open
        # Shown in top and `ps -o comm`; its command line stays the launcher's.
        prctl(PR_SET_NAME, b"ddplaunch-guard")
        os.close(write_fd)
        os.closerange(3, read_fd)
        os.closerange(read_fd + 1, 65536)
        orders = read_orders(read_fd)
        if not orders.clean:
            _stop_job(orders.groups, job_marker, kill_timeout)
            _remove(orders.folders)
    finally:
        os._exit(0)


@dataclass
class Orders:
    """What the launcher told its guard before it went: what to stop, what to remove."""

    groups: set[int] = field(default_factory=set)
    folders: list[bytes] = field(default_factory=list)
    clean: bool = False  # it said "done": it stopped and removed everything itself


def read_orders(fd: int) -> Orders:
    """The launcher's lines up to "done" or its end: +PGID, -PGID, rm HEX-PATH."""
    orders = Orders()
    pending = b""
    while True:
        try:
            data = os.read(fd, 4096)
        except InterruptedError:
            continue
        if not data:
            return orders
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line == b"done":
                orders.clean = True
                return orders
            if line[:1] == b"+":
                orders.groups.add(int(line[1:]))
            elif line[:1] == b"-":
                orders.groups.discard(int(line[1:]))
            elif line.startswith(b"rm "):
                orders.folders.append(bytes.fromhex(line[3:].decode()))


def _stop_job(groups: set[int], job_marker: bytes | None, kill_timeout: float) -> None:
    _signal_groups(groups, signal.SIGTERM)
    _signal_marked(job_marker, signal.SIGTERM)
    _wait_gone(groups, job_marker, GUARD_GRACE_S)
    _signal_groups(groups, signal.SIGKILL)
    _signal_marked(job_marker, signal.SIGKILL)
    _wait_gone(groups, job_marker, kill_timeout)  # bounded: a process in state D never goes


def _wait_gone(groups: set[int], job_marker: bytes | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _job_alive(groups, job_marker):
        time.sleep(_POLL_S)  # nothing to wait on: these processes are not our children


def _job_alive(groups: set[int], job_marker: bytes | None) -> bool:
    """A live process in one of the groups, or carrying the marker. Zombies do not count: the
    killed workers' new parent may never reap them, and they hold nothing."""
    return bool(_live_in_groups(groups)) or bool(_marked_processes(job_marker))


def _live_in_groups(groups: set[int]) -> list[int]:
    if not groups:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as stat_file:
                    fields = stat_file.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != b"Z" and int(fields[2]) in groups:
                found.append(int(entry))
    return found


def _remove(folders: list[bytes]) -> None:
    import shutil

    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def _marked_processes(job_marker: bytes | None) -> list[int]:
    """Live processes whose environment holds the job's exact `NAME=value` entry."""
    if job_marker is None:
        return []
    needle = b"\0" + job_marker + b"\0"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as env_file:
                if needle not in b"\0" + env_file.read():
                    continue
            with open(f"/proc/{entry}/stat", "rb") as stat_file:
                state = stat_file.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if state != b"Z":
            found.append(int(entry))
    return found


def _signal_marked(job_marker: bytes | None, sig: int) -> None:
    for pid in _marked_processes(job_marker):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _signal_groups(groups: set[int], sig: int) -> None:
    for pgid in groups:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
