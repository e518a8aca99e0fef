"""--warm: the launcher's side of the warm interpreter (ddplaunch.zygote) that forks every rank.

Pure parts first: the environment every rank shares (`shared_environment`), the variables
that differ per rank and that torch would read at import (`import_time_conflicts`), a rank's
request from its cold command line (`rank_request`). Then `Zygote`: start the warm
interpreter, wait until it says it is ready, fork each rank through it (`spawn` has
ddplaunch.workers.start_process's shape: it is a WorkerTree's starter), close it at the job's
end. It lives across restarts; should it die mid-job (the OOM killer), the next rank starts
cold, and so does every one after (said once). A launcher killed with SIGKILL leaves it to the
guard (its own process group, and the job id in its environment), and it exits on its own at
the socket's EOF.

The warm interpreter starts with only what every rank shares. What `import torch` reads
(recorded here: os.environ reads during the import, and getenv through an LD_PRELOAD shim):
in C/C++, OMP_* and GOMP_* (libgomp's constructor; OMP_NUM_THREADS thrice), OPENBLAS_*,
GOTO_NUM_THREADS (numpy's OpenBLAS, which starts OMP_NUM_THREADS-1 threads then), MKL_*,
MKLDNN_*/ONEDNN_*/DNNL_*, GFORTRAN_*, ACC_*, the MPI launchers' local sizes (MPI_LOCALNRANKS,
OMPI_COMM_WORLD_LOCAL_SIZE, I_MPI_*), TORCH_CPP_LOG_LEVEL, TORCH_SHOW_CPP_STACKTRACES,
TORCH_DISTRIBUTED_DEBUG, TORCH_BLAS_PREFER_*, TORCH_ALLOW_TF32_CUBLAS_OVERRIDE,
PYTORCH_API_USAGE_STDERR, KINETO_USE_DAEMON; in Python, TORCH_LOGS, TORCH_LOGS_OUT,
TORCH_TRACE, TORCH_COMPILE_*, TORCHDYNAMO_*, TORCHINDUCTOR_FORCE_DISABLE_CACHES,
TORCH_DEVICE_BACKEND_AUTOLOAD, TORCH_USE_RTLD_GLOBAL, PYTORCH_JIT*, FX_*, NPY_*/NUMPY_*.
ddplaunch sets none of them per rank; the per-rank ones it sets (RANK, LOCAL_RANK,
ROLE_RANK, TORCHELASTIC_ERROR_FILE, and TORCHELASTIC_RESTART_COUNT per attempt) are read by
none at import. Should a variable with one of those prefixes differ between ranks
(CUDA_VISIBLE_DEVICES under --virtual-local-rank), the job starts cold; so does a script that
sets one at module level before it imports a warm module (`early_environment_writes`, a
scan of its source: cold, the import would read the script's value).
"""

from __future__ import annotations

import ast
import json
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import ddplaunch
from ddplaunch.plan import Plan
from ddplaunch.proctitle import ROOM_VARIABLE, room_for
from ddplaunch.watchdog import Watchdog
from ddplaunch.workers import start_process
from ddplaunch.zygote import REQUEST_MAX, RankRequest, script_path0

DEFAULT_MODULES = ("torch",)
READY_TIMEOUT_S = 300.0  # the imports, on a cold shared filesystem
FORK_TIMEOUT_S = 30.0  # one fork and one setsid
CLOSE_TIMEOUT_S = 2.0  # the zygote exits at EOF; after this it is killed
_POLL_S = 0.05  # only while the zygote imports: a stop signal must not wait for it
# Set per rank by ddplaunch (ddplaunch.plan.build_worker), or per attempt: never in the zygote.
PER_RANK_VARIABLES = frozenset({
    "RANK", "LOCAL_RANK", "ROLE_RANK", "GROUP_RANK", "NODE_RANK", "TORCHELASTIC_ERROR_FILE",
    "TORCHELASTIC_RESTART_COUNT",
})
# What torch, its OpenMP and BLAS, CUDA, NCCL and numpy may read when they are imported.
IMPORT_TIME_PREFIXES = (
    "OMP_", "GOMP_", "KMP_", "MKL", "ONEDNN_", "DNNL_", "OPENBLAS_", "GOTO_", "GFORTRAN_", "ACC_",
    "MPI_", "OMPI_", "I_MPI_", "INTEL_", "TORCH", "PYTORCH_", "CUDA_", "NCCL_", "NVIDIA_", "KINETO_",
    "FX_", "NPY_", "NUMPY_", "PYTHON", "LD_",
)


