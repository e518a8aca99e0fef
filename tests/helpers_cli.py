"""The one way tests run the real CLI: its command line, its environment, a run to the end or
in the background, and the processes a run leaves; also fake nvidia-smi scripts.

A plain module, not conftest.py: pytest loads conftest.py as a plugin and does not mean it to
be imported, so conftest.py only wraps these helpers in fixtures (token, job_env, start).
Nothing here touches the test process's os.environ: every subprocess gets its own env dict.
"""

from __future__ import annotations

import glob
import os
import queue
import shutil
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psutil

from ddplaunch.options import Options

REPO = Path(__file__).resolve().parents[1]
CLI_TIMEOUT_S = 30
POLL_S = 0.02
TOKEN_VARIABLE = "DDPLAUNCH_TEST_TOKEN"  # marks every process of one test's job

# Variables from the caller's shell that would change what the launcher decides. PET_* are
# torchrun's spellings of the flags (click reads them); SLURM_*, OMPI_* and MASTER_* are what
# the cluster detection reads, so a test that turns it back on sees only its own.
_SCRUBBED = (
    "CUDA_VISIBLE_DEVICES",
    "NO_COLOR",
    "OMP_NUM_THREADS",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
    "MASTER_ADDR",
    "MASTER_PORT",
)
_SCRUBBED_PREFIXES = ("PET_", "SLURM_", "OMPI_")


# -- the command line and its environment ----------------------------------------------------


def launcher_argv(*args: str, interpreter_options: Sequence[str] = ()) -> list[str]:
    """`python -m ddplaunch ARGS` with this venv's Python (options such as -X importtime first)."""
    return [sys.executable, *interpreter_options, "-m", "ddplaunch", *args]


def cli_env(bin_dir: Path | None = None, *, only_bin_dir: bool = False, **extra: str) -> dict[str, str]:
    """A copy of os.environ for the CLI: decision-changing variables out, cluster detection off.

    bin_dir goes first on PATH; only_bin_dir=True makes it all of PATH, which hides any real
    nvidia-smi (the CLI and the workers are started through absolute paths, so they need
    nothing from PATH). `extra` comes last: a test of the detection sets DDPLAUNCH_CLUSTER.
    """
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED and not k.startswith(_SCRUBBED_PREFIXES)}
    env["DDPLAUNCH_CLUSTER"] = "none"  # a CI runner inside a Slurm job must not change the plans
    if bin_dir is not None:
        env["PATH"] = str(bin_dir) if only_bin_dir else str(bin_dir) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


def write_script(path: Path, body: str) -> str:
    """Write a worker script (its indentation removed) and return its path as the CLI takes it."""
    path.write_text(textwrap.dedent(body))
    return str(path)


# -- a run to its end ----------------------------------------------------------------------


@dataclass(frozen=True)
class CliResult:
    code: int
    out: bytes
    err: bytes

    @property
    def stdout(self) -> str:
        return self.out.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return self.err.decode("utf-8", "replace")

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_cli(
    args: Sequence[str],
    env: dict[str, str],
    *,
    cwd: Path = REPO,
    timeout: float = CLI_TIMEOUT_S,
    interpreter_options: Sequence[str] = (),
    input: bytes | None = None,
) -> CliResult:
    """Run the CLI to its end with both outputs captured (read together: no pipe fills up).

    Its stdin is `input` through a pipe, closed after it; /dev/null without one.
    """
    argv = launcher_argv(*args, interpreter_options=interpreter_options)
    stdin = subprocess.DEVNULL if input is None else None  # run() makes the pipe for input
    try:
        done = subprocess.run(argv, cwd=cwd, env=env, stdin=stdin, input=input, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:  # the launcher was SIGKILLed; its guard stops the rest
        tail = (exc.stderr or b"")[-2000:]
        raise AssertionError(f"launcher still running after {timeout}s; its stderr ends {tail!r}") from None
    return CliResult(done.returncode, done.stdout, done.stderr)


# -- a run in the background ----------------------------------------------------------------


class Run:
    """A launcher started in the background; its output lines arrive on queues (events).

    Its stdin is `input`, written by a thread and then closed; /dev/null without one.
    """

    def __init__(self, args: Sequence[str], env: dict[str, str], cwd: Path, input: bytes | None = None) -> None:
        self.proc = subprocess.Popen(
            launcher_argv(*args),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL if input is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        if input is not None:
            threading.Thread(target=self._feed, args=(self.proc.stdin, input), daemon=True).start()
        self.lines: dict[str, queue.Queue[str]] = {"out": queue.Queue(), "err": queue.Queue()}
        self.seen: dict[str, list[str]] = {"out": [], "err": []}
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, "out"), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, "err"), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _feed(pipe: IO[bytes], data: bytes) -> None:
        try:
            pipe.write(data)
            pipe.close()
        except BrokenPipeError:
            pass  # the launcher is gone; the test's assertions say why

    def _pump(self, pipe: IO[bytes], name: str) -> None:
        for raw in iter(pipe.readline, b""):
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


