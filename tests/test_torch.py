"""Real torch.distributed through ddplaunch: gloo collectives, the demo, @record, torchrun parity."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers_cli import REPO, launcher_argv, processes_with_token, write_script

ENV_DUMP = """
import json, os, sys
with open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump(dict(os.environ), f)
"""


def test_gloo_all_reduce_across_four_ranks(start, tmp_path: Path, token: str) -> None:
    script = write_script(
        tmp_path / "allreduce.py",
        """
import torch, torch.distributed as dist
dist.init_process_group("gloo")
value = torch.tensor([float(dist.get_rank())])
dist.all_reduce(value)
print(f"sum {value.item():g} world {dist.get_world_size()} elastic {dist.is_torchelastic_launched()}")
dist.destroy_process_group()
""",
    )
    run = start("--nproc", "4", script)
    assert run.wait(timeout=120) == 0, run.err
    assert sorted(line.split(" | ")[1] for line in run.seen["out"]) == ["sum 6 world 4 elastic True"] * 4
    assert processes_with_token(token) == []


def test_demo_trains_and_replicas_end_identical(start) -> None:
    run = start("--nproc", "2", str(REPO / "examples" / "train_ddp.py"), "--epochs", "3")
    assert run.wait(timeout=180) == 0, run.err
    assert "replicas identical on all 2 ranks" in run.out
    assert "epoch 3/3" in run.out


def test_record_traceback_reaches_the_failure_report(start, tmp_path: Path) -> None:
    script = write_script(
        tmp_path / "recorded.py",
        """
import os
from torch.distributed.elastic.multiprocessing.errors import record

def load_batch():
    raise KeyError("missing column 'label' in shard 17")

@record
def main():
    if os.environ["RANK"] == "1":
        load_batch()
    import time; time.sleep(60)

main()
""",
    )
    run = start("--nproc", "2", script)
    assert run.wait(timeout=120) == 1
    report = run.err[run.err.index("Root cause"):]
    assert "traceback from its error file" in report
    assert "in load_batch" in report and "missing column 'label' in shard 17" in report


def _dump_env(argv: list[str], out_dir: Path, env: dict[str, str]) -> dict[int, dict[str, str]]:
    out_dir.mkdir()
    done = subprocess.run([*argv, str(out_dir)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in out_dir.glob("rank*.json")}


def test_workers_see_what_torchrun_gives(tmp_path: Path, job_env: dict[str, str]) -> None:
    script = write_script(tmp_path / "dump.py", ENV_DUMP)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    theirs = _dump_env([torchrun, "--standalone", "--nproc-per-node", "2", script], tmp_path / "torchrun", job_env)
    ours = _dump_env(launcher_argv("--nproc", "2", script), tmp_path / "ours", job_env)
    assert sorted(theirs) == sorted(ours) == [0, 1]
    for rank in (0, 1):
        added_by_torchrun = set(theirs[rank]) - set(job_env)
        missing = added_by_torchrun - set(ours[rank])
        assert not missing, f"torchrun sets {sorted(missing)} and ddplaunch does not"
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                    "ROLE_NAME", "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE", "TORCHELASTIC_RESTART_COUNT",
                    "TORCHELASTIC_MAX_RESTARTS", "TORCH_NCCL_ASYNC_ERROR_HANDLING"):
            assert ours[rank][key] == theirs[rank][key], key
        for key in set(job_env) - {"OMP_NUM_THREADS"}:
            assert ours[rank].get(key) == job_env[key], f"user variable {key} changed"
