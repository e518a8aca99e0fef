"""ddplaunch from Python: `run` (the command line's job) and `spawn` (mp.spawn's fn(rank, *args)).

Both run the launcher as a child process of the caller, exactly the command line's
(`python -m ddplaunch ...`, whose job function, launcher.job.run_command, the `ddplaunch`
command calls too), and wait for it. So the caller's process gains no signal handler, thread,
subreaper flag, open-files limit or fork of its own (the launcher forks its guard, which is
safe only in a process without threads, and a notebook's kernel has several), and keeps only
what it asked for: the child is reaped, its pipes closed and its folder removed before the call
returns. The launcher hears of its caller's death (PR_SET_PDEATHSIG, set by itself: see
launcher.job), stops its ranks and removes the folder.

Output: when the caller's sys.stdout and sys.stderr are this process's file descriptors 1 and
2 (a terminal, a file, a pipe), the launcher writes there itself, live areas and colours
included; otherwise (Jupyter, pytest's capture, a redirect_stdout) its output is copied into
them, a line at a time. Ctrl-C (KeyboardInterrupt) in the caller stops every rank (one SIGINT
to the launcher, which runs in a session of its own) and is raised again once they are gone.
The launcher leaves `result.json` in the caller's private folder (launcher.job.write_result):
the exit code, each rank's, and the root cause, from which `RunResult` and `JobFailed` come.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from ddplaunch.errors import LaunchError

RESULT_FILE = "result.json"
STOP_WAIT_S = 60.0  # after Ctrl-C: the launcher's grace is the ranks' to use; then SIGKILL (its guard stops them)


@dataclass(frozen=True)
class RootCause:
    """The first observed failure: which rank, how it ended, what it said."""

    rank: int | None  # None when the job ended for another reason (a signal, a lost host)
    description: str  # "rank 1 failed (exit code 1)", as the launcher says it
    exit_code: int | None = None
    signal: str | None = None  # "SIGSEGV" when the rank died of a signal
    host: str | None = None
    traceback: str | None = None  # the whole traceback, when the rank raised
    last_lines: tuple[str, ...] = ()  # the last lines it printed (both streams)


@dataclass(frozen=True)
class RunResult:
    """How a job ended: its exit code (the command line's), each rank's, and the root cause."""

    exit_code: int
    rank_exit_codes: Mapping[int, int | None] = field(default_factory=dict)  # -N: killed by signal N
    root_cause: RootCause | None = None
    others: tuple[str, ...] = ()  # the other ranks' fate, one line each, as in the failure report
    restarts: int = 0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class JobFailed(Exception):
    """A `spawn` whose job failed: nothing of it is left running. `root_cause` says which rank
    and why (its traceback included), `result` the rest."""

    def __init__(self, result: RunResult) -> None:
        self.result = result
        self.root_cause = result.root_cause
        cause = result.root_cause
        text = cause.description if cause is not None else f"the job ended with exit code {result.exit_code}"
        if cause is not None and cause.traceback:
            text += "\n" + cause.traceback.rstrip()
        super().__init__(text)


# -- run ------------------------------------------------------------------------------------------


def run(args: str | Sequence[str], **options: Any) -> RunResult:
    """The command line's job from Python: `run(["train.py", "--lr", "0.1"], nproc=4)` is
    `ddplaunch --nproc 4 train.py --lr 0.1`, returning a RunResult instead of exiting.

    `args`: the script (or module with module=True, or program with no_python=True) and its
    arguments. Every option of the command line is a keyword, dashes as underscores (nproc,
    hosts, gpu_ids, log_dir, ranks, env, grace, max_restarts, stall_timeout, ...): True for a
    switch; a list or tuple for a comma-separated or repeated one; env also takes a dict.
    Options not given are the command line's defaults, except stdin, which is "none" (the
    caller's stdin stays the caller's). A mistake raises LaunchError, before anything starts."""
    argv = [args] if isinstance(args, str) else list(args)
    if not argv:
        raise LaunchError("ddplaunch.run needs the script to run: run(['train.py', ...], nproc=N).")
    with _Folder() as folder:
        return _launch([*option_flags({"stdin": "none", **options}), *argv], folder)


def option_flags(options: Mapping[str, Any]) -> list[str]:
    """Keywords -> the command line's flags, checked against the command line's own options."""
    from ddplaunch.cli import command

    internal = ("script", "script_args", "agent", "host_name", "from_python")
    known = {param.name: param for param in command.params if param.name not in internal}
    flags: list[str] = []
    for name, value in options.items():
        param = known.get(name)
        if param is None:
            raise LaunchError(f"ddplaunch: no option {name!r}. The options are the command line's, with "
                              f"underscores: {', '.join(sorted(str(n) for n in known))}.")
        # the dashed long form (--gpu-ids), not torchrun's underscore alias or a short one
        flag = next((o for o in param.opts if o.startswith("--") and "_" not in o), param.opts[0])
        if value is False and param.secondary_opts:  # warm=False: --no-warm, over DDPLAUNCH_WARM=1
            flag, value = param.secondary_opts[0], True
        flags += _flag_values(flag, value, getattr(param, "is_flag", False), getattr(param, "multiple", False))
    return flags


def _flag_values(flag: str, value: Any, is_flag: bool, multiple: bool) -> list[str]:
    if value is None or (is_flag and value is False):
        return []
    if is_flag:
        return [flag]
    if isinstance(value, Mapping):
        value = [f"{key}={item}" for key, item in value.items()]
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [str(item) for item in value]
        return [part for item in items for part in (flag, item)] if multiple else [flag, ",".join(items)]
    return [flag, str(value)]


# -- spawn ----------------------------------------------------------------------------------------


def spawn(
    fn: Callable[..., Any],
    args: tuple[Any, ...] = (),
    nprocs: int = 1,
    join: bool = True,
    daemon: bool = False,
    start_method: str = "spawn",
    **options: Any,
) -> list[Any] | SpawnContext:
    """torch.multiprocessing.spawn with ddplaunch's supervision: fn(rank, *args) in `nprocs`
    new processes, each with the torchrun environment (init_process_group("env://") just works).

    Returns each rank's return value, by rank (values must pickle). A failure raises JobFailed
    once every rank is gone; KeyboardInterrupt stops them all and is raised again. With
    join=False it returns a SpawnContext at once; its join() waits. `daemon` and `start_method`
    are accepted for mp.spawn's sake: every rank is a new interpreter, and none outlives the job.
    Keywords: the command line's options (gpu_ids, log_dir, ranks, env, grace, max_restarts,
    stall_timeout, ...), as for `run`."""
    from ddplaunch.spawned import IMPORTING_MAIN

    if os.environ.get(IMPORTING_MAIN):
        raise LaunchError(
            "ddplaunch.spawn was called while a rank was importing your main script to find its function: "
            "each rank runs the script's top level again (as under torch.multiprocessing.spawn). Put the "
            "call under `if __name__ == \"__main__\":`."
        )
    if start_method not in ("spawn", "fork", "forkserver"):
        raise LaunchError(f"ddplaunch.spawn: start_method={start_method!r}: use 'spawn' (every rank is a new process).")
    if not isinstance(nprocs, int) or nprocs < 1:
        raise LaunchError(f"ddplaunch.spawn: nprocs={nprocs!r}: give the number of processes, 1 or more.")
    folder = _Folder()
    try:
        write_payload(folder.path, fn, args)
        argv = [*option_flags({"stdin": "none", **options, "nproc": nprocs}), "-m", "ddplaunch.spawned", folder.path]
        context = SpawnContext(folder, argv, nprocs)
    except BaseException:
        folder.remove()
        raise
    return context.join_results() if join else context


class SpawnContext:
    """A spawn started with join=False: `join()` waits (and raises JobFailed on a failure),
    then `results` holds each rank's return value."""

    def __init__(self, folder: _Folder, argv: list[str], nprocs: int) -> None:
        self._folder = folder
        self._nprocs = nprocs
        self._launcher = _Launcher(argv, folder.path)
        self._ended: RunResult | None = None
        self.results: list[Any] | None = None

    @property
    def pid(self) -> int:
        """The launcher's process id (the ranks are its children)."""
        return self._launcher.pid

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the job; True once it ended (mp.spawn's meaning), False if `timeout` passed
        first. A failed job raises JobFailed, at every join."""
        if self._ended is None:
            try:
                if not self._launcher.wait(timeout):
                    return False
                result = self._launcher.result()
                if result.ok:
                    self.results = [read_result(self._folder.path, rank) for rank in range(self._nprocs)]
                self._ended = result
            finally:
                if self._launcher.done:
                    self._folder.remove()
        if not self._ended.ok:
            raise JobFailed(self._ended)
        return True

    def join_results(self) -> list[Any]:
        self.join()
        assert self.results is not None
        return self.results


def write_payload(folder: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    import multiprocessing.spawn
    import pickle

    from ddplaunch.spawned import PAYLOAD

    preparation = {key: value for key, value in multiprocessing.spawn.get_preparation_data("ddplaunch").items()
                   if key in ("sys_path", "sys_argv", "dir", "orig_dir", "init_main_from_name", "init_main_from_path")}
    payload = {"preparation": preparation, "fn": _pickled(fn, "the function", by_name=findable_by_name(fn)),
               "args": _pickled(args, "its args", by_name=True)}
    with open(os.path.join(folder, PAYLOAD), "wb") as file:
        pickle.dump(payload, file)


def findable_by_name(fn: Callable[..., Any]) -> bool:
    """Whether a new process finds fn by module and name, as mp.spawn finds it: a module-level
    function of an importable module, or of the script run as __main__ (re-run there as
    __mp_main__). One defined in a notebook cell, a lambda or a nested function is not."""
    qualname, module = getattr(fn, "__qualname__", ""), getattr(fn, "__module__", None)
    if module is None or "<locals>" in qualname or "<lambda>" in qualname:
        return False
    if module != "__main__":
        return True
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    code = getattr(fn, "__code__", None)
    return bool(main_file and code and os.path.abspath(code.co_filename) == os.path.abspath(main_file))


def _pickled(value: Any, what: str, by_name: bool) -> bytes:
    import pickle

    if by_name:
        try:
            return pickle.dumps(value)
        except Exception as exc:  # pickle raises PicklingError, TypeError, AttributeError...
            reason = str(exc)
    else:
        reason = "it is defined in a notebook, the interactive prompt, or inside another function"
    try:
        import cloudpickle
    except ImportError:
        raise LaunchError(
            f"ddplaunch.spawn cannot send {what} to the new processes ({reason}). Move it to a module "
            "(a .py file you import), or pip install cloudpickle, with which ddplaunch sends it by value."
        ) from None
    try:
        return bytes(cloudpickle.dumps(value))
    except Exception as exc:
        raise LaunchError(f"ddplaunch.spawn cannot send {what} to the new processes, even by value ({exc}).") from None


def read_result(folder: str, rank: int) -> Any:
    import pickle

    from ddplaunch.spawned import result_path

    with open(result_path(folder, rank), "rb") as file:
        return pickle.load(file)


# -- the launcher, a child of the caller ------------------------------------------------------------


class _Folder:
    """The caller's private folder for one job (payload, results, result.json); removed at the
    end, by the launcher if the caller is gone, or by its guard if the launcher is killed."""

    def __init__(self) -> None:
        self.path = tempfile.mkdtemp(prefix="ddplaunch-py-")

    def __enter__(self) -> _Folder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.path, ignore_errors=True)


def _launch(argv: list[str], folder: _Folder) -> RunResult:
    launcher = _Launcher(argv, folder.path)
    launcher.wait(None)
    return launcher.result()


def _owns_fd(stream: IO[str], fd: int) -> bool:
    """Whether `stream` writes to this process's file descriptor `fd` (else output is copied into it)."""
    try:
        return stream.fileno() == fd and stream is getattr(sys, "__stdout__" if fd == 1 else "__stderr__")
    except (AttributeError, OSError, ValueError):
        return False


class _Launcher:
    """`python -m ddplaunch --from-python FOLDER ...` as the caller's child, in a session of its own."""

    def __init__(self, argv: list[str], folder: str) -> None:
        from ddplaunch.cli import command

        try:  # the command line's own checks, here: a mistake is raised before anything starts
            command.make_context("ddplaunch", list(argv), resilient_parsing=False)
        except Exception as exc:
            raise LaunchError(_click_message(exc)) from None
        self._folder = folder
        self._copies: dict[int, IO[str]] = {}
        outputs: list[Any] = []
        for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
            if _owns_fd(stream, fd):
                stream.flush()
                outputs.append(None)  # inherited: the launcher writes there itself
            else:
                outputs.append(subprocess.PIPE)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "ddplaunch", "--from-python", folder, *argv],
            stdin=subprocess.DEVNULL, stdout=outputs[0], stderr=outputs[1], start_new_session=True,
            env={**os.environ, "DDPLAUNCH_PARENT_PID": str(os.getpid())},
        )
        self._selector = selectors.DefaultSelector()
        for pipe, stream in ((self._proc.stdout, sys.stdout), (self._proc.stderr, sys.stderr)):
            if pipe is not None:
                os.set_blocking(pipe.fileno(), False)
                self._selector.register(pipe, selectors.EVENT_READ, stream)
        self.done = False

    @property
    def pid(self) -> int:
        return self._proc.pid

    def wait(self, timeout: float | None) -> bool:
        """Copy its output until it exits (True) or `timeout` passes (False); Ctrl-C stops it."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while self._selector.get_map():
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                events = self._selector.select(left)
                if not events and deadline is not None and time.monotonic() >= deadline:
                    return False
                for key, _ in events:
                    self._copy(key)
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                self._proc.wait(left)
            except subprocess.TimeoutExpired:
                return False
        except KeyboardInterrupt:
            self._stop()
            raise
        self._finish()
        return True

    def _copy(self, key: selectors.SelectorKey) -> None:
        try:
            data = os.read(key.fd, 1 << 16)
        except BlockingIOError:
            return
        if not data:
            self._selector.unregister(key.fileobj)
            key.fileobj.close()  # type: ignore[union-attr]
            return
        stream: IO[str] = key.data
        stream.write(data.decode("utf-8", "replace"))
        stream.flush()

    def _stop(self) -> None:
        """One SIGINT, as Ctrl-C at its terminal: it stops every rank; SIGKILL if it does not end."""
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
        try:
            while self._selector.get_map():  # what the ranks say as they stop still reaches the caller
                for key, _ in self._selector.select(STOP_WAIT_S):
                    self._copy(key)
                if self._proc.poll() is not None and not self._selector.select(0):
                    break
            self._proc.wait(STOP_WAIT_S)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            self._proc.kill()  # its guard stops the ranks
            self._proc.wait()
        self._finish()

    def _finish(self) -> None:
        for key in list(self._selector.get_map().values()):
            self._selector.unregister(key.fileobj)
            key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()
        self.done = True

    def result(self) -> RunResult:
        """What the launcher left in result.json; its exit code alone if it left nothing."""
        code = self._proc.returncode
        try:
            with open(os.path.join(self._folder, RESULT_FILE), encoding="utf-8") as file:
                data = json.load(file)
        except (OSError, ValueError):
            return RunResult(code if code >= 0 else 128 - code)
        if data.get("error"):
            raise LaunchError(data["error"])
        cause = data.get("root_cause")
        return RunResult(
            exit_code=int(data["exit_code"]),
            rank_exit_codes={int(rank): value for rank, value in data.get("ranks", {}).items()},
            root_cause=RootCause(**{**cause, "last_lines": tuple(cause.get("last_lines", ()))}) if cause else None,
            others=tuple(data.get("others", ())),
            restarts=int(data.get("restarts", 0)),
        )


def _click_message(exc: BaseException) -> str:
    show = getattr(exc, "format_message", None)
    return f"ddplaunch: {show() if show else exc}"
