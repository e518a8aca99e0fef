"""--warm across nodes: every node's launcher (a static node's, or an SSH head's agent) forks its
ranks from its own warm interpreter, and they train together."""

from __future__ import annotations

import json
from pathlib import Path

from helpers_cli import TOKEN_VARIABLE, processes_with_token, wait_until, write_script
from sshd import SshdPool, SshHome

from ddplaunch.ports import pick_free_port
from ddplaunch.ship import CACHE_VARIABLE

# The first line tells whether torch was there before the script imported it.
WARM_FACTS = """
import sys
warm = "torch" in sys.modules
import json, os
import torch, torch.distributed as dist
dist.init_process_group("gloo")
total = torch.ones(1)
dist.all_reduce(total)
parent = " ".join(open(f"/proc/{os.getppid()}/cmdline").read().split("\\0"))
facts = {"warm": warm, "sum": total.item(), "parent": parent, "ppid": os.getppid()}
with open(os.path.join(sys.argv[1], f"warm-{os.environ['RANK']}.json"), "w") as out:
    json.dump(facts, out)
"""


def facts_of(folder: Path, ranks: int) -> list[dict[str, object]]:
    return [json.loads((folder / f"warm-{rank}.json").read_text()) for rank in range(ranks)]


def test_static_nodes_each_fork_their_ranks_warm(start, tmp_path: Path, token: str) -> None:
    script = write_script(tmp_path / "facts.py", WARM_FACTS)
    port = str(pick_free_port())
    nodes = [start("--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", port,
                   "--nproc", "1", "--warm", script, str(tmp_path)) for rank in (0, 1)]
    for node in nodes:
        assert node.wait(timeout=120) == 0, node.err
        assert "--warm: torch imported once in " in node.err and "starting the workers cold" not in node.err
    facts = facts_of(tmp_path, 2)
    assert [f["warm"] for f in facts] == [True, True] and [f["sum"] for f in facts] == [2.0, 2.0]
    assert [f["ppid"] for f in facts] == [node.proc.pid for node in nodes]  # each node's launcher reaps its own
    assert processes_with_token(token) == []


def test_over_ssh_each_hosts_agent_forks_its_ranks_warm(
    start, ssh_home: SshHome, job_env: dict[str, str], tmp_path: Path, token: str, sshd_pool: SshdPool
) -> None:
    script = write_script(tmp_path / "facts.py", WARM_FACTS)
    env = ssh_home.env({**job_env, CACHE_VARIABLE: str(tmp_path / "cache")})
    run = start("--env", f"{TOKEN_VARIABLE}={token}", "--run-id", token, "--hosts", "host1,host2", "--nproc", "1",
                "--warm", script, str(tmp_path), env=env)
    assert run.wait(timeout=120) == 0, run.err
    assert run.err.count("--warm: torch imported once in ") == 2, run.err  # one per host's agent
    facts = facts_of(tmp_path, 2)
    assert [f["warm"] for f in facts] == [True, True] and [f["sum"] for f in facts] == [2.0, 2.0]
    assert all(" --agent " in str(f["parent"]) for f in facts), facts  # the agent reaps its ranks
    wait_until(lambda: not processes_with_token(token, in_command_line=True), 15, "nothing of the job left")
    wait_until(lambda: not sshd_pool.session_processes(), 15, "no SSH session left")
