"""Static multi-node: two real ddplaunch processes on this machine as node 0 and node 1.

They meet at node 0's TCPStore, run real gloo collectives across "nodes", and a failure or a
Ctrl-C on one node stops the other at once. Every test ends with no process of the job left.

Tests whose ranks only wait for the launchers to act run a rank without torch (SLEEP_READY);
the failure and restart tests, with two ranks per node, run --warm (each node's launcher imports
torch once and forks its ranks): their subject is what the nodes tell each other, not how a
rank starts. Their cold twins are named where they run warm.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers_cli import processes_with_token, wait_until, write_script
from ddplaunch.ports import pick_free_port

ENV_DUMP = """
import json, os, sys
import torch, torch.distributed as dist
dist.init_process_group("gloo")
value = torch.tensor([float(dist.get_rank())])
dist.all_reduce(value)
env = dict(os.environ, SUM=str(value.item()))
with open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump(env, f)
dist.barrier()
dist.destroy_process_group()
"""

# ENV_DUMP's environment without torch: for a test whose subject is which node gets which rank.
PLAIN_ENV_DUMP = """
import json, os, sys
with open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump(dict(os.environ), f)
"""

# Rank FAIL_RANK exits 7 (in the attempts listed in FAIL_ATTEMPTS) after writing the time;
# every other rank sleeps outside any collective, so only the launcher can stop it, and
# notes when the launcher's SIGTERM reached it.
FAIL_OR_SLEEP = """
import os, signal, sys, time
import torch, torch.distributed as dist

def stopped(signum, frame):
    with open(sys.argv[1] + ".stopped-rank" + os.environ["RANK"], "w") as f:
        f.write(repr(time.time()))
    os._exit(128 + signum)

signal.signal(signal.SIGTERM, stopped)
dist.init_process_group("gloo")
dist.barrier()
attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
print(f"rank {os.environ['RANK']} attempt {attempt} ready", flush=True)
if os.environ["RANK"] == os.environ.get("FAIL_RANK") and attempt in os.environ.get("FAIL_ATTEMPTS", "0"):
    with open(sys.argv[1], "w") as f:
        f.write(repr(time.time()))
    os._exit(7)
if attempt in os.environ.get("FAIL_ATTEMPTS", "0"):
    time.sleep(600)
dist.barrier()
dist.destroy_process_group()
"""


# A rank that is up once its node has joined the job, and waits, without torch: for the tests
# where only the launchers can stop it (a Ctrl-C, a launcher killed or cut off).
SLEEP_READY = """
import os, time
print(f"rank {os.environ['RANK']} attempt {os.environ['TORCHELASTIC_RESTART_COUNT']} ready", flush=True)
time.sleep(600)
"""


# Every rank all-reduces in a loop, as training does: when a node vanishes, the others' ranks
# fail in their next collective (gloo sees its peer's connection close).
TRAIN_IN_STEP = """
import os, time
import torch, torch.distributed as dist
dist.init_process_group("gloo")
value = torch.ones(1)
dist.all_reduce(value)
print(f"rank {os.environ['RANK']} in step", flush=True)
while True:
    dist.all_reduce(value)
    time.sleep(0.02)
"""


def node_args(nnodes: int, port: int, *extra: str) -> list[str]:
    return ["--nnodes", str(nnodes), "--master-addr", "127.0.0.1", "--master-port", str(port), *extra]


def test_two_nodes_train_together_with_torchrun_env(start, tmp_path: Path, token: str) -> None:
    # Cold: static nodes' gloo job on the default path.
    script = write_script(tmp_path / "dump.py", ENV_DUMP)
    port = pick_free_port()
    nodes = [
        start(*node_args(2, port, "--node-rank", str(rank), "--nproc", "2"), script, str(tmp_path))
        for rank in (1, 0)  # node 1 first: it must wait for node 0's store, not fail
    ]
    for node in nodes:
        assert node.wait(timeout=120) == 0, node.err
    envs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    assert [e["SUM"] for e in envs] == ["6.0"] * 4  # 0+1+2+3 across both nodes
    assert [e["NODE_RANK"] for e in envs] == ["0", "0", "1", "1"]
    assert [e["GROUP_RANK"] for e in envs] == ["0", "0", "1", "1"]
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1", "0", "1"]
    for env in envs:
        assert env["WORLD_SIZE"] == "4" and env["LOCAL_WORLD_SIZE"] == "2" and env["GROUP_WORLD_SIZE"] == "2"
        assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] == str(port)
        assert env["TORCHELASTIC_USE_AGENT_STORE"] == "True"
    assert len({e["TORCHELASTIC_RUN_ID"] for e in envs}) == 1  # node 1 adopts node 0's run id
    assert "all 2 nodes joined" in nodes[0].err and "all 2 nodes joined" in nodes[1].err
    assert processes_with_token(token) == []


def test_without_node_rank_nodes_rank_in_order_of_arrival(start, tmp_path: Path, token: str) -> None:
    """Ranks without torch: that the ranks of both nodes form one gloo job is the test above's."""
    script = write_script(tmp_path / "dump.py", PLAIN_ENV_DUMP)
    port = pick_free_port()
    nodes = [start(*node_args(2, port, "--nproc", "1"), script, str(tmp_path)) for _ in range(2)]
    for node in nodes:
        assert node.wait(timeout=120) == 0, node.err
    envs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [e["NODE_RANK"] for e in envs] == ["0", "1"]  # rank r's file: one rank per node, each its own
    assert {(e["WORLD_SIZE"], e["GROUP_WORLD_SIZE"]) for e in envs} == {("2", "2")}
    assert len({(e["TORCHELASTIC_RUN_ID"], e["MASTER_PORT"]) for e in envs}) == 1  # one job
    assert processes_with_token(token) == []


