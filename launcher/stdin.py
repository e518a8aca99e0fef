"""--stdin: the launcher's stdin reaches one rank (0 by default), as under mpirun; the others read /dev/null.

One node: the chosen rank is given the launcher's own fd 0. It runs in its own session, so it
reads a terminal without SIGTTIN, and the terminal's Ctrl-C still reaches only the launcher
(the foreground group), which stops the job as always. Over SSH the head relays its stdin
to the chosen rank's host (ddplaunch.stdin_relay).
"""

from __future__ import annotations

import os
from collections.abc import Callable


def keep_stdin_open() -> None:
    """A closed stdin (`<&-`) becomes /dev/null: no file or socket opened later may take fd 0
    and be handed to a rank as its stdin (or read by the head as ours)."""
    try:
        os.fstat(0)
    except OSError:
        os.set_inheritable(os.open(os.devnull, os.O_RDONLY), True)  # the lowest free fd: 0


def launcher_stdin(rank: int, note: Callable[[str], None], fd: int = 0) -> int | None:
    """`fd` (stdin), for `rank` to read; None (it reads /dev/null) when that is a terminal
    whose foreground is another job: a rank outside the terminal's session reads it without
    SIGTTIN, so it would take the lines typed to the shell."""
    try:
        background = os.tcgetpgrp(fd) != os.getpgrp()
    except OSError:
        background = False  # not a terminal, or not this session's
    if background:
        note(
            f"started in the background of a terminal: rank {rank} reads /dev/null, not the terminal; "
            "start ddplaunch in the foreground to type to it (pdb)"
        )
        return None
    return fd
