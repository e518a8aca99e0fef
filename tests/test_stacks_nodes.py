"""Every rank's stack across nodes: one report of the whole job, over SSH and between static nodes.

Real sshd hosts on 127.0.1.x (as in test_ssh_launch) and real static nodes on this machine
(as in test_static_nodes), running a real gloo job that hangs: ranks 0-2 block in
all_reduce while rank 3 waits elsewhere. SIGQUIT, or a stall, must show both places, and
every host; the job goes on, unless --stall-action stop ends it (exit 124 everywhere).

All cold but --stall-action stop between static nodes, which runs --warm (each node's launcher
imports torch once and forks its two ranks): its subject is node 0 telling node 1 that the job
stalled; --stall-action stop over SSH is its cold twin. The SSH stall test stays cold: with
--warm the head's stall timer runs while each host's zygote imports torch, before any rank
can print, and it reports a stall at start-up.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest

from helpers_cli import TOKEN_VARIABLE, Run, processes_with_token, wait_until, write_script
from ddplaunch.ports import pick_free_port
from sshd import SshdPool, SshHome

# A line every 0.2 s from a thread until the rank is in place, so that no stall is seen while
# torch loads (seconds, on a 2-core machine); then silence.
HANG = """
import os, threading, time

in_place = threading.Event()

def tick():
    while not in_place.wait(0.2):
        print("starting", flush=True)

threading.Thread(target=tick, daemon=True).start()
import torch, torch.distributed as dist

def wait_elsewhere():
    in_place.set()
    print("rank 3 waits elsewhere", flush=True)
    time.sleep(600)

def reduce_forever():
    in_place.set()
    print(f"rank {dist.get_rank()} in all_reduce", flush=True)
    dist.all_reduce(torch.ones(1))

dist.init_process_group("gloo")
dist.barrier()
if dist.get_rank() == 3:
    wait_elsewhere()
else:
    reduce_forever()
"""
TITLE = "Where the ranks are:"
IN_PLACE = ("in all_reduce", "waits elsewhere")


def wait_in_place(run: Run, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    seen = 0
    while seen < 4:
        line = run.wait_line("", max(0.1, deadline - time.monotonic()))
        seen += any(needle in line for needle in IN_PLACE)


def read_report(run: Run, timeout: float) -> str:
    """The next report on the launcher's stderr: from its title to its closing rule."""
    lines = [run.wait_line(TITLE, timeout, stream="err")]
    while not re.fullmatch(r"━+", lines[-1].strip()):
        lines.append(run.wait_line("", 5.0, stream="err"))
    return "\n".join(lines)


def grouped_report(run: Run, first: str, tries: int = 5) -> str:
    """`first`, or the next report asked with SIGQUIT until one groups ranks 0-2: the line
    "in all_reduce" comes just before the call, so at the first report a rank may still be on
    its way into the collective, at another line of it."""
    report = first
    for _ in range(tries):
        if "ranks 0-2" in report:
            break
        run.signal(signal.SIGQUIT)
        report = read_report(run, 10.0)
    return report


def assert_names_both_places(report: str, hosts: set[str]) -> None:
    """Ranks 0-2 grouped in all_reduce, rank 3 apart (the smaller group first), every host."""
    assert "4 ranks on" in report and "no answer in time" not in report, report
    elsewhere, reduce = report.index("wait_elsewhere"), report.index("reduce_forever")
    assert elsewhere < reduce, report
    assert re.search(r"\brank 3\b", report[:reduce]) and "ranks 0-2" in report[elsewhere:], report
    for host in hosts:
        assert host in report, report


def workers_alive(token: str, script: str) -> int:
    """The job's workers still running (the launchers carry the token too)."""
    return sum(script in p.cmdline() and "ddplaunch" not in p.cmdline() for p in processes_with_token(token))


# -- over SSH ------------------------------------------------------------------------------------


def nothing_left(token: str, pool: SshdPool) -> None:
    wait_until(lambda: not processes_with_token(token, in_command_line=True), 15, "no worker or agent of the job left")
    wait_until(lambda: not pool.session_processes(), 15, "no SSH session left on any host")


@pytest.fixture
def launch(start, ssh_home: SshHome, job_env: dict[str, str], token: str):
    def _launch(*args: str) -> Run:
        return start("--env", f"{TOKEN_VARIABLE}={token}", "--run-id", token, *args, env=ssh_home.env(job_env))

    return _launch


def test_sigquit_at_the_head_shows_every_hosts_ranks_in_one_report_and_the_job_goes_on(
    launch, tmp_path: Path, token: str, sshd_pool: SshdPool
) -> None:
    script = write_script(tmp_path / "hang.py", HANG)
    logs = tmp_path / "logs"
    run = launch("--hosts", "host1,host2", "--nproc", "2", "--grace", "1", "--log-dir", str(logs), script)
    ready = run.wait_line("all 2 hosts ready", 60, stream="err")
    assert f"every rank's stack: Ctrl-\\ or kill -QUIT {run.proc.pid}" in ready
    wait_in_place(run)
    asked = time.monotonic()
    run.signal(signal.SIGQUIT)
    report = read_report(run, 10.0)
    took = time.monotonic() - asked
    print(f"SIGQUIT to a printed report, 2 SSH hosts x 2 ranks: {took:.2f} s\n{report}")
    report = grouped_report(run, report)
    assert_names_both_places(report, {"host1", "host2"})
    assert took < 2.0 + 1.0  # the answers came well before the head's 2 s wait ended (then + margin)
    details = Path(report.split("full stacks, every thread of every process: ")[1].split()[0])
    assert details.parent == logs / "stacks" and "reduce_forever" in details.read_text()
    # The agents run from the zip the head shipped, and their workers still ran the bootstrap.
    assert "stacks from py-spy" not in details.read_text() and "stacks from faulthandler" in details.read_text()
    assert workers_alive(token, script) == 4  # the job goes on
    run.signal(signal.SIGINT)
    assert run.wait(timeout=30) == 130
    nothing_left(token, sshd_pool)