def test_a_failure_on_one_node_stops_the_other_within_two_seconds(
    start, tmp_path: Path, token: str, job_env: dict[str, str]
) -> None:
    script = write_script(tmp_path / "fail.py", FAIL_OR_SLEEP)
    stamp = tmp_path / "failed-at"
    env = dict(job_env, FAIL_RANK="3")
    port = pick_free_port()
    # Warm: the cold test of a failure stopping every node is test_ssh_launch.py's
    # test_a_remote_worker_failing_stops_every_host_and_the_report_names_it.
    nodes = [
        start(*node_args(2, port, "--node-rank", str(rank), "--nproc", "2", "--warm"), script, str(stamp), env=env)
        for rank in (0, 1)
    ]
    for node in nodes:
        node.wait_lines("attempt 0 ready", 2, timeout=120)
    codes = [node.wait(timeout=30) for node in nodes]
    assert codes == [7, 7], nodes[0].err + nodes[1].err  # the root cause's code on every node
    failed_at = float(stamp.read_text())
    for rank in (0, 1):  # node 0's workers, told by node 0's agent
        assert float(Path(f"{stamp}.stopped-rank{rank}").read_text()) - failed_at < 2.0
    assert "stopping this node's workers: node 1" in nodes[0].err
    assert "root cause on another node: node 1" in nodes[0].err
    assert "Root cause (first observed failure): rank 3" in nodes[1].err
    wait_until(lambda: not processes_with_token(token), 10, "no process of the job left")


def test_restarts_run_again_on_every_node(start, tmp_path: Path, token: str, job_env: dict[str, str]) -> None:
    script = write_script(tmp_path / "fail.py", FAIL_OR_SLEEP)
    env = dict(job_env, FAIL_RANK="2", FAIL_ATTEMPTS="0")
    port = pick_free_port()
    # Warm: the cold test of restarts across nodes is test_ssh_launch.py's
    # test_restarts_run_again_on_every_host.
    nodes = [
        start(*node_args(2, port, "--node-rank", str(rank), "--nproc", "2", "--max-restarts", "1", "--warm"),
              script, str(tmp_path / "failed-at"), env=env)
        for rank in (0, 1)
    ]
    for node in nodes:
        assert node.wait(timeout=120) == 0, node.err
        assert "restarting all workers (restart 1 of 1)" in node.err
    assert sorted(line.split(" | ")[1] for n in nodes for line in n.seen["out"] if "attempt 1" in line) == [
        f"rank {r} attempt 1 ready" for r in range(4)
    ]
    assert processes_with_token(token) == []


def test_ctrl_c_on_one_node_stops_both(start, tmp_path: Path, token: str, job_env: dict[str, str]) -> None:
    script = write_script(tmp_path / "sleep.py", SLEEP_READY)
    port = pick_free_port()
    nodes = [
        start(*node_args(2, port, "--node-rank", str(rank), "--nproc", "1"), script)
        for rank in (0, 1)
    ]
    for node in nodes:
        node.wait_line("attempt 0 ready", timeout=120)
    nodes[1].signal(signal.SIGINT)
    assert [node.wait(timeout=30) for node in nodes] == [130, 130]
    assert "node 1" in nodes[0].err and "SIGINT" in nodes[0].err
    wait_until(lambda: not processes_with_token(token), 10, "no process of the job left")


