"""Fixtures around helpers_cli: a token that marks a job, its environment, background runs."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers_cli import TOKEN_VARIABLE, Run, cli_env, kill_token

pytest_plugins = ["ssh_fixtures"]


@pytest.fixture(autouse=True)
def _pure_tests_parse_without_ddplaunch_warm(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """DDPLAUNCH_WARM=1 (a user's default, or the suite run warm: every job it starts is then
    warm) is read by click in-process too: a pure test comparing parsed options must not see it."""
    if request.node.get_closest_marker("unit") is not None:
        monkeypatch.delenv("DDPLAUNCH_WARM", raising=False)


@pytest.fixture
def token() -> Iterator[str]:
    """A unique mark in every worker's environment; whatever carries it is killed afterwards."""
    value = uuid.uuid4().hex
    yield value
    kill_token(value)


@pytest.fixture
def job_env(token: str) -> dict[str, str]:
    return {**cli_env(), TOKEN_VARIABLE: token}


@pytest.fixture
def start(job_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., Run]]:
    """Start the launcher in the background; it is killed at the end if still running."""
    runs: list[Run] = []

    def _start(*args: str, env: dict[str, str] | None = None, input: bytes | None = None) -> Run:
        run = Run(list(args), env or job_env, tmp_path, input)
        runs.append(run)
        return run

    yield _start
    for run in runs:
        if run.proc.poll() is None:
            run.proc.send_signal(signal.SIGKILL)
            run.proc.wait(timeout=10)
