"""What differs between a node's three modes, each in one class: the rest of a launch is shared.

- `Local`: one node; nobody else to meet.
- `StaticNode`: one of several nodes started by hand (or under srun/mpirun); the nodes meet
  at node 0's TCPStore, which the workers reuse.
- `NodeAgent`: one node under an SSH head; the head links the nodes (no store, no torch),
  sends node 0's address with each go, and shows every node's output on its terminal.

A role answers five questions: what to do before the first worker may start (`prepare`),
who the other nodes are (`connect`), where each attempt meets (`address`), what the --stdin
rank reads (`stdin`), and who shows what (`printer`, `say`, `announce`). `ddplaunch.job` asks
them and branches on nothing.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from typing import TYPE_CHECKING, Protocol

from ddplaunch.decide import Decision, Facts
from ddplaunch.errors import Interrupted, LaunchError
from ddplaunch.logs import Printer, terminal_printer
from ddplaunch.options import Options, heartbeat_timeout_of, kill_timeout_of
from ddplaunch.plan import Plan, PlanInputs
from ddplaunch.report import joined_line, start_line

if TYPE_CHECKING:
    from ddplaunch.agent import HeadLink, Heartbeat
    from ddplaunch.rendezvous import NodeLink
    from ddplaunch.protocol import Peers


class Role(Protocol):
    """What a launch asks of a node's mode; see the module's docstring."""

    def prepare(self, facts: Facts) -> Decision | None: ...

    def connect(self, inputs: PlanInputs) -> tuple[Peers | None, PlanInputs]: ...

    def address(self, inputs: PlanInputs) -> tuple[str, int]: ...

    def stdin(self, printer: Printer, first: Plan) -> int | None: ...

    def printer(self, first: Plan) -> Printer: ...

    def say(self, printer: Printer, text: str) -> None: ...

    def announce(self, printer: Printer, first: Plan) -> None: ...


class Local:
    """One node: the launcher owns the terminal and picks a free port per attempt."""

    def __init__(self, options: Options, decision: Decision) -> None:
        self.options = options
        self.decision = decision

    def prepare(self, facts: Facts) -> Decision | None:
        """Checks that need the machine, before anything starts; None: nothing may start."""
        decision = self.decision
        inputs = decision.inputs
        if decision.port_given and decision.node_rank_given and inputs.node_rank == 0:
            from ddplaunch.ports import check_port_free

            check_port_free(inputs.master_port)
        if self.options.local_addr is not None:
            check_local_addr(self.options.local_addr)
        if decision.log_dir is None and decision.files_wanted is not None:
            self.decision = decision = with_temp_log_dir(decision, decision.files_wanted)
        return decision

    def connect(self, inputs: PlanInputs) -> tuple[Peers | None, PlanInputs]:
        return None, inputs

    def address(self, inputs: PlanInputs) -> tuple[str, int]:
        """Node 0's address and port for the next attempt."""
        if self.decision.port_given:
            return inputs.master_addr, inputs.master_port
        from ddplaunch.ports import pick_free_port

        return inputs.master_addr, pick_free_port()

    def stdin(self, printer: Printer, first: Plan) -> int | None:
        """The launcher's own stdin, when the --stdin rank is on this node (else /dev/null)."""
        if first.stdin_worker is None:
            return None
        from ddplaunch.stdin import launcher_stdin

        return launcher_stdin(first.stdin_worker.global_rank, printer.note)

    def printer(self, first: Plan) -> Printer:
        decision, ranks, no_color = self.decision, [w.global_rank for w in first.workers], self.options.no_color
        shows = decision.terminal.shows
        if decision.log_dir is not None and any(decision.duplicates):
            from ddplaunch.copies import copying_printer

            return copying_printer(
                decision.duplicates, no_color=no_color, world_ranks=ranks, world_size=first.world_size,
                log_dir=decision.log_dir, shows=shows,
            )
        return terminal_printer(
            no_color=no_color, world_ranks=ranks, world_size=first.world_size, shown_ranks=None,
            log_dir=decision.log_dir, shows=shows,
        )

    def say(self, printer: Printer, text: str) -> None:
        printer.note(text)

    def announce(self, printer: Printer, first: Plan) -> None:
        self.say(printer, start_line(first, os.getpid() if quit_reports(self.options) else None))


class StaticNode(Local):
    """A node started by hand: meet the others at node 0's store before the first worker."""

    def connect(self, inputs: PlanInputs) -> tuple[Peers | None, PlanInputs]:
        link = self._join(inputs)
        assert link.node_rank is not None
        self._hosts = link.hosts
        return link, replace(inputs, node_rank=link.node_rank, run_id=link.shape.run_id)

    def _join(self, inputs: PlanInputs) -> NodeLink:
        """Returns once every node has joined; a node that never comes is named."""
        from ddplaunch.rendezvous import JobShape, NodeLink

        ranked = self.decision.node_rank_given
        who = f"node {inputs.node_rank}" if ranked else "this node (rank by arrival)"
        print(
            f"ddplaunch: {who} is waiting for {inputs.nnodes} nodes at {inputs.master_addr}:"
            f"{inputs.master_port} (--join-timeout {self.decision.join_timeout:g}s)",
            file=sys.stderr,
            flush=True,
        )
        link = NodeLink(
            master_addr=inputs.master_addr,
            master_port=inputs.master_port,
            shape=JobShape(inputs.nnodes, inputs.nproc, inputs.max_restarts, inputs.run_id),
            run_id_given=self.options.run_id is not None,
            node_rank=inputs.node_rank if ranked else None,
            hostname=inputs.hostname,
            join_timeout=self.decision.join_timeout,
            heartbeat_timeout=heartbeat_timeout_of(self.options),
            # the longest a live node may take to stop its workers: grace, SIGKILL, --kill-timeout
            stop_budget=self.decision.grace + kill_timeout_of(self.options),
        )
        try:
            link.join(0)
        except KeyboardInterrupt:
            link.close()
            raise Interrupted("interrupted while waiting for the other nodes; no worker was started.") from None
        except BaseException:
            link.close()
            raise
        return link

    def announce(self, printer: Printer, first: Plan) -> None:
        self.say(printer, joined_line(self._hosts))
        super().announce(printer, first)