# -- pure ---------------------------------------------------------------------------------------


def parse_modules(text: str) -> tuple[str, ...]:
    """--warm-modules a,b.c: dotted names; ValueError names the first that is not one."""
    names = tuple(part.strip() for part in text.split(","))
    for name in names:
        if not name or not all(part.isidentifier() for part in name.split(".")):
            raise ValueError(name)
    return names


def shared_environment(environments: Sequence[Mapping[str, str]]) -> dict[str, str]:
    """What every rank's environment holds with the same value, less the per-rank variables."""
    first, *rest = environments
    return {
        key: value for key, value in first.items()
        if key not in PER_RANK_VARIABLES and all(other.get(key) == value for other in rest)
    }


def import_time_conflicts(environments: Sequence[Mapping[str, str]], shared: Mapping[str, str]) -> tuple[str, ...]:
    """Variables that differ per rank (so the zygote imports without them) and that an import
    may read: with any, the ranks could not all see what they would cold."""
    differing = {key for env in environments for key in env if key not in shared}
    return tuple(sorted(key for key in differing - PER_RANK_VARIABLES if key.startswith(IMPORT_TIME_PREFIXES)))


def rank_request(argv: Sequence[str], environment: Mapping[str, str], cpus: frozenset[int] | None, cwd: str) -> RankRequest:
    """The request for the rank whose cold command line is `argv` (ddplaunch.plan.worker_argv:
    python -u SCRIPT ARGS, or python -u -m MODULE ARGS)."""
    if len(argv) >= 4 and argv[1:3] == ("-u", "-m"):
        return RankRequest("module", argv[3], tuple(argv[4:]), dict(environment), _cpus(cpus), cwd)
    if len(argv) >= 3 and argv[1] == "-u" and not argv[2].startswith("-"):
        return RankRequest("script", argv[2], tuple(argv[3:]), dict(environment), _cpus(cpus), cwd)
    raise ValueError(f"not a python -u script or -m module command line: {' '.join(argv)}")


@dataclass(frozen=True)
class EarlyWrite:
    """A module-level write to the environment, before the script imports a warm module."""

    variable: str | None  # None: a key not written literally (a possible conflict)
    line: int


def early_environment_writes(source: str | bytes, modules: Sequence[str]) -> tuple[tuple[EarlyWrite, ...], str | None]:
    """The import-time variables a script sets at module level (also in top-level if, try and
    with blocks; not in a def or class) before its first import of a warm module, with that
    module (None when none is imported at module level: then torch comes later, in a function
    or through another package, and every module-level write counts). The forms:
    os.environ[K] = v, os.environ.setdefault(K, v), os.environ.update(...), os.environ |= {...},
    os.putenv(K, v), and environ after `from os import environ`. A syntax error: none found
    (the run reports it as it would)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return (), None
    scan = _EnvironmentScan(tuple(name.split(".")[0] for name in modules))
    for statement in _module_level(tree.body):
        if scan.reaches_warm_import(statement):
            return tuple(scan.found), scan.imported
        scan.read(statement)
    return tuple(scan.found), None


_TRY_BLOCKS = tuple(getattr(ast, name) for name in ("Try", "TryStar") if hasattr(ast, name))  # except*: 3.11


def _module_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Each statement run at import, in order, through if/try/with blocks (not def/class)."""
    for statement in body:
        if isinstance(statement, ast.If):
            yield from _module_level(statement.body + statement.orelse)
        elif isinstance(statement, _TRY_BLOCKS):
            handlers = [line for handler in statement.handlers for line in handler.body]
            yield from _module_level(statement.body + handlers + statement.orelse + statement.finalbody)
        elif isinstance(statement, (ast.With, ast.AsyncWith)):
            yield statement  # its context expressions run first
            yield from _module_level(statement.body)
        elif not isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield statement


