"""torchrun's --duplicate-stdout-filters / --duplicate-stderr-filters: the terminal's lines that
contain one of the filters are also appended to filtered_stdout.log / filtered_stderr.log in
the log directory, with their rank prefix, as torchrun copies its console's lines to the files
of the same names.

A printer of its own (a subclass that only adds to `_emit`, where the terminal's whole lines
pass), so the terminal's printer does not change for a launch that does not ask for copies.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ddplaunch.logs import Printer, Stream, _open_append, _RankOutput, _write_all, rank_prefixes, terminal_colour

STREAM_NAMES = {1: "stdout", 2: "stderr"}


class CopyingPrinter(Printer):
    """The terminal's printer, and a copy of the matching lines it shows."""

    def __init__(
        self,
        duplicates: tuple[tuple[str, ...], tuple[str, ...]],
        *,
        log_dir: str,
        world_ranks: list[int],
        world_size: int,
        colour: bool,
        shows: Callable[[int, int], bool],
    ) -> None:
        super().__init__(world_ranks=world_ranks, world_size=world_size, colour=colour, log_dir=log_dir, shows=shows)
        self._needles = {1: [n.encode() for n in duplicates[0]], 2: [n.encode() for n in duplicates[1]]}
        self._files = {
            stream: _open_append(os.path.join(log_dir, f"filtered_{name}.log"))
            for stream, name in STREAM_NAMES.items()
            if self._needles[stream]
        }

    def _emit(self, output: _RankOutput, stream: Stream, lines: list[bytes]) -> None:
        """The lines framed once, for the terminal; those it shows and that match are copied."""
        super()._emit(output, stream, lines)
        if lines and stream in self._files and output.shown[stream]:
            self._copy(output.rank, stream, lines)

    def _copy(self, rank: int, stream: int, lines: list[bytes]) -> None:
        needles = self._needles[stream]
        matching = [line for line in lines if any(needle in line for needle in needles)]
        if matching:
            prefix = rank_prefixes(rank, self._world_size, False)[stream - 1]
            _write_all(self._files[stream], b"".join(prefix + line + b"\n" for line in matching))

    def close(self) -> None:
        super().close()
        for fd in self._files.values():
            os.close(fd)
        self._files = {}


def copying_printer(
    duplicates: tuple[tuple[str, ...], tuple[str, ...]],
    *,
    no_color: bool,
    world_ranks: list[int],
    world_size: int,
    log_dir: str,
    shows: Callable[[int, int], bool],
) -> CopyingPrinter:
    """As ddplaunch.logs.terminal_printer, with the copies."""
    colour = terminal_colour(no_color, os.environ)
    return CopyingPrinter(
        duplicates, log_dir=log_dir, world_ranks=world_ranks, world_size=world_size, colour=colour, shows=shows
    )
