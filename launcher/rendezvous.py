"""Node agents of a multi-node job meet, and stay in touch, through torch's TCPStore.

Node 0's agent hosts the store at MASTER_ADDR:MASTER_PORT; every agent is a client of it,
and so are the workers (TORCHELASTIC_USE_AGENT_STORE=True, as under torchrun). An attempt
goes: join (each node says who it is; the last to arrive says "go"), run the workers, end
(the first node to write "end" names why the attempt ended; every other node's watcher
wakes at once and stops its workers), over (each node says its workers are gone).

A job-wide stack report goes through the store too: the asking node bumps STACKS_ASKED to get
its request's number N, every other node's watcher sees the count move within a slice and
wakes its loop, which reads its ranks and sets `ddplaunch/stacks/N/<node rank>`; the asker
looks for those keys from its own loop, and names the nodes whose key did not come in time.

Whether the other launchers are alive does not ride on the store (ddplaunch.lifeline says why):
each node holds a plain TCP line to node 0's launcher, whose port node 0 puts in the store. A
node whose launcher died (its line closed) or went silent (--heartbeat-timeout without a beat)
ends the attempt as "silent", named as the root cause on every node; node 0 writes it to the
store for the others, and waits at the attempt's end only for the nodes still alive.

Every attempt gets a fresh store on the same port: torchrun keeps one store across restarts,
and the workers' stale keys from the last attempt (gloo addresses) then make a restart fail
at random. torch is imported here only, so only multi-node agents pay for it.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ddplaunch.errors import LaunchError
from ddplaunch.lifeline import Gone, Lifeline
from ddplaunch.protocol import AttemptEnd, EndKind, StackAnswer
from ddplaunch.snapshot import RankSnapshot
from ddplaunch.wakepipe import WakePipe

TCPStore = Any  # torch.distributed.TCPStore, which torch's type hints do not export

PREFIX = "ddplaunch/"
GENERATION, CONFIG, ARRIVALS = PREFIX + "generation", PREFIX + "config", PREFIX + "arrivals"
JOINED, GO, END = PREFIX + "joined", PREFIX + "go", PREFIX + "end"
SUCCEEDED, LIFELINE = PREFIX + "succeeded", PREFIX + "lifeline"
STACKS_ASKED = PREFIX + "stacks/asked"  # how many stack requests this attempt has seen
SLICE_S = 0.25  # longest a blocking store call may keep us from noticing Ctrl-C or a stop
RETRY_S = 0.05  # between connection attempts to a store that is not (yet) there
OVER_WAIT_S = 10.0  # beyond a node's stop budget, how long the others wait for it to say it is over
OVER_NOTE_AFTER_S = 2.0  # a wait for the others this long is said, with whom and for how long
READ_WAIT_S = 2.0  # node 0 keeps the store up this long for the others to read the closing words
NOTHING_TO_SAY = "1"  # an over key's value when the node has no closing word
SILENT = "its launcher is gone or unreachable"


class JoinError(LaunchError):
    """The nodes could not meet: one never came, or they disagree about the job."""

    exit_code = 1


# -- what travels through the store (pure) ------------------------------------------------------


@dataclass(frozen=True)
class JobShape:
    """What every node must agree on; node 0's copy is the reference."""

    nnodes: int
    nproc: int
    max_restarts: int
    run_id: str

    def to_text(self) -> str:
        return json.dumps([self.nnodes, self.nproc, self.max_restarts, self.run_id])

    @staticmethod
    def from_text(text: str) -> JobShape:
        nnodes, nproc, max_restarts, run_id = json.loads(text)
        return JobShape(int(nnodes), int(nproc), int(max_restarts), str(run_id))


