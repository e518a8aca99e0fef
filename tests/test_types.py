"""The launcher is fully typed: mypy --strict over cli.py and launcher/ finds nothing."""

from __future__ import annotations

import subprocess
import sys

from helpers_cli import REPO


def test_mypy_strict_is_clean() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--ignore-missing-imports", "cli.py", "launcher"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