def test_a_stall_over_ssh_is_reported_job_wide_and_the_job_goes_on(
    launch, tmp_path: Path, token: str, sshd_pool: SshdPool
) -> None:
    script = write_script(tmp_path / "hang.py", HANG)
    run = launch("--hosts", "host1,host2", "--nproc", "2", "--grace", "1", "--stall-timeout", "2", script)
    wait_in_place(run)
    report = read_report(run, 10.0)
    assert "no rank wrote a line for 2 s" in report and "two snapshots per rank" in report
    assert "stuck" in report
    assert_names_both_places(report, {"host1", "host2"})
    assert workers_alive(token, script) == 4
    run.signal(signal.SIGINT)
    assert run.wait(timeout=30) == 130
    nothing_left(token, sshd_pool)


def test_stall_action_stop_over_ssh_ends_every_host_with_124(
    launch, tmp_path: Path, token: str, sshd_pool: SshdPool
) -> None:
    script = write_script(tmp_path / "hang.py", HANG)
    run = launch("--hosts", "host1,host2", "--nproc", "2", "--grace", "1", "--stall-timeout", "2",
                 "--stall-action", "stop", script)
    wait_in_place(run)
    assert_names_both_places(read_report(run, 10.0), {"host1", "host2"})
    assert run.wait(timeout=30) == 124, run.err
    assert "root cause: the job stalled (no rank wrote a line for 2 s" in run.err
    assert "restarting" not in run.err
    nothing_left(token, sshd_pool)


def test_sigquit_listed_in_signals_to_handle_stops_every_host_as_under_torchrun(
    launch, tmp_path: Path, token: str, sshd_pool: SshdPool
) -> None:
    script = write_script(tmp_path / "sleeper.py", "import time\nprint('up', flush=True)\ntime.sleep(600)\n")
    run = launch("--hosts", "host1,host2", "--nproc", "1", "--signals-to-handle", "SIGTERM,SIGINT,SIGQUIT", script)
    assert "every rank's stack" not in run.wait_line("all 2 hosts ready", 60, stream="err")
    run.wait_lines("| up", 2, timeout=60)
    run.signal(signal.SIGQUIT)
    assert run.wait(timeout=30) == 128 + signal.SIGQUIT
    assert "got SIGQUIT: stopping the workers on every host" in run.err and TITLE not in run.err
    nothing_left(token, sshd_pool)


# -- static nodes --------------------------------------------------------------------------------


def start_nodes(
    start, script: str, node0: tuple[str, ...] = (), node1: tuple[str, ...] = (), both: tuple[str, ...] = ()
) -> list[Run]:
    """Node 0 and node 1 of one job, each with its own extra flags and `both`."""
    port = pick_free_port()
    return [
        start("--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
              "--nproc", "2", "--grace", "1", *both, *extra, script)
        for rank, extra in ((0, node0), (1, node1))
    ]


def test_sigquit_on_a_static_node_shows_every_nodes_ranks_there(start, tmp_path: Path, token: str) -> None:
    script = write_script(tmp_path / "hang.py", HANG)
    nodes = start_nodes(start, script)
    for node in nodes:
        wait_until(lambda node=node: sum(any(n in l for n in IN_PLACE) for l in node.seen["out"]) == 2, 90,
                   "both of the node's ranks in place")
    nodes[1].signal(signal.SIGQUIT)
    report = grouped_report(nodes[1], read_report(nodes[1], 10.0))
    assert_names_both_places(report, set())
    assert TITLE not in nodes[0].err  # node 0 answered; the report is the asking node's
    assert workers_alive(token, script) == 4
    nodes[1].signal(signal.SIGINT)
    assert [node.wait(timeout=30) for node in nodes] == [130, 130]
    wait_until(lambda: not processes_with_token(token), 10, "no process of the job left")


def test_stall_action_stop_on_a_static_node_ends_both_with_124(start, tmp_path: Path, token: str) -> None:
    """Only node 0 watches for a stall here: node 1 stops because node 0 says the job stalled."""
    script = write_script(tmp_path / "hang.py", HANG)
    nodes = start_nodes(start, script, ("--stall-timeout", "2", "--stall-action", "stop"), ("--stall-timeout", "0"),
                        both=("--warm",))
    codes = [node.wait(timeout=90) for node in nodes]
    assert codes == [124, 124], nodes[0].err + nodes[1].err
    assert_names_both_places(nodes[0].err[nodes[0].err.index(TITLE):], set())
    assert TITLE not in nodes[1].err
    assert "root cause on another node: node 0" in nodes[1].err and "the job stalled" in nodes[1].err
    wait_until(lambda: not processes_with_token(token), 10, "no process of the job left")
