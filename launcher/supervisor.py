"""Spawn, watch and tear down the workers of one node. Signal handlers only record; one loop decides.

Each worker runs in its own session (so its whole tree shares one process group, and the
terminal's Ctrl-C reaches only the launcher, which forwards it). The launcher makes itself a
child subreaper, so a worker's orphaned children are reparented to it: it reaps them, and
"no child left" means the whole tree is gone. The loop wakes on pipe output and on signals
(SIGCHLD included, through the wakeup fd), never on a polling timer while workers run.
Here the loop decides; the processes are a WorkerTree's (ddplaunch.workers), the stop's
deadlines a Teardown's (ddplaunch.teardown) and what the loop waits on is ddplaunch.inputs'.
"""

from __future__ import annotations

import os
import signal
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ddplaunch.inputs import Inputs, PeerNews, SignalWake, WorkerOutput, sooner
from ddplaunch.hangs import StackReporter
from ddplaunch.logs import PRIVATE_DIR, Printer
from ddplaunch.options import DEFAULT_KILL_TIMEOUT_S, STALL_EXIT_CODE, Stall
from ddplaunch.plan import FORWARDED_SIGNALS, JOB_ID_VARIABLE, Plan, Worker
from ddplaunch.prctl import PR_SET_CHILD_SUBREAPER, prctl
from ddplaunch.protocol import Peers
from ddplaunch.teardown import Teardown
from ddplaunch.wakepipe import WakePipe
from ddplaunch.watchdog import Watchdog
from ddplaunch.workers import WorkerTree
from ddplaunch.workers import WorkerProcess as WorkerProcess  # re-exported: report.py reads it here

if TYPE_CHECKING:
    from ddplaunch.hangs import Finished
    from ddplaunch.procfs import KernelWait
    from ddplaunch.protocol import AttemptEnd, EndKind
    from ddplaunch.snapshot import RankSnapshot
    from ddplaunch.stacks import Target
    from ddplaunch.warm import Zygote

GROUP_POLL_S = 0.02  # only while waiting for a tree with no SIGCHLD to tell us it ended
# The workers are told torchrun's list (TORCHELASTIC_SIGNALS_TO_HANDLE); SIGQUIT in it stops
# the job only when the user lists it: by default it asks for every rank's stack.
REPORT_SIGNAL = signal.SIGQUIT
STOP_SIGNALS = tuple(
    sig for sig in (signal.Signals[name] for name in FORWARDED_SIGNALS.split(",")) if sig != REPORT_SIGNAL
)
RELAYED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)  # e.g. Slurm's checkpoint-before-preemption


@dataclass(frozen=True)
class SignalPlan:
    """What each signal the launcher catches does: stop the job (forwarded to every worker,
    then SIGKILL after the grace), or only be relayed to the workers. A signal in neither is
    not caught at all. The default is torchrun's --signals-to-handle."""

    stop: tuple[int, ...] = STOP_SIGNALS
    relayed: tuple[int, ...] = RELAYED_SIGNALS
    report: tuple[int, ...] = (REPORT_SIGNAL,)  # print every rank's stack; the job goes on

    @classmethod
    def handling(cls, names: str | None) -> SignalPlan:
        """--signals-to-handle (names checked by ddplaunch.options.parse_signals), None when not
        given: those stop the job; SIGUSR1/SIGUSR2 left out of it are still relayed, and SIGQUIT
        left out of it asks for a stack report (listed, it stops the job as under torchrun)."""
        if names is None:
            return cls()
        stop = tuple(signal.Signals[name] for name in names.split(","))
        report = () if REPORT_SIGNAL in stop else (REPORT_SIGNAL,)
        return cls(stop, tuple(sig for sig in RELAYED_SIGNALS if sig not in stop), report)


@dataclass(frozen=True)
class Unkillable:
    """A process of the tree still alive --kill-timeout after SIGKILL (stuck in the kernel)."""

    pid: int
    rank: int | None  # whose process group it is in; None: it left every worker's group
    is_worker: bool  # the rank's own process, else one of its descendants
    wait: KernelWait


