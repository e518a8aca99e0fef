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

from launcher.errors import LaunchError
from launcher.protocol import NOT_A_NODE, AttemptEnd, EndKind, StackAnswer
from launcher.snapshot import RankSnapshot
from launcher.wakepipe import WakePipe

TCPStore = Any  # torch.distributed.TCPStore, which torch's type hints do not export

PREFIX = "ddplaunch/"
GENERATION, CONFIG, ARRIVALS = PREFIX + "generation", PREFIX + "config", PREFIX + "arrivals"
JOINED, GO, END = PREFIX + "joined", PREFIX + "go", PREFIX + "end"
SUCCEEDED, OVER, ALL_OVER = PREFIX + "succeeded", PREFIX + "over", PREFIX + "all-over"
STACKS_ASKED = PREFIX + "stacks/asked"  # how many stack requests this attempt has seen
SLICE_S = 0.25  # longest a blocking store call may keep us from noticing Ctrl-C or a stop
RETRY_S = 0.05  # between connection attempts to a store that is not (yet) there
OVER_WAIT_S = 10.0  # node 0 keeps the store up this long for the others to finish stopping
BEAT_S = 1.0  # every node bumps its heartbeat counter this often while its workers run
SILENCE_S = 10.0  # node 0 declares a node lost after this long without a beat
SILENCE_VARIABLE = "DDPLAUNCH_NODE_SILENCE_S"


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
    """Where a node answers a stack request (launcher.protocol.StackAnswer's text)."""
    return PREFIX + f"stacks/{request}/{node_rank}"


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
    ) -> None:
        self.master_addr = master_addr
        self.master_port = master_port
        self.shape = shape
        self.run_id_given = run_id_given
        self.node_rank = node_rank
        self.hostname = hostname
        self.join_timeout = join_timeout
        self.is_host = node_rank == 0
        self.hosts: dict[int, str] = {}
        self._dist = _torch_store()
        self._store: TCPStore | None = None
        self._watch: _Watcher | None = None
        self._asked: set[int] = set()  # this attempt's stack requests that this node made
        self._answers: dict[int, dict[int, tuple[RankSnapshot, ...]]] = {}  # request -> node rank -> ranks

    @property
    def endpoint(self) -> str:
        return f"{self.master_addr}:{self.master_port}"

    @property
    def fd(self) -> int:
        assert self._watch is not None
        return self._watch.read_fd

    # -- joining ------------------------------------------------------------------------------

    def join(self, attempt: int, interrupted: Callable[[], bool] = lambda: False) -> None:
        """Meet the other nodes for this attempt; raises JoinError if they do not come."""
        deadline = time.monotonic() + self.join_timeout
        self._store = self._open_store(attempt, deadline, interrupted)
        store = self._store
        self._asked, self._answers = set(), {}  # a fresh store counts requests from 1 again
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
        pulse = Pulse(rank, self.hosts, watch_others=self.is_host, silence_s=silence_limit(os.environ))
        self._watch = _Watcher(self._client(deadline=time.monotonic() + self.join_timeout), pulse)

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
        """Say why the attempt ends, unless a node said it first; return what stands."""
        store = self._store
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
        store = self._store
        assert store is not None
        try:
            if int(store.add(SUCCEEDED, 1)) == self.shape.nnodes:
                self.publish(self.local_end("success", "", 0))
        except RuntimeError:
            pass  # node 0 is gone: our watcher reports that

    def take(self) -> AttemptEnd | None:
        """What the watcher saw: the attempt's end, or lost contact with node 0."""
        assert self._watch is not None
        return self._watch.take()

    # -- stack reports -------------------------------------------------------------------------

    def ask_stacks(self) -> int | None:
        store = self._store
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
        store, key = self._store, stacks_key(request, rank)
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
        if self._watch is None:
            return []
        return [request for request in self._watch.take_requests() if request not in self._asked]

    def answer_stacks(self, request: int, snapshots: Sequence[RankSnapshot]) -> None:
        store = self._store
        if store is None:
            return
        try:
            store.set(stacks_key(request, self.node_rank or 0), StackAnswer(request, tuple(snapshots)).to_text())
        except RuntimeError:
            pass  # node 0 is gone: our watcher reports that

    def end_attempt(self, interrupted: Callable[[], bool] = lambda: False) -> None:
        """Our workers are gone. Node 0 keeps the store until every node says the same."""
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        store, self._store = self._store, None
        if store is None:
            return
        try:
            if int(store.add(OVER, 1)) == self.shape.nnodes:
                store.set(ALL_OVER, "1")
            if self.is_host:
                deadline = time.monotonic() + OVER_WAIT_S
                while time.monotonic() < deadline and not interrupted():
                    try:
                        store.wait([ALL_OVER], timedelta(seconds=SLICE_S))
                        break
                    except self._dist.DistStoreError:
                        continue
        except RuntimeError:
            pass  # a node went away; nothing to wait for
        del store

    def close(self) -> None:
        """Let go of the store at once (a failed join, or the job is over)."""
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        self._store = None


