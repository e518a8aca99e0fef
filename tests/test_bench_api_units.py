"""The bench's Python API rows (scripts/bench_api.py), their pure parts: the driver's result line,
what each process left behind is, the rows' verdicts, and that a leftover is shown, not hidden."""

from __future__ import annotations

import json

import pytest
from bench_api import (
    API_WORKERS, DDP, DRIVER, FUNCTIONS, GRANDCHILD, MP, RESULT_MARK, SpawnFailRow, SpawnKillRow, Spawn4Row,
    count_kinds, parse_report, process_kind, render_api,
)

pytestmark = pytest.mark.unit

PY = "/venv/bin/python"


def test_the_result_line_is_found_among_the_launchers_own_lines() -> None:
    report = {"tool": DDP, "mode": "noop", "call_s": 1.25, "returned": "[None, None, None, None]"}
    stdout = f"ddplaunch: starting 4 worker(s), ranks 0-3\n{RESULT_MARK}{json.dumps(report)}\n  0 | a rank's line\n"
    assert parse_report(stdout) == report


def test_a_driver_that_printed_no_result_line_is_an_error_not_a_zero() -> None:
    with pytest.raises(RuntimeError, match="no result line"):
        parse_report("Traceback (most recent call last):\nRuntimeError: boom\n")


@pytest.mark.parametrize(("cmdline", "kind"), [
    ([PY, "-c", "import time; time.sleep(60)", GRANDCHILD], "grandchild"),
    ([PY, "-c", "from multiprocessing.resource_tracker import main;main(5)"], "resource tracker"),
    ([PY, "-c", "from multiprocessing.spawn import spawn_main; spawn_main(tracker_fd=6, pipe_handle=8)",
      "--multiprocessing-fork"], "rank"),
    ([PY, "-m", "ddplaunch.spawned", "/tmp/ddplaunch-py-x"], "rank"),
    ([PY, "-m", "ddplaunch", "--from-python", "/tmp/ddplaunch-py-x", "--nproc", "4", "-m", "ddplaunch.spawned"],
     "launcher"),
    ([PY, "/tmp/bench/api_driver.py", MP, "sleep"], "other"),
    ([], "other"),  # gone before its command line was read
])
def test_each_leftover_is_named_by_its_command_line(cmdline: list[str], kind: str) -> None:
    assert process_kind(cmdline) == kind


def test_leftovers_are_counted_by_kind() -> None:
    grandchild = [PY, "-c", "pass", GRANDCHILD]
    assert count_kinds([grandchild, grandchild, [PY, "-m", "ddplaunch.spawned", "F"]]) == {"grandchild": 2, "rank": 1}
    assert count_kinds([]) == {}


def test_spawn4_is_judged_by_the_ratio_of_the_call_times() -> None:
    row = Spawn4Row()
    assert row.ok() is None  # nothing measured: no verdict
    row.series[DDP] += [1.0, 1.2, None]
    row.series[MP] += [3.0, None, 3.2]
    assert row.ratio() == pytest.approx(1.1 / 3.1)
    assert row.ok() is True
    row.series[DDP][:] = [2.0, 2.0]
    assert row.ok() is False


def test_spawnfail_fails_when_ddplaunch_left_anything_running_however_fast() -> None:
    row = SpawnFailRow()
    row.series[DDP] += [1.0, 1.0]
    row.series[MP] += [9.0, 9.0]
    row.extra[DDP]["left"] = [0, 0]
    assert row.ok() is True
    row.extra[DDP]["left"] = [0, 1]
    assert row.ok() is False
    row.extra[DDP]["left"] = []  # never counted: not a pass
    assert row.ok() is False


def test_spawnkill_wants_zero_from_ddplaunch_in_every_rep_and_has_no_ratio() -> None:
    row = SpawnKillRow()
    assert row.ok() is None
    row.series[DDP] += [0.0, 0.0]
    row.series[MP] += [4.0, 9.0]
    assert (row.ok(), row.ratio()) == (True, None)
    row.series[DDP].append(1.0)
    assert row.ok() is False


def test_the_report_shows_every_tools_leftovers_and_the_verdicts() -> None:
    fail, kill = SpawnFailRow(), SpawnKillRow()
    fail.series[DDP] += [1.0]
    fail.series[MP] += [9.0]
    fail.extra[DDP].update(left=[0], kinds=[{}], raised=["JobFailed"])
    fail.extra[MP].update(left=[1], kinds=[{"resource tracker": 1}], raised=["ProcessRaisedException"])
    kill.series[DDP] += [0.0]
    kill.series[MP] += [4.0]
    kill.extra[MP].update(before_kill=[9], kinds=[{"grandchild": 4}])
    text = "\n".join(render_api([fail, kill]))
    assert "mp.spawn : per rep [1]; last run {'resource tracker': 1}" in text
    assert "mp.spawn : per rep [4] (of [9] besides the caller before the kill); last run {'grandchild': 4}" in text
    assert "| 0.111 | <= 0.3, 0 left | yes" in text
    assert "| 0                        | 4                 | n/a   | ddplaunch 0    | yes" in text


def test_the_driver_and_its_functions_are_valid_python() -> None:
    for name in (DRIVER, FUNCTIONS):
        compile(API_WORKERS[name], name, "exec")
