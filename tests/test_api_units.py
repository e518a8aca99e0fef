"""ddplaunch.spawn/run's pure parts: keywords to the command line's flags, which functions a
new process finds by name, and what JobFailed says."""

from __future__ import annotations

import pytest
from api_functions import noop

from ddplaunch.api import JobFailed, RootCause, RunResult, findable_by_name, option_flags
from ddplaunch.errors import LaunchError

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("options", "flags"), [
    ({"nproc": 4}, ["--nproc", "4"]),
    ({"gpu_ids": [0, 2]}, ["--gpu-ids", "0,2"]),  # a list is comma-joined for a one-value option
    ({"gpu_ids": "0,2"}, ["--gpu-ids", "0,2"]),
    ({"env": {"A": "1", "B": "x y"}}, ["--env", "A=1", "--env", "B=x y"]),  # repeated for a multiple one
    ({"env": ["A=1"]}, ["--env", "A=1"]),
    ({"no_python": True, "module": False}, ["--no-python"]),  # switches: True only
    ({"max_restarts": 2, "log_dir": None}, ["--max-restarts", "2"]),  # None: the default
    ({"hosts": ["a", "b"], "sync": True}, ["--hosts", "a,b", "--sync"]),
    ({"sync_exclude": ["data", "*.ckpt"]}, ["--sync-exclude", "data", "--sync-exclude", "*.ckpt"]),
])
def test_keywords_become_the_command_lines_flags(options: dict[str, object], flags: list[str]) -> None:
    assert option_flags(options) == flags


@pytest.mark.parametrize("name", ["nprocs", "agent", "from_python", "script"])
def test_a_keyword_that_is_no_option_is_named(name: str) -> None:
    with pytest.raises(LaunchError, match=f"no option '{name}'.*nproc"):
        option_flags({name: 1})


def test_a_function_is_found_by_name_unless_it_lives_only_here() -> None:
    def nested(rank: int) -> int:
        return rank

    assert findable_by_name(noop)  # a module's function, as mp.spawn finds it
    assert not findable_by_name(nested) and not findable_by_name(lambda rank: rank)
    in_main = type(noop)(noop.__code__, {}, "cell_fn")
    in_main.__module__ = "__main__"  # as a notebook cell's: its code is not the main script's file
    assert not findable_by_name(in_main)


def test_job_failed_says_the_root_cause_and_its_traceback() -> None:
    cause = RootCause(rank=1, description="rank 1 failed (exit code 1)", exit_code=1,
                      traceback="Traceback (most recent call last):\n  ...\nValueError: no\n")
    failed = JobFailed(RunResult(exit_code=1, rank_exit_codes={0: -15, 1: 1}, root_cause=cause))
    assert str(failed) == "rank 1 failed (exit code 1)\nTraceback (most recent call last):\n  ...\nValueError: no"
    assert failed.root_cause is cause and not failed.result.ok
    assert str(JobFailed(RunResult(exit_code=130))) == "the job ended with exit code 130"
