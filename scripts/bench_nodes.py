"""The multi-node rows of scripts/bench.py: `--hosts` over real sshd servers, and static nodes.

scripts/bench.py runs these rows when a multi-node row is selected (all are, by default);
the helpers they share with the single-node rows (bench_local.py) live in benchlib.py
(bounded waits, BENCH_TOKEN clean-up, the line format).

  hosts      `ddplaunch --hosts` with 8 hosts and with 2 hosts, --nproc 1 (alternating).
             Each worker writes `ready-<RANK>` into a directory and sleeps. Measured: from
             Popen to the moment all ready files exist (the directory is polled every 10 ms).
             Then the head gets SIGTERM; it must exit, and no worker, agent or SSH session
             may be left. Ratio 8 hosts / 2 hosts.                  target <= 1.5
             The notes split the time by the head's own stderr lines (connecting, connected,
             all agents ready), and say how many workers saw the SIGTERM (a handler writes
             `term-<RANK>`) rather than a SIGKILL, and how often the head called a host lost.
  connect16  the connect phase alone: `ddplaunch --hosts` with 16 hosts and with 2, --nproc 1
             (alternating), a worker that exits at once. Measured: from Popen to the head's
             "all N hosts ready" line (every SSH session open, every agent started and
             checked). Then the job must end 0 and leave no worker, agent or SSH session.
             Ratio 16 hosts / 2 hosts (16 agents share 2 CPUs here).  target <= 2.0
  crossnode  static mode, 2 nodes x 2 workers, both launchers on this machine. Every worker
             does init_process_group("gloo") + barrier; rank 3 (node 1) then writes
             time.time() and calls os._exit(1); the others sleep 60 s with a SIGTERM handler
             that writes time.time() to `stopped-<RANK>`. Measured against rank 3's stamp:
             the later of node 0's two stopped stamps, and the moment node 0's launcher
             has exited (pidfd). torchrun's node 0 is given CROSSNODE_BOUND_S, then killed.
                                                                     target <= 2 s
  sshlines   `ddplaunch --hosts h1,h2 --nproc 2`, each rank printing 50,000 lines of ~60
             bytes (benchlib's line format), stdout redirected to a file, lines counted per
             rank by their `R | ` prefix; against the same 4 x 50,000 lines on one node
             (`ddplaunch --nproc 4`). Wall time, ratio ssh / local, lines per second over the
             wall time and from the first line on (start-up aside). Target: 0 lines lost.
  ship       the shipped agent (issue 11): `ddplaunch --hosts h1,h2 --nproc 1` of the hosts
             row's worker (no torch), timed the same way (Popen to all ready files), in two
             series alternating per rep: "first", whose DDPLAUNCH_AGENT_CACHE is a fresh empty
             folder, so the head must send its agent zip to both hosts; and "cached", whose
             folder already holds that zip (written here by ddplaunch.ship). Each run must have
             sent (first) or not sent (cached) the agent, by the head's own stderr. The bytes
             sent per host are the zip's size. Ratio first / cached.
                                                                     target first <= cached + 0.5 s
  sync       `--sync` (issue 11): `ddplaunch --hosts h1,h2 --nproc 1` started in a generated tree
             (SYNC_FILES = 2,000 files, 50 MiB, 100 folders; made once per bench run from a fixed
             seed, then removed; see make_tree), its worker a file of the tree that writes its
             working directory into its ready file (no torch). Timed as the ship row (Popen to all
             ready files), three series in turn per rep: "plain", no --sync (the hosts run in the
             head's directory, which exists here); "first", --sync into a fresh empty cache
             (DDPLAUNCH_AGENT_CACHE, holding the agent zip already, so only the tree goes); and
             "second", --sync again into the same cache with nothing changed. Checked, by the head's
             "--sync N.N s: ..." line, the workers' working directory and the copy itself: plain
             ran in the tree; first sent every file to both hosts and the copy holds them all;
             second said "up to date". Notes: second - plain, and the first sync's files/s and
             MiB/s per host from the head's line (0.1 s resolution). At most SYNC_REPS reps
             whatever --reps says (each first sync writes 2 x 50 MiB).
                                                                     target second <= plain + 0.5 s

The "hosts" are 8 OpenSSH servers (16 when connect16 runs) (scripts/sshd.py) on 127.0.1.40+
of this one machine, reached through a throw-away HOME whose ~/.ssh/config names them bench1..: they
share this machine's CPUs, so 8 hosts cost 4x the CPU of 2 hosts here (each node agent
is a login shell plus a Python start). torchrun has no SSH mode: its column is n/a there.
They also share its one filesystem and user: the sync row's two hosts write their copies to
the same folder (each still reads an empty record and sends every file, so both transfers are
made in full, but the disk writes land in one place).
The pool is stopped, with every session it holds, in a finally block.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import psutil
from benchlib import (
    SeriesRow,
    secs,
    DDP_LINE,
    TOOLS,
    Bench,
    Timeout,
    attempt,
    draw_table,
    finish,
    lines_script,
    log,
    median_of,
    ok_mark,
    tally_lines,
    token_processes,
    wait_exit,
)
from sshd import SshdPool, SshHome, start_sshd_pool

from ddplaunch.ship import CACHE_VARIABLE, AgentZip, build_agent_zip
from ddplaunch.syncplan import MANIFEST_NAME, default_remote_dir, human_bytes, select_files

NODE_KEYS = ("hosts", "crossnode", "sshlines", "connect16", "ship", "sync")
POOL_FIRST_ADDRESS = "127.0.1.40"  # the test suite's servers use 127.0.1.2-9
POOL_ALIAS = "bench"
HOST_COUNTS = (2, 8)
HOSTS_TARGET = 1.5
CONNECT_COUNTS = (2, 16)
CONNECT_TARGET = 2.0
CROSSNODE_TARGET_S = 2.0
CROSSNODE_BOUND_S = 10.0  # after rank 3's failure, how long node 0 is given to stop
SSH_LINES_PER_RANK = 50_000
SSH_HOSTS, SSH_NPROC = 2, 2
SSH_RANKS = SSH_HOSTS * SSH_NPROC
SHIP_HOSTS = 2
SHIP_SERIES = ("first", "cached")
SHIP_EXTRA_S = 0.5  # what sending the agent may add to a launch, once per version
SYNC_HOSTS = 2
SYNC_SERIES = ("plain", "first", "second")
SYNC_EXTRA_S = 0.5  # the "well under a second" more than a run without --sync, when nothing changed
SYNC_REPS = 3  # at most, whatever --reps says: each first sync writes 2 x 50 MiB
SYNC_SEED = 11
SYNC_FILES = 2000  # every path the head picks: files, the two executables and the symlink
SYNC_BYTES = 50 << 20  # their sizes together (a symlink's is its target's length, as --sync counts it)
SYNC_PACKAGES, SYNC_MODULES = 20, 4  # pkgNN/ and pkgNN/modM/: 100 folders
SYNC_LARGE = 8  # MB-sized files (a few MiB each) that carry most of the bytes; the rest are small .py files
SYNC_WORKER = "sync_worker.py"  # the tree's script: the hosts row's worker, writing its working directory
SYNC_LINK = "latest.py"
START_TIMEOUT_S = 120.0  # from Popen until every worker runs (hosts) or rank 3 failed (crossnode)
LEFTOVER_WAIT_S = 15.0  # after the head exited: until no worker, agent or SSH session is left
POLL_S = 0.01

WORKERS = {
    "ready_sleep.py": """\