@dataclass(frozen=True)
class AttemptResult:
    """How one attempt ended: its workers, the first failure, the stop signal the launcher got."""

    workers: tuple[WorkerProcess, ...]
    root_cause: WorkerProcess | None
    stop_signal: int | None  # received; what the launcher sent is each worker's signals_sent
    spawn_error: str | None = None
    ended_by: AttemptEnd | None = None  # multi-node: why the attempt ended, job-wide
    node_rank: int = 0
    stalled: str | None = None  # --stall-action stop: why the job was stopped
    others_at_failure: tuple[RankSnapshot, ...] = ()  # where the other ranks were when the root cause died
    stop_began: float | None = None  # when the workers were told to stop (the printer's clock)
    unkillable: tuple[Unkillable, ...] = ()  # given up on after SIGKILL; the job ends without them

    @property
    def exit_code(self) -> int:
        if self.elsewhere is not None:
            return self.elsewhere.exit_code or 1  # another node's root cause is the job's
        if self.root_cause is not None:
            return self.root_cause.exit_code or 1
        if self.stalled is not None:
            return STALL_EXIT_CODE
        if self.stop_signal is not None:
            return 128 + self.stop_signal
        if self.spawn_error is not None:
            return 1
        return 0

    @property
    def elsewhere(self) -> AttemptEnd | None:
        """The job's end when another node said it first: its root cause, not ours.

        A local worker that failed after that (its peer vanished) is a consequence.
        """
        end = self.ended_by
        if end is None or end.kind == "success" or end.node_rank == self.node_rank:
            return None
        return end


