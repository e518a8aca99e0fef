"""The head of an SSH launch: one command starts a node agent on every host and shows them all.

Life cycle: connect to every host at once; start the agents, each of which checks its host
(working directory, interpreter, script) and says ready, node 0 with its address and a free
port; only when every host is ready does the head say go, so a bad host starts nothing
anywhere. Then the agents run, their frames come back over SSH and one printer shows every
rank's lines. The head links the nodes (no store, so agents never import torch): the first
node to report how an attempt ended speaks for all, and the head tells every node at once;
restarts start when every node is ready again. Ctrl-C here becomes a stop sent to every
agent; a host whose connection drops stops its own workers (its agent reads end of file)
and the head ends the attempt for the others.
"""

from __future__ import annotations

import os
import queue
import re
import selectors
import shlex
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from launcher.errors import Interrupted, LaunchError
from launcher.frames import (
    ATTEMPT_END,
    BLOCK,
    DATA,
    END_OF_STREAM,
    EVENT,
    EXIT,
    NOTE,
    OVER,
    READY,
    SUCCEEDED,
    Frame,
    FrameError,
    FrameReader,
    decode_ready,
    end_line,
    go_line,
)
from launcher.hosts import HostSpec, parse_hosts_flag, read_hostfile
from launcher.plan import is_plain_int
from launcher.protocol import Referee, job_exit_code
from launcher.wakepipe import WakePipe

if TYPE_CHECKING:
    from launcher.options import Options
    from launcher.logs import Printer
    from launcher.ssh import SshTarget

# Forwarded from the head to every remote worker unless --env sets them: the knobs of the
# communication libraries and of torch, which users set once in their shell.
FORWARDED_PREFIXES = ("NCCL_", "TORCH_", "PYTORCH_", "GLOO_", "UCX_", "FI_", "HF_", "WANDB_")
FORWARDED_NAMES = ("OMP_NUM_THREADS", "PYTHONPATH", "CUDA_LAUNCH_BLOCKING")
READY_TIMEOUT_S = 60.0  # from connected to "ready": a Python start and a few checks
CLOSE_TIMEOUT_S = 10.0
NO_DIR, NO_PYTHON = 120, 121  # exit codes of the remote preflight shell line
# Flags the head hands to every agent unchanged (value-taking ones, then switches).
PASSED_OPTIONS = ("max_restarts", "grace", "join_timeout", "master_port")
PASSED_SWITCHES = ("module", "no_python", "local_rank_arg")


@dataclass
class Host:
    """One host of the job: its node rank, connection, agent channel and what it said."""

    node_rank: int
    spec: HostSpec
    target: SshTarget
    nproc: int | None = None
    client: Any = None
    channel: Any = None
    frames: FrameReader = field(default_factory=FrameReader)
    stderr_tail: list[str] = field(default_factory=list)
    ready: tuple[str, int] | None = None
    exit_status: int | None = None  # SSH's, -1 when none came
    said_exit: int | None = None  # the agent's own EXIT frame

    @property
    def lost(self) -> bool:
        """Ended without its agent saying how: killed, or the connection dropped."""
        return self.closed and self.said_exit is None and self.exit_status in (-1, None)

    @property
    def exit_code(self) -> int | None:
        return self.said_exit if self.said_exit is not None else self.exit_status

    @property
    def name(self) -> str:
        return self.spec.host

    @property
    def closed(self) -> bool:
        return self.exit_status is not None


# -- planning (pure) ------------------------------------------------------------------------------


