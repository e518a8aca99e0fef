"""The warm interpreter (--warm): import the modules once, then fork every rank of the job from it.

The launcher (ddplaunch.warm) starts it like a worker, in its own session, as
`python -u -c BOOT PACKAGE_PARENT PATH0 MODULES ROOM` with the environment every rank shares
(and DDPLAUNCH_WARM_ROOM last) and its end of a unix SEQPACKET socket on fd 0; ROOM and that
variable make room for what ps shows of it and of each rank (ddplaunch.proctitle). It
imports MODULES, makes sure it holds one thread and no CUDA context (a fork copies only the
forking thread, and a CUDA context does not survive a fork), says "ready" or why not, and
then answers each rank request (a JSON `RankRequest`, with the rank's stdin, stdout and
stderr passed as SCM_RIGHTS) with the pid of a rank it forked.

The rank is a grandchild: the middle process exits at once, so the rank is reparented to the
launcher (a child subreaper), which reaps it as it reaps a cold worker. The answer waits until
the rank has called setsid, so the process group the launcher signals is already the rank's,
and then the rank leaves the zygote's loop (it raises `Forked` up to `main`).
In the rank, before any user code: its own descriptors, environment, CPUs and signal
dispositions, sys.argv and sys.path[0] as `python script.py` (or `-m`) would set them, the
stack bootstrap as the cold worker's sitecustomize runs it, then the script as the real
__main__ (not runpy.run_path, whose temporary module is emptied when it returns, under the
script's atexit handlers and threads). ps, psutil and py-spy show the rank's cold command
line and environment, and sys.orig_argv is that command line. What the script raises leaves
through BOOT, so the interpreter prints it, exits and finalises as after a cold script (and
dies of SIGINT after a KeyboardInterrupt).

Only the standard library: whatever this module imports, every rank has imported too.
"""

from __future__ import annotations

import builtins
import json
import os
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Any, Literal

from ddplaunch import proctitle

REQUEST_MAX = 1 << 22  # a rank's request: its environment is most of it
STACKS_VARIABLE = "DDPLAUNCH_STACKS"  # ddplaunch.snapshot.STACKS_VARIABLE (not imported: see above)
JOB_ID_VARIABLE = "DDPLAUNCH_JOB_ID"  # ddplaunch.plan.JOB_ID_VARIABLE
BOOTSTRAP_NAME = "_ddplaunch_stacks_bootstrap"
BOOT_FILENAME = "<string>"  # what `python -c BOOT` names BOOT's code

RankKind = Literal["script", "module"]


@dataclass(frozen=True)
class RankRequest:
    """What one rank runs and with what: the launcher's side encodes, the zygote's decodes."""

    kind: RankKind
    target: str  # the script's path as given, or the module's name
    args: tuple[str, ...]
    environment: dict[str, str]
    cpus: tuple[int, ...] | None = None  # sched_setaffinity; None: the zygote's own
    cwd: str = ""  # for -m, sys.path[0]; "" here means the zygote's working directory

    def encode(self) -> bytes:
        return json.dumps({
            "kind": self.kind, "target": self.target, "args": list(self.args),
            "environment": self.environment, "cpus": None if self.cpus is None else list(self.cpus),
            "cwd": self.cwd,
        }).encode()

    @staticmethod
    def decode(data: bytes) -> RankRequest:
        raw = json.loads(data)
        kind = raw["kind"]
        if kind not in ("script", "module"):
            raise ValueError(f"unknown program kind {kind!r}")
        cpus = raw["cpus"]
        return RankRequest(
            kind, str(raw["target"]), tuple(str(a) for a in raw["args"]),
            {str(k): str(v) for k, v in raw["environment"].items()},
            None if cpus is None else tuple(int(c) for c in cpus), str(raw["cwd"]),
        )


