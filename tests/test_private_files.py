"""What ddplaunch writes for a job is its owner's only: a rank's output may hold secrets it printed."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from helpers_cli import run_cli, write_script


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_log_dir_files_and_folders_it_makes_are_the_owners_only(tmp_path: Path, job_env: dict[str, str]) -> None:
    script = write_script(tmp_path / "fails.py", "import os, sys\nprint('hello')\nsys.exit(int(os.environ['RANK']))\n")
    logs = tmp_path / "new" / "logs"
    result = run_cli(["--nproc", "2", "--log-dir", str(logs), script], job_env, cwd=tmp_path)
    assert result.code == 1, result.stderr
    assert mode(logs) == 0o700
    assert {p.name for p in logs.iterdir()} >= {"rank0.log", "rank1.log", "launcher.log", "errors"}
    for name in ("rank0.log", "rank1.log", "launcher.log"):
        assert mode(logs / name) == 0o600, name
    assert mode(logs / "errors") == 0o700
    assert mode(logs / "errors" / "attempt0") == 0o700