import os, signal, sys, time
rank = os.environ["RANK"]

def put(name):
    path = os.path.join(sys.argv[1], name)
    with open(path + ".tmp", "w") as f:
        f.write(repr(time.time()))
    os.rename(path + ".tmp", path)

def on_term(signum, frame):  # a SIGTERM reached us (not a SIGKILL): the stop was graceful
    put("term-" + rank)
    os._exit(0)

signal.signal(signal.SIGTERM, on_term)
put("ready-" + rank)
time.sleep(60)
""",
    "crossnode.py": """\
import os, signal, sys, time
out = sys.argv[1]
rank = int(os.environ["RANK"])

def put(name, text):
    path = os.path.join(out, name)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.rename(path + ".tmp", path)

def on_term(signum, frame):
    put(f"stopped-{rank}", repr(time.time()))
    os._exit(0)

signal.signal(signal.SIGTERM, on_term)
import torch.distributed as dist
dist.init_process_group("gloo")
dist.barrier()
print(f"ready {rank}", flush=True)
put(f"ready-{rank}", "")
if rank == 3:  # fail once the others are past the barrier, asleep with their handler set
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(os.path.exists(os.path.join(out, f"ready-{r}")) for r in range(3)):
        time.sleep(0.01)
    put("failed", repr(time.time()))
    os._exit(1)
time.sleep(60)
""",
    "lines50k.py": lines_script(SSH_LINES_PER_RANK),
    "hello.py": """\
import os
print("hello from rank", os.environ["RANK"], flush=True)
""",
}

SYNC_WORKER_TEXT = """\
import os, signal, sys, time
rank = os.environ["RANK"]

def put(name, text):
    path = os.path.join(sys.argv[1], name)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.rename(path + ".tmp", path)

def on_term(signum, frame):
    put("term-" + rank, repr(time.time()))
    os._exit(0)

signal.signal(signal.SIGTERM, on_term)
put("ready-" + rank, os.getcwd())  # the copy (--sync) or the head's directory (plain)
time.sleep(60)
"""


# -- rows -------------------------------------------------------------------------------------


class NodeRow(SeriesRow):
    """One multi-node row, shown as ddplaunch, torchrun, reference and ratio cells."""

    def cells(self) -> tuple[str, str, str, str]:
        """ddplaunch, torchrun, reference, ratio."""
        raise NotImplementedError

    def leftovers_ok(self) -> bool:
        return all(n == 0 for n in self.extra.get("left_behind", []))


class ScalingRow(NodeRow):
    """series: "N hosts" -> seconds, for the two host counts `counts`; the ratio many / few."""

    counts: tuple[int, int] = HOST_COUNTS
    limit: float = HOSTS_TARGET

    def ratio(self) -> float | None:
        few, many = (self.median(f"{n} hosts") for n in self.counts)
        return many / few if few and many is not None else None

    def target(self) -> str:
        return f"<= {self.limit:g} ({self.counts[1]}/{self.counts[0]})"

    def ok(self) -> bool | None:
        ratio = self.ratio()
        if ratio is None:
            return None
        return ratio <= self.limit and self.leftovers_ok() and not self.errors

    def cells(self) -> tuple[str, str, str, str]:
        few, many = self.counts
        ratio = self.ratio()
        return (
            f"{secs(self.median(f'{many} hosts'))} ({many} hosts)",
            "n/a (no SSH mode)",
            f"{secs(self.median(f'{few} hosts'))} ({few} hosts)",
            "n/a" if ratio is None else f"{ratio:.3f} ({many}/{few})",
        )


class HostsRow(ScalingRow):
    """series: "N hosts" -> seconds from Popen to all workers running."""


class ConnectRow(ScalingRow):
    """series: "N hosts" -> seconds from Popen to every agent ready."""

    counts = CONNECT_COUNTS
    limit = CONNECT_TARGET


class ExtraCostRow(NodeRow):
    """A series against a baseline series, with a budget of seconds on top: `measured` must take
    at most `baseline` + `extra_s` (medians). Errors (a series that did not do what its name
    says) fail the row."""

    measured = baseline = ""
    extra_s = 0.0

    def ratio(self) -> float | None:
        measured, baseline = self.median(self.measured), self.median(self.baseline)
        return measured / baseline if baseline and measured is not None else None

    def target(self) -> str:
        return f"{self.measured} <= {self.baseline} + {self.extra_s:g} s"

    def ok(self) -> bool | None:
        if self.errors:
            return False
        measured, baseline = self.median(self.measured), self.median(self.baseline)
        if measured is None or baseline is None:
            return None
        return measured <= baseline + self.extra_s and self.leftovers_ok()

    def ratio_cell(self) -> str:
        ratio = self.ratio()
        return "n/a" if ratio is None else f"{ratio:.3f} ({self.measured}/{self.baseline})"


class ShipRow(ExtraCostRow):
    """series: "first" (the agent sent), "cached" -> seconds from Popen to all workers running;
    extra["bytes"]: the zip's size, sent to each host on a first run."""

    measured, baseline, extra_s = "first", "cached", SHIP_EXTRA_S

    def cells(self) -> tuple[str, str, str, str]:
        return (f"{secs(self.median('first'))} (first, sent)", "n/a (no SSH mode)",
                f"{secs(self.median('cached'))} (cached)", self.ratio_cell())


class SyncRow(ExtraCostRow):
    """series: "plain" (no --sync), "first" (the whole tree sent), "second" (up to date) -> seconds
    from Popen to all workers running; extra["tree"]: what the tree holds."""

    measured, baseline, extra_s = "second", "plain", SYNC_EXTRA_S

    def cells(self) -> tuple[str, str, str, str]:
        return (f"{secs(self.median('second'))} (second, up to date); {secs(self.median('first'))} (first)",
                "n/a (no SSH mode)", f"{secs(self.median('plain'))} (no --sync)", self.ratio_cell())