def silence_limit(environ: dict[str, str] | os._Environ[str]) -> float:
    try:
        value = float(environ.get(SILENCE_VARIABLE, SILENCE_S))
    except ValueError:
        return SILENCE_S
    return value if value > 0 else SILENCE_S


class Pulse:
    """Heartbeats: every node bumps a counter; node 0 names a node whose counter stopped.

    A node whose launcher is SIGKILLed loses its workers (its guard stops them), but the
    other nodes' workers may be computing, not waiting on it, and would not notice.
    """

    def __init__(
        self,
        rank: int,
        hosts: dict[int, str],
        *,
        watch_others: bool,
        silence_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rank = rank
        self.hosts = hosts
        self.watch_others = watch_others
        self.silence_s = silence_s
        self.clock = clock
        now = clock()
        self._next_beat = now
        self._next_check = now + BEAT_S
        self._seen = {r: (-1, now) for r in hosts if r != rank}

    def tick(self, store: TCPStore) -> AttemptEnd | None:
        """Beat when due; on node 0, the first node silent for too long, as an attempt end."""
        now = self.clock()
        if now >= self._next_beat:
            store.add(PREFIX + f"beat/{self.rank}", 1)
            self._next_beat = now + BEAT_S
        if not self.watch_others or now < self._next_check:
            return None
        self._next_check = now + BEAT_S
        for rank, (count, since) in self._seen.items():
            current = int(store.add(PREFIX + f"beat/{rank}", 0))
            if current != count:
                self._seen[rank] = (current, now)
            elif now - since > self.silence_s:
                detail = (
                    f"stopped answering for {self.silence_s:g}s (its ddplaunch was killed, or its "
                    "network failed)"
                )
                return AttemptEnd("lost", rank, self.hosts.get(rank, "?"), detail, 1)
        return None


class _Watcher:
    """A thread blocked on the store's END key; it wakes the supervisor's loop through a pipe.

    Between waits it keeps the heartbeats going (Pulse) and looks for stack requests.
    """

    def __init__(self, store: TCPStore, pulse: Pulse) -> None:
        self._pulse = pulse
        self._store = store
        self._wake = WakePipe()
        self.read_fd = self._wake.read_fd
        self._stopping = threading.Event()
        self._result: AttemptEnd | None = None
        self._lost: str | None = None
        self._told = False
        self._requests: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._requests_seen = 0
        self._thread = threading.Thread(target=self._run, name="ddplaunch-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import torch.distributed as dist

        while not self._stopping.is_set():
            try:
                silent = self._pulse.tick(self._store)
                if silent is not None:
                    self._store.compare_set(END, "", silent.to_text())
                self._see_requests()
                self._store.wait([END], timedelta(seconds=SLICE_S))
                self._result = AttemptEnd.from_text(self._store.get(END).decode())
            except dist.DistStoreError:
                continue  # a slice passed with no news
            except RuntimeError as exc:
                self._lost = _first_line(exc)
            self._wake.ring()
            return

    def _see_requests(self) -> None:
        asked = int(self._store.add(STACKS_ASKED, 0))
        if asked > self._requests_seen:
            for request in range(self._requests_seen + 1, asked + 1):
                self._requests.put(request)
            self._requests_seen = asked
            self._wake.ring()

    def take(self) -> AttemptEnd | None:
        """The attempt's end, or lost contact, once (the pipe also rings for stack requests)."""
        self._wake.drain()
        if self._told or (self._result is None and self._lost is None):
            return None
        self._told = True
        if self._result is not None:
            return self._result
        return AttemptEnd("lost", NOT_A_NODE, "this node", f"lost contact with node 0's rendezvous ({self._lost})")

    def take_requests(self) -> list[int]:
        self._wake.drain()
        taken = []
        while not self._requests.empty():
            taken.append(self._requests.get_nowait())
        return taken

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=SLICE_S * 8)
        self._wake.close()
        del self._store


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