def forwarded_env(environ: dict[str, str], explicit: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The head's variables every remote worker gets (sorted), then --env, which wins."""
    chosen = {
        key: value
        for key, value in environ.items()
        if key.startswith(FORWARDED_PREFIXES) or key in FORWARDED_NAMES
    }
    chosen.update(dict(explicit))
    return sorted(chosen.items())


def per_host_nproc(specs: Sequence[HostSpec], nproc: str | None) -> int | None:
    """Workers per host, where the head can know it: --nproc N wins; else a hostfile's slots,
    which must agree (RANK = node * nproc + local). None for auto/gpu/cpu, which each agent
    resolves on its own host."""
    if nproc is not None:
        return int(nproc) if is_plain_int(nproc.strip()) else None
    slots = {spec.slots or (len(spec.gpus) if spec.gpus else None) for spec in specs}
    slots.discard(None)
    if len(slots) > 1:
        listed = ", ".join(f"{s.host} slots={s.slots}" for s in specs)
        raise LaunchError(
            f"--hostfile: every host must run the same number of workers ({listed}); ranks are "
            "node_rank * nproc + local_rank. Give equal slots, or --nproc N for all."
        )
    return slots.pop() if slots else 1


def agent_argv(options: Options, host: Host, env: Sequence[tuple[str, str]], nnodes: int) -> list[str]:
    python = options.python or sys.executable
    argv = [python, "-m", "launcher", "--agent", "--host-name", host.name]
    argv += ["--nnodes", str(nnodes), "--node-rank", str(host.node_rank)]
    if options.nproc is not None:
        argv += ["--nproc", options.nproc]
    elif host.nproc is not None:
        argv += ["--nproc", str(host.nproc)]
    gpu_ids = host.spec.gpus if host.spec.gpus else options.gpu_ids
    if gpu_ids:
        argv += ["--gpu-ids", gpu_ids if isinstance(gpu_ids, str) else ",".join(gpu_ids)]
    for name in PASSED_OPTIONS:
        value = getattr(options, name)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", f"{value:g}" if isinstance(value, float) else str(value)]
    argv += [f"--{name.replace('_', '-')}" for name in PASSED_SWITCHES if getattr(options, name)]
    argv += ["--run-id", options.run_id] if options.run_id else []
    for key, value in env:
        argv += ["--env", f"{key}={value}"]
    return [*argv, options.script, *options.script_args]


def remote_command(argv: Sequence[str], workdir: str) -> str:
    """One shell line: check the directory and the interpreter, then become the agent."""
    q = shlex.quote
    python = q(argv[0])
    return (
        f"cd -- {q(workdir)} 2>/dev/null || exit {NO_DIR}; "
        f"command -v {python} >/dev/null 2>&1 || exit {NO_PYTHON}; "
        f"exec {' '.join(q(arg) for arg in argv)}"
    )


def preflight_problem(host: Host, workdir: str, python: str) -> str:
    """Why an agent ended before saying ready, in words that name the host and the fix."""
    status = host.exit_status
    printed = host.stderr_tail + host.frames.noise.decode("utf-8", "replace").splitlines()
    said = "\n".join(line for line in printed if line.strip())
    if status == NO_DIR:
        return f"{host.name}: working directory {workdir} does not exist there; create it or pass --chdir DIR."
    if status == NO_PYTHON:
        return f"{host.name}: no Python at {python}; install it there or pass --python PATH."
    if "No module named launcher" in said or "No module named 'launcher'" in said:
        return f"{host.name}: ddplaunch is not installed for {python}; install it there or pass --python PATH."
    said = re.sub(r"^ddplaunch: error: ", "", said)
    return f"{host.name}: {said or f'the agent exited with status {status} before it was ready'}"


# -- running --------------------------------------------------------------------------------------


def launch_on_hosts(options: Options) -> int:
    from dataclasses import replace

    from launcher.plan import parse_env_assignments

    hosts = plan_hosts(options)
    shown_ranks = shown_ranks_of(options, hosts)
    options = replace(options, run_id=options.run_id or os.urandom(8).hex())  # one id for every node
    env = forwarded_env(dict(os.environ), parse_env_assignments(options.env, gpu_ids_given=options.gpu_ids is not None))
    workdir = options.chdir or os.getcwd()
    if options.dry_run:
        print(render_hosts(options, hosts, env, workdir), end="")
        return 0
    return Head(options, hosts, env, workdir, shown_ranks).run()


def world_size_of(hosts: Sequence[Host]) -> int | None:
    """Known on the head when every host's worker count is a number (not auto/gpu/cpu)."""
    counts = {h.nproc for h in hosts}
    if len(counts) != 1 or None in counts:
        return None
    (nproc,) = counts
    assert nproc is not None
    return len(hosts) * nproc


def shown_ranks_of(options: Options, hosts: Sequence[Host]) -> frozenset[int] | None:
    from launcher.options import parse_ranks

    if not options.ranks:
        return None
    return parse_ranks(options.ranks, world_size_of(hosts) or 1 << 30)


def plan_hosts(options: Options) -> list[Host]:
    from launcher.ssh import resolve_target

    if options.hosts is not None and options.hostfile is not None:
        raise LaunchError("--hosts and --hostfile both name the hosts; give one of them.")
    for flag, given in (("--nnodes", options.nnodes), ("--node-rank", options.node_rank),
                        ("--rdzv-endpoint", options.rdzv_endpoint)):
        if given is not None:
            raise LaunchError(
                f"{flag} does not go with --hosts/--hostfile: the host list sets the nodes and their "
                "order. Drop it (or drop the host list and start each node by hand)."
            )
    specs = read_hostfile(options.hostfile) if options.hostfile else parse_hosts_flag(options.hosts or "")
    nproc = per_host_nproc(specs, options.nproc)
    return [
        Host(rank, spec, resolve_target(spec.host, spec.user, spec.port), nproc)
        for rank, spec in enumerate(specs)
    ]


def render_hosts(options: Options, hosts: Sequence[Host], env: Sequence[tuple[str, str]], workdir: str) -> str:
    lines = [
        "ddplaunch dry run: nothing was started, no host was contacted.",
        f"job: {len(hosts)} host(s); node rank follows host order; MASTER_ADDR: "
        f"{options.master_addr or 'the first host, as the head reaches it'}; MASTER_PORT: "
        f"{options.master_port or 'picked free on the first host'}",
        "",
        "node  host  ssh",
    ]
    lines += [f"{h.node_rank:<4}  {h.name}  {h.target.label}" for h in hosts]
    lines += ["", "environment forwarded to every remote worker (NCCL_*, TORCH_*, ... and --env):"]
    lines += [f"  {key}={value}" for key, value in env] or ["  (none)"]
    lines += ["", "command run on each host over SSH (node 0 shown):"]
    lines.append("  " + remote_command(agent_argv(options, hosts[0], env, len(hosts)), workdir))
    return "\n".join(lines) + "\n"


class Head:
    """Connects, starts the agents, relays their frames to one printer, and stops them all."""

    def __init__(
        self,
        options: Options,
        hosts: list[Host],
        env: Sequence[tuple[str, str]],
        workdir: str,
        shown_ranks: frozenset[int] | None = None,
    ) -> None:
        self.options = options
        self.shown_ranks = shown_ranks
        self.hosts = hosts
        self.env = env
        self.workdir = workdir
        self.python = options.python or sys.executable
        self.events: queue.SimpleQueue[tuple[int, str, bytes | int]] = queue.SimpleQueue()
        self._wake = WakePipe()
        self._stop_count = 0
        self._referee = Referee(len(hosts))  # the current attempt, decided here for every node

    def run(self) -> int:
        from launcher.supervisor import SignalInbox

        try:
            with _Status(f"connecting to {len(self.hosts)} host(s)") as status:
                self._connect()
                self._start_agents()
                status(f"waiting for {len(self.hosts)} host(s) to be ready")
                self._await_ready()
            with SignalInbox() as inbox:
                return self._supervise(inbox)
        except KeyboardInterrupt:
            raise Interrupted("interrupted while connecting; no worker was started.") from None
        finally:
            self._close()

    # -- phase 1: connect and start -----------------------------------------------------------------

    def _connect(self) -> None:
        from launcher.ssh import connect_all

        added: list[str] = []
        try:
            clients = connect_all(
                [h.target for h in self.hosts],
                accept_new_host_keys=self.options.ssh_accept_new_host_keys,
                added_keys=added,
            )
        finally:
            for line in added:  # as OpenSSH says "Permanently added ..."
                print(f"ddplaunch: {line}", file=sys.stderr, flush=True)
        for host, client in zip(self.hosts, clients):
            host.client = client

    def _start_agents(self) -> None:
        for host in self.hosts:
            argv = agent_argv(self.options, host, self.env, len(self.hosts))
            channel = host.client.get_transport().open_session()
            channel.exec_command(remote_command(argv, self.workdir))
            host.channel = channel
            for stream in ("out", "err"):
                threading.Thread(target=self._pump, args=(host, stream), daemon=True).start()

    def _pump(self, host: Host, stream: str) -> None:
        """A thread per channel stream: bytes and the end go on one queue; a pipe wakes the loop."""
        channel = host.channel
        recv = channel.recv if stream == "out" else channel.recv_stderr
        while True:
            try:
                data = recv(1 << 16)
            except OSError:
                data = b""
            self._post(host.node_rank, stream, data)
            if not data:
                break
        if stream == "out":
            self._post(host.node_rank, "exit", channel.recv_exit_status())

    def _post(self, node_rank: int, kind: str, payload: bytes | int) -> None:
        self.events.put((node_rank, kind, payload))
        self._wake.ring()

    def _await_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not all(h.ready or h.closed for h in self.hosts):
            if time.monotonic() > deadline:
                slow = ", ".join(h.name for h in self.hosts if not (h.ready or h.closed))
                raise LaunchError(f"no answer from the agent on {slow} within {READY_TIMEOUT_S:g}s; nothing was started.")
            self._wait(deadline - time.monotonic())
            self._drain(printer=None)
        failed = [h for h in self.hosts if not h.ready]
        if failed:
            problems = [preflight_problem(h, self.workdir, self.python) for h in failed]
            raise LaunchError(
                f"{len(failed)} of {len(self.hosts)} host(s) cannot run the job; nothing was started:\n"
                + "\n".join(f"  {p}" for p in problems)
            )
        self._send_go()

    def _send_go(self) -> None:
        """Every host is ready: start the attempt, at node 0's address and port."""
        first = self.hosts[0].ready
        assert first is not None
        addr = self.options.master_addr or first[0]
        port = self.options.master_port or first[1]
        for host in self.hosts:
            host.ready = None
            self._tell(host, go_line(addr, port))

    def _tell(self, host: Host, line: bytes) -> None:
        if not host.closed:
            try:
                host.channel.sendall(line)
            except OSError:
                pass  # that host is going; its end reaches us as an event

    # -- phase 2: supervise -------------------------------------------------------------------------

    def _supervise(self, inbox: Any) -> int:
        from launcher.logs import Printer, colour_enabled
        from launcher.supervisor import STOP_SIGNALS

        world = world_size_of(self.hosts)
        colour = colour_enabled(self.options.no_color, os.environ, 1) and colour_enabled(
            self.options.no_color, os.environ, 2
        )
        printer = Printer(
            world_ranks=[],
            world_size=world or 100,  # only sizes the rank prefixes
            colour=colour,
            shown_ranks=self.shown_ranks,
            log_dir=self.options.log_dir,
        )
        self.printer = printer
        printer.note(f"all {len(self.hosts)} hosts ready: " + ", ".join(f"{h.node_rank} {h.name}" for h in self.hosts))
        selector = selectors.DefaultSelector()
        selector.register(self._wake.read_fd, selectors.EVENT_READ)
        selector.register(inbox.read_fd, selectors.EVENT_READ)
        try:
            while not all(h.closed for h in self.hosts):
                selector.select()
                for sig in inbox.take():
                    if sig in STOP_SIGNALS:
                        self._stop_all(sig, printer)
                self._drain(printer)
        finally:
            selector.close()
            printer.close()
        return self._exit_code(printer)

    def _stop_all(self, sig: int, printer: Printer) -> None:
        import signal

        name = signal.Signals(sig).name
        self._stop_count += 1
        if self._stop_count == 1:
            printer.note(f"got {name}: stopping the workers on every host (again to kill at once)")
        else:
            printer.note(f"got {name} again: killing the workers on every host now")
        for host in self.hosts:
            self._tell(host, f"stop {name}\n".encode())

    def _exit_code(self, printer: Printer) -> int:
        statuses = [h.exit_code for h in self.hosts]
        lost = [h for h in self.hosts if h.lost]
        for host in lost:
            printer.note(f"lost {host.name} (node {host.node_rank}): its connection or agent ended without an exit status")
        code = job_exit_code(statuses, any_lost=bool(lost))
        if code != 0:
            printer.note(f"exit code {code}")
        return code

    # -- events -------------------------------------------------------------------------------------

    def _wait(self, timeout: float) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._wake.read_fd, selectors.EVENT_READ)
        selector.select(max(timeout, 0))
        selector.close()

    def _drain(self, printer: Printer | None) -> None:
        self._wake.drain()
        while True:
            try:
                node_rank, kind, payload = self.events.get_nowait()
            except queue.Empty:
                return
            host = self.hosts[node_rank]
            if kind == "out":
                assert isinstance(payload, bytes)
                self._on_stdout(host, payload, printer)
            elif kind == "err":
                assert isinstance(payload, bytes)
                self._on_stderr(host, payload, printer)
            else:
                assert isinstance(payload, int)
                self._on_exit(host, payload, printer)

    def _on_stdout(self, host: Host, data: bytes, printer: Printer | None) -> None:
        if not data:
            return  # the exit event follows
        try:
            frames = host.frames.feed(data)
        except FrameError as exc:
            host.stderr_tail.append(str(exc))
            return
        for frame in frames:
            self._on_frame(host, frame, printer)

    def _on_frame(self, host: Host, frame: Frame, printer: Printer | None) -> None:
        if frame.kind == READY:
            host.ready = decode_ready(frame)
            if printer is not None and all(h.ready for h in self.hosts):
                self._send_go()  # every node is ready for a restart
            return
        if frame.kind == EXIT:
            host.said_exit = int(frame.text)
            return
        if frame.kind in (ATTEMPT_END, SUCCEEDED, OVER):
            self._on_attempt_news(host, frame)
            return
        if printer is None:
            return
        if frame.kind == DATA:
            printer.add_ranks([frame.rank])
            printer.feed(frame.rank, frame.stream, frame.payload)  # type: ignore[arg-type]
        elif frame.kind == END_OF_STREAM:
            printer.add_ranks([frame.rank])
            printer.end_of_stream(frame.rank, frame.stream)  # type: ignore[arg-type]
        elif frame.kind == NOTE:
            printer.note(f"{host.name}: {frame.text}")
        elif frame.kind == EVENT:
            printer.log_event(f"{host.name}: {frame.text}")
        elif frame.kind == BLOCK:
            printer.block(frame.text)

    def _on_stderr(self, host: Host, data: bytes, printer: Printer | None) -> None:
        if not data:
            return
        lines = data.decode("utf-8", "replace").splitlines()
        host.stderr_tail = (host.stderr_tail + lines)[-20:]
        if printer is not None:
            for line in lines:
                if line.strip():
                    printer.note(f"{host.name}: {line}")

    def _on_exit(self, host: Host, status: int, printer: Printer | None) -> None:
        host.exit_status = status
        if printer is None:
            return
        end = self._referee.host_ended(
            host.node_rank, host.name, lost=host.lost, exit_code=host.exit_code,
            every_host_closed=all(h.closed for h in self.hosts),
        )
        if end is None:
            return
        if host.lost:
            printer.note(f"lost {host.name} (node {host.node_rank}): stopping the workers on every other host")
        self._tell_every_host(end)

    # -- the attempt, decided by the referee for every node --------------------------------------

    def _on_attempt_news(self, host: Host, frame: Frame) -> None:
        if frame.kind == ATTEMPT_END:
            self._tell_every_host(self._referee.node_ended(frame.text))
        elif frame.kind == SUCCEEDED:
            self._tell_every_host(self._referee.node_succeeded(host.node_rank, host.name))
        else:
            self._referee.node_over(host.node_rank)

    def _tell_every_host(self, end: str | None) -> None:
        if end is not None:
            for host in self.hosts:
                self._tell(host, end_line(end))

    # -- the end ------------------------------------------------------------------------------------

    def _close(self) -> None:
        """Closing our side is the agents' signal to stop (end of file); wait for them, bounded."""
        for host in self.hosts:
            if host.channel is not None and not host.closed:
                try:
                    host.channel.shutdown_write()
                except OSError:
                    pass
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        while any(h.channel is not None and not h.closed for h in self.hosts) and time.monotonic() < deadline:
            self._wait(deadline - time.monotonic())
            self._drain(printer=None)
        for host in self.hosts:
            if host.client is not None:
                host.client.close()
        self._wake.close()


class _Status:
    """A rich spinner on a terminal while hosts connect; nothing when stderr is not one."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._live: Any = None

    def __enter__(self) -> Any:
        if sys.stderr.isatty():
            from rich.console import Console

            self._live = Console(stderr=True).status(self._text)
            self._live.__enter__()
        else:
            print(f"ddplaunch: {self._text}", file=sys.stderr, flush=True)
        return self.update

    def update(self, text: str) -> None:
        if self._live is not None:
            self._live.update(text)
        else:
            print(f"ddplaunch: {text}", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)