def shape_mismatch(mine: JobShape, host: JobShape, run_id_given: bool) -> str | None:
    """Why this node cannot join node 0's job, or None. A default run id adopts node 0's."""
    for flag, ours, theirs in (
        ("--nnodes", mine.nnodes, host.nnodes),
        ("--nproc", mine.nproc, host.nproc),
        ("--max-restarts", mine.max_restarts, host.max_restarts),
    ):
        if ours != theirs:
            return f"this node has {flag} {ours} but node 0 has {flag} {theirs}; run the same command on every node."
    if run_id_given and mine.run_id != host.run_id:
        return f"this node has --run-id {mine.run_id} but node 0 has {host.run_id}; use the same id everywhere."
    return None


def stacks_key(request: int, node_rank: int) -> str:
    """Where a node answers a stack request (ddplaunch.protocol.StackAnswer's text)."""
    return PREFIX + f"stacks/{request}/{node_rank}"


def over_key(node_rank: int) -> str:
    """Set by a node once its workers of this attempt are gone: its closing word, or "1"."""
    return PREFIX + f"over/{node_rank}"


def read_key(node_rank: int) -> str:
    """Set by a node once it has read the others' closing words (node 0 then lets go of the store)."""
    return PREFIX + f"read/{node_rank}"


def _words(store: TCPStore, ranks: list[int]) -> list[tuple[int, str]]:
    """The closing words of these nodes (those that had something to say)."""
    said = [store.get(over_key(rank)).decode("utf-8", "replace") for rank in ranks]
    return [(rank, word) for rank, word in zip(ranks, said) if word != NOTHING_TO_SAY]


def silent_end(gone: Gone, hosts: dict[int, str], seen_by: int) -> AttemptEnd:
    """How every node names a node whose launcher is gone: the job's root cause."""
    why = f"{SILENT} ({gone.evidence(seen_by)})"
    return AttemptEnd("silent", gone.node_rank, hosts.get(gone.node_rank, "?"), why, 1)


def missing_ranks(nnodes: int, present: Callable[[int], bool]) -> list[int]:
    return [rank for rank in range(nnodes) if not present(rank)]


def join_timeout_message(missing: list[int], joined: dict[int, str], timeout: float, endpoint: str) -> str:
    names = ", ".join(str(r) for r in missing)
    came = ", ".join(f"{r} ({host})" for r, host in sorted(joined.items())) or "none"
    return (
        f"node rank(s) {names} never joined the rendezvous at {endpoint} within --join-timeout "
        f"{timeout:g}s (joined: {came}). Start ddplaunch on the missing node(s) with the same "
        "--nnodes, --master-addr and --master-port, or check that they can reach this address."
    )


# -- the store ------------------------------------------------------------------------------------


def _torch_store() -> Any:
    # The agent's own C++ warnings (a wait that timed out is routine here) would land in the
    # user's terminal; the workers' environment was captured before this line.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
    import torch.distributed as dist

    return dist