class NodeAgent:
    """A node under an SSH head: ready/go with the head, frames instead of a terminal."""

    def __init__(self, options: Options, decision: Decision) -> None:
        self.options = options
        self.decision = decision
        self._head: HeadLink | None = None
        self._beats: Heartbeat | None = None

    def prepare(self, facts: Facts) -> Decision | None:
        """The checks passed: say ready (node 0: its address and port), await the head's go."""
        from ddplaunch.agent import HeadGone, Heartbeat, handshake, ssh_server_address
        from ddplaunch.options import heartbeat_timeout_of
        from ddplaunch.ports import check_port_free, pick_free_port

        decision = self.decision
        inputs = decision.inputs
        port = inputs.master_port if self.options.master_port is not None else 0
        if inputs.node_rank == 0:
            if port:
                check_port_free(port)  # before ready: a busy port then starts nothing anywhere
            else:
                port = pick_free_port()
        self._beats = Heartbeat(heartbeat_timeout_of(self.options))  # from the first ready to the exit
        try:
            addr, port = handshake(ssh_server_address(facts.environ) or inputs.hostname, port, beats=self._beats)
        except HeadGone:
            return None  # the head went away before saying go: nothing was started
        told = replace(inputs, master_addr=addr, master_port=port)
        self.decision = replace(decision, inputs=told, port_given=True)
        return self.decision

    def connect(self, inputs: PlanInputs) -> tuple[Peers | None, PlanInputs]:
        from ddplaunch.agent import HeadLink

        master = (inputs.master_addr, inputs.master_port)
        pick_port = self.options.master_port is None
        self._head = HeadLink(inputs.node_rank, inputs.hostname, master, pick_port=pick_port, beats=self._beats)
        return self._head, inputs

    def address(self, inputs: PlanInputs) -> tuple[str, int]:
        """The head's go for this attempt named node 0's address and port."""
        assert self._head is not None
        return self._head.master_addr, self._head.master_port

    def stdin(self, printer: Printer, first: Plan) -> int | None:
        """Our own stdin is the head's commands: the head forwards its stdin, into a pipe."""
        if first.stdin_worker is None:
            return None
        assert self._head is not None
        return self._head.open_stdin(first.stdin_worker.global_rank)

    def printer(self, first: Plan) -> Printer:
        from ddplaunch.agent import FramePrinter

        return FramePrinter(world_ranks=[w.global_rank for w in first.workers], world_size=first.world_size)

    def say(self, printer: Printer, text: str) -> None:
        printer.log_event(text)  # the head sums up for all hosts

    def announce(self, printer: Printer, first: Plan) -> None:
        self.say(printer, start_line(first))


def quit_reports(options: Options) -> bool:
    """SIGQUIT prints every rank's stack, unless --signals-to-handle lists it (then it stops the
    job, as under torchrun)."""
    from ddplaunch.options import parse_signals
    from ddplaunch.supervisor import SignalPlan  # the one place that decides what SIGQUIT does

    given = options.signals_to_handle
    return bool(SignalPlan.handling(parse_signals(given) if given else None).report)


def check_local_addr(addr: str) -> None:
    """--local-addr names this node: it must be one of this machine's addresses."""
    from ddplaunch.rendezvous import is_local_address

    if not is_local_address(addr):
        raise LaunchError(
            f"--local-addr {addr}: not an address of this machine (or it does not resolve). Give "
            "this node's own host name or IP address, as the other nodes reach it."
        )


def with_temp_log_dir(decision: Decision, why: str) -> Decision:
    """torchrun writes to a temporary directory when it needs files and has no --log-dir; so do
    we, and say where (it is kept: it holds output that the terminal did not show)."""
    path, note = temp_log_dir(why)
    return replace(decision, log_dir=path, notes=(*decision.notes, note))


def temp_log_dir(why: str) -> tuple[str, str]:
    """A kept temporary log directory, and the note that names it."""
    import tempfile

    path = tempfile.mkdtemp(prefix="ddplaunch-logs-")
    return path, f"{why} and no --log-dir was given: every rank's output is in {path}/rankN.log"


def role_for(options: Options, decision: Decision) -> Role:
    """The one place that tells the modes apart."""
    if options.agent:
        return NodeAgent(options, decision)
    if decision.inputs.nnodes > 1:
        return StaticNode(options, decision)
    return Local(options, decision)
