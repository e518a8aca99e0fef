"""What ps, top -c, htop, py-spy, psutil and nvidia-smi show of a process: its command line and
environment as /proc/PID/cmdline and /proc/PID/environ read them, rewritten in place (the
unprivileged way setproctitle does it on Linux). ddplaunch.zygote uses it so that a --warm
rank shows its cold command line and environment, and the warm interpreter a title.

The kernel reads both from the memory that held the strings at exec: argv's area
(arg_start..arg_end, fields 48-49 of /proc/self/stat, Linux >= 3.5) and the environment's
(env_start..env_end, fields 50-51). When the argv area's last byte is not NUL the kernel takes
the area as one string up to its first NUL, at most a page (fs/proc/base.c, get_mm_proctitle):
a title. So a title holds the arguments joined by spaces, as ps prints a command line anyway;
psutil splits such a title at its spaces again. The areas are only as large as what the
process was started with, so ddplaunch.warm starts the warm interpreter with room in both.

The environment area is written only where nothing points: a rank's os.environ was replaced
(CPython's putenv is setenv, which copies, and unsetenv drops the pointers), and a pointer a
library kept from a getenv() during the warm imports still reads its own unchanged value,
because every entry but the room (the last) stays where it was. Any doubt (no /proc, another
shape, too little room, a C `environ` entry inside the part to write) leaves the process as it
was: these writes never break a rank.

Only the standard library: ddplaunch.zygote imports it, and so every rank has.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PAGE = 4096  # get_mm_proctitle reads one page of a title
ROOM_VARIABLE = "DDPLAUNCH_WARM_ROOM"  # the warm interpreter's last variable: the room for a rank's own


@dataclass(frozen=True)
class Areas:
    """Where argv's and the environment's strings lie in this process's memory."""

    arg_start: int
    arg_end: int
    env_start: int
    env_end: int


# -- pure ---------------------------------------------------------------------------------------


def parse_areas(stat: str) -> Areas | None:
    """Fields 48-51 of /proc/PID/stat; None for an older kernel's shorter line or odd values.
    The command name (field 2) may hold spaces and parentheses: fields are counted after its
    last ')'."""
    fields = stat.rpartition(")")[2].split()  # field 3 (the state) first
    try:
        arg_start, arg_end, env_start, env_end = (int(fields[n - 3]) for n in range(48, 52))
    except (IndexError, ValueError):
        return None
    if not 0 < arg_start < arg_end or not 0 < env_start <= env_end:
        return None
    return Areas(arg_start, arg_end, env_start, env_end)


def title_bytes(title: str, size: int) -> bytes | None:
    """What to write over an argv area of `size` bytes so /proc shows `title` (truncated to
    fit): the title, a NUL, and a last byte that is not NUL (which makes it a title)."""
    if size < 3:
        return None
    text = os.fsencode(title).replace(b"\0", b" ")[: min(size, PAGE) - 2]
    return text + b"\0" * (size - len(text) - 1) + b"."


def command_title(argv: list[str]) -> str:
    """A command line as ps shows one (and psutil splits one that a process rewrote)."""
    return " ".join(argv)


def environment_bytes(current: bytes, wanted: Mapping[str, str]) -> bytes | None:
    """The environment area `current` rewritten to show `wanted`: every entry before the room
    (the last, ROOM_VARIABLE) stays where it is and must be in `wanted` with its value; the
    room takes the entries `wanted` has besides, then NULs (tools stop at an empty entry).
    None when the area is not of that shape or the room is too small."""
    strings = current.rstrip(b"\0")
    *kept, room = strings.split(b"\0")
    if not room.startswith(os.fsencode(ROOM_VARIABLE) + b"=") or not current.endswith(b"\0"):
        return None
    encoded = {os.fsencode(key): os.fsencode(value) for key, value in wanted.items()}
    keys = set()
    for entry in kept:
        key, equals, value = entry.partition(b"=")
        if not equals or encoded.get(key) != value:
            return None  # a variable the rank has not, or with another value: show nothing wrong
        keys.add(key)
    extra = b"".join(key + b"=" + value + b"\0" for key, value in encoded.items() if key not in keys)
    start = len(strings) - len(room)
    if start + len(extra) > len(current):
        return None
    return current[:start] + extra + b"\0" * (len(current) - start - len(extra))


def room_for(argv: tuple[str, ...], size: int = PAGE) -> str:
    """An argument that makes argv's area about `size` bytes, room for a rank's title."""
    used = sum(len(os.fsencode(arg)) + 1 for arg in argv) + 1
    return "." * max(1, size - used)


# -- this process -------------------------------------------------------------------------------


def set_title(title: str) -> bool:
    """Show `title` as this process's command line; False (and nothing changed) if it cannot."""
    try:
        areas = _areas()
        if areas is None:
            return False
        data = title_bytes(title, areas.arg_end - areas.arg_start)
        if data is None:
            return False
        _keep_program_names()
        _write(areas.arg_start, data)
        return True
    except Exception:
        return False


def set_environment(environment: Mapping[str, str]) -> bool:
    """Show `environment` as this process's /proc/PID/environ, once os.environ holds it;
    False (and nothing changed) if it cannot."""
    try:
        areas = _areas()
        if areas is None:
            return False
        import ctypes

        size = areas.env_end - areas.env_start
        current = ctypes.string_at(areas.env_start, size)
        data = environment_bytes(current, environment)
        if data is None:
            return False
        changed = next((i for i, (old, new) in enumerate(zip(current, data)) if old != new), size)
        if _environ_points_into(areas.env_start + changed, areas.env_end):
            return False
        _write(areas.env_start, data)
        return True
    except Exception:
        return False


def _areas() -> Areas | None:
    with open("/proc/self/stat") as file:
        return parse_areas(file.read())


def _write(address: int, data: bytes) -> None:
    import ctypes

    ctypes.memmove(address, data, len(data))


def _libc() -> Any:
    import ctypes

    return ctypes.CDLL(None)


def _environ_points_into(start: int, end: int) -> bool:
    """Whether an entry of C's `environ` lies in start..end (it would read what is written)."""
    import ctypes

    table = ctypes.c_void_p.in_dll(_libc(), "environ").value
    if not table:
        return False
    entries = ctypes.cast(table, ctypes.POINTER(ctypes.c_void_p))
    index = 0
    while (entry := entries[index]) is not None:
        if start <= entry < end:
            return True
        index += 1
    return False


_program_names_kept = False


def _keep_program_names() -> None:
    """glibc's program_invocation_name and _short_name point into argv[0] (its messages
    name the program by them): point them at copies first, as setproctitle does."""
    global _program_names_kept
    if _program_names_kept:
        return
    import ctypes

    libc = _libc()
    libc.strdup.restype = ctypes.c_void_p
    libc.strdup.argtypes = [ctypes.c_char_p]
    for name in ("program_invocation_name", "program_invocation_short_name"):
        try:
            pointer = ctypes.c_void_p.in_dll(libc, name)
        except ValueError:
            continue  # not glibc
        value = ctypes.c_char_p.in_dll(libc, name).value
        copy = None if value is None else libc.strdup(value)
        if copy:
            pointer.value = copy
    _program_names_kept = True
