"""The head of an SSH launch: one command starts a node agent on every host and shows them all.

Life cycle: connect to every host at once; start the agents (the workers' variables go to
each as its first stdin line, never on its command line). An agent is the head's own code,
shipped (ddplaunch.ship): a host whose cache lacks this version's zip says so, the head sends
it to every host not ready yet, over the open connections, and starts those agents again.
Each agent checks its host (working directory, interpreter, script), says which Python it
runs and says ready, node 0 with its address and a free port; only when every host is ready
does the head name each host's Python (warning of one without torch) and say go, so a bad
host starts nothing anywhere. Then the agents run, their frames come back over SSH and one
printer shows every rank's lines. The head links the nodes (no store, so agents never import torch): the first
node to report how an attempt ended speaks for all (ddplaunch.protocol.Referee decides), and
the head tells every node at once; restarts start when every node is ready again. Ctrl-C
here becomes a stop sent to every agent; a host whose connection drops stops its own
workers (its agent reads end of file) and the head ends the attempt for the others. A
network that drops packets closes nothing, so the head and each agent also beat to each
other every HEARTBEAT_INTERVAL_S (faster for a short timeout; the head's from a thread, so
a loop held up on the terminal still beats): a host silent for --heartbeat-timeout after its
first ready is lost the same way (its session is dropped, the others are stopped), and an
agent that hears nothing from the head for as long stops its own workers. The head's stdin
goes to the --stdin rank's agent, a piece each time it asks (ddplaunch.stdin_relay).
Stack reports are job-wide and the head's: SIGQUIT, or a stall of the whole job's output
(the head sees every line), asks every agent for its ranks' stacks (ddplaunch.headstacks)
and prints one report; --stall-action stop then ends the attempt everywhere as "stalled".
"""

from __future__ import annotations

import os
import queue
import selectors
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ddplaunch.agent import PythonFacts, replay
from ddplaunch.channel import AgentChannel, ChannelEvent
from ddplaunch.errors import Interrupted, LaunchError
from ddplaunch.fanout import (
    NO_AGENT, Host, agent_argv, prefixed_world_size, preflight_problem, python_of, pythons_of, remote_command,
)
from ddplaunch.frames import (
    ATTEMPT_END, HEARTBEAT, NOTE, OVER, READY, STACKS, SUCCEEDED, WANT_STDIN, Frame, decode_ready, end_line, env_line,
    go_line,
)
from ddplaunch.headstacks import AgentStacks, HeadReports
from ddplaunch.heartbeat import beat_interval
from ddplaunch.inputs import sooner
from ddplaunch.options import HEARTBEAT_INTERVAL_S, heartbeat_timeout_of
from ddplaunch.protocol import NOT_A_NODE, AttemptEnd, Referee, job_exit_code
from ddplaunch.secrets import redact
from ddplaunch.ship import AgentPlace, AgentZip, build_agent_zip, build_in_background, place_of, upload_all
from ddplaunch.stdin_relay import ForwardedStdin
from ddplaunch.wakepipe import WakePipe

if TYPE_CHECKING:
    from ddplaunch.logs import Printer
    from ddplaunch.options import Options
    from ddplaunch.supervisor import SignalInbox
    from ddplaunch.sync import SyncSource

READY_TIMEOUT_S = 60.0  # from connected to "ready": a Python start and a few checks
CLOSE_TIMEOUT_S = 10.0