def is_local_address(host: str) -> bool:
    """Whether this machine owns `host` (so its agent may host the store there)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except OSError:
        return False
    for family, kind, proto, _, address in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.bind((address[0], 0))
                return True
        except OSError:
            continue
    return False


class NodeLink:
    """This node's line to the other nodes of the job, for every attempt."""

    def __init__(
        self,
        *,
        master_addr: str,
        master_port: int,
        shape: JobShape,
        run_id_given: bool,
        node_rank: int | None,
        hostname: str,
        join_timeout: float,
        heartbeat_timeout: float,
        stop_budget: float = 0.0,
    ) -> None:
        self.master_addr = master_addr
        self.master_port = master_port
        self.shape = shape
        self.run_id_given = run_id_given
        self.node_rank = node_rank
        self.hostname = hostname
        self.join_timeout = join_timeout
        self.stop_budget = stop_budget
        self.is_host = node_rank == 0
        self.hosts: dict[int, str] = {}
        self._dist = _torch_store()
        self._store: TCPStore | None = None
        self._watch: _Watcher | None = None
        self._wake = WakePipe()  # rung by the watcher and the lifeline; the supervisor selects on it
        self._lifeline = Lifeline(heartbeat_timeout, self._wake.ring)
        self._lifeline_port: int | None = None  # node 0's, once it listens
        self._told = False  # this attempt's end went to the supervisor
        self._closed = False
        self._asked: set[int] = set()  # this attempt's stack requests that this node made
        self._answers: dict[int, dict[int, tuple[RankSnapshot, ...]]] = {}  # request -> node rank -> ranks

    @property
    def endpoint(self) -> str:
        return f"{self.master_addr}:{self.master_port}"

    @property
    def fd(self) -> int:
        return self._wake.read_fd

    # -- joining ------------------------------------------------------------------------------

    def join(self, attempt: int, interrupted: Callable[[], bool] = lambda: False) -> None:
        """Meet the other nodes for this attempt; raises JoinError if they do not come."""
        deadline = time.monotonic() + self.join_timeout
        self._store = self._open_store(attempt, deadline, interrupted)
        store = self._store
        self._asked, self._answers = set(), {}  # a fresh store counts requests from 1 again
        self._told = False
        if attempt == 0:
            self._adopt_shape(store)
            if self.node_rank is None:
                self.node_rank = 0 if self.is_host else int(store.add(ARRIVALS, 1))
        rank = self.node_rank
        assert rank is not None
        if rank >= self.shape.nnodes:
            self._fail_join(f"more nodes joined than --nnodes {self.shape.nnodes}; this one is extra.")
        claim = PREFIX + f"node/{rank}"
        if int(store.add(claim + "/claims", 1)) > 1:
            self._fail_join(
                f"node rank {rank} was already taken by another node. Give every node a distinct "
                "--node-rank, or leave --node-rank out on every node (ranks then follow arrival)."
            )
        store.set(claim, self.hostname)
        if int(store.add(JOINED, 1)) == self.shape.nnodes:
            store.set(GO, "1")
        self._await(GO, deadline, interrupted, on_timeout=self._missing_nodes_error)
        self.hosts = {r: store.get(PREFIX + f"node/{r}").decode() for r in range(self.shape.nnodes)}
        if attempt == 0:
            self._open_lifeline(store, rank, deadline)
        self._watch = _Watcher(self._client(deadline=time.monotonic() + self.join_timeout), self._wake.ring)

    def _open_lifeline(self, store: TCPStore, rank: int, deadline: float) -> None:
        """Node 0 expects every other node on its lifeline; the others connect to it."""
        if self.is_host:
            self._lifeline.expect(self._other_ranks())
            return
        port = int(store.get(LIFELINE).decode())
        try:
            self._lifeline.connect(self.master_addr, port, rank, deadline - time.monotonic())
        except OSError as exc:
            self._fail_join(
                f"could not open a line to node 0's launcher at {self.master_addr}:{port} ({exc}). "
                "Let the nodes reach each other on any TCP port, as torch's workers must too."
            )

    def _dead(self) -> dict[int, Gone]:
        return self._lifeline.gone()

    def _node0_dead(self) -> bool:
        """Node 0's launcher is gone: its store with it, and a store call could block for good."""
        return not self.is_host and 0 in self._dead()

    def _dead_error(self) -> JoinError | None:
        dead = self._dead()
        if not dead:
            return None
        first = dead[min(dead)]
        return JoinError(silent_end(first, self.hosts, self.node_rank or 0).describe())

    def _open_store(self, attempt: int, deadline: float, interrupted: Callable[[], bool]) -> TCPStore:
        if self.is_host:
            return self._host_store(attempt)
        if self.node_rank is None and is_local_address(self.master_addr):
            try:  # the same command on every node: the node that owns the address hosts
                store = self._host_store(attempt)
                self.is_host = True
                return store
            except JoinError:
                pass  # another agent on this machine got there first
        while True:
            if interrupted():
                raise KeyboardInterrupt
            if (dead := self._dead_error()) is not None:
                raise dead
            store = self._client(deadline)
            try:
                if store.check([GENERATION]) and store.get(GENERATION).decode() == str(attempt):
                    return store
            except RuntimeError:
                pass  # node 0 closed the last attempt's store just after we reached it
            del store  # node 0 still serves the last attempt, or has not said which yet
            time.sleep(RETRY_S)

    def _host_store(self, attempt: int) -> TCPStore:
        try:
            store = self._dist.TCPStore(
                "0.0.0.0", self.master_port, None, True, timedelta(seconds=SLICE_S), wait_for_workers=False
            )
        except RuntimeError as exc:
            raise JoinError(
                f"--master-port {self.master_port}: node 0 cannot serve the rendezvous there "
                f"({_first_line(exc)}). Pick a free port with --master-port on every node."
            ) from None
        if attempt == 0:
            store.set(CONFIG, self.shape.to_text())
        if self._lifeline_port is None:
            self._lifeline_port = self._lifeline.listen()
        store.set(LIFELINE, str(self._lifeline_port))
        store.set(GENERATION, str(attempt))  # last: a client that sees it finds the rest
        return store

    def _client(self, deadline: float) -> TCPStore:
        last = ""
        while time.monotonic() < deadline:
            try:
                return self._dist.TCPStore(
                    self.master_addr, self.master_port, None, False, timedelta(seconds=SLICE_S),
                    wait_for_workers=False,
                )
            except RuntimeError as exc:
                last = _first_line(exc)
        raise JoinError(
            f"could not reach node 0's rendezvous at {self.endpoint} within --join-timeout "
            f"{self.join_timeout:g}s ({last or 'no answer'}). Start node 0 (--node-rank 0) with the "
            "same --master-port, and check --master-addr is an address this node can reach."
        )

    def _adopt_shape(self, store: TCPStore) -> None:
        host_shape = JobShape.from_text(store.get(CONFIG).decode())
        problem = shape_mismatch(self.shape, host_shape, self.run_id_given)
        if problem is not None:
            self._fail_join(problem)
        self.shape = host_shape

    def _missing_nodes_error(self) -> JoinError:
        store = self._store
        assert store is not None
        missing = missing_ranks(self.shape.nnodes, lambda r: bool(store.check([PREFIX + f"node/{r}"])))
        joined = {
            r: store.get(PREFIX + f"node/{r}").decode() for r in range(self.shape.nnodes) if r not in missing
        }
        return JoinError(join_timeout_message(missing, joined, self.join_timeout, self.endpoint))

    def _fail_join(self, why: str) -> None:
        """Tell the others (so they stop waiting) and stop here."""
        self.publish(self.local_end("error", why, 2))
        raise JoinError(why)

    def _await(
        self, key: str, deadline: float, interrupted: Callable[[], bool], on_timeout: Callable[[], JoinError]
    ) -> None:
        store = self._store
        assert store is not None
        while True:
            if interrupted():
                raise KeyboardInterrupt
            if (dead := self._dead_error()) is not None:
                raise dead
            if store.check([END]):
                end = AttemptEnd.from_text(store.get(END).decode())
                raise JoinError(f"node {end.node_rank} ({end.host}) gave up joining: {end.detail}")
            try:
                store.wait([key], timedelta(seconds=min(SLICE_S, max(0.01, deadline - time.monotonic()))))
                return
            except self._dist.DistStoreError:
                if time.monotonic() >= deadline:
                    raise on_timeout() from None

    # -- during an attempt ---------------------------------------------------------------------

    def publish(self, end: AttemptEnd) -> AttemptEnd:
        """Say why the attempt ends, unless a node said it first; return what stands.

        A rank that failed while another node's launcher is already gone most likely failed
        of it (its peers vanished): the gone node is the cause, and is said instead.
        """
        if end.kind == "failed" and (dead := self._dead()):
            end = silent_end(dead[min(dead)], self.hosts, self.node_rank or 0)
        store = self._usable_store()
        if store is None:
            return end
        text = end.to_text()
        try:
            standing = store.compare_set(END, "", text).decode()
        except RuntimeError:
            return end  # node 0 is gone: our watcher reports that
        return AttemptEnd.from_text(standing)

    def local_end(self, kind: EndKind, detail: str, exit_code: int) -> AttemptEnd:
        return AttemptEnd(kind, self.node_rank or 0, self.hostname, detail, exit_code)

    def report_success(self) -> None:
        store = self._usable_store()
        if store is None:
            return
        try:
            if int(store.add(SUCCEEDED, 1)) == self.shape.nnodes:
                self.publish(self.local_end("success", "", 0))
        except RuntimeError:
            pass  # node 0 is gone: our watcher reports that

    def take(self) -> AttemptEnd | None:
        """The attempt's end, once: a node found gone (node 0 writes it for the others), or
        what the store says (the watcher saw it), or that node 0's store failed under us."""
        self._wake.drain()
        if self._told:
            return None
        end = self._news()
        self._told = end is not None
        return end

    def _news(self) -> AttemptEnd | None:
        if dead := self._dead():
            return self.publish(silent_end(dead[min(dead)], self.hosts, self.node_rank or 0))
        if self._watch is None:
            return None
        if self._watch.lost is not None:  # node 0's store failed: its launcher went with it
            why = f"{SILENT} (its rendezvous failed: {self._watch.lost})"
            return AttemptEnd("silent", 0, self.hosts.get(0, "?"), why, 1)
        return self._watch.result

    def _usable_store(self) -> TCPStore | None:
        """The store, unless node 0 is known gone (a call to it could then block for good)."""
        return None if self._node0_dead() else self._store

    # -- stack reports -------------------------------------------------------------------------

    def ask_stacks(self) -> int | None:
        store = self._usable_store()
        if store is None:
            return None
        try:
            request = int(store.add(STACKS_ASKED, 1))
        except RuntimeError:
            return None  # node 0 is gone: our watcher reports that
        self._asked.add(request)
        self._answers[request] = {}
        return request

    def stack_answers(self, request: int) -> tuple[list[RankSnapshot], list[str]]:
        got = self._answers.setdefault(request, {})
        for rank in self._other_ranks():
            if rank not in got and (answer := self._read_answer(request, rank)) is not None:
                got[rank] = answer.snapshots
        missing = [f"node {r} ({self.hosts.get(r, '?')})" for r in self._other_ranks() if r not in got]
        return [s for rank in sorted(got) for s in got[rank]], missing

    def _other_ranks(self) -> list[int]:
        return [rank for rank in range(self.shape.nnodes) if rank != self.node_rank]

    def _read_answer(self, request: int, rank: int) -> StackAnswer | None:
        store, key = self._usable_store(), stacks_key(request, rank)
        if store is None:
            return None
        try:
            if not store.check([key]):
                return None
            return StackAnswer.from_text(store.get(key).decode())
        except (RuntimeError, ValueError):
            return None  # node 0 is gone, or the answer is not one: that node is named as silent

    def stack_requests(self) -> list[int]:
        """The other nodes' requests the watcher saw (this node's own are answered at home)."""
        self._wake.drain()
        if self._watch is None:
            return []
        return [request for request in self._watch.take_requests() if request not in self._asked]

    def answer_stacks(self, request: int, snapshots: Sequence[RankSnapshot]) -> None:
        store = self._usable_store()
        if store is None:
            return
        try:
            store.set(stacks_key(request, self.node_rank or 0), StackAnswer(request, tuple(snapshots)).to_text())
        except RuntimeError:
            pass  # node 0 is gone: our watcher reports that

    def end_attempt(
        self,
        interrupted: Callable[[], bool] = lambda: False,
        closing: str = "",
        note: Callable[[str], None] = lambda text: None,
    ) -> list[str]:
        """Our workers are gone: say so, with our closing word (processes that would not die),
        and wait for every live node to say the same, bounded by the time a node may take to
        stop its workers; then read their words. A node whose launcher is gone will never say
        it, so it is not waited for. Node 0 keeps the store up until the others have read."""
        node0_dead = self._node0_dead()
        if self._watch is not None:
            self._watch.stop(wait=not node0_dead)  # a watcher blocked on a cut store never returns
            self._watch = None
        store, self._store = self._store, None
        if store is None or node0_dead:
            return []
        words: list[str] = []
        try:
            store.set(over_key(self.node_rank or 0), closing or NOTHING_TO_SAY)
            over = self._await_others(store, over_key, self.stop_budget + OVER_WAIT_S, interrupted, note)
            words = [f"node {rank} ({self.hosts.get(rank, '?')}): {word}" for rank, word in _words(store, over)]
            if self.is_host:
                self._await_others(store, read_key, READ_WAIT_S, interrupted, lambda text: None)
            else:
                store.set(read_key(self.node_rank or 0), "1")
        except RuntimeError:
            pass  # a node went away; nothing to wait for
        del store
        return words

    def _await_others(
        self, store: TCPStore, key: Callable[[int], str], within: float, interrupted: Callable[[], bool],
        note: Callable[[str], None],
    ) -> list[int]:
        """The live other nodes that set their `key` within `within` seconds (all, or fewer)."""
        started = time.monotonic()
        noted = False
        while not interrupted() and not self._node0_dead():
            dead = self._dead()
            live = [rank for rank in self._other_ranks() if rank not in dead]
            waited = time.monotonic() - started
            try:
                if live:
                    store.wait([key(rank) for rank in live], timedelta(seconds=SLICE_S))
                return live
            except self._dist.DistStoreError:
                pass
            if waited >= within:
                return [rank for rank in live if store.check([key(rank)])]
            if not noted and waited >= OVER_NOTE_AFTER_S:
                noted = True
                slow = ", ".join(f"node {rank} ({self.hosts.get(rank, '?')})" for rank in live)
                note(f"waiting up to {within - waited:.0f}s more for {slow} to stop its workers")
        return []

    def close(self) -> None:
        """Let go of the store and the lifeline at once (a failed join, or the job is over)."""
        if self._closed:
            return
        self._closed = True
        if self._watch is not None:
            self._watch.stop(wait=not self._node0_dead())
            self._watch = None
        self._store = None
        self._lifeline.close()
        self._wake.close()


