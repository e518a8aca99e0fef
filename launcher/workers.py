"""The process tree of one attempt's workers: start them, signal them, reap them, tell if any live.

Each worker runs in its own session, so its whole tree shares one process group, which is
signalled as one. The launcher is a child subreaper (`become_subreaper`): a worker's orphaned
descendants are reparented to it, so it reaps them, and "no child left" means the whole tree
is gone. What to send and when is not decided here (ddplaunch.teardown, ddplaunch.supervisor).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from ddplaunch.limits import original_limit
from ddplaunch.plan import Worker
from ddplaunch.procfs import children_map, descendants
from ddplaunch.watchdog import Watchdog


@dataclass
class WorkerProcess:
    """A started worker and what became of it."""

    spec: Worker
    pid: int
    started: float
    exit_code: int | None = None  # shell convention: 128+N when killed by signal N
    term_signal: int | None = None
    ended: float | None = None
    after_stop: bool = False  # it ended after the launcher began stopping workers
    group_gone: bool = False
    signals_sent: set[int] = field(default_factory=set)  # what the launcher sent its group

    @property
    def runtime(self) -> float:
        return (self.ended or time.monotonic()) - self.started


@dataclass(frozen=True)
class Pipes:
    """The launcher's read ends of a started worker's stdout and stderr."""

    stdout: int
    stderr: int


# How a worker is started: start_process, or a warm interpreter's fork (ddplaunch.warm.Zygote.spawn).
Starter = Callable[[tuple[str, ...], Mapping[str, str], list[tuple[int, int, int]], "frozenset[int] | None"], int]


def start_process(
    argv: tuple[str, ...],
    environment: Mapping[str, str],
    actions: list[tuple[int, int, int]],
    cpus: frozenset[int] | None,
) -> int:
    """posix_spawn in a new session; with `cpus`, the child runs only on those from its first
    instruction.

    posix_spawn has no affinity attribute, but a child starts with the mask of the thread that
    spawned it, so this thread wears the worker's mask for the spawn. The mask is per thread:
    no other thread, and so no other start, can inherit it meanwhile.

    The open-files limit is worn the same way, for the same reason (ddplaunch.limits), though it
    is the whole process's.
    """
    with original_limit(actions) as low_actions:
        if cpus is None:
            return os.posix_spawnp(argv[0], list(argv), environment, file_actions=low_actions, setsid=True)
        own = os.sched_getaffinity(0)
        os.sched_setaffinity(0, cpus)
        try:
            return os.posix_spawnp(argv[0], list(argv), environment, file_actions=low_actions, setsid=True)
        finally:
            os.sched_setaffinity(0, own)


class WorkerTree:
    """The started workers, their process groups and the descendants that left those groups.

    The guard (`watchdog`) is told each group as it starts and forgets it once it is gone.
    `starter` starts each worker (posix_spawn, or a fork from --warm's interpreter); `helpers`
    are the launcher's own children that are not the tree (that interpreter), each with what
    to call with its wait status should the reaper collect it: they neither count as the
    tree's children nor get its signals, and one reaped is no helper any more (its id may be reused).
    """

    def __init__(
        self, watchdog: Watchdog | None, clock: Callable[[], float] = time.monotonic,
        starter: Starter = start_process, helpers: Mapping[int, Callable[[int], None]] | None = None,
    ) -> None:
        self.workers: list[WorkerProcess] = []
        self.has_children = True  # until waitpid says otherwise
        self._watchdog = watchdog
        self._clock = clock
        self._starter = starter
        self._helpers = dict(helpers or {})
        self._strays_sig: int | None = None  # the last signal sent to descendants outside worker groups

    def spawn(
        self, spec: Worker, environment: Mapping[str, str], stdin: int | None = None
    ) -> tuple[WorkerProcess, Pipes]:
        """Start one worker in its own session, stdout and stderr to pipes, stdin from the
        `stdin` descriptor (the --stdin rank's), else /dev/null."""
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        actions = [
            (os.POSIX_SPAWN_DUP2, devnull if stdin is None else stdin, 0),
            (os.POSIX_SPAWN_DUP2, out_write, 1),
            (os.POSIX_SPAWN_DUP2, err_write, 2),
        ]
        try:
            pid = self._starter(spec.argv, environment, actions, spec.cpus)
        except OSError:
            for fd in (out_read, err_read):
                os.close(fd)
            raise
        finally:
            for fd in (out_write, err_write, devnull):
                os.close(fd)
        worker = WorkerProcess(spec=spec, pid=pid, started=self._clock())
        self.workers.append(worker)
        if self._watchdog is not None:
            self._watchdog.watch(pid)
        return worker, Pipes(out_read, err_read)

    def signal(self, sig: int) -> None:
        """Every worker's process group; once all workers exited, also the strays they left."""
        for worker in self.workers:
            if not worker.group_gone:
                if worker.exit_code is None:
                    worker.signals_sent.add(sig)
                try:
                    os.killpg(worker.pid, sig)
                except ProcessLookupError:
                    self._mark_group_gone(worker)
        if self.has_children and self.all_exited():
            self.signal_strays(sig)

    def signal_strays(self, sig: int) -> None:
        """Descendants that left their worker's process group (setsid), adopted by us."""
        if self._strays_sig == sig:
            return
        self._strays_sig = sig
        groups = {w.pid for w in self.workers} | set(self._helpers)
        for pid in descendants(os.getpid(), children_map()):  # /proc: Linux only, as is prctl's subreaper
            try:
                if os.getpgid(pid) not in groups:
                    os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):  # gone since the scan; a setuid program's
                pass

    def reap(self) -> Iterator[tuple[WorkerProcess, int]]:
        """Collect every child that ended; yield each worker among them and its exit code.

        Lazy on purpose: the caller may signal the tree between two workers' exits.
        """
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.has_children = False
                return
            if pid == 0:
                self.has_children = self._tree_has_children()
                return
            helper_ended = self._helpers.pop(pid, None)
            if helper_ended is not None:
                helper_ended(status)
                continue
            worker = next((w for w in self.workers if w.pid == pid and w.exit_code is None), None)
            if worker is not None:
                yield worker, self._record_exit(worker, status)

    def _record_exit(self, worker: WorkerProcess, status: int) -> int:
        code = os.waitstatus_to_exitcode(status)
        worker.ended = self._clock()
        worker.term_signal = -code if code < 0 else None
        worker.exit_code = 128 - code if code < 0 else code
        return worker.exit_code

    def _tree_has_children(self) -> bool:
        """Some child is not a helper (always, without helpers: no /proc scan then)."""
        if not self._helpers:
            return True
        return any(pid not in self._helpers for pid in children_map().get(os.getpid(), ()))

    @property
    def helpers(self) -> frozenset[int]:
        """The helpers not reaped yet."""
        return frozenset(self._helpers)

    def all_exited(self) -> bool:
        return all(w.exit_code is not None for w in self.workers)

    def groups_alive(self) -> bool:
        for worker in self.workers:
            if not worker.group_gone:
                try:
                    os.killpg(worker.pid, 0)
                except ProcessLookupError:
                    self._mark_group_gone(worker)
        return not all(w.group_gone for w in self.workers)

    def alive(self) -> bool:
        """Any process of the tree, as of the last `reap`."""
        return self.groups_alive() or self.has_children

    def _mark_group_gone(self, worker: WorkerProcess) -> None:
        if not worker.group_gone and worker.exit_code is not None:
            worker.group_gone = True  # never signal this id again: it may be reused
            if self._watchdog is not None:
                self._watchdog.unwatch(worker.pid)