def answer(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def cold_argv(request: RankRequest, python: str) -> list[str]:
    """The command line that starts this rank cold (ddplaunch.plan.worker_argv's)."""
    program = ["-m", request.target] if request.kind == "module" else [request.target]
    return [python, "-u", *program, *request.args]


def warm_title(modules: str, job_id: str | None) -> str:
    """What ps shows of the warm interpreter."""
    return f"ddplaunch --warm: {modules.replace(',', ', ')}" + (f" (job {job_id})" if job_id else "")


def script_path0(target: str) -> str:
    """sys.path[0] as `python TARGET` sets it: the script's real folder, or a folder or zip
    with a __main__.py itself."""
    if os.path.isfile(target) and not _is_zip(target):
        return os.path.dirname(os.path.realpath(target))
    return os.path.abspath(target)


def _is_zip(path: str) -> bool:
    try:
        with open(path, "rb") as file:
            return file.read(4) == b"PK\x03\x04"
    except OSError:
        return False


# -- the warm interpreter ----------------------------------------------------------------------


class Forked(BaseException):
    """Raised in a new rank to leave the zygote's loop: the rank then runs from `main`, with
    none of the loop's frames under the script (nor in its stack reports)."""

    def __init__(self, request: RankRequest, fds: list[int], sock: socket.socket, initial: dict[int, Any]) -> None:
        super().__init__()
        self.request, self.fds, self.sock, self.initial = request, fds, sock, initial


def main(argv: list[str]) -> None:
    """BOOT's entry: argv is PACKAGE_PARENT PATH0 MODULES (comma-separated) ROOM."""
    try:
        serve(argv)
        return
    except Forked as forked:
        rank = forked
    # out of the except block, so that the script's exceptions have no __context__
    become_rank(rank.request, rank.fds, rank.sock, rank.initial)


def serve(argv: list[str]) -> None:
    """The zygote: import, then fork a rank for each request until the socket's EOF."""
    package_parent, path0, modules, *_room = argv
    proctitle.set_title(warm_title(modules, os.environ.get(JOB_ID_VARIABLE)))
    sys.argv = [sys.argv[0]]
    if sys.path and sys.path[0] == package_parent:
        del sys.path[0]  # BOOT put it there to find this module; a rank does not see it
    if sys.path:
        sys.path[0] = path0  # the modules are found where the ranks would find them
    initial = _dispositions()
    sock = socket.socket(fileno=0)
    why = _warm_up([name for name in modules.split(",") if name])
    sock.send(answer(refused=why) if why else answer(ready=True))
    if why:
        os._exit(0)
    # What the imports made stays out of the ranks' garbage collections, so those do not
    # write to (and so copy) the pages the ranks share with this process (the gc module's advice).
    import gc

    gc.freeze()
    while True:
        try:
            message, fds, _flags, _addr = socket.recv_fds(sock, REQUEST_MAX, 3)
        except OSError:
            message, fds = b"", []
        if not message:
            os._exit(0)  # the launcher closed the socket (or died): nothing to finalise here
        try:
            pid = _fork_rank(RankRequest.decode(message), fds, sock, initial)
            reply = answer(pid=pid)
        except (OSError, ValueError, KeyError, TypeError) as exc:  # never Forked: a BaseException
            reply = answer(error=f"{type(exc).__name__}: {exc}")
        for fd in fds:
            os.close(fd)
        sock.send(reply)


def _warm_up(modules: list[str]) -> str | None:
    """Import the modules; why this process cannot fork ranks safely, or None."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except BaseException as exc:  # a module may even call sys.exit
            return f"importing {name} failed ({type(exc).__name__}: {exc})"
    threads = _threads()
    if threads != 1:
        # A library that is fork-safe stops its threads in its pre-fork handler (OpenBLAS,
        # which numpy and torch load, starts OMP_NUM_THREADS-1 at import and does): one trial
        # fork runs those handlers, and what still runs then would be lost in the ranks.
        _trial_fork()
        threads = _threads()
    if threads != 1:
        return (
            f"after importing {','.join(modules)} it runs {threads} threads; a fork keeps only one, "
            "so a lock another thread held would never be released in the ranks"
        )
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    if cuda is not None and cuda.is_initialized():
        return "importing the modules initialised CUDA, whose context does not survive a fork"
    if cuda_driver_initialised():
        return (
            "importing the modules initialised the CUDA driver (torch.cuda.is_available() or "
            "device_count() at import does; PYTORCH_NVML_BASED_CUDA_CHECK=1 avoids it), and a "
            "forked rank's first CUDA call would then fail"
        )
    return None


CUDA_ERROR_NOT_INITIALIZED = 3  # what the driver answers before cuInit


def cuda_driver_initialised(maps_path: str = "/proc/self/maps") -> bool:
    """Whether this process ran cuInit, by torch or not (torch.cuda.is_initialized() says
    only whether torch's own lazy init ran): the driver API is loaded by cudart at its first
    call, and cuDeviceGetCount answers CUDA_ERROR_NOT_INITIALIZED until cuInit (the probe
    vLLM uses before it forks). No libcuda mapped: not initialised."""
    library = mapped_library(maps_path, "libcuda.so")
    if library is None:
        return False
    try:
        import ctypes

        count = ctypes.c_int()
        return int(ctypes.CDLL(library).cuDeviceGetCount(ctypes.byref(count))) != CUDA_ERROR_NOT_INITIALIZED
    except (OSError, AttributeError):
        return True  # mapped but unreadable: assume the worst, the job then starts cold


def mapped_library(maps_path: str, prefix: str) -> str | None:
    """The path of a shared library whose file name starts with `prefix` that this process
    has mapped (/proc/self/maps: the path is the sixth field), or None."""
    try:
        with open(maps_path) as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and os.path.basename(fields[5].strip()).startswith(prefix):
                    return fields[5].strip()
    except OSError:
        pass
    return None


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _trial_fork() -> None:
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)


def _dispositions() -> dict[int, Any]:
    """Every signal's handler before the modules are imported: what a rank gets back."""
    found: dict[int, Any] = {}
    for sig in signal.valid_signals():
        try:
            handler = signal.getsignal(sig)
        except (OSError, ValueError):
            continue
        if handler is not None:
            found[sig] = handler
    return found


def _fork_rank(request: RankRequest, fds: list[int], sock: socket.socket, initial: dict[int, Any]) -> int:
    if len(fds) != 3:
        raise ValueError(f"expected stdin, stdout and stderr, got {len(fds)} descriptors")
    read_end, write_end = os.pipe()
    # No try/finally around the fork: the rank leaves through these frames with Forked, and
    # a finally would run in it too.
    middle = os.fork()
    if middle == 0:
        _middle(request, fds, sock, initial, write_end)
    os.close(write_end)
    os.waitpid(middle, 0)
    told = b""
    while chunk := os.read(read_end, 64):
        told += chunk
    os.close(read_end)
    if not told.isdigit():
        raise OSError("the rank ended before it started")
    return int(told)


def _middle(request: RankRequest, fds: list[int], sock: socket.socket, initial: dict[int, Any], write_end: int) -> None:
    """The middle process: fork the rank and exit, so the rank's parent becomes the launcher."""
    middle = os.getpid()
    try:
        rank = os.fork()
    except OSError:
        os._exit(1)
    if rank != 0:
        os._exit(0)
    os.setsid()  # before the launcher hears the pid: the group it signals is then the rank's
    os.write(write_end, str(os.getpid()).encode())
    _await_adoption(middle)
    raise Forked(request, fds, sock, initial)


def _await_adoption(middle: int) -> None:
    """Until the middle process is gone, so the script's os.getppid() is the launcher's pid
    (it exits at once; a bounded wait, of microseconds in practice)."""
    import time

    deadline = time.monotonic() + 5.0
    while os.getppid() == middle and time.monotonic() < deadline:
        time.sleep(0.0005)


# -- the rank ----------------------------------------------------------------------------------


def become_rank(request: RankRequest, fds: list[int], sock: socket.socket, initial: dict[int, Any]) -> None:
    """Turn this fresh fork into the rank and run its program.

    What the program raises leaves through BOOT, as it leaves a cold script: CPython then
    prints it with sys.excepthook and exits 1, ends as SystemExit says, or, for a
    KeyboardInterrupt, finalises and kills itself with SIGINT (Py_RunMain's
    unhandled_keyboard_interrupt, set where the `-c` code's exception leaves it).
    """
    try:
        _set_up(request, fds, sock, initial)
    except BaseException as exc:  # never back into the zygote's loop: this process is a rank
        os.write(2, f"ddplaunch --warm: could not set up this rank: {type(exc).__name__}: {exc}\n".encode())
        os._exit(1)
    _show_as_cold(request)
    _draw_afresh()
    _run_stack_bootstrap()
    try:
        if request.kind == "module":
            _run_module(request.target, request.args, request.cwd)
        else:
            _run_script(request.target, request.args)
    except BaseException as exc:
        if not isinstance(exc, SystemExit):  # CPython prints no traceback for it
            sys.excepthook = _trimming(sys.excepthook)  # the hook of now: the script's own, if it set one
        raise


def _trimming(hook: Any) -> Any:
    """`hook` shown the traceback from the user's first frame, as in a cold worker's report."""
    if not callable(hook):
        return hook  # CPython's own complaint about it, as cold

    def without_zygote_frames(kind: type[BaseException], value: BaseException, tb: Any) -> Any:
        tb = _without_own_frames(tb)
        if isinstance(value, BaseException):
            value.__traceback__ = tb  # the built-in hook prints the exception's own traceback
        return hook(kind, value, tb)

    return without_zygote_frames


def _set_up(request: RankRequest, fds: list[int], sock: socket.socket, initial: dict[int, Any]) -> None:
    sock.detach()  # its fd 0 becomes the rank's stdin below: never closed by this object
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # the socket, the pipe, whatever the imports opened
    os.environ.clear()
    os.environ.update(request.environment)
    if request.cpus is not None:
        os.sched_setaffinity(0, request.cpus)
    for sig, handler in initial.items():
        if signal.getsignal(sig) != handler:
            signal.signal(sig, handler)


def _show_as_cold(request: RankRequest) -> None:
    """The rank's cold command line in sys.orig_argv and /proc/PID/cmdline, its environment in
    /proc/PID/environ (what ps, top, psutil, py-spy and the guard read). Best effort: a write
    that cannot be made leaves the warm interpreter's there."""
    argv = cold_argv(request, sys.orig_argv[0])
    sys.orig_argv = argv
    proctitle.set_title(proctitle.command_title(argv))
    proctitle.set_environment(request.environment)


def _draw_afresh() -> None:
    """Draw again what an interpreter draws at random when it starts, which a fork copies to
    every rank: torch's CPU generator (a cold `import torch` seeds it from the OS; CUDA's
    start from a fixed seed, and CUDA is not initialised here), numpy's global RandomState
    (seeded from the OS when numpy.random is imported: a --warm-modules framework may have)
    and multiprocessing's authkey. Python's random module reseeds itself in a forked child.
    The hash seed stays the zygote's (strings hashed with it live on)."""
    try:
        torch = sys.modules.get("torch")
        generator = getattr(torch, "default_generator", None)
        if generator is not None:
            generator.seed()
        numpy_random = sys.modules.get("numpy.random")
        if numpy_random is not None:
            numpy_random.seed()  # no argument: fresh entropy, as at its import
        process = sys.modules.get("multiprocessing.process")
        if process is not None:
            process.current_process().authkey = os.urandom(32)
    except Exception:
        pass  # a module's odd state never stops the rank: it then shares the zygote's draw


def _run_stack_bootstrap() -> None:
    """The cold worker's sitecustomize, run from its folder (first on PYTHONPATH when
    DDPLAUNCH_STACKS is set: ddplaunch.snapshot's contract). sys.path is empty meanwhile, so
    it does not run the sitecustomize it shadows a second time: this interpreter ran it."""
    if STACKS_VARIABLE not in os.environ:
        return
    import importlib.util

    folder = os.environ.get("PYTHONPATH", "").split(os.pathsep)[0]
    spec = importlib.util.spec_from_file_location(BOOTSTRAP_NAME, os.path.join(folder, "sitecustomize.py"))
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    saved = sys.path[:]
    sys.path[:] = []
    try:
        spec.loader.exec_module(module)
    except Exception:
        pass  # as in a cold worker: a broken bootstrap never breaks the script
    finally:
        sys.path[:] = saved
    sys.modules[BOOTSTRAP_NAME] = module


def _run_script(target: str, args: tuple[str, ...]) -> None:
    """As `python TARGET ARGS`: the script's code in the real __main__ module."""
    sys.argv = [target, *args]
    sys.path[0] = script_path0(target)
    if not os.path.isfile(target) or _is_zip(target):
        import runpy

        runpy._run_module_as_main("__main__", False)  # type: ignore[attr-defined]  # what python does for a folder
        return
    path = os.path.abspath(target)
    from importlib.machinery import SourceFileLoader

    main = sys.modules["__main__"]
    namespace = main.__dict__
    # an empty __annotations__ where this Python gives __main__ one at start (3.10-3.13 do)
    fresh: dict[str, Any] = {"__annotations__": {}} if "__annotations__" in namespace else {}
    namespace.clear()
    namespace.update(
        __name__="__main__", __doc__=None, __package__=None, __spec__=None, __file__=path,
        __cached__=None, __builtins__=builtins, __loader__=SourceFileLoader("__main__", path), **fresh,
    )
    with open(path, "rb") as file:  # bytes: compile honours the script's coding line
        code = compile(file.read(), path, "exec")
    exec(code, namespace)


def _run_module(name: str, args: tuple[str, ...], cwd: str) -> None:
    """As `python -m NAME ARGS`: runpy's _run_module_as_main, which python -m itself calls."""
    import runpy

    sys.argv = ["-m", *args]
    sys.path[0] = cwd or os.getcwd()
    runpy._run_module_as_main(name, True)  # type: ignore[attr-defined]


def _without_own_frames(tb: Any) -> Any:
    """The traceback from the user's first frame: a cold worker's shows no launcher code
    (BOOT's "<string>" frame, then this module's)."""
    while tb is not None and tb.tb_frame.f_code.co_filename in (BOOT_FILENAME, __file__):
        tb = tb.tb_next
    return tb