def test_a_node_that_never_comes_is_named_after_the_join_timeout(start, tmp_path: Path, token: str) -> None:
    script = write_script(tmp_path / "dump.py", ENV_DUMP)
    port = pick_free_port()
    node = start(*node_args(3, port, "--node-rank", "0", "--join-timeout", "2"), script, str(tmp_path))
    assert node.wait(timeout=60) == 1
    assert "node rank(s) 1, 2 never joined" in node.err and "--join-timeout 2s" in node.err
    assert "Traceback" not in node.err
    assert processes_with_token(token) == []


def test_node_one_without_node_zero_says_where_it_looked(start, tmp_path: Path, token: str) -> None:
    script = write_script(tmp_path / "dump.py", ENV_DUMP)
    port = pick_free_port()
    node = start(*node_args(2, port, "--node-rank", "1", "--join-timeout", "1.5"), script, str(tmp_path))
    assert node.wait(timeout=60) == 1
    assert f"could not reach node 0's rendezvous at 127.0.0.1:{port}" in node.err
    assert "Traceback" not in node.err


def test_nodes_that_disagree_about_the_job_both_stop_with_the_reason(start, tmp_path: Path, token: str) -> None:
    script = write_script(tmp_path / "dump.py", ENV_DUMP)
    port = pick_free_port()
    nodes = [
        start(*node_args(2, port, "--node-rank", str(rank), "--nproc", str(rank + 1), "--join-timeout", "60"),
              script, str(tmp_path))
        for rank in (0, 1)
    ]
    codes = [node.wait(timeout=60) for node in nodes]
    assert codes == [1, 1]
    assert "this node has --nproc 2 but node 0 has --nproc 1" in nodes[1].err
    assert "node 1" in nodes[0].err and "--nproc" in nodes[0].err
    assert processes_with_token(token) == []


def test_two_nodes_claiming_one_rank_are_told(start, tmp_path: Path, token: str) -> None:
    script = write_script(tmp_path / "dump.py", ENV_DUMP)
    port = pick_free_port()
    nodes = [
        start(*node_args(3, port, "--node-rank", rank, "--join-timeout", "60"), script, str(tmp_path))
        for rank in ("0", "1", "1")
    ]
    codes = [node.wait(timeout=60) for node in nodes]
    assert codes == [1, 1, 1]
    assert any("node rank 1 was already taken" in node.err for node in nodes)
    assert processes_with_token(token) == []


@pytest.mark.parametrize("killed", [1, 0])
def test_a_node_whose_launcher_is_killed_is_the_root_cause_on_the_other(
    start, tmp_path: Path, token: str, killed: int
) -> None:
    """Training in step: the survivor's rank fails too when its peer vanishes, yet the report
    names the dead node, and the survivor exits at once (no wait for a node known dead)."""
    script = write_script(tmp_path / "train.py", TRAIN_IN_STEP)
    port = pick_free_port()
    nodes = [start(*node_args(2, port, "--node-rank", str(rank), "--nproc", "1"), script) for rank in (0, 1)]
    for node in nodes:
        node.wait_line("in step", timeout=120)
    survivor = nodes[1 - killed]
    killed_at = time.monotonic()
    nodes[killed].signal(signal.SIGKILL)  # its guard stops its worker; no word from its launcher
    assert survivor.wait(timeout=30) == 1, survivor.err
    took = time.monotonic() - killed_at
    host = os.uname().nodename
    assert f"node {killed} ({host}) went silent: its launcher is gone or unreachable" in survivor.err
    assert f"Root cause (first observed failure): node {killed} ({host})" in survivor.err
    assert "Root cause (first observed failure): rank" not in survivor.err  # not its own rank
    assert took < 5.0, f"{took:.1f}s from the kill to the survivor's exit\n{survivor.err}"
    wait_until(lambda: not processes_with_token(token), 10, "no process of the job left")