class Head:
    """Connects, starts the agents, says go, relays their frames to one printer, and stops them all."""

    def __init__(
        self,
        options: Options,
        hosts: list[Host],
        env: Sequence[tuple[str, str]],
        workdir: str,
        shown_ranks: frozenset[int] | None = None,
        shows: Callable[[int, int], bool] | None = None,
        sync: SyncSource | None = None,
    ) -> None:
        self.options = options
        self.sync = sync  # --sync: this directory's copy, made on every host before the agents start
        self.shown_ranks = shown_ranks
        self.shows = shows  # --redirects: per (rank, stream), None for every stream
        self.hosts = hosts
        self.env = env
        self.workdir = workdir
        self.python = python_of(options)  # in words, for errors
        self._interpreters = pythons_of(options)  # the first a host has is its agent's
        self._agent: AgentZip | None = None  # the head's own code, shipped to hosts that lack it
        self._place: AgentPlace | None = None
        self._commands: list[str] = []  # by node rank: the remote line that becomes the agent
        self._shipped: set[int] = set()  # node ranks the agent was sent to in this run
        self._restarted: set[int] = set()  # node ranks whose command ran again after that
        self._pythons: dict[int, PythonFacts] = {}  # node rank -> what its agent said it runs
        self.agents: list[AgentChannel] = []  # by node rank, once every host is connected
        self.events: queue.SimpleQueue[ChannelEvent] = queue.SimpleQueue()
        self._wake = WakePipe()
        self._ready: dict[int, tuple[str, int]] = {}  # node rank -> the address and port it said
        self._stop_count = 0
        self._referee = Referee(len(hosts))  # the current attempt, decided there for every node
        self._stdin: ForwardedStdin | None = None  # while the loop runs
        self._reports = _head_reports(options, hosts, self.agents)
        self._stalled: str | None = None  # --stall-action stop ended the job: why
        self._silence_s = heartbeat_timeout_of(options)
        self._beats: _Beats | None = None  # from the agents' start to the close
        self._stopped_waiting: set[int] = set()  # node ranks told to stop waiting for a go

    def run(self) -> int:
        from ddplaunch.options import parse_signals
        from ddplaunch.supervisor import SignalInbox, SignalPlan

        try:
            with _Status(f"connecting to {len(self.hosts)} host(s)") as status:
                agent_zip = build_in_background()  # once per run: the same code, the same name
                accept_new = self.options.ssh_accept_new_host_keys
                outlast = self._silence_s + HEARTBEAT_INTERVAL_S
                self.agents[:] = connect(self.hosts, self._post, accept_new_host_keys=accept_new, outlast_s=outlast)
                self._agent = agent_zip()
                self._place = place_of(self._agent, dict(os.environ))
                if self.sync is not None:
                    self._sync_copies(self.sync, status)
                self._start_agents()
                status(f"waiting for {len(self.hosts)} host(s) to be ready")
                self._await_ready()
            self._say_pythons()
            self._send_go()
            # --signals-to-handle: the head stops on the same signals as its agents (each agent
            # turns "stop NAME" into that signal to itself, and its plan stops on it too). Not
            # listed there, SIGQUIT asks every agent for its ranks' stacks.
            given = self.options.signals_to_handle
            handled = SignalPlan.handling(parse_signals(given) if given else None)
            with SignalInbox(handled) as inbox:
                return self._supervise(inbox)
        except KeyboardInterrupt:
            raise Interrupted("interrupted while connecting; no worker was started.") from None
        finally:
            self._close()

    # -- phase 1: connect, start, ready, go ---------------------------------------------------------

    def _start_agents(self) -> None:
        if self._agent is None:  # run() builds it while the hosts connect
            self._agent = build_agent_zip()
        if self._place is None:
            self._place = place_of(self._agent, dict(os.environ))
        self._commands = [
            remote_command(self._interpreters, self._place, agent_argv(self.options, host, len(self.hosts)), self.workdir)
            for host in self.hosts
        ]
        for command, agent in zip(self._commands, self.agents):
            agent.start(command)
            agent.tell(env_line(self.env))  # the agent's first line: no value goes on its command line
        self._beats = _Beats(self.agents, beat_interval(self._silence_s))  # each agent watches from its ready on

    def _ship_where_missing(self) -> None:
        """A host whose command found no agent in its cache makes the head send it, at once, to
        every host not ready yet (a new version is missing everywhere; where it is there, the
        upload stops at a stat); then each host that lacked it runs its command once more. A
        host that cannot take it is named, and nothing starts."""
        assert self._agent is not None and self._place is not None
        lacking = [h for h in self.hosts if self.agents[h.node_rank].exit_status == NO_AGENT
                   and h.node_rank not in self._restarted]
        if not lacking:
            return
        unsent = [h for h in self.hosts if h.node_rank not in self._shipped and h.node_rank not in self._ready]
        if unsent:
            self._ship(unsent)
        for host in lacking:
            self._restarted.add(host.node_rank)  # once: still lacking it then is preflight_problem's
            agent = self.agents[host.node_rank]
            agent.start_again(self._commands[host.node_rank])
            agent.tell(env_line(self.env))

    def _ship(self, hosts: Sequence[Host]) -> None:
        assert self._agent is not None and self._place is not None
        print(f"ddplaunch: sending ddplaunch's agent ({self._agent.size // 1024} kB, once per version) to "
              f"{self._place.shown} on {', '.join(h.name for h in hosts)}", file=sys.stderr, flush=True)
        sent = upload_all([(h.name, self.agents[h.node_rank].open_sftp) for h in hosts], self._agent, self._place)
        failed = [f"  {name}: {why}" for name, why in sent.items() if isinstance(why, str)]
        if failed:
            raise LaunchError(f"{len(failed)} of {len(self.hosts)} host(s) cannot run the job; nothing was started:\n"
                              + "\n".join(failed))
        self._shipped.update(h.node_rank for h in hosts)

    def _sync_copies(self, source: SyncSource, status: _Status) -> None:
        """--sync: every host's copy up to date, in parallel, before any agent starts there; a
        progress line per host at a terminal, then what changed; one host failing stops all."""
        from ddplaunch.sync import files, summaries, sync_hosts
        from ddplaunch.syncplan import human_bytes

        names = ", ".join(h.name for h in self.hosts)
        print(f"ddplaunch: --sync: {source.root} ({files(len(source.entries))}, {human_bytes(source.total_bytes)}) "
              f"to {source.shown_dir} on {names}", file=sys.stderr, flush=True)
        started = time.monotonic()
        progress, failed = sync_hosts(
            [(h.name, self.agents[h.node_rank].open_sftp) for h in self.hosts], source,
            on_tick=lambda states: status.show(["syncing " + source.shown_dir, *(s.line() for s in states)]),
        )
        if failed:
            raise LaunchError(f"{len(failed)} of {len(self.hosts)} host(s) cannot run the job; nothing was started:\n"
                              + "\n".join(f"  {name}: {why}" for name, why in failed.items()))
        elapsed = time.monotonic() - started
        for line in summaries(progress):
            print(f"ddplaunch: --sync {elapsed:.1f} s: {line}", file=sys.stderr, flush=True)

    def _say_pythons(self) -> None:
        """Which Python each host runs, hosts alike on one line; a warning for each whose Python
        cannot import torch (a --no-python job needs none), before anything starts."""
        by_python: dict[tuple[str, str], list[str]] = {}
        for host in self.hosts:
            facts = self._pythons.get(host.node_rank)
            if facts is not None:
                by_python.setdefault((facts.version, facts.executable), []).append(host.name)
        for (version, executable), names in by_python.items():
            print(f"ddplaunch: {', '.join(names)}: Python {version} at {executable}", file=sys.stderr, flush=True)
        if self.options.no_python:
            return
        for host in self.hosts:
            facts = self._pythons.get(host.node_rank)
            if facts is not None and not facts.has_torch:
                print(f"ddplaunch: warning: {host.name}: torch is not importable by {facts.executable} "
                      f"(Python {facts.version}); a script there that imports it will fail. Install torch "
                      "for that Python, or pass --python PATH to one that has it.", file=sys.stderr, flush=True)

    def _post(self, event: ChannelEvent) -> None:
        """From the pump threads: one queue, and a pipe that wakes the loop."""
        self.events.put(event)
        self._wake.ring()

    def _await_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while self._unanswered():
            if time.monotonic() > deadline:
                slow = ", ".join(h.name for h in self._unanswered())
                raise LaunchError(f"no answer from the agent on {slow} within {READY_TIMEOUT_S:g}s; nothing was started.")
            left, silence = deadline - time.monotonic(), self._silence_due_in()
            _wait_readable(self._wake.read_fd, left if silence is None else min(left, silence))
            self._drain(printer=None)
            self._ship_where_missing()
            silent = self._abandon_silent()
            if silent:
                raise LaunchError("; ".join(self._silent_line(h) for h in silent) + "; nothing was started.")
        failed = [(h, self.agents[h.node_rank]) for h in self.hosts if h.node_rank not in self._ready]
        if failed:
            said = [(h, a.exit_status, a.said_outside_frames()) for h, a in failed]
            shown = self._place.shown if self._place is not None else "the agent's zip"
            problems = [redact(preflight_problem(h.name, status, lines, self.workdir, self.python, shown), self.env)
                        for h, status, lines in said]  # an agent's words may quote a value
            raise LaunchError(
                f"{len(failed)} of {len(self.hosts)} host(s) cannot run the job; nothing was started:\n"
                + "\n".join(f"  {p}" for p in problems)
            )

    def _unanswered(self) -> list[Host]:
        return [h for h in self.hosts if h.node_rank not in self._ready and not self.agents[h.node_rank].closed]

    def _send_go(self) -> None:
        """Every host is ready: start the attempt, at node 0's address and port."""
        addr = self.options.master_addr or self._ready[0][0]
        port = self.options.master_port or self._ready[0][1]
        self._ready.clear()
        for agent in self.agents:
            agent.tell(go_line(addr, port))

    # -- phase 2: supervise -------------------------------------------------------------------------

    def _supervise(self, inbox: SignalInbox) -> int:
        from ddplaunch.logs import terminal_printer

        printer = terminal_printer(
            no_color=self.options.no_color,
            world_ranks=[],
            world_size=prefixed_world_size(self.hosts),  # only sizes the rank prefixes
            shown_ranks=self.shown_ranks,
            log_dir=self.options.log_dir,
            shows=self.shows,
        )
        ready = f"all {len(self.hosts)} hosts ready: " + ", ".join(f"{h.node_rank} {h.name}" for h in self.hosts)
        if inbox.plan.report:
            ready += f"; every rank's stack: Ctrl-\\ or kill -QUIT {os.getpid()}"
        printer.note(ready)
        selector = selectors.DefaultSelector()
        selector.register(self._wake.read_fd, selectors.EVENT_READ)
        selector.register(inbox.read_fd, selectors.EVENT_READ)
        self._stdin = ForwardedStdin(selector, printer.note)
        self._reports.begin_attempt(printer)
        try:
            while not all(a.closed for a in self.agents):
                printer.tick()
                wait = sooner(sooner(printer.due_in(), self._reports.due_in()), self._silence_due_in())
                for key, _ in selector.select(wait):
                    if isinstance(key.data, ForwardedStdin):
                        key.data.forward()
                self._handle_signals(inbox, printer)
                self._drain(printer)
                for host in self._abandon_silent():
                    self._lose_silent(host, printer)
                self._advance_stacks(printer)
        finally:
            self._reports.end_attempt()
            self._stdin = None
            selector.close()
            printer.close()
        return self._exit_code(printer)

    def _handle_signals(self, inbox: SignalInbox, printer: Printer) -> None:
        for sig in inbox.take():
            if sig in inbox.plan.stop:
                self._stop_all(sig, printer)
            elif sig in inbox.plan.report:
                self._reports.on_demand(signal.Signals(sig).name, printer)

    def _stop_all(self, sig: int, printer: Printer) -> None:
        name = signal.Signals(sig).name
        self._stop_count += 1
        if self._stop_count == 1:
            printer.note(f"got {name}: stopping the workers on every host (again to kill at once)")
        else:
            printer.note(f"got {name} again: killing the workers on every host now")
        for agent in self.agents:
            agent.tell(f"stop {name}\n".encode())

    def _exit_code(self, printer: Printer) -> int:
        from ddplaunch.options import STALL_EXIT_CODE

        lost = [h for h in self.hosts if self.agents[h.node_rank].lost]
        for host in lost:
            if self.agents[host.node_rank].silent:
                printer.note(f"{self._silent_line(host)}: the network or the host is down")
            else:
                printer.note(f"lost {host.name} (node {host.node_rank}): its connection or agent ended without an exit status")
        # An agent stopped from waiting for a go exits "interrupted" (130) because we told it
        # to: the job's code is the lost host's.
        codes = [None if a.node_rank in self._stopped_waiting else a.exit_code for a in self.agents]
        code = job_exit_code(codes, any_lost=bool(lost))
        if self._stalled is not None:
            printer.note(f"root cause: the job stalled ({self._stalled}); the report above shows where each rank was")
            code = STALL_EXIT_CODE
        if code != 0:
            printer.note(f"exit code {code}")
        return code

    # -- stack reports: the current attempt's, job-wide ------------------------------------------

    def _advance_stacks(self, printer: Printer) -> None:
        stalled = self._reports.advance(printer.last_any)
        if stalled is not None and self._referee.end is None:
            self._stop_for_stall(stalled, printer)

    def _stop_for_stall(self, reason: str, printer: Printer) -> None:
        """--stall-action stop: the attempt ends as "stalled" on every host; no restart."""
        from ddplaunch.options import STALL_EXIT_CODE

        self._stalled = reason
        printer.note(f"the job stalled ({reason}): stopping the workers on every host, as --stall-action stop asks")
        end = AttemptEnd("stalled", NOT_A_NODE, "the SSH head", f"the job stalled: {reason}", STALL_EXIT_CODE)
        self._tell_every_host(self._referee.node_ended(end.to_text()))

    # -- heartbeats: a host that says nothing for the timeout is gone ------------------------------

    def _silence_due_in(self) -> float | None:
        """Seconds until the first watched host would be gone; None while none is watched."""
        watched = [a.silence.due_in() for a in self.agents if a.running and a.silence is not None]
        return min(watched, default=None)

    def _abandon_silent(self) -> list[Host]:
        """The hosts that fell silent now, abandoned (closed, lost). Called after a drain, so
        every byte that came before counts, however long the loop was held up."""
        silent = [h for h in self.hosts if self.agents[h.node_rank].went_silent]
        for host in silent:
            self.agents[host.node_rank].abandon()
        return silent

    def _lose_silent(self, host: Host, printer: Printer) -> None:
        """As a host whose connection dropped: the attempt ends as "lost" on every other host."""
        printer.note(f"{self._silent_line(host)}: stopping the workers on every other host")
        why = f"nothing heard from it for {self._silence_s:g} s: the network or the host is down"
        self._tell_every_host(self._referee.host_ended(
            host.node_rank, host.name, lost=True, exit_code=None,
            every_host_closed=all(a.closed for a in self.agents), why=why,
        ))
        self._stop_waiting()

    def _stop_waiting(self) -> None:
        """A host is lost, so no restart can start: the agents that wait for its go (which an
        attempt's end does not reach) stop, as on SIGTERM, and the job ends."""
        for node_rank in self._ready.keys() - self._stopped_waiting:
            self._stopped_waiting.add(node_rank)  # once: a second stop would kill at once
            self.agents[node_rank].tell(b"stop SIGTERM\n")

    def _silent_line(self, host: Host) -> str:
        return f"lost {host.name} (node {host.node_rank}): nothing heard from it for {self._silence_s:g} s"

    # -- events: what the agents said, in the order they said it ---------------------------------

    def _drain(self, printer: Printer | None) -> None:
        self._wake.drain()
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return
            host, agent = self.hosts[event.node_rank], self.agents[event.node_rank]
            if event.kind == "out":
                for frame in agent.read_out(event.data):
                    self._on_frame(host, frame, printer)
            elif event.kind == "err":
                for line in agent.read_err(event.data):
                    if printer is not None and line.strip():
                        printer.note(f"{host.name}: {redact(line, self.env)}")  # an agent's words may quote a value
            elif not agent.silent:  # an abandoned host's dropped session says nothing new
                agent.exited(event.status)
                if printer is not None:
                    self._on_exit(host, agent, printer)

    def _on_frame(self, host: Host, frame: Frame, printer: Printer | None) -> None:
        if frame.kind == READY:
            self._ready[host.node_rank] = decode_ready(frame)
            self.agents[host.node_rank].watch(self._silence_s)  # its agent beats from here on
            if printer is not None and any(a.lost for a in self.agents):
                self._stop_waiting()  # ready for a restart that cannot come
            if printer is not None and len(self._ready) == len(self.hosts):
                self._send_go()  # every node is ready for a restart
                self._reports.begin_attempt(printer)
        elif frame.kind == STACKS:
            self._reports.asker.took(host.node_rank, frame.payload)
        elif frame.kind == ATTEMPT_END:
            self._tell_every_host(self._referee.node_ended(frame.text))
        elif frame.kind == SUCCEEDED:
            self._tell_every_host(self._referee.node_succeeded(host.node_rank, host.name))
        elif frame.kind == OVER:
            self._referee.node_over(host.node_rank)
        elif frame.kind == HEARTBEAT:
            pass  # its bytes were its word (AgentChannel.read_out)
        elif frame.kind == WANT_STDIN:
            if self._stdin is not None:
                self._stdin.want(self.agents[host.node_rank], frame.rank)
        elif frame.kind == NOTE and (facts := PythonFacts.from_note(frame.text)) is not None:
            self._pythons[host.node_rank] = facts
        elif printer is not None:
            replay(frame, printer, host.name)

    def _on_exit(self, host: Host, agent: AgentChannel, printer: Printer) -> None:
        end = self._referee.host_ended(
            host.node_rank, host.name, lost=agent.lost, exit_code=agent.exit_code,
            every_host_closed=all(a.closed for a in self.agents),
        )
        if end is not None:
            if agent.lost:
                printer.note(f"lost {host.name} (node {host.node_rank}): stopping the workers on every other host")
            self._tell_every_host(end)
        if agent.lost:
            self._stop_waiting()

    def _tell_every_host(self, end: str | None) -> None:
        if end is not None:
            self._reports.end_attempt()
            for agent in self.agents:
                agent.tell(end_line(end))

    # -- the end ------------------------------------------------------------------------------------

    def _close(self) -> None:
        """Closing our side is the agents' signal to stop (end of file); wait for them, bounded."""
        if self._beats is not None:
            self._beats.stop()
        for agent in self.agents:
            agent.shutdown_write()
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        while any(a.running for a in self.agents) and time.monotonic() < deadline:
            _wait_readable(self._wake.read_fd, deadline - time.monotonic())
            self._drain(printer=None)
        for agent in self.agents:
            agent.close()
        self._wake.close()


