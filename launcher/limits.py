"""Enough file descriptors for this node's workers, checked before anything starts.

The launcher holds, for the whole attempt, both pipe ends it reads of every worker (stdout,
stderr) and, with log files, one rankN.log each; a spawn briefly holds three more. Beyond
those, a fixed set: the standard streams, the signal wake-up pipe, the guard's pipe, the
selector, launcher.log and the filtered logs, the --stdin relay, py-spy's output files and
the modules imported late. Past the soft RLIMIT_NOFILE a 400-rank launch used to die with
EMFILE in the middle of starting, so:

- the count needed is a pure function (`descriptors_needed`);
- `ensure_descriptors` raises the soft limit up to the hard one when that is enough (as Go's
  runtime does at start), else raises LaunchError naming both limits and `ulimit -n`;
- the workers get the soft limit back (`original_limit`, around each spawn in
  ddplaunch.workers), so a script sees the limit it would see under torchrun.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ddplaunch.errors import LaunchError

PER_WORKER_PIPES = 2  # the read ends of its stdout and stderr
PER_WORKER_LOG = 1  # its rankN.log, open for the whole attempt
SPAWN_TRANSIENT = 3  # while one worker is spawned: the pipes' write ends and /dev/null
# stdio 3, wake-up pipe 2, guard pipe 1, selector 1, launcher.log and filtered logs 3, stdin
# relay 2, py-spy runs 8 x 2 files, a pidfd, an open dump file, a late import, and once raised
# the spawn slots 4: 35; rounded up
FIXED = 48
SPAWN_SLOTS = 3  # a worker's stdin, stdout and stderr


@dataclass(frozen=True)
class Raised:
    """The soft limit this process started with, and the low descriptors a spawn dups through.

    A spawn gives the child the spawner's limit, so the launcher wears the original one for
    the instant of each spawn. glibc's posix_spawn then refuses to dup a descriptor at or above
    that limit (EBADF), and a worker's pipes are high once hundreds are open: so they are
    first dup'ed onto `slots`, reserved low while few descriptors were open, and parked on
    /dev/null (`parked`) again after the spawn.
    """

    original_soft: int
    parked: int
    slots: tuple[int, ...]


# Process-wide like the limit itself (Go keeps its origRlimitNofile the same way).
_raised: Raised | None = None


def descriptors_needed(nproc: int, log_files: bool) -> int:
    """File descriptors a launcher of `nproc` workers holds at its peak."""
    per_worker = PER_WORKER_PIPES + (PER_WORKER_LOG if log_files else 0)
    return FIXED + SPAWN_TRANSIENT + nproc * per_worker


def ensure_descriptors(nproc: int, log_files: bool) -> None:
    """Make sure `nproc` workers fit under RLIMIT_NOFILE, raising the soft limit if need be."""
    global _raised
    needed = descriptors_needed(nproc, log_files)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if needed <= soft:
        return
    if hard != resource.RLIM_INFINITY and needed > hard:
        raise LaunchError(too_few_message(nproc, log_files, needed, soft, hard))
    if _raised is None:
        _raised = _reserve(soft)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError):  # a hard limit above the kernel's nr_open cannot be worn
        raise LaunchError(too_few_message(nproc, log_files, needed, soft, soft)) from None


def too_few_message(nproc: int, log_files: bool, needed: int, soft: int, hard: int) -> str:
    files = " and a log file" if log_files else ""
    return (
        f"--nproc {nproc} needs about {needed} open files in the launcher (two pipes{files} per "
        f"worker), but this shell allows at most {hard} (its hard limit, ulimit -Hn; soft limit "
        f"{soft}). Raise it before launching with `ulimit -n {needed}` (above the hard limit that "
        "takes root, or nofile in /etc/security/limits.conf), or start fewer workers per node."
    )


def _reserve(original_soft: int) -> Raised | None:
    parked = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    slots = tuple(os.dup(parked) for _ in range(SPAWN_SLOTS))  # the lowest free: low
    if max(slots) >= original_soft:  # so many open already that no slot is low: workers then
        # inherit the raised limit, which is harmless, rather than fail to start
        for fd in (parked, *slots):
            os.close(fd)
        return None
    return Raised(original_soft, parked, slots)


@contextmanager
def original_limit(actions: list[tuple[int, int, int]]) -> Iterator[list[tuple[int, int, int]]]:
    """For a spawn with these posix_spawn dup2 `actions`: the launcher wears its original soft
    limit meanwhile, and the actions to pass, their sources moved onto the low slots.

    Only a descriptor opened by another thread in that instant could fail (EMFILE); the
    launcher's threads open none while workers start.
    """
    raised = _raised
    if raised is None or len(actions) > len(raised.slots):
        yield actions
        return
    low = []
    for (action, source, target), slot in zip(actions, raised.slots):
        os.dup2(source, slot, inheritable=False)
        low.append((action, slot, target))
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (raised.original_soft, limits[1]))
    try:
        yield low
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
        for slot in raised.slots:
            os.dup2(raised.parked, slot, inheritable=False)  # a pipe's end held here would keep it open