def test_node_zero_tells_every_other_node_which_launcher_died(start, tmp_path: Path, token: str) -> None:
    """Only node 0 holds a line to node 1's launcher; node 2 learns through the store, and
    names the same root cause. The ranks only sleep: only the launchers tell."""
    script = write_script(tmp_path / "sleep.py", SLEEP_READY)
    port = pick_free_port()
    nodes = [
        start(*node_args(3, port, "--node-rank", str(rank), "--nproc", "1"), script)
        for rank in (0, 1, 2)
    ]
    for node in nodes:
        node.wait_line("attempt 0 ready", timeout=120)
    killed_at = time.monotonic()
    nodes[1].signal(signal.SIGKILL)
    assert [nodes[rank].wait(timeout=30) for rank in (0, 2)] == [1, 1], nodes[0].err + nodes[2].err
    assert time.monotonic() - killed_at < 5.0
    named = f"node 1 ({os.uname().nodename}) went silent: its launcher is gone or unreachable (its connection to node 0 closed)"
    assert named in nodes[0].err and named in nodes[2].err
    assert "Root cause (first observed failure): node 1" in nodes[2].err
    wait_until(lambda: not processes_with_token(token), 10, "no process of the job left")

# -- a cut: packets dropped, nothing closed ------------------------------------------------------

CUT_ADDR = "127.0.7.2"  # this test's own loopback address: node 0's store and lifeline are reached there


def launcher_links(pid: int, addr: str) -> list[tuple[int, int]]:
    """(local port, remote port) of every TCP connection process `pid` holds to `addr`."""
    listing = subprocess.run(["ss", "-tnpH", "state", "established"], capture_output=True, text=True, check=True)
    links = []
    for line in listing.stdout.splitlines():
        fields = line.split()
        if f"pid={pid}," not in line or len(fields) < 4:
            continue
        local, remote = fields[-3], fields[-2]
        if remote.rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:") == addr:
            links.append((int(local.rsplit(":", 1)[1]), int(remote.rsplit(":", 1)[1])))
    return links


@pytest.fixture
def drop_packets() -> Iterator[Callable[[str, list[tuple[int, int]]], None]]:
    """Drops both directions of the given connections to `addr` (an address of this test's
    own), as a cut network does: nothing is closed. Every rule is removed afterwards."""
    if os.geteuid() != 0 and not os.environ.get("CI"):  # CI runs as root: never skipped there
        pytest.skip("dropping packets with iptables needs root")
    rules: list[list[str]] = []

    def drop(addr: str, links: list[tuple[int, int]]) -> None:
        for local, remote in links:
            for rule in (
                ["OUTPUT", "-p", "tcp", "-d", addr, "--sport", str(local), "--dport", str(remote), "-j", "DROP"],
                ["OUTPUT", "-p", "tcp", "-s", addr, "--sport", str(remote), "--dport", str(local), "-j", "DROP"],
            ):
                subprocess.run(["iptables", "-w", "-I", *rule], check=True)
                rules.append(rule)

    try:
        yield drop
    finally:
        for rule in rules:
            subprocess.run(["iptables", "-w", "-D", *rule], check=False)


def test_a_node_cut_off_is_named_silent_on_both_sides_after_the_heartbeat_timeout(
    start, tmp_path: Path, token: str, drop_packets: Callable[[str, list[tuple[int, int]]], None]
) -> None:
    """Node 1's launcher is cut from node 0's (its store and lifeline connections drop every
    packet); the workers hold no link of their own and only sleep, so only the launchers'
    heartbeats can tell. Each side names the other after 3 s of silence."""
    script = write_script(tmp_path / "sleep.py", SLEEP_READY)
    port = pick_free_port()
    args = ["--nnodes", "2", "--master-addr", CUT_ADDR, "--master-port", str(port), "--nproc", "1",
            "--heartbeat-timeout", "3"]
    nodes = [start(*args, "--node-rank", str(rank), script) for rank in (0, 1)]
    for node in nodes:
        node.wait_line("attempt 0 ready", timeout=120)
    links = launcher_links(nodes[1].proc.pid, CUT_ADDR)
    assert len(links) >= 2, links  # its store client(s) and its lifeline
    drop_packets(CUT_ADDR, links)
    cut_at = time.monotonic()
    assert [node.wait(timeout=30) for node in nodes] == [1, 1], nodes[0].err + nodes[1].err
    took = time.monotonic() - cut_at
    host = os.uname().nodename
    for node, other in ((nodes[0], 1), (nodes[1], 0)):
        assert f"Root cause (first observed failure): node {other} ({host})" in node.err
        assert f"node {other} ({host}) went silent: its launcher is gone or unreachable" in node.err
        assert f"node {1 - other} heard nothing from it for 3s, --heartbeat-timeout" in node.err
    assert 2.0 < took < 8.0, f"{took:.1f}s from the cut to both exits"  # last beat up to 0.75 s before it
    wait_until(lambda: not processes_with_token(token), 10, "no process of the job left")
