"""Static multi-node: two real ddplaunch processes on this machine as node 0 and node 1.

They meet at node 0's TCPStore, run real gloo collectives across "nodes", and a failure or a
Ctrl-C on one node stops the other at once. Every test ends with no process of the job left.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

from helpers_cli import processes_with_token, wait_until, write_script
from launcher.ports import pick_free_port

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


def node_args(nnodes: int, port: int, *extra: str) -> list[str]:
    return ["--nnodes", str(nnodes), "--master-addr", "127.0.0.1", "--master-port", str(port), *extra]


def test_two_nodes_train_together_with_torchrun_env(start, tmp_path: Path, token: str) -> None:
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
    script = write_script(tmp_path / "dump.py", ENV_DUMP)
    port = pick_free_port()
    nodes = [start(*node_args(2, port, "--nproc", "1"), script, str(tmp_path)) for _ in range(2)]
    for node in nodes:
        assert node.wait(timeout=120) == 0, node.err
    envs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert sorted(e["NODE_RANK"] for e in envs) == ["0", "1"]
    assert {e["SUM"] for e in envs} == {"1.0"}
    assert processes_with_token(token) == []


def test_a_failure_on_one_node_stops_the_other_within_two_seconds(
    start, tmp_path: Path, token: str, job_env: dict[str, str]
) -> None:
    script = write_script(tmp_path / "fail.py", FAIL_OR_SLEEP)
    stamp = tmp_path / "failed-at"
    env = dict(job_env, FAIL_RANK="3")
    port = pick_free_port()
    nodes = [
        start(*node_args(2, port, "--node-rank", str(rank), "--nproc", "2"), script, str(stamp), env=env)
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
    nodes = [
        start(*node_args(2, port, "--node-rank", str(rank), "--nproc", "2", "--max-restarts", "1"),
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
    script = write_script(tmp_path / "sleep.py", FAIL_OR_SLEEP)
    port = pick_free_port()
    nodes = [
        start(*node_args(2, port, "--node-rank", str(rank), "--nproc", "1"), script, str(tmp_path / "x"))
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


def test_a_node_whose_launcher_is_killed_is_named_and_the_others_stop(
    start, tmp_path: Path, token: str, job_env: dict[str, str]
) -> None:
    script = write_script(tmp_path / "sleep.py", FAIL_OR_SLEEP)
    env = job_env
    port = pick_free_port()
    nodes = [
        start(*node_args(2, port, "--node-rank", str(rank), "--nproc", "1"), script, str(tmp_path / "x"), env=env)
        for rank in (0, 1)
    ]
    for node in nodes:
        node.wait_line("attempt 0 ready", timeout=120)
    nodes[1].signal(signal.SIGKILL)  # its guard stops its worker; node 0's worker sleeps on
    assert nodes[0].wait(timeout=30) == 1
    assert "node 1 (" in nodes[0].err and "stopped answering for 2s" in nodes[0].err
    wait_until(lambda: not processes_with_token(token), 10, "no process of the job left")