# Runs the launcher at a pseudo-terminal of its own, as a shell would: the pty (fd 0) becomes
# the session's controlling terminal. "foreground": the launcher is the terminal's foreground
# job, so Ctrl-C reaches it. "background": this process stays the foreground and the launcher
# runs as a job of its own (`ddplaunch ... &`).
_AT_TERMINAL = """
import fcntl, os, sys, termios
os.setsid()
fcntl.ioctl(0, termios.TIOCSCTTY, 0)
if sys.argv[1] == "background":
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)
        os.execv(sys.argv[2], sys.argv[2:])
    sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
os.execv(sys.argv[2], sys.argv[2:])
"""


class TerminalRun:
    """A launcher at a terminal (a pty): what a user would see there, and keys typed to it."""

    def __init__(self, args: Sequence[str], env: dict[str, str], cwd: Path, *, job: str = "foreground") -> None:
        import pty

        self._master, slave = pty.openpty()
        argv = [sys.executable, "-c", _AT_TERMINAL, job, *launcher_argv(*args)]
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave)
        os.close(slave)
        self.screen = b""
        self._ended = False  # every process of the terminal closed it
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self._master, 4096)
            except OSError:  # EIO: every process of the terminal closed it
                data = b""
            with self._changed:
                self.screen += data
                self._ended = not data
                self._changed.notify_all()
            if not data:
                return

    def type(self, keys: bytes) -> None:
        os.write(self._master, keys)

    def wait_for(self, pattern: bytes, timeout: float = 20.0) -> None:
        """Until the screen matches the regular expression `pattern`."""
        import re

        with self._changed:
            if not self._changed.wait_for(lambda: re.search(pattern, self.screen) is not None, timeout):
                raise AssertionError(f"no {pattern!r} on the terminal within {timeout}s; it shows {self.screen!r}")

    def wait(self, timeout: float = 30.0) -> int:
        code = self.proc.wait(timeout=timeout)
        with self._changed:
            self._changed.wait_for(lambda: self._ended, 5)
        os.close(self._master)
        return code


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll a condition that has no event to wait on (a process disappearing), bounded."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(POLL_S)


# -- what a run leaves behind ---------------------------------------------------------------


def processes_with_token(token: str, *, in_command_line: bool = False) -> list[psutil.Process]:
    """Live processes whose environment carries this test's token: the job's whole tree.

    in_command_line=True also counts those that only name it in their command line: an SSH
    head and its agents, when tests give it as --run-id too (--env values go to an agent on its
    stdin, not its command line).
    """
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid == os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(TOKEN_VARIABLE) == token or (in_command_line and token in " ".join(proc.cmdline())):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def without_warm_interpreters(processes: list[psutil.Process]) -> list[psutil.Process]:
    """The job's processes less --warm's interpreters (one per node, titled `ddplaunch --warm:
    MODULES (job ID)`): what a count of the launcher, guard, workers and their children means
    whether the suite runs cold or warm (DDPLAUNCH_WARM=1)."""
    kept = []
    for proc in processes:
        try:
            if not " ".join(proc.cmdline()).startswith("ddplaunch --warm:"):
                kept.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return kept