class _EnvironmentScan:
    """Reads statements in order: the names os and os.environ go by, the writes found."""

    def __init__(self, warm_packages: tuple[str, ...]) -> None:
        self.warm_packages = warm_packages
        self.os_names = {"os"}
        self.environ_names: set[str] = set()
        self.putenv_names: set[str] = set()
        self.found: list[EarlyWrite] = []
        self.imported: str | None = None

    def reaches_warm_import(self, statement: ast.stmt) -> bool:
        """An import of a warm module, or of any module of its package (whose import the
        warm interpreter ran too)."""
        if isinstance(statement, ast.Import):
            names = [alias.name for alias in statement.names]
        elif isinstance(statement, ast.ImportFrom) and statement.level == 0 and statement.module:
            names = [statement.module]
        else:
            return False
        for name in names:
            if name.split(".")[0] in self.warm_packages:
                self.imported = name
                return True
        return False

    def read(self, statement: ast.stmt) -> None:
        if isinstance(statement, ast.Import):
            self.os_names |= {alias.asname for alias in statement.names if alias.name == "os" and alias.asname}
        elif isinstance(statement, ast.ImportFrom) and statement.module == "os" and statement.level == 0:
            for alias in statement.names:
                if alias.name == "environ":
                    self.environ_names.add(alias.asname or alias.name)
                elif alias.name == "putenv":
                    self.putenv_names.add(alias.asname or alias.name)
        elif isinstance(statement, (ast.With, ast.AsyncWith)):
            for item in statement.items:
                self._read_expression(item.context_expr)
            return
        for node in _without_nested_code(statement):
            self._read_node(node)

    def _read_expression(self, expression: ast.expr) -> None:
        for node in _without_nested_code(expression):
            self._read_node(node)

    def _read_node(self, node: ast.AST) -> None:
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Subscript) and self._is_environ(target.value):
                    self._key(target.slice, node.lineno)
                elif isinstance(node, ast.AugAssign) and self._is_environ(target):
                    self._keys_of_mapping(node.value, node.lineno)  # os.environ |= {...}
        elif isinstance(node, ast.Call):
            self._read_call(node)

    def _read_call(self, call: ast.Call) -> None:
        function = call.func
        if isinstance(function, ast.Attribute) and self._is_environ(function.value):
            if function.attr == "setdefault" and call.args:
                self._key(call.args[0], call.lineno)
            elif function.attr == "update":
                for argument in call.args:
                    self._keys_of_mapping(argument, call.lineno)
                for keyword in call.keywords:
                    self._name(keyword.arg, call.lineno)  # **spread: None, a possible conflict
        elif self._is_putenv(function) and call.args:
            self._key(call.args[0], call.lineno)

    def _keys_of_mapping(self, mapping: ast.expr, line: int) -> None:
        if not isinstance(mapping, ast.Dict):
            self._name(None, line)
            return
        for key in mapping.keys:
            if key is None:  # {**other}
                self._name(None, line)
            else:
                self._key(key, line)

    def _key(self, key: ast.expr, line: int) -> None:
        self._name(key.value if isinstance(key, ast.Constant) and isinstance(key.value, str) else None, line)

    def _name(self, name: str | None, line: int) -> None:
        if name is None or name.startswith(IMPORT_TIME_PREFIXES):
            self.found.append(EarlyWrite(name, line))

    def _is_environ(self, node: ast.expr) -> bool:
        return self._is_os_name(node, "environ", self.environ_names)

    def _is_putenv(self, node: ast.expr) -> bool:
        return self._is_os_name(node, "putenv", self.putenv_names)

    def _is_os_name(self, node: ast.expr, attribute: str, imported_as: set[str]) -> bool:
        """os.ATTRIBUTE (os under any name it was imported as), or a name `from os import` gave it."""
        if isinstance(node, ast.Name):
            return node.id in imported_as
        return (
            isinstance(node, ast.Attribute) and node.attr == attribute
            and isinstance(node.value, ast.Name) and node.value.id in self.os_names
        )


