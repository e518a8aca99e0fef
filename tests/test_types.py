"""The launcher is fully typed: mypy --strict over the package (launcher/, cli.py with it) finds nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers_cli import REPO


def test_mypy_strict_is_clean(tmp_path: Path) -> None:
    # mypy names a module by its path, and the repository's folder is launcher/: a folder that
    # holds it under the import name lets it check the package as `ddplaunch`, imports resolved.
    (tmp_path / "ddplaunch").symlink_to(REPO / "launcher")
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--ignore-missing-imports", "--cache-dir", str(tmp_path / "cache"),
         "-p", "ddplaunch"],
        cwd=REPO,
        env={**os.environ, "MYPYPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and "Success: no issues found" in done.stdout, done.stdout + done.stderr