class _Watcher:
    """A thread blocked on the store's END key (and looking for stack requests between waits);
    it rings the supervisor's pipe. Under a cut its store call may block for good: it is a
    daemon thread, left behind when node 0 is known gone."""

    def __init__(self, store: TCPStore, ring: Callable[[], None]) -> None:
        self._store = store
        self._ring = ring
        self._stopping = threading.Event()
        self.result: AttemptEnd | None = None
        self.lost: str | None = None
        self._requests: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._requests_seen = 0
        self._thread = threading.Thread(target=self._run, name="ddplaunch-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import torch.distributed as dist

        store = self._store  # ours until the thread ends, even when stop() leaves it behind
        while not self._stopping.is_set():
            try:
                self._see_requests(store)
                store.wait([END], timedelta(seconds=SLICE_S))
                self.result = AttemptEnd.from_text(store.get(END).decode())
            except dist.DistStoreError:
                continue  # a slice passed with no news
            except RuntimeError as exc:
                self.lost = _first_line(exc)
            self._ring()
            return

    def _see_requests(self, store: TCPStore) -> None:
        asked = int(store.add(STACKS_ASKED, 0))
        if asked > self._requests_seen:
            for request in range(self._requests_seen + 1, asked + 1):
                self._requests.put(request)
            self._requests_seen = asked
            self._ring()

    def take_requests(self) -> list[int]:
        taken = []
        while not self._requests.empty():
            taken.append(self._requests.get_nowait())
        return taken

    def stop(self, wait: bool = True) -> None:
        self._stopping.set()
        del self._store  # the thread's own reference goes when it ends
        if wait:
            self._thread.join(timeout=SLICE_S * 8)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