class _Beats:
    """The head's beat to every agent every `interval`, from a thread of its own: a
    loop held up on its terminal (Ctrl-S, a slow pipe) must not make the agents think the head
    is gone and stop a healthy job."""

    def __init__(self, agents: Sequence[AgentChannel], interval: float) -> None:
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, args=(agents,), name="ddplaunch-beats", daemon=True)
        self._thread.start()

    def _run(self, agents: Sequence[AgentChannel]) -> None:
        while True:
            for agent in agents:
                agent.beat()
            if self._stop.wait(self._interval):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=CLOSE_TIMEOUT_S)  # a beat never waits (AgentChannel.beat)


def _head_reports(options: Options, hosts: Sequence[Host], agents: Sequence[AgentChannel]) -> HeadReports:
    from ddplaunch.job import ReportDir
    from ddplaunch.options import stall_of

    return HeadReports(AgentStacks([h.name for h in hosts], agents), stall_of(options), ReportDir(options.log_dir))


def connect(
    hosts: Sequence[Host], post: Callable[[ChannelEvent], None], *, accept_new_host_keys: bool, outlast_s: float = 0.0,
) -> list[AgentChannel]:
    """Every host at once, or none (ddplaunch.ssh.connect_all); one channel per host, by node rank.
    TCP gives up on a silent link no sooner than `outlast_s`: the heartbeat, which names the
    host, has the first word."""
    from ddplaunch.ssh import DEAD_LINK_S, connect_all

    dead_link_s = max(DEAD_LINK_S, outlast_s)

    added: list[str] = []
    try:
        clients = connect_all(
            [h.target for h in hosts], accept_new_host_keys=accept_new_host_keys, added_keys=added,
            dead_link_s=dead_link_s,
        )
    finally:
        for line in added:  # as OpenSSH says "Permanently added ..."
            print(f"ddplaunch: {line}", file=sys.stderr, flush=True)
    return [AgentChannel(h.node_rank, client, post) for h, client in zip(hosts, clients)]


def _wait_readable(fd: int, timeout: float) -> None:
    selector = selectors.DefaultSelector()
    selector.register(fd, selectors.EVENT_READ)
    selector.select(max(timeout, 0))
    selector.close()


class _Status:
    """A rich spinner on a terminal while hosts connect; nothing when stderr is not one."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._live: Any = None

    def __enter__(self) -> _Status:
        if sys.stderr.isatty():
            from rich.console import Console

            self._live = Console(stderr=True).status(self._text)
            self._live.__enter__()
        else:
            print(f"ddplaunch: {self._text}", file=sys.stderr, flush=True)
        return self

    def __call__(self, text: str) -> None:
        """A new phase: on the spinner at a terminal, else a line of its own."""
        if self._live is not None:
            self._live.update(text)
        else:
            print(f"ddplaunch: {text}", file=sys.stderr, flush=True)

    def show(self, lines: Sequence[str]) -> None:
        """Counts that change many times a second (--sync's per host): at a terminal only."""
        if self._live is not None:
            from rich.text import Text

            self._live.update(Text("\n".join(lines)))

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)
