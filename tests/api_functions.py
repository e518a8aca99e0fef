"""Functions that tests run on ranks through ddplaunch.spawn: a module of their own, found by
name in the new processes (tests/ is on the caller's sys.path, which each rank gets)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                      "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")


def environment(rank: int, greeting: str) -> dict[str, str]:
    print(f"{greeting} from rank {rank}", flush=True)
    return {name: os.environ[name] for name in TORCHRUN_VARIABLES}


def fail_on_rank_one(rank: int) -> None:
    if rank == 1:
        raise ValueError(f"rank {rank} is unhappy")
    time.sleep(60)


def noop(rank: int) -> int:
    return rank


def sleep_with_a_child(rank: int, folder: str) -> None:
    """Each rank starts a subprocess (as a DataLoader would), says it runs, and waits."""
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    Path(folder, f"running-{rank}").touch()
    time.sleep(60)


def all_reduce(rank: int, value: float) -> float:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")  # env:// from the launcher's variables
    tensor = torch.tensor([value * (rank + 1)])
    dist.all_reduce(tensor)
    dist.destroy_process_group()
    return float(tensor.item())