def kill_token(token: str) -> None:
    """SIGKILL whatever is left of a job, wherever it carries the token."""
    for proc in processes_with_token(token, in_command_line=True):
        try:
            proc.kill()
        except psutil.Error:
            pass


# -- a fake nvidia-smi ----------------------------------------------------------------------


def gpu_uuid(index: int) -> str:
    return f"GPU-00000000-0000-0000-0000-{index:012d}"


def nvidia_smi_lines(count: int) -> list[str]:
    return [f"{i}, {gpu_uuid(i)}" for i in range(count)]


def _shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def fake_nvidia_smi_script(stdout_lines: list[str], exit_code: int = 0) -> str:
    """A /bin/sh script that prints `stdout_lines` and exits with `exit_code` (builtins only)."""
    body = "".join(f"printf '%s\\n' {_shell_quote(line)}\n" for line in stdout_lines)
    return f"#!/bin/sh\n{body}exit {exit_code}\n"


# name -> (stdout lines, exit code)
FAKE_NVIDIA_SMI = {
    "8gpu": (nvidia_smi_lines(8), 0),
    "2gpu": (nvidia_smi_lines(2), 0),
    "nogpu": (["No devices were found"], 6),
    "broken": (["this is not, a, gpu list", "garbage"], 0),
    "failing": (["Failed to initialize NVML: Driver/library version mismatch"], 9),
}


def install_fake_nvidia_smi(bin_dir: Path, variant: str | None) -> Path:
    """Write `nvidia-smi` into bin_dir (or nothing, for variant None); return bin_dir."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    if variant is not None:
        lines, code = FAKE_NVIDIA_SMI[variant]
        exe = bin_dir / "nvidia-smi"
        exe.write_text(fake_nvidia_smi_script(lines, code))
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return bin_dir


# -- the dry-run table ----------------------------------------------------------------------


def table_rows(dry_run_output: str) -> list[list[str]]:
    """The worker rows of a dry-run table, split on runs of spaces (header excluded)."""
    lines = dry_run_output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("node  host"))
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


def table_header(dry_run_output: str) -> list[str]:
    line = next(line for line in dry_run_output.splitlines() if line.startswith("node  host"))
    return [cell.strip() for cell in line.split("  ") if cell.strip()]


def table_column(dry_run_output: str, name: str) -> list[str]:
    """One column of the dry-run table by header name (cells contain no spaces)."""
    header = table_header(dry_run_output)
    index = header.index(name)
    return [row[index] for row in table_rows(dry_run_output)]


def interpreter(minor: int) -> str | None:
    """A CPython 3.<minor> on PATH or under pyenv that actually runs (a pyenv shim may not)."""
    candidates = [shutil.which(f"python3.{minor}") or ""]
    candidates += sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/3.{minor}.*/bin/python3.{minor}")))
    for candidate in candidates:
        if candidate and subprocess.run([candidate, "-c", "pass"], capture_output=True, timeout=30).returncode == 0:
            return candidate
    return None


def head_options(**changes: object) -> Options:
    """Options as the SSH head holds them for a job on hosts a,b; `changes` override fields."""
    base: dict[str, object] = dict(
        script="train.py", script_args=("--lr", "0.1"), nproc=None, nnodes=None, node_rank=None,
        master_addr=None, master_port=None, rdzv_endpoint=None, rdzv_backend=None, join_timeout=None,
        standalone=False, gpu_ids=None, module=False, no_python=False, local_rank_arg=False, log_dir=None,
        ranks=None, max_restarts=0, env=(), dry_run=False, grace=30.0, run_id="rid", no_color=False,
        hosts="a,b", hostfile=None, ssh_accept_new_host_keys=False, chdir=None, python="/opt/py/bin/python",
        stdin="0", agent=False, host_name=None,
    )
    base.update(changes)
    return Options(**base)  # type: ignore[arg-type]
