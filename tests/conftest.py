"""Shared helpers: run the real CLI, read its output with deadlines, find a job's processes."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from collections.abc import Callable, Iterator

import psutil
import pytest

pytest_plugins = ["ssh_fixtures"]

REPO = Path(__file__).resolve().parents[1]
POLL_S = 0.02


def launcher_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "launcher", *args]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll a condition that has no event to wait on (a process disappearing), bounded."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(POLL_S)


def processes_with_token(token: str) -> list[psutil.Process]:
    """Live processes whose environment carries this test's token: the job's whole tree."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get("DDPLAUNCH_TEST_TOKEN") == token:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def kill_token(token: str) -> None:
    for proc in processes_with_token(token):
        try:
            proc.kill()
        except psutil.Error:
            pass


class Run:
    """A launcher started in the background; its output lines arrive on queues (events)."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            launcher_argv(*args),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.lines: dict[str, queue.Queue[str]] = {"out": queue.Queue(), "err": queue.Queue()}
        self.seen: dict[str, list[str]] = {"out": [], "err": []}
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, "out"), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, "err"), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _pump(self, pipe: object, name: str) -> None:
        for raw in iter(pipe.readline, b""):  # type: ignore[attr-defined]
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.seen[name].append(line)
            self.lines[name].put(line)

    def wait_line(self, needle: str, timeout: float = 20.0, stream: str = "out") -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line with {needle!r} within {timeout}s; got {self.seen}")
            try:
                line = self.lines[stream].get(timeout=remaining)
            except queue.Empty:
                continue
            if needle in line:
                return line

    def wait_lines(self, needle: str, count: int, timeout: float = 20.0) -> None:
        for _ in range(count):
            self.wait_line(needle, timeout)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        code = self.proc.wait(timeout=timeout)
        for thread in self._threads:
            thread.join(timeout=5)
        return code

    @property
    def out(self) -> str:
        return "\n".join(self.seen["out"])

    @property
    def err(self) -> str:
        return "\n".join(self.seen["err"])


@pytest.fixture
def token() -> Iterator[str]:
    """A unique mark in every worker's environment; whatever carries it is killed afterwards."""
    value = uuid.uuid4().hex
    yield value
    kill_token(value)


@pytest.fixture
def job_env(token: str) -> dict[str, str]:
    env = dict(os.environ)
    env["DDPLAUNCH_TEST_TOKEN"] = token
    env["DDPLAUNCH_CLUSTER"] = "none"  # a CI runner inside a Slurm job must not change the plans
    env.pop("NO_COLOR", None)
    return env


@pytest.fixture
def start(job_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., Run]]:
    """Start the launcher in the background; it is killed at the end if still running."""
    runs: list[Run] = []

    def _start(*args: str, env: dict[str, str] | None = None) -> Run:
        run = Run(list(args), env or job_env, tmp_path)
        runs.append(run)
        return run

    yield _start
    for run in runs:
        if run.proc.poll() is None:
            run.proc.send_signal(signal.SIGKILL)
            run.proc.wait(timeout=10)


def write_script(path: Path, body: str) -> str:
    path.write_text(body)
    return str(path)