class CrossRow(NodeRow):
    """series: ddplaunch, torchrun; extra[tool]["outcome"]: stopped / never / error per rep."""

    def target(self) -> str:
        return f"<= {CROSSNODE_TARGET_S:g} s"

    def ok(self) -> bool | None:
        samples = self.series["ddplaunch"]
        if not samples:
            return None
        return all(v is not None for v in samples) and max(v for v in samples if v is not None) <= CROSSNODE_TARGET_S

    def tool_cell(self, tool: str) -> str:
        outcomes = self.extra[tool].get("outcome", [])
        never = outcomes.count("never")
        median = self.median(tool)
        if median is None:
            return f"never (still running after {CROSSNODE_BOUND_S:g} s)" if never else "n/a"
        return secs(median) + (f" ({never}/{len(outcomes)} never)" if never else "")

    def cells(self) -> tuple[str, str, str, str]:
        return (self.tool_cell("ddplaunch"), self.tool_cell("torchrun"), "n/a", "n/a")


class SshLinesRow(NodeRow):
    """series: ssh, local (wall seconds); extra[mode]: lost, per_rank, exit_code per rep."""

    def ratio(self) -> float | None:
        ssh, local = self.median("ssh"), self.median("local")
        return ssh / local if ssh is not None and local else None

    def target(self) -> str:
        return "0 lost"

    def ok(self) -> bool | None:
        lost = self.extra["ssh"].get("lost", []) + self.extra["local"].get("lost", [])
        if not lost:
            return None
        return all(n == 0 for n in lost) and self.leftovers_ok() and not self.errors

    def cells(self) -> tuple[str, str, str, str]:
        ratio = self.ratio()
        return (
            f"{secs(self.median('ssh'))} ({SSH_HOSTS} hosts x {SSH_NPROC})",
            "n/a (no SSH mode)",
            f"{secs(self.median('local'))} (1 node, --nproc {SSH_RANKS})",
            "n/a" if ratio is None else f"{ratio:.3f} (ssh/local)",
        )


# -- processes: the head, agents and workers of one launch ----------------------------------------


@dataclass
class Nodes:
    """What the node measurements share: the bench, the sshd pool and the HOME that reaches it."""

    bench: Bench
    pool: SshdPool | None = None
    home: SshHome | None = None

    @property
    def ddplaunch(self) -> str:
        return self.bench.tools["ddplaunch"]

    def hosts(self, count: int) -> str:
        assert self.pool is not None
        return ",".join(self.pool.aliases[:count])

    def ssh_env(self) -> dict[str, str]:
        assert self.home is not None
        env = self.home.env()
        env.pop("NO_COLOR", None)
        return env

    def left_behind(self, token: str) -> tuple[int, int]:
        """Wait (bounded) until no process of this launch and no SSH session is left.

        Returns (processes, sessions) still there at the deadline: workers carry BENCH_TOKEN
        in their environment (--env), agents in their command line (benchlib.token_processes
        matches both).
        """
        assert self.pool is not None
        deadline = time.monotonic() + LEFTOVER_WAIT_S
        while True:
            procs, sessions = len(token_processes(token)), len(self.pool.session_processes())
            if (procs == 0 and sessions == 0) or time.monotonic() > deadline:
                return procs, sessions
            time.sleep(0.05)

    def kill_sessions(self) -> None:
        if self.pool is None:
            return
        sessions = self.pool.session_processes()
        for proc in sessions:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(sessions, timeout=5)


# The head's own lines on stderr, as it goes: started, connected (every agent started), and
# every agent ready (each checked its directory, interpreter and script); then the "go".
HEAD_PHASES = {"connecting": b"ddplaunch: connecting to ", "connected": b"ddplaunch: waiting for ",
               "agents_ready": b" hosts ready: "}
# Notes worth counting after a plain SIGTERM at the head (see the README of the bench's report).
HEAD_NOTES = {"lost_host": b": its connection or agent ended without an exit status",
              "killed_at_once": b"again: killing all workers now",
              "sent_agent": b"ddplaunch: sending ddplaunch's agent "}
# --sync's outcome, a line per outcome: "ddplaunch: --sync 3.1 s: h1, h2: sent 2000 files (50.0 MiB),
# 0 unchanged" or "...: up to date (2000 files)" (its first line, "ddplaunch: --sync: DIR ...", is not one).
SYNC_SAID = b"ddplaunch: --sync "
SYNC_SENT = re.compile(r"--sync (\d+(?:\.\d+)?) s: (.+): sent (\d+) files? \((.+)\), (\d+) unchanged$")
SYNC_UP_TO_DATE = re.compile(r"--sync (\d+(?:\.\d+)?) s: (.+): up to date \((\d+) files?\)$")


class StderrWatch:
    """Drains a head's stderr in a thread: its tail, when each phase line first appeared
    (seconds after t0), and how often each note was said."""

    def __init__(self, stream: IO[bytes], t0: float) -> None:
        self.stream = stream
        self.t0 = t0
        self.phases: dict[str, float | None] = dict.fromkeys(HEAD_PHASES)
        self.notes = dict.fromkeys(HEAD_NOTES, 0)
        self.synced: list[str] = []  # the head's --sync outcome lines
        self.tail: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for line in self.stream:
            for name, marker in HEAD_PHASES.items():
                if self.phases[name] is None and marker in line:
                    self.phases[name] = time.perf_counter() - self.t0
            for name, marker in HEAD_NOTES.items():
                self.notes[name] += marker in line
            text = line.decode("utf-8", "replace").rstrip()
            if SYNC_SAID in line:
                self.synced.append(text)
            self.tail = [*self.tail[-19:], text]

    def close(self) -> None:
        self.thread.join(timeout=5)  # the head is gone by now; its stderr ends with it
        self.stream.close()

    def said(self) -> str:
        return " / ".join(self.tail[-3:])


def count_files(folder: Path, prefix: str) -> int:
    return sum(1 for p in folder.iterdir() if p.name.startswith(prefix) and not p.name.endswith(".tmp"))


def read_stamp(path: Path) -> float | None:
    try:
        return float(path.read_text())
    except (OSError, ValueError):
        return None


def wait_exits(procs: list[subprocess.Popen[bytes]], timeout: float) -> list[float | None]:
    """benchlib.wait_exit for several processes at once (a thread each): when each one exited."""
    results: list[float | None] = [None] * len(procs)

    def one(i: int) -> None:
        results[i] = wait_exit(procs[i], timeout)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(procs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 10)
    return results


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the sync row's tree --------------------------------------------------------------------------


@dataclass(frozen=True)
class TreeFile:
    """One path of the generated tree and its size in bytes (a link's: its target's length)."""

    path: str
    size: int
    kind: Literal["small", "large", "executable", "worker", "link"]
    target: str | None = None  # a link's