class SignalInbox:
    """Handlers append the signal number and nothing else; the loop reads them."""

    def __init__(self, plan: SignalPlan = SignalPlan()) -> None:
        self.plan = plan
        self.handled = (signal.SIGCHLD, *plan.stop, *plan.relayed, *plan.report)
        self.pending: deque[int] = deque()
        self._wake = WakePipe()
        self.read_fd = self._wake.read_fd
        self._previous: dict[int, object] = {}
        self._previous_wakeup = -1

    def __enter__(self) -> SignalInbox:
        self._previous_wakeup = signal.set_wakeup_fd(self._wake.write_fd, warn_on_full_buffer=False)
        for sig in self.handled:
            self._previous[sig] = signal.signal(sig, self._record)
        if signal.SIGINT not in self.handled:
            # Left out of --signals-to-handle: Python's own handler would raise KeyboardInterrupt
            # in the loop; the system's default ends the launcher, as for any signal left out.
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_DFL)
        return self

    def _record(self, signum: int, _frame: object) -> None:
        self.pending.append(signum)

    def take(self) -> list[int]:
        self._wake.drain()
        taken = []
        while self.pending:
            taken.append(self.pending.popleft())
        return taken

    def __exit__(self, *_exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        signal.set_wakeup_fd(self._previous_wakeup)
        self._wake.close()


def become_subreaper() -> bool:
    """Orphaned grandchildren come to us (Linux), so we can reap them and know they are gone."""
    return prctl(PR_SET_CHILD_SUBREAPER, 1)


@dataclass(frozen=True)
class StackSettings:
    """Stack reports for every attempt: the stall policy, and where a report's full stacks go."""

    stall: Stall
    report_dir: Callable[[], str]


@dataclass
class Attempt:
    """One start of all workers of this node, run to its end by `run`."""

    plan: Plan
    printer: Printer
    inbox: SignalInbox
    grace: float
    watchdog: Watchdog | None
    peers: Peers | None = None
    stdin: int | None = None  # what the --stdin rank reads, if it is on this node; None: /dev/null
    stacks: StackSettings | None = None  # None: no stack reports (SIGQUIT says so)
    kill_timeout: float = DEFAULT_KILL_TIMEOUT_S  # how long SIGKILL may take before we give up on what is left
    zygote: Zygote | None = None  # --warm: the ranks are forked from it; None: posix_spawn
    clock: Callable[[], float] = time.monotonic
    signal_received: int | None = None  # the first stop signal that reached the launcher
    root_cause: WorkerProcess | None = None
    spawn_error: str | None = None
    ended_by: AttemptEnd | None = None
    stalled: str | None = None
    others_at_failure: tuple[RankSnapshot, ...] = ()
    unkillable: tuple[Unkillable, ...] = ()
    _told_success: bool = False
    _stopping_leftovers: bool = False  # the stop began only for what succeeded workers left behind
    _failure: tuple[str, int] | None = None  # told to peers and acted on once the others' stacks are read

    def __post_init__(self) -> None:
        if self.zygote is None or self.zygote.lost is not None:
            self.tree = WorkerTree(self.watchdog, self.clock)
        else:  # should the reaper collect the zygote mid-attempt, it says so and the next rank starts cold
            self.tree = WorkerTree(self.watchdog, self.clock, self.zygote.spawn, {self.zygote.pid: self.zygote.exited})
        self.teardown = Teardown(self.grace, self.clock, self.kill_timeout)
        self.reporter: StackReporter | None = None
        if self.stacks is not None:
            self.reporter = StackReporter(
                self.printer, stack_dir=self.plan.stack_dir, report_dir=self.stacks.report_dir,
                stall=self.stacks.stall, targets=self._stack_targets, others=self.peers,
                answer=None if self.peers is None else self.peers.answer_stacks, clock=self.clock,
            )

    def run(self) -> AttemptResult:
        self.inputs = Inputs(self.printer, self.inbox.read_fd, None if self.peers is None else self.peers.fd)
        try:
            self._spawn_all()
            if self.reporter is not None:
                self.reporter.warm()
            while not self._finished():
                self._wait_for_events()
                self._handle_signals(self.inbox.take())
                self._advance_stacks()
                self._enforce_deadlines()
        finally:
            if self.reporter is not None:
                self.reporter.close()
            self.inputs.close()
        return AttemptResult(
            tuple(self.tree.workers), self.root_cause, self.signal_received, self.spawn_error, self.ended_by,
            self.plan.node_rank, self.stalled, self.others_at_failure, self.teardown.began_at, self.unkillable,
        )

    def _spawn_all(self) -> None:
        # torch's @record writes each rank's error file but makes no directory; one per attempt
        for folder in {os.path.dirname(w.error_file) for w in self.plan.workers if w.error_file}:
            try:
                os.makedirs(folder, mode=PRIVATE_DIR, exist_ok=True)
            except OSError as exc:  # a --log-dir that filled up or went read-only: the job goes on
                self.printer.note(f"cannot make {folder} ({exc.strerror}): no error file from torch's @record this attempt")
        for spec in self.plan.workers:
            if self.teardown.stopping:
                return  # a signal or a failure arrived while we were still starting
            try:
                self._spawn(spec)
            except OSError as exc:
                self.spawn_error = f"could not start rank {spec.global_rank} ({spec.argv[0]}): {exc.strerror or exc}"
                self.printer.note(self.spawn_error)
                self._tell_peers("failed", f"{self.spawn_error} on node {self.plan.node_rank}", 1)
                self._begin_stop(signal.SIGTERM)
                return
            self._handle_signals(self.inbox.take())

    def _spawn(self, spec: Worker) -> None:
        stdin = self.stdin if spec.global_rank == self.plan.stdin_rank else None
        worker, pipes = self.tree.spawn(spec, self.plan.environment_of(spec), stdin)
        self.inputs.add_worker(spec.global_rank, pipes)
        self.printer.log_event(f"started rank {spec.global_rank} pid {worker.pid}: {' '.join(spec.argv)}")

    def _wait_for_events(self) -> None:
        for fd, source in self.inputs.select(self._timeout()):
            match source:
                case WorkerOutput():
                    self.inputs.read(fd, source)
                case PeerNews():
                    self._handle_peer_news()
                case SignalWake():
                    pass  # the signals are taken after every wait

    def _timeout(self) -> float | None:
        due = self.teardown.due_in()
        if self.reporter is not None:
            due = sooner(due, self.reporter.due_in())
        if self.tree.all_exited() and self.tree.groups_alive():
            # a tree may end without a SIGCHLD reaching us
            return GROUP_POLL_S if due is None else min(due, GROUP_POLL_S)
        return due

    def _handle_signals(self, signals: list[int]) -> None:
        for sig in signals:
            if sig == signal.SIGCHLD:
                self._reap()
            elif sig in self.inbox.plan.relayed:
                self._handle_relayed(sig)
            elif sig in self.inbox.plan.stop:
                self._handle_stop(sig)
            elif sig in self.inbox.plan.report:
                self._handle_report(sig)

    def _handle_report(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if self.reporter is None or self.teardown.stopping:
            why = "the workers are being stopped" if self.teardown.stopping else "stack reports are off here"
            self.printer.note(f"got {name}: no stack report ({why})")
            return
        self.printer.log_event(f"got {name}: reading every rank's stack")
        self.reporter.on_demand(f"{name} (Ctrl-\\ or kill -QUIT {os.getpid()})")

    def _handle_relayed(self, sig: int) -> None:
        self.printer.log_event(f"relaying {signal.Signals(sig).name} to the workers")
        self.tree.signal(sig)

    def _handle_stop(self, sig: int) -> None:
        """The first stop signal stops gracefully; only a second one kills at once.

        A stop already under way for a failure (here or on another node) does not count as
        the first: the head relays its stop to every node, and a node already stopping must
        still give its workers their grace to checkpoint.
        """
        name = signal.Signals(sig).name
        if self.signal_received is not None:
            self.printer.note(f"got {name} again: killing all workers now")
            self._kill_now()
            return
        self.signal_received = sig  # no restart after this, whatever else failed
        if self.teardown.stopping:
            self.printer.note(f"got {name}: already stopping all workers (again to kill at once)")
            return
        self.printer.note(f"got {name}: stopping all workers (again to kill at once)")
        self._tell_peers("stopped", f"ddplaunch got {name}", 128 + sig)
        self._begin_stop(sig)

    def _reap(self) -> None:
        for worker, exit_code in self.tree.reap():
            self._handle_exit(worker, exit_code)

    def _handle_exit(self, worker: WorkerProcess, exit_code: int) -> None:
        worker.after_stop = self.teardown.stopping
        self.printer.log_event(f"rank {worker.spec.global_rank} pid {worker.pid} exited {describe_exit(worker)}")
        if exit_code != 0 and not self.teardown.stopping and self.root_cause is None:
            self.root_cause = worker
            failed = f"rank {worker.spec.global_rank} failed ({describe_exit(worker)})"
            self.printer.note(f"{failed}: stopping the other workers")
            self._failure = (failed, exit_code)
            if self.reporter is None or not self.reporter.before_stop(failed):
                self._stop_for_failure()

    def _stop_for_failure(self) -> None:
        """The root cause's news goes out, and the others are stopped (their stacks read first)."""
        if self._failure is None:
            return
        failed, exit_code = self._failure
        self._failure = None
        self._tell_peers("failed", failed, exit_code)
        self._begin_stop(signal.SIGTERM)

    # -- stacks -----------------------------------------------------------------------------------

    def _stack_targets(self) -> list[Target]:
        from ddplaunch.stacks import Target

        now = self.clock()
        targets = []
        for worker in self.tree.workers:
            if worker.exit_code is not None:
                continue
            spec, last = worker.spec, self.printer.last_output(worker.spec.global_rank)
            targets.append(Target(
                host=spec.host, rank=spec.global_rank, local_rank=spec.local_rank, pid=worker.pid,
                since_output_s=None if last is None else max(0.0, now - last),
            ))
        return targets

    def _advance_stacks(self) -> None:
        if self.reporter is None:
            return
        self.reporter.heard(self.printer.last_any)
        finished = self.reporter.advance()
        if finished is not None:
            self._act_on(finished)

    def _act_on(self, finished: Finished) -> None:
        if finished.purpose == "failure":
            self.others_at_failure = finished.snapshots
            self._stop_for_failure()
        elif finished.purpose == "stall" and not self.teardown.stopping:
            self.stalled = finished.reason
            self.printer.note(f"the job stalled ({finished.reason}): stopping all workers, as --stall-action stop asks")
            self._tell_peers("stalled", f"the job stalled: {finished.reason}", STALL_EXIT_CODE)
            self._begin_stop(signal.SIGTERM)

    # -- the other nodes --------------------------------------------------------------------------

    def _tell_peers(self, kind: EndKind, detail: str, exit_code: int) -> None:
        if self.peers is None or self.ended_by is not None:
            return
        mine = self.peers.local_end(kind, detail, exit_code)
        self.ended_by = self.peers.publish(mine)
        if self.ended_by != mine:
            self.printer.note(f"the job had already ended on another node: {self.ended_by.describe()}")

    def _handle_peer_news(self) -> None:
        assert self.peers is not None
        self._answer_stack_requests(self.peers.stack_requests())
        end = self.peers.take()
        if end is None:
            return
        self.ended_by = end  # the job-wide verdict; over SSH it may differ from what we published
        if end.kind == "success" or self.teardown.stopping:
            return
        if self.tree.all_exited():
            self.printer.note(f"the job failed on another node: {end.describe()}")
        else:
            self.printer.note(f"stopping this node's workers: {end.describe()}")
        self._begin_stop(signal.SIGTERM)

    def _answer_stack_requests(self, requests: list[int]) -> None:
        """Another node (or the head) asked for this node's stacks: the reporter reads them.
        Not while the workers are being stopped: the asker then names this node as silent."""
        if requests and self.reporter is not None and not self.teardown.stopping:
            self.reporter.asked(requests)

    def _awaiting_peers(self) -> bool:
        """Our workers all succeeded; the attempt ends when every node says so (or one fails)."""
        if self.peers is None or self.ended_by is not None:
            return False
        # A stop we began only for what succeeded workers left behind is still a success.
        if not self._told_success and (not self.teardown.stopping or self._stopping_leftovers):
            self._told_success = True
            self.peers.report_success()
        return True

    # -- stopping: one path, safe to enter twice -------------------------------------------------

    def _begin_stop(self, sig: int) -> None:
        if self.reporter is not None:
            self.reporter.close()  # a report can wait; the stop cannot
        self._failure = None
        if self.teardown.begin(sig):
            self.tree.signal(sig)

    def _kill_now(self) -> None:
        self.teardown.kill_now()
        self.tree.signal(signal.SIGKILL)

    def _enforce_deadlines(self) -> None:
        if self.teardown.kill_due():
            self.printer.note(f"workers still running {self.grace:g}s after the stop signal: sending SIGKILL")
            self._kill_now()
        if self.teardown.give_up_due():
            self._give_up()
        if not self.tree.all_exited() or not self._tree_alive():
            return
        sent = self.teardown.signal_sent
        if sent is None:
            self.printer.log_event("workers exited but left processes behind: stopping them")
            self._stopping_leftovers = True
            self._begin_stop(signal.SIGTERM)
        elif self.tree.has_children:
            # They left their group, so the group signal missed them: send what the rest got.
            self.tree.signal_strays(sent)

    def _give_up(self) -> None:
        """SIGKILL did not end them in --kill-timeout: name them and end the attempt without
        them (their pipes are not drained either: a process that cannot die may hold them)."""
        self.teardown.give_up()
        self._reap()
        self.unkillable = find_unkillable(self.tree.workers, self.tree.helpers)
        if self.unkillable:
            self.printer.note(
                f"{len(self.unkillable)} process(es) still alive {self.kill_timeout:g}s after SIGKILL: "
                "not waiting for them (--kill-timeout)"
            )

    def _tree_alive(self) -> bool:
        self._reap()
        return self.tree.alive()

    def _finished(self) -> bool:
        if not self.teardown.gave_up and (not self.tree.all_exited() or self._tree_alive()):
            return False
        if self._awaiting_peers():
            return False
        if not self.inputs.pipes_open() or self.teardown.gave_up:
            return True
        self.teardown.tree_gone()
        return self.teardown.drain_over()


def find_unkillable(workers: list[WorkerProcess], helpers: Collection[int] = ()) -> tuple[Unkillable, ...]:
    """The tree's live processes, each with its rank: as a subreaper the launcher is the
    ancestor of all of them (ddplaunch.procfs reads who they are, `pick_unkillable` decides)."""
    from ddplaunch.procfs import children_map, descendants, read_kernel_wait

    seen = []
    for pid in descendants(os.getpid(), children_map()):
        try:
            seen.append((pid, os.getpgid(pid), read_kernel_wait(pid)))
        except ProcessLookupError:
            continue
    return pick_unkillable(seen, {w.pid: w.spec.global_rank for w in workers}, os.getpgid(0), helpers)


def pick_unkillable(
    seen: Sequence[tuple[int, int, KernelWait | None]], ranks: Mapping[int, int], own_group: int, helpers: Collection[int],
) -> tuple[Unkillable, ...]:
    """Of the descendants seen (pid, process group, state), those still alive that are the
    tree's: not in the launcher's own group (its own short-lived helpers), nor in a
    tree helper's (--warm's interpreter, which was never signalled: it is not the workers')."""
    return tuple(
        Unkillable(pid, ranks.get(group), pid in ranks, wait)
        for pid, group, wait in seen
        if group != own_group and group not in helpers and wait is not None and not wait.state.startswith("Z")
    )


def describe_exit(worker: WorkerProcess) -> str:
    if worker.term_signal is not None:
        return f"signal {signal_name(worker.term_signal)}, exit code {worker.exit_code}"
    return f"exit code {worker.exit_code}"


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


@dataclass(frozen=True)
class JobResult:
    """The last attempt's result and how many restarts it took."""

    last: AttemptResult
    restarts: int

    @property
    def exit_code(self) -> int:
        return self.last.exit_code


def run_job(
    plan_for_attempt: Callable[[int], Plan],
    *,
    printer: Printer,
    grace: float,
    max_restarts: int,
    job_id: str | None = None,
    use_watchdog: bool = True,
    peers: Peers | None = None,
    signals: SignalPlan = SignalPlan(),
    stdin: int | None = None,
    stacks: StackSettings | None = None,
    kill_timeout: float = DEFAULT_KILL_TIMEOUT_S,
    temp_dirs: Sequence[str] = (),
    warm: tuple[str, ...] | None = None,
) -> JobResult:
    """Run attempts until one succeeds, a signal stops us, or restarts run out.

    With `peers` (multi-node) the first attempt has already joined; every node takes the
    same restart decision because it rests on the job-wide end they all read. `stdin` goes to
    the --stdin rank of every attempt, so a restarted rank reads on where the last one stopped.
    `temp_dirs`: the job's private folders, which the guard removes should the launcher be killed.
    `warm`: --warm's modules; the ranks of every attempt are forked from one interpreter that
    imported them (ddplaunch.warm), unless it says it cannot, which is noted once.
    """
    marker = f"{JOB_ID_VARIABLE}={job_id}".encode() if job_id else None
    watchdog = Watchdog.start(marker, kill_timeout) if use_watchdog else None
    if watchdog is not None:
        for folder in temp_dirs:
            watchdog.remove_after(folder)
    become_subreaper()
    zygote: Zygote | None = None
    try:
        with SignalInbox(signals) as inbox:
            interrupted = _stop_requested(inbox)
            restart = 0
            while True:
                if peers is not None and restart > 0:
                    printer.note(f"waiting for every node to join restart {restart}")
                    peers.join(restart, interrupted)
                plan = plan_for_attempt(restart)
                if warm is not None and restart == 0:
                    zygote = _start_warm(plan, warm, watchdog, printer, inbox)
                result = Attempt(
                    plan, printer, inbox, grace, watchdog, peers, stdin, stacks, kill_timeout, zygote
                ).run()
                if peers is not None:
                    for word in peers.end_attempt(interrupted, _closing_word(result), printer.note):
                        printer.note(word)
                if not _should_restart(result, restart, max_restarts):
                    return JobResult(result, restart)
                restart += 1
                printer.note(
                    f"{failure_summary(result)}; restarting all workers "
                    f"(restart {restart} of {max_restarts})"
                )
    finally:
        if zygote is not None:
            zygote.close()
        if watchdog is not None:
            watchdog.stand_down()


def _start_warm(
    plan: Plan, modules: tuple[str, ...], watchdog: Watchdog | None, printer: Printer, inbox: SignalInbox
) -> Zygote | None:
    from ddplaunch.warm import start_warm

    def stop_pending() -> bool:  # read, not taken: the attempt acts on it
        return any(sig in inbox.plan.stop for sig in inbox.pending)

    zygote = start_warm(plan, modules, watchdog, printer.note, stop_pending)
    if zygote is not None and zygote.ready_after is not None:
        printer.log_event(f"warm interpreter pid {zygote.pid} imported {','.join(modules)} in {zygote.ready_after:.2f}s")
    return zygote


def _closing_word(result: AttemptResult) -> str:
    """What the other nodes must hear of this node's end: the processes that would not die."""
    from ddplaunch.report import unkillable_line

    return "; ".join(unkillable_line(stuck) for stuck in result.unkillable)


def _should_restart(result: AttemptResult, restart: int, max_restarts: int) -> bool:
    if result.exit_code == 0 or result.stop_signal is not None or result.stalled is not None:
        return False
    if result.unkillable:
        return False  # what would not die still holds its GPU: a new attempt would not get it
    if restart >= max_restarts:
        return False
    return result.ended_by is None or result.ended_by.kind == "failed"


def _stop_requested(inbox: SignalInbox) -> Callable[[], bool]:
    """For waits between attempts (no worker runs): did a stop signal arrive?"""

    def interrupted() -> bool:
        return any(sig in inbox.plan.stop for sig in inbox.take())

    return interrupted


def failure_summary(result: AttemptResult) -> str:
    if result.elsewhere is not None:
        return result.elsewhere.describe()
    if result.root_cause is not None:
        return f"rank {result.root_cause.spec.global_rank} failed ({describe_exit(result.root_cause)})"
    return result.spawn_error or "the attempt failed"
