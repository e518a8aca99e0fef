"""ddplaunch: a launcher for PyTorch distributed training with torchrun's environment.

From Python: `ddplaunch.spawn(fn, args, nprocs=N)` runs fn(rank, *args) on N ranks, as
torch.multiprocessing.spawn does, with the launcher's supervision; `ddplaunch.run([...], ...)`
is the command line's job, returning a RunResult (launcher.api). They are imported on first
use: `python -m ddplaunch` and every node agent import this package first, and start in
milliseconds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["JobFailed", "LaunchError", "RootCause", "RunResult", "SpawnContext", "run", "spawn"]

if TYPE_CHECKING:
    from ddplaunch.api import JobFailed, RootCause, RunResult, SpawnContext, run, spawn
    from ddplaunch.errors import LaunchError


def __getattr__(name: str) -> Any:
    if name == "LaunchError":
        from ddplaunch.errors import LaunchError

        return LaunchError
    if name in __all__:
        from ddplaunch import api

        return getattr(api, name)
    raise AttributeError(f"module 'ddplaunch' has no attribute {name!r}")