def _without_nested_code(root: ast.AST) -> Iterator[ast.AST]:
    """ast.walk, less what runs later: a lambda's body, a def or class inside."""
    pending = [root]
    while pending:
        node = pending.pop()
        yield node
        if isinstance(node, (ast.Lambda, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        pending.extend(ast.iter_child_nodes(node))


def script_cold_reason(plan: Plan, modules: Sequence[str]) -> str | None:
    """Why this script must start cold: it sets an import-time variable before it imports a
    warm module, whose import would read the script's value cold but has read the launcher's
    warm. Read from the script's file (not for -m: the module is found only when it runs)."""
    request = first_request(plan)
    if request is None or request.kind != "script" or not os.path.isfile(request.target):
        return None  # a folder with a __main__.py is not read; a zip does not parse
    try:
        with open(request.target, "rb") as file:  # bytes: ast honours the script's coding line
            source = file.read()
    except OSError:
        return None  # the run says why it cannot read it
    writes, imported = early_environment_writes(source, modules)
    if not writes:
        return None
    return early_writes_reason(os.path.basename(request.target), writes, imported or modules[0])


def early_writes_reason(script: str, writes: Sequence[EarlyWrite], module: str) -> str:
    """train.py sets OMP_NUM_THREADS (line 2) before importing torch, which reads it at import"""
    named = [f"{write.variable or 'a variable named at run time'} (line {write.line})" for write in writes]
    it = "it" if len(writes) == 1 else "them"
    reads = f"reads {it}" if all(write.variable for write in writes) else f"may read {it}"
    return f"{script} sets {', '.join(named)} before importing {module}, which {reads} at import"


def _cpus(cpus: frozenset[int] | None) -> tuple[int, ...] | None:
    return None if cpus is None else tuple(sorted(cpus))


def path0_of(request: RankRequest) -> str:
    """sys.path[0] of the ranks, where the zygote looks for the modules it imports."""
    return request.cwd if request.kind == "module" else script_path0(request.target)


def cold_reason(plan: Plan, python: str = sys.executable) -> str | None:
    """Why this node's plan cannot start warm, or None."""
    first = plan.workers[0].argv
    if first_request(plan) is None:
        return "only a Python script or -m module can start warm"
    if os.path.realpath(first[0]) != os.path.realpath(python):
        return f"the workers' Python ({first[0]}) is not the launcher's ({python})"
    environments = [{**plan.base_env, **w.env_added} for w in plan.workers]
    conflicts = import_time_conflicts(environments, shared_environment(environments))
    if conflicts:
        return f"{', '.join(conflicts)} differ(s) between ranks, and an import may read it"
    return None


def runs_module(plan: Plan) -> bool:
    """The ranks run -m MODULE (whose source script_cold_reason does not read)."""
    request = first_request(plan)
    return request is not None and request.kind == "module"


def first_request(plan: Plan) -> RankRequest | None:
    """What this node's first rank would ask of a warm interpreter (its script or module),
    or None when its command line is no Python script or module."""
    try:
        return rank_request(plan.workers[0].argv, {}, None, "")
    except ValueError:
        return None


def plan_cold_reason(plan: Plan, modules: Sequence[str]) -> str | None:
    """Why this node starts cold, as far as is known before a warm interpreter starts (what it
    finds on importing, threads or CUDA, is known only then)."""
    return cold_reason(plan) or script_cold_reason(plan, modules)


# -- the warm interpreter, from the launcher ----------------------------------------------------

BOOT = "import sys; sys.path.insert(0, sys.argv[1]); from ddplaunch.zygote import main; main(sys.argv[1:])"


class Zygote:
    """The launcher's end of one warm interpreter: a child in its own session."""

    def __init__(self, pid: int, sock: socket.socket, watchdog: Watchdog | None, started: float) -> None:
        self.pid = pid
        self.started = started
        self.ready_after: float | None = None  # seconds from start to ready
        self._sock = sock
        self._watchdog = watchdog
        self._cwd = os.getcwd()
        self.note: Callable[[str], None] = _say_nothing  # start_warm gives the printer's
        self.lost: str | None = None  # how it went mid-job; the ranks then start cold

    @classmethod
    def start(cls, plan: Plan, modules: Sequence[str], watchdog: Watchdog | None) -> Zygote:
        """posix_spawn it as a worker is started; it imports in the background meanwhile."""
        environments = [{**plan.base_env, **w.env_added} for w in plan.workers]
        first = rank_request(plan.workers[0].argv, {}, None, os.getcwd())
        command = (plan.workers[0].argv[0], "-u", "-c", BOOT, package_parent(), path0_of(first), ",".join(modules))
        argv = (*command, room_for(command))  # the area its title, then each rank's command line, is written over
        room = {ROOM_VARIABLE: room_for(())}  # last: each rank writes its own variables over it
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        actions = [(os.POSIX_SPAWN_DUP2, theirs.fileno(), 0), (os.POSIX_SPAWN_DUP2, devnull, 1),
                   (os.POSIX_SPAWN_DUP2, devnull, 2)]
        try:
            pid = start_process(argv, {**shared_environment(environments), **room}, actions, None)
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
            os.close(devnull)
        if watchdog is not None:
            watchdog.watch(pid)  # its own group: the guard stops it with the ranks
        return cls(pid, ours, watchdog, time.monotonic())

    def wait_ready(self, stop_pending: Callable[[], bool], timeout: float = READY_TIMEOUT_S) -> str | None:
        """None once it has imported its modules and may fork; else why not (it is then closed)."""
        deadline = time.monotonic() + timeout
        while not select.select([self._sock], [], [], _POLL_S)[0]:
            if stop_pending():
                self.close()
                return "a stop signal came while it was importing"
            if time.monotonic() > deadline:
                self.close()
                return f"it was not ready after {timeout:g}s"
        try:
            said = json.loads(self._sock.recv(REQUEST_MAX) or b"{}")
        except (OSError, ValueError):
            said = {}
        if said.get("ready") is True:
            self.ready_after = time.monotonic() - self.started
            return None
        self.close()
        return str(said.get("refused") or "the warm interpreter exited while importing")

    def spawn(
        self, argv: tuple[str, ...], environment: Mapping[str, str],
        actions: list[tuple[int, int, int]], cpus: frozenset[int] | None,
    ) -> int:
        """start_process's twin: the rank forked from the warm interpreter, its pid as posix_spawn's.
        Once the interpreter is lost (killed, or it stops answering), the rank starts cold."""
        if self.lost is None:
            try:
                return self._fork(argv, environment, actions, cpus)
            except _NoAnswer as exc:
                self._lose(self._fate(str(exc)))
        return start_process(argv, environment, actions, cpus)

    def _fork(
        self, argv: tuple[str, ...], environment: Mapping[str, str],
        actions: list[tuple[int, int, int]], cpus: frozenset[int] | None,
    ) -> int:
        request = rank_request(argv, environment, cpus, self._cwd)
        fds = [source for _action, source, _target in sorted(actions, key=lambda a: a[2])]
        try:
            socket.send_fds(self._sock, [request.encode()], fds)
            self._sock.settimeout(FORK_TIMEOUT_S)
            said = json.loads(self._sock.recv(REQUEST_MAX) or b"{}")
        except (OSError, ValueError) as exc:
            raise _NoAnswer(str(exc)) from None
        finally:
            self._sock.settimeout(None)
        if not said:  # EOF: only its exit closes its end
            raise _NoAnswer("its socket closed")
        if "pid" not in said:
            raise OSError(f"the warm interpreter could not fork it ({said.get('error', 'it exited')})")
        return int(said["pid"])

    def exited(self, status: int) -> None:
        """The workers' reaper collected it (its wait status): it died mid-job."""
        self._lose(f"exited ({describe_status(os.waitstatus_to_exitcode(status))})")

    def _fate(self, why: str) -> str:
        """What became of it when it did not answer: its exit if it has one (left for the
        workers' reaper to collect: WNOWAIT), else it is killed here, as it serves no more."""
        try:
            found = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return f"exited ({why})"
        if found is not None:
            code = found.si_status if found.si_code == os.CLD_EXITED else -found.si_status
            return f"exited ({describe_status(code)})"
        os.killpg(self.pid, signal.SIGKILL)  # still our unreaped child: the id is its own
        return f"did not answer ({why}) and was killed"

    def _lose(self, what: str) -> None:
        if self.lost is not None:
            return
        self.lost = what
        self._sock.close()
        if self._watchdog is not None:
            self._watchdog.unwatch(self.pid)
        self.note(f"--warm: the warm interpreter (pid {self.pid}) {what}; the ranks start cold from now on")

    def close(self) -> None:
        """EOF ends it; a zygote that does not go is killed. Reaped here unless the workers'
        reaper (waitpid(-1)) already collected it. One lost mid-job is the reaper's."""
        if self._sock.fileno() < 0:
            return
        self._sock.close()
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        try:
            while os.waitpid(self.pid, os.WNOHANG)[0] == 0:
                if time.monotonic() > deadline:
                    os.killpg(self.pid, signal.SIGKILL)  # still our unreaped child: the id is its own
                    os.waitpid(self.pid, 0)
                    break
                time.sleep(0.01)
        except ChildProcessError:
            pass
        if self._watchdog is not None:
            self._watchdog.unwatch(self.pid)


class _NoAnswer(Exception):
    """The warm interpreter's socket failed or closed: it is gone, or no longer serves."""


def _say_nothing(_text: str) -> None:
    pass


def describe_status(code: int) -> str:
    """An exit code as os.waitstatus_to_exitcode gives it (negative: the signal's number)."""
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"


def package_parent() -> str:
    """The folder the ddplaunch package is found in, for the zygote's own import."""
    return os.path.dirname(os.path.dirname(os.path.abspath(ddplaunch.__file__)))


def start_warm(
    plan: Plan, modules: Sequence[str], watchdog: Watchdog | None,
    note: Callable[[str], None], stop_pending: Callable[[], bool],
) -> Zygote | None:
    """The job's zygote, ready to fork; None (said once) when this job starts cold."""
    why = plan_cold_reason(plan, modules)
    zygote = None
    if why is None:
        try:
            zygote = Zygote.start(plan, modules, watchdog)
        except OSError as exc:
            why = f"the warm interpreter could not start ({exc.strerror or exc})"
        else:
            zygote.note = note
    if zygote is not None:
        started = time.monotonic()
        why = zygote.wait_ready(stop_pending)
        if why is None:
            # said, so that a user sees warm mode is on (and what the import cost, once)
            note(f"--warm: {', '.join(modules)} imported once in {time.monotonic() - started:.2f} s "
                 f"(pid {zygote.pid}); every rank is forked from it")
            return zygote
    note(f"--warm: {why}; starting the workers cold")
    return None

