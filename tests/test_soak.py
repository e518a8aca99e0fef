"""scripts/soak.py, small: ten real launches (two of each scenario) leave nothing behind."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

import soak


def test_ten_launches_of_every_kind_leave_no_process_zombie_or_temp_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ddplaunch = str(Path(sys.executable).with_name("ddplaunch"))
    code = soak.main(["--runs", "10", "--dir", str(tmp_path / "soak"), "--ddplaunch", ddplaunch])
    out = capsys.readouterr()
    cells = [re.split(r"\s{2,}", line) for line in out.out.splitlines()]
    rows = {row[0]: row[1:] for row in cells if row[0] in {s.name for s in soak.SCENARIOS}}
    assert code == 0, out
    assert set(rows) == {s.name for s in soak.SCENARIOS}
    for name, (runs, failures, procs, dirs, kill9_dirs, zombies, _rss) in rows.items():
        # kill9_dirs: a SIGKILLed launcher ran no code to remove its temp dir; its guard did.
        assert (runs, failures, procs, dirs, kill9_dirs, zombies) == ("2", "0", "0", "0", "0", "0"), (name, out.out)
    assert "nothing left" in out.out