def tree_layout(seed: int = SYNC_SEED) -> list[TreeFile]:
    """The tree make_tree writes (pure, the same for a seed): SYNC_FILES paths of SYNC_BYTES
    together in 100 folders. Sizes are skewed as in a code base with a few data files: small
    .py files of log-normal size (median ~2 KB, at most 64 KiB), SYNC_LARGE files that take
    the rest (a few MiB each), two executables and a symlink at the top."""
    rng = random.Random(seed)
    folders = [f"pkg{p:02d}" + ("" if m < 0 else f"/mod{m}") for p in range(SYNC_PACKAGES) for m in range(-1, SYNC_MODULES)]
    small_count = SYNC_FILES - SYNC_LARGE - 4  # the worker, the link and two executables
    small = [TreeFile(f"{folders[i % len(folders)]}/m{i:04d}.py", min(max(int(rng.lognormvariate(7.6, 1.0)), 64), 64 << 10),
                      "small") for i in range(small_count)]
    link_target = small[0].path
    fixed = [
        TreeFile(SYNC_WORKER, len(SYNC_WORKER_TEXT.encode()), "worker"),
        TreeFile(SYNC_LINK, len(link_target.encode()), "link", link_target),
        TreeFile("pkg00/mod0/prepare.sh", 512, "executable"),
        TreeFile("pkg10/mod2/run.sh", 512, "executable"),
    ]
    rest = SYNC_BYTES - sum(f.size for f in [*small, *fixed])
    weights = [rng.uniform(1.0, 3.0) for _ in range(SYNC_LARGE)]
    sizes = [int(rest * w / sum(weights)) for w in weights]
    sizes[-1] += rest - sum(sizes)
    large = [TreeFile(f"pkg{2 * k:02d}/weights-{k}.bin", size, "large") for k, size in enumerate(sizes)]
    return [*fixed, *small, *large]


def file_bytes(item: TreeFile, seed: int) -> bytes:
    """Its content: Python-like text for the small files, a shell script padded with comments for
    the executables, pseudo-random bytes for the large ones (SSH sends them as they are)."""
    if item.kind == "worker":
        return SYNC_WORKER_TEXT.encode()
    if item.kind == "large":
        return random.Random(f"{seed}:{item.path}").randbytes(item.size)
    head = "#!/bin/sh\necho ready\n" if item.kind == "executable" else f"# {item.path}\n"
    body = "# padding\n" if item.kind == "executable" else "def step(x):\n    return x * 2 + 1\n\n"
    text = head + body * (item.size // len(body) + 1)
    return text.encode()[:item.size]


@dataclass(frozen=True)
class SyncTree:
    """The tree as written, and what it holds (as --sync picks it)."""

    root: Path
    files: int
    bytes: int
    folders: int
    layout: tuple[TreeFile, ...]

    def facts(self) -> dict[str, Any]:
        small = sorted(f.size for f in self.layout if f.kind == "small")
        large = [f.size for f in self.layout if f.kind == "large"]
        return {"files": self.files, "bytes": self.bytes, "folders": self.folders, "small": len(small),
                "small_median": small[len(small) // 2], "large": len(large), "large_bytes": sum(large),
                "executables": sum(f.kind == "executable" for f in self.layout),
                "links": sum(f.kind == "link" for f in self.layout), "seed": SYNC_SEED}


def make_tree(root: Path, seed: int = SYNC_SEED) -> SyncTree:
    """Write tree_layout(seed) under root, a plain folder (not a git repo: --sync walks it, which is
    what a directory outside git costs; a work tree would add one `git ls-files`), and check that
    --sync's own picker sees exactly SYNC_FILES paths of SYNC_BYTES there."""
    layout = tree_layout(seed)
    for item in layout:
        path = root / item.path
        path.parent.mkdir(parents=True, exist_ok=True)
        if item.kind == "link":
            assert item.target is not None
            path.symlink_to(item.target)
            continue
        path.write_bytes(file_bytes(item, seed))
        if item.kind == "executable":
            path.chmod(0o755)
    picked = select_files(root)
    folders = sum(len(dirs) for _, dirs, _ in os.walk(root))
    tree = SyncTree(root, len(picked), sum(entry.size for entry in picked), folders, tuple(layout))
    if (tree.files, tree.bytes) != (SYNC_FILES, SYNC_BYTES) or sum(e.executable for e in picked) != 2:
        raise RuntimeError(f"sync: --sync would pick {tree.files} paths of {tree.bytes:,} bytes in {root}, not "
                           f"{SYNC_FILES} of {SYNC_BYTES:,} (is the bench's folder inside a git work tree?)")
    return tree


# -- the measurements -----------------------------------------------------------------------------


def run_hosts(nodes: Nodes, count: int, extra: dict[str, Any], *, label: str = "hosts",
              cache: Path | None = None, options: Sequence[str] = (), cwd: Path | None = None,
              script: str | None = None, on_ready: Callable[[Path], None] | None = None) -> float:
    """Seconds from Popen to all `count` workers running; then SIGTERM, and nothing may be left.
    `cache`: the hosts' agent cache (DDPLAUNCH_AGENT_CACHE), else their default one. `options`
    go before the script (default: the bench's ready_sleep.py), which the head runs from `cwd`
    (else the bench's own); `on_ready` sees the ready files' folder once all are there (untimed)."""
    bench = nodes.bench
    ready = Path(tempfile.mkdtemp(prefix=f"{label.replace(' ', '-')}{count}-", dir=bench.workdir))
    token = bench.new_token()
    # benchlib's start takes no folder to start in: `env -C` changes it and execs the head (same pid)
    chdir = [] if cwd is None else ["env", "-C", str(cwd)]
    argv = [*chdir, nodes.ddplaunch, "--hosts", nodes.hosts(count), "--nproc", "1", "--env", f"BENCH_TOKEN={token}",
            *options, script or str(bench.workdir / "ready_sleep.py"), str(ready)]
    env = nodes.ssh_env()
    if cache is not None:
        env[CACHE_VARIABLE] = str(cache)
    t0 = time.perf_counter()
    proc, _ = bench.start(argv, subprocess.DEVNULL, subprocess.PIPE, f"{label} {count}", env=env, token=token)
    assert proc.stderr is not None
    watch = StderrWatch(proc.stderr, t0)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while count_files(ready, "ready-") < count:
            if proc.poll() is not None:
                raise RuntimeError(f"the head exited {proc.returncode} before all workers ran: {watch.said()}")
            if time.monotonic() > deadline:
                raise Timeout(f"{count} hosts: workers not all running after {START_TIMEOUT_S:g} s")
            time.sleep(POLL_S)
        elapsed = time.perf_counter() - t0
        if on_ready is not None:
            on_ready(ready)
        proc.send_signal(signal.SIGTERM)
        if wait_exit(proc, timeout=30) is None:
            raise Timeout(f"{count} hosts: the head did not exit within 30 s of SIGTERM")
        procs, sessions = nodes.left_behind(token)
        watch.close()
        for name, at in watch.phases.items():
            extra.setdefault(f"{name}_s", []).append(at)
        for name, times in watch.notes.items():
            extra.setdefault(name, []).append(times)
        if "--sync" in options:
            extra.setdefault("sync_said", []).append(watch.synced)
        extra.setdefault("exit_code_after_sigterm", []).append(proc.returncode)
        extra.setdefault("graceful", []).append(count_files(ready, "term-"))
        extra.setdefault("left_behind", []).append(procs + sessions)
        if procs or sessions:
            raise RuntimeError(f"{procs} process(es) and {sessions} SSH session(s) left {LEFTOVER_WAIT_S:g} s "
                               "after the head exited (killed)")
        return elapsed
    finally:
        finish(proc, token)
        nodes.kill_sessions()
        watch.close()
        shutil.rmtree(ready, ignore_errors=True)


def run_connect(nodes: Nodes, count: int, extra: dict[str, Any]) -> float:
    """Seconds from Popen to the head's "all N hosts ready"; the job then runs to its end."""
    bench = nodes.bench
    token = bench.new_token()
    argv = [nodes.ddplaunch, "--hosts", nodes.hosts(count), "--nproc", "1", "--env", f"BENCH_TOKEN={token}",
            str(bench.workdir / "hello.py")]
    t0 = time.perf_counter()
    proc, _ = bench.start(argv, subprocess.DEVNULL, subprocess.PIPE, f"connect {count}", env=nodes.ssh_env(), token=token)
    assert proc.stderr is not None
    watch = StderrWatch(proc.stderr, t0)
    try:
        if wait_exit(proc, timeout=START_TIMEOUT_S) is None:
            raise Timeout(f"connect {count}: the job did not end within {START_TIMEOUT_S:g} s")
        procs, sessions = nodes.left_behind(token)
        watch.close()
        extra.setdefault("left_behind", []).append(procs + sessions)
        extra.setdefault("connected_s", []).append(watch.phases["connected"])
        ready = watch.phases["agents_ready"]
        if proc.returncode != 0 or ready is None:
            raise RuntimeError(f"connect {count}: exit {proc.returncode}, hosts ready at {ready}: {watch.said()}")
        if procs or sessions:
            raise RuntimeError(f"{procs} process(es) and {sessions} SSH session(s) left after the job")
        return ready
    finally:
        finish(proc, token)
        nodes.kill_sessions()
        watch.close()


def run_ship(nodes: Nodes, series: str, agent: AgentZip, cached: Path, extra: dict[str, Any]) -> float:
    """run_hosts on SHIP_HOSTS hosts, their agent cache a fresh empty folder ("first") or
    `cached`, which holds the zip; the head must have sent the agent on a first run only."""
    folder = Path(tempfile.mkdtemp(prefix="ship-cache-", dir=nodes.bench.workdir)) if series == "first" else cached
    try:
        elapsed = run_hosts(nodes, SHIP_HOSTS, extra, label=f"ship {series}", cache=folder.resolve())
        sent = extra["sent_agent"][-1]
        if (series == "first") != (sent > 0):
            raise RuntimeError(f"ship {series}: the head {'did not send' if not sent else 'sent'} its agent")
        held = sorted(p.name for p in folder.iterdir())
        if held != [agent.name] or (folder / agent.name).stat().st_size != agent.size:
            raise RuntimeError(f"ship {series}: the cache holds {held}, not {agent.name} of {agent.size} bytes "
                               "(is the head's code this checkout's?)")
        return elapsed
    finally:
        if folder != cached:
            shutil.rmtree(folder, ignore_errors=True)


def run_sync(nodes: Nodes, series: str, tree: SyncTree, cache: Path, extra: dict[str, Any]) -> float:
    """run_hosts of the tree's worker, started in the tree, on SYNC_HOSTS hosts whose agent cache is
    `cache` (the zip already there, so only --sync's work is added); "first" and "second" add
    --sync. Then, untimed: did each series do what its name says?"""
    ran_in: set[str] = set()

    def look(ready: Path) -> None:
        ran_in.update(p.read_text() for p in ready.glob("ready-*") if not p.name.endswith(".tmp"))

    elapsed = run_hosts(nodes, SYNC_HOSTS, extra, label=f"sync {series}", cache=cache, cwd=tree.root,
                        options=() if series == "plain" else ("--sync",), script=SYNC_WORKER, on_ready=look)
    if extra["sent_agent"][-1]:
        raise RuntimeError(f"sync {series}: the head sent its agent, so this time is not --sync's alone")
    copy = default_remote_dir(str(cache), socket.gethostname(), str(tree.root))
    where = str(tree.root) if series == "plain" else copy
    if ran_in != {where}:
        raise RuntimeError(f"sync {series}: the workers ran in {sorted(ran_in)}, not in {where}")
    if series == "plain":
        return elapsed
    extra.setdefault("sync_s", []).append(sync_seconds(series, extra["sync_said"][-1], tree, nodes.hosts(SYNC_HOSTS)))
    if series == "first" and (held := count_copy(Path(copy))) != tree.files:
        raise RuntimeError(f"sync first: the copy at {copy} holds {held} paths, not {tree.files}")
    return elapsed


def sync_seconds(series: str, said: Sequence[str], tree: SyncTree, hosts: str) -> float:
    """The seconds of the head's --sync line, which must say that every host got the whole tree
    (first) or was up to date (second), all on one line: anything else fails the row, with the lines said."""
    names = hosts.replace(",", ", ")
    for line in said:
        if series == "first" and (m := SYNC_SENT.search(line)):
            if (m[2], int(m[3]), m[4], int(m[5])) == (names, tree.files, human_bytes(tree.bytes), 0):
                return float(m[1])
        if series == "second" and (m := SYNC_UP_TO_DATE.search(line)):
            if (m[2], int(m[3])) == (names, tree.files):
                return float(m[1])
    wanted = (f"sent {tree.files} files ({human_bytes(tree.bytes)}), 0 unchanged" if series == "first"
              else f"up to date ({tree.files} files)")
    raise RuntimeError(f"sync {series}: the head said {list(said)}, not '{names}: {wanted}'")


def count_copy(copy: Path) -> int:
    """Files and links in a host's copy, its own record aside."""
    return sum(len([n for n in names if n != MANIFEST_NAME]) for _, _, names in os.walk(copy))


def static_argv(nodes: Nodes, tool: str, node_rank: int, port: int, outdir: Path) -> list[str]:
    common = ["--nnodes", "2", "--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port)]
    script = [str(nodes.bench.workdir / "crossnode.py"), str(outdir)]
    if tool == "ddplaunch":
        return [nodes.ddplaunch, *common, "--nproc", "2", *script]
    return [nodes.bench.tools["torchrun"], *common, "--rdzv-backend", "static", "--nproc-per-node", "2", *script]


def tail(path: Path, lines: int = 3) -> str:
    try:
        return " / ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def run_crossnode(nodes: Nodes, tool: str, extra: dict[str, Any]) -> tuple[float | None, float | None]:
    """(node 0's workers stopped, node 0's launcher exited), seconds after rank 3 failed; None: not
    within CROSSNODE_BOUND_S."""
    bench = nodes.bench
    outdir = Path(tempfile.mkdtemp(prefix=f"crossnode-{tool}-", dir=bench.workdir))
    port = free_port()
    token = bench.new_token()
    procs: list[subprocess.Popen[bytes]] = []
    logs = [outdir / f"node{r}.log" for r in (0, 1)]
    try:
        for node_rank, log_path in enumerate(logs):
            with open(log_path, "wb") as out:
                argv = static_argv(nodes, tool, node_rank, port, outdir)
                procs.append(bench.start(argv, out, subprocess.STDOUT, f"crossnode {tool} node {node_rank}",
                                         token=token)[0])
        stamp = outdir / "failed"
        deadline = time.monotonic() + START_TIMEOUT_S
        while not stamp.exists():
            for node_rank, proc in enumerate(procs):
                if proc.poll() is not None:
                    raise RuntimeError(f"node {node_rank} exited {proc.returncode} before rank 3 failed: "
                                       f"{tail(logs[node_rank])}")
            if time.monotonic() > deadline:
                raise Timeout(f"rank 3 did not fail within {START_TIMEOUT_S:g} s (the nodes never met?)")
            time.sleep(POLL_S)
        failed = read_stamp(stamp)
        if failed is None:
            raise RuntimeError("unreadable failure stamp")
        node0_exit, node1_exit = wait_exits(procs, timeout=max(failed + CROSSNODE_BOUND_S - time.time(), 0.1))
        stopped = [read_stamp(outdir / f"stopped-{r}") for r in (0, 1)]
        workers = None if None in stopped else max(s for s in stopped if s is not None) - failed
        launcher = None if node0_exit is None else node0_exit - failed
        extra.setdefault("node0_ranks_stopped_s", []).append([None if s is None else s - failed for s in stopped])
        extra.setdefault("node1_launcher_exit_s", []).append(None if node1_exit is None else node1_exit - failed)
        extra.setdefault("exit_codes", []).append([p.returncode for p in procs])
        return workers, launcher
    finally:
        for proc in procs:
            finish(proc, token)
        shutil.rmtree(outdir, ignore_errors=True)


def run_sshlines(nodes: Nodes, mode: str, extra: dict[str, Any]) -> float:
    bench = nodes.bench
    token = bench.new_token()
    script = str(bench.workdir / "lines50k.py")
    if mode == "ssh":
        argv = [nodes.ddplaunch, "--hosts", nodes.hosts(SSH_HOSTS), "--nproc", str(SSH_NPROC),
                "--env", f"BENCH_TOKEN={token}", script]
        env = nodes.ssh_env()
    else:
        argv, env = [nodes.ddplaunch, "--nproc", str(SSH_RANKS), script], None
    out_path = bench.workdir / f"sshlines-{mode}-{token}.out"
    err_path = out_path.with_suffix(".err")
    try:
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            first: list[float] = []  # when the first line reached the file (polled every 10 ms)

            def look() -> None:
                if not first and os.fstat(out.fileno()).st_size > 0:
                    first.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            proc, _ = bench.start(argv, out, err, f"sshlines {mode}", env=env, token=token)
            try:
                if wait_exit(proc, timeout=180, on_tick=look, tick=POLL_S) is None:
                    raise Timeout(f"sshlines {mode}: not done within 180 s")
                elapsed = time.perf_counter() - t0
                if mode == "ssh":
                    procs, sessions = nodes.left_behind(token)
                    extra.setdefault("left_behind", []).append(procs + sessions)
            finally:
                finish(proc, token)
                if mode == "ssh":
                    nodes.kill_sessions()
        per_rank = tally_lines(extra, out_path, DDP_LINE, SSH_RANKS, SSH_LINES_PER_RANK)
        extra.setdefault("exit_code", []).append(proc.returncode)
        extra.setdefault("lines_per_s", []).append(sum(per_rank) / elapsed)
        extra.setdefault("first_line_s", []).append(first[0] if first else None)
        if first and elapsed > first[0]:
            extra.setdefault("streaming_lines_per_s", []).append(sum(per_rank) / (elapsed - first[0]))
        if proc.returncode != 0:
            raise RuntimeError(f"sshlines {mode} exited {proc.returncode}: {tail(err_path)}")
        return elapsed
    finally:
        out_path.unlink(missing_ok=True)
        err_path.unlink(missing_ok=True)


# -- running them ---------------------------------------------------------------------------------

def sample(row: NodeRow, rep: int, reps: int, name: str, fn: Any, *args: Any) -> Any:
    """One timed call, its error recorded in the row (None then), its value logged."""
    value = attempt(row.errors, rep, name, fn, *args)
    if value is not None and not isinstance(value, tuple):
        log(f"    rep {rep + 1}/{reps} {name:<9} {value:.4g} s")
    return value


def measure_nodes(bench: Bench, reps: int, selected: set[str]) -> list[NodeRow]:
    for name, text in WORKERS.items():
        (bench.workdir / name).write_text(text)
    nodes = Nodes(bench)
    rows: list[NodeRow] = []
    try:
        if selected & {"hosts", "sshlines", "connect16", "ship", "sync"}:
            t0 = time.perf_counter()
            size = max(HOST_COUNTS + (CONNECT_COUNTS if "connect16" in selected else ()))
            nodes.pool = start_sshd_pool(size, bench.workdir / "sshd",
                                         first_address=POOL_FIRST_ADDRESS, alias_prefix=POOL_ALIAS)
            nodes.home = nodes.pool.make_home(bench.workdir / "ssh-home")
            log(f"sshd pool: {', '.join(f'{s.alias}={s.address}:{s.port}' for s in nodes.pool.servers)} "
                f"({time.perf_counter() - t0:.2f} s to start)")
        if "hosts" in selected:
            rows.append(measure_hosts(nodes, reps))
        if "connect16" in selected:
            rows.append(measure_connect(nodes, reps))
        if "crossnode" in selected:
            rows.extend(measure_crossnode(nodes, reps))
        if "sshlines" in selected:
            rows.append(measure_sshlines(nodes, reps))
        if "ship" in selected:
            rows.append(measure_ship(nodes, reps))
        if "sync" in selected:
            rows.append(measure_sync(nodes, min(reps, SYNC_REPS)))
    finally:
        if nodes.pool is not None:
            nodes.pool.stop()
    return rows


def measure_hosts(nodes: Nodes, reps: int) -> NodeRow:
    few, many = HOST_COUNTS
    log(f"hosts: {many} vs {few} hosts over SSH, --nproc 1, until every worker runs")
    row = HostsRow("hosts", f"hosts: {many} vs {few} hosts to all workers running", {}, {})
    return measure_scaling(row, nodes, reps, run_hosts)


def measure_connect(nodes: Nodes, reps: int) -> NodeRow:
    few, many = CONNECT_COUNTS
    log(f"connect16: {many} vs {few} hosts over SSH, --nproc 1, until every agent is ready")
    row = ConnectRow("connect16", f"connect: {many} vs {few} hosts to every agent ready", {}, {})
    return measure_scaling(row, nodes, reps, run_connect)


def measure_scaling(row: ScalingRow, nodes: Nodes, reps: int, run: Callable[..., float]) -> NodeRow:
    """The row's two host counts in turn, `reps` times each; what each left behind, together."""
    for count in row.counts:
        row.series[f"{count} hosts"], row.extra[f"{count} hosts"] = [], {}
    for rep in range(reps):
        for count in row.counts:
            name = f"{count} hosts"
            row.series[name].append(sample(row, rep, reps, name, run, nodes, count, row.extra[name]))
    row.extra["left_behind"] = [n for name in row.series for n in row.extra[name].get("left_behind", [])]
    return row


def measure_ship(nodes: Nodes, reps: int) -> NodeRow:
    agent = build_agent_zip()  # the same code gives the same bytes: the head's zip is this one
    log(f"ship: {SHIP_HOSTS} hosts over SSH, --nproc 1, until every worker runs; agent sent ({agent.size:,} "
        "bytes to each host) vs already cached")
    row = ShipRow("ship", f"ship: {SHIP_HOSTS} hosts to all workers running, agent sent vs cached",
                  {name: [] for name in SHIP_SERIES}, {name: {} for name in SHIP_SERIES})
    row.extra["bytes"] = agent.size
    cached = Path(tempfile.mkdtemp(prefix="ship-cached-", dir=nodes.bench.workdir))
    (cached / agent.name).write_bytes(agent.data)
    try:
        for rep in range(reps):
            for name in SHIP_SERIES:
                row.series[name].append(sample(row, rep, reps, name, run_ship, nodes, name, agent, cached,
                                               row.extra[name]))
    finally:
        shutil.rmtree(cached, ignore_errors=True)
    row.extra["left_behind"] = [n for name in SHIP_SERIES for n in row.extra[name].get("left_behind", [])]
    return row


def measure_sync(nodes: Nodes, reps: int) -> NodeRow:
    """The three series in turn per rep, each rep with a fresh cache (the agent zip only), so its
    "first" finds no copy and its "second" finds the one "first" made; the tree and every copy
    are removed at the end."""
    agent = build_agent_zip()
    t0 = time.perf_counter()
    tree = make_tree((nodes.bench.workdir / "synctree").resolve())
    log(f"sync: {SYNC_HOSTS} hosts over SSH, --nproc 1, until every worker runs; a tree of {tree.files:,} files, "
        f"{human_bytes(tree.bytes)} ({time.perf_counter() - t0:.2f} s to write): no --sync, a first and a second "
        f"--sync; {reps} rep(s)")
    row = SyncRow("sync", f"sync: {tree.files:,} files, {human_bytes(tree.bytes)} to {SYNC_HOSTS} hosts, to all "
                  "workers running", {name: [] for name in SYNC_SERIES}, {name: {} for name in SYNC_SERIES})
    row.extra["tree"] = tree.facts()
    try:
        for rep in range(reps):
            cache = Path(tempfile.mkdtemp(prefix="sync-cache-", dir=nodes.bench.workdir)).resolve()
            (cache / agent.name).write_bytes(agent.data)
            try:
                for name in SYNC_SERIES:
                    row.series[name].append(sample(row, rep, reps, name, run_sync, nodes, name, tree, cache,
                                                   row.extra[name]))
            finally:
                shutil.rmtree(cache, ignore_errors=True)
    finally:
        shutil.rmtree(tree.root, ignore_errors=True)
    row.extra["left_behind"] = [n for name in SYNC_SERIES for n in row.extra[name].get("left_behind", [])]
    return row


def measure_crossnode(nodes: Nodes, reps: int) -> list[NodeRow]:
    log(f"crossnode: static, 2 nodes x 2 workers, rank 3 fails; node 0 given {CROSSNODE_BOUND_S:g} s")
    extra: dict[str, dict[str, Any]] = {tool: {} for tool in TOOLS}  # shared by the two rows: one run gives both figures
    workers = CrossRow("crossnode_workers", "cross-node failure -> other node's workers stopped",
                       {tool: [] for tool in TOOLS}, extra)
    launcher = CrossRow("crossnode_exit", "cross-node failure -> other node's launcher exited",
                        {tool: [] for tool in TOOLS}, extra)
    for rep in range(reps):
        for tool in TOOLS:
            got = sample(workers, rep, reps, tool, run_crossnode, nodes, tool, extra[tool])
            stopped, exited = got if got is not None else (None, None)
            extra[tool].setdefault("outcome", []).append(
                "error" if got is None else "never" if stopped is None else "stopped")
            workers.series[tool].append(stopped)
            launcher.series[tool].append(exited)
            if got is not None:
                log(f"    rep {rep + 1}/{reps} {tool:<9} workers stopped {show(stopped)}, "
                    f"launcher exited {show(exited)}")
    launcher.errors = workers.errors
    return [workers, launcher]


def show(value: float | None) -> str:
    return f"never (>{CROSSNODE_BOUND_S:g} s)" if value is None else f"{value:.4g} s"


def measure_sshlines(nodes: Nodes, reps: int) -> NodeRow:
    log(f"sshlines: {SSH_HOSTS} hosts x {SSH_NPROC} ranks x {SSH_LINES_PER_RANK:,} lines, against 1 node x {SSH_RANKS}")
    row = SshLinesRow("sshlines", f"lines through SSH, {SSH_HOSTS} hosts ({SSH_RANKS}x{SSH_LINES_PER_RANK // 1000}k)",
                      {"ssh": [], "local": []}, {"ssh": {}, "local": {}})
    for rep in range(reps):
        for mode in ("ssh", "local"):
            row.series[mode].append(sample(row, rep, reps, mode, run_sshlines, nodes, mode, row.extra[mode]))
    row.extra["left_behind"] = row.extra["ssh"].get("left_behind", [])
    return row


# -- output ---------------------------------------------------------------------------------------


def render_nodes(rows: Sequence[NodeRow]) -> list[str]:
    header = ("multi-node measurement", "ddplaunch (median)", "torchrun (median)", "reference (median)",
              "ratio", "target", "ok?")
    body = [(row.label, *row.cells(), row.target(), ok_mark(row.ok())) for row in rows]
    servers = max(HOST_COUNTS + (CONNECT_COUNTS if any(row.key == "connect16" for row in rows) else ()))
    lines = [(f"# multi-node: the hosts are {servers} sshd servers on {POOL_FIRST_ADDRESS}+ of this "
              "one machine (they share its CPUs)")]
    lines += draw_table(header, body)
    by_key = {row.key: row for row in rows}
    if "hosts" in by_key:
        lines.append("")
        lines += hosts_notes(by_key["hosts"])
    if "connect16" in by_key:
        row = by_key["connect16"]
        lines.append("")
        for count in CONNECT_COUNTS:
            x = row.extra[f"{count} hosts"]
            lines.append(f"connect16, {count} hosts: every agent ready after {rounded(row.series[f'{count} hosts'])} s "
                         f"per rep (all SSH sessions open, agents started, after {rounded(x.get('connected_s', []))} s); "
                         f"processes/sessions left {x.get('left_behind', [])}")
    if "crossnode_workers" in by_key:
        row = by_key["crossnode_workers"]
        lines.append("")
        for tool in TOOLS:
            x = row.extra[tool]
            ranks = [[None if s is None else round(s, 3) for s in pair] for pair in x.get("node0_ranks_stopped_s", [])]
            lines.append(f"cross-node, {tool:<9}: node 0 ranks 0,1 stopped after {ranks} s per rep; node 0's "
                         f"launcher exited after {rounded(by_key['crossnode_exit'].series[tool])}; node 1's (where "
                         f"rank 3 failed) after {rounded(x.get('node1_launcher_exit_s', []))} "
                         f"(None: not within {CROSSNODE_BOUND_S:g} s, then killed); exit codes {x.get('exit_codes', [])}")
    if "sshlines" in by_key:
        row = by_key["sshlines"]
        lines.append("")
        for mode in ("ssh", "local"):
            x = row.extra[mode]
            per = x.get("per_rank", [])
            lines.append(f"lines {mode:<5}: {rate(x.get('lines_per_s'))} lines/s over the wall time, "
                         f"{rate(x.get('streaming_lines_per_s'))} from the first line on (first line after "
                         f"{rounded(x.get('first_line_s', []))} s); lost of {SSH_RANKS * SSH_LINES_PER_RANK:,} per "
                         f"rep {x.get('lost', [])}{'' if not per else f'; last run per rank {per[-1]}'}"
                         + (f"; processes/sessions left {x['left_behind']}" if "left_behind" in x else ""))
    if "ship" in by_key:
        lines.append("")
        lines += ship_notes(by_key["ship"])
    if "sync" in by_key:
        lines.append("")
        lines += sync_notes(by_key["sync"])
    return lines


def rounded(values: list[float | None]) -> list[float | None]:
    return [None if v is None else round(v, 3) for v in values]


def rate(values: list[float | None] | None) -> str:
    value = median_of(values or [])
    return "n/a" if value is None else f"{value:,.0f}"


def hosts_notes(row: NodeRow) -> list[str]:
    lines = []
    phases: dict[str, tuple[float | None, float | None]] = {}
    for count in HOST_COUNTS:
        name = f"{count} hosts"
        x = row.extra[name]
        began, connected, ready = (median_of(x.get(f"{p}_s", [])) for p in HEAD_PHASES)
        running = row.median(name)
        connect = None if began is None or connected is None else connected - began
        after_go = None if ready is None or running is None else running - ready
        phases[name] = (connect, after_go)
        lines.append(
            f"{name}: {rounded(row.series[name])} s per rep to all workers running. Medians: the head said "
            f"'connecting' at {secs(began)}, was connected (all SSH sessions, agents started) at "
            f"{secs(connected)}, had every agent ready at {secs(ready)}; the go to all workers running took "
            f"{secs(after_go)}.")
        lines.append(
            f"  after SIGTERM at the head: exit codes {x.get('exit_code_after_sigterm', [])}; workers that got "
            f"SIGTERM (not SIGKILL) {x.get('graceful', [])} of {count}; agents that escalated to 'killing all "
            f"workers now' {x.get('killed_at_once', [])}; hosts the head called lost {x.get('lost_host', [])}; "
            f"processes/sessions left {x.get('left_behind', [])}")
    (few_connect, few_go), (many_connect, many_go) = (phases[f"{n} hosts"] for n in HOST_COUNTS)
    if few_connect and many_connect is not None:
        lines.append(f"connect phase alone ({HOST_COUNTS[1]}/{HOST_COUNTS[0]} hosts): "
                     f"{many_connect / few_connect:.2f}; the go to all running: "
                     + ("n/a" if not few_go or many_go is None else f"{many_go / few_go:.2f}"))
    return lines


def ship_notes(row: NodeRow) -> list[str]:
    first, cached = row.median("first"), row.median("cached")
    extra = "n/a" if first is None or cached is None else f"{first - cached:+.3f} s"
    lines = [f"ship: the agent zip is {row.extra['bytes']:,} bytes, sent to each of {SHIP_HOSTS} hosts on a first "
             f"run; the first run costs {extra} over a cached one (medians)."]
    for name in SHIP_SERIES:
        x = row.extra[name]
        lines.append(f"  {name:<6}: {rounded(row.series[name])} s per rep to all workers running; every agent ready "
                     f"at {rounded(x.get('agents_ready_s', []))} s; head said 'sending' {x.get('sent_agent', [])}; "
                     f"processes/sessions left {x.get('left_behind', [])}")
    return lines


def sync_notes(row: NodeRow) -> list[str]:
    tree = row.extra["tree"]
    plain, second = row.median("plain"), row.median("second")
    more = ("n/a" if plain is None or second is None
            else f"{second - plain:+.3f} s (ratio {second / plain:.3f})")
    first_sync = median_of(row.extra["first"].get("sync_s", []))
    if first_sync:
        per_host = (f"{tree['files'] / first_sync:,.0f} files/s and {tree['bytes'] / first_sync / (1 << 20):.1f} MiB/s "
                    f"per host, {SYNC_HOSTS} hosts at once ({SYNC_HOSTS * tree['bytes'] / first_sync / (1 << 20):.1f} "
                    "MiB/s in all)")
    else:
        per_host = "n/a"
    lines = [
        f"sync: the tree is {tree['files']:,} paths of {human_bytes(tree['bytes'])} in {tree['folders']} folders, not a "
        f"git repo (seed {tree['seed']}): {tree['small']:,} small .py files (median {tree['small_median']:,} bytes), "
        f"{tree['large']} large ones ({human_bytes(tree['large_bytes'])} together), {tree['executables']} "
        f"executables, {tree['links']} symlink.",
        f"  a second --sync with nothing changed costs {more} over a run without --sync (medians).",
        f"  the first sync took {secs(first_sync)} by the head's '--sync N.N s' line (0.1 s steps; median): "
        f"{per_host}.",
    ]
    for name in SYNC_SERIES:
        x = row.extra[name]
        said = x.get("sync_said", [])
        lines.append(f"  {name:<6}: {rounded(row.series[name])} s per rep to all workers running; every agent ready "
                     f"at {rounded(x.get('agents_ready_s', []))} s"
                     + (f"; --sync took {x.get('sync_s', [])} s, last said {said[-1]}" if said else "")
                     + f"; processes/sessions left {x.get('left_behind', [])}")
    return lines
