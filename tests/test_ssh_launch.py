"""`ddplaunch --hosts ...`: real sshd servers on 127.0.1.x, real agents, real gloo training.

Every "host" is this machine, so after each test psutil can check that no process of the
job is left anywhere: not a worker, not an agent, not an SSH session.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import psutil
import pytest

from helpers_cli import (
    REPO,
    TOKEN_VARIABLE,
    Run,
    kill_token,
    launcher_argv,
    processes_with_token,
    wait_until,
    without_warm_interpreters,
    write_script,
)
from helpers_screen import Terminal, run_on_terminal
from sshd import SshdPool, SshHome

ENV_DUMP = """
import json, os, sys
import torch, torch.distributed as dist
dist.init_process_group("gloo")
value = torch.tensor([float(dist.get_rank())])
dist.all_reduce(value)
with open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump({"env": dict(os.environ), "sum": value.item(), "argv": sys.argv[2:], "cwd": os.getcwd()}, f)
dist.barrier()
dist.destroy_process_group()
"""

# ENV_DUMP's record without torch or a collective: for the tests whose subject is what reaches
# a rank (its arguments, its environment) or whether it runs at all, not the job torch sees.
PLAIN_DUMP = """
import json, os, sys
with open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump({"env": dict(os.environ), "argv": sys.argv[2:], "cwd": os.getcwd()}, f)
"""

SLEEPER = """
import os, sys, time
print(f"up {os.environ['RANK']}", flush=True)
if os.environ["RANK"] == os.environ.get("FAIL_RANK"):
    print("about to fail", flush=True)
    sys.exit(7)
time.sleep(600)
"""


def nothing_left(token: str, pool: SshdPool) -> None:
    # Workers carry the token in their environment, the head and the agents in their command line (--run-id).
    wait_until(lambda: not processes_with_token(token, in_command_line=True), 15, "no worker or agent of the job left")
    wait_until(lambda: not pool.session_processes(), 15, "no SSH session left on any host")


@pytest.fixture
def launch(start, ssh_home: SshHome, job_env: dict[str, str], token: str, sshd_pool: SshdPool):
    """launch(*args): ddplaunch with the test HOME; workers get the token through --env.

    The token fixture kills what is left, head and agents included: they name the token in
    their command line as --run-id (an --env value never reaches an agent's command line).
    """

    def _launch(*args: str, env: dict[str, str] | None = None, input: bytes | None = None) -> Run:
        marks = ("--env", f"{TOKEN_VARIABLE}={token}", "--run-id", token)
        return start(*marks, *args, env=ssh_home.env(env or job_env), input=input)

    return _launch


def test_two_hosts_train_ddp_and_replicas_end_identical(launch, token: str, sshd_pool: SshdPool) -> None:
    run = launch("--hosts", "host1,host2", "--nproc", "2", str(REPO / "examples" / "train_ddp.py"), "--epochs", "2")
    assert run.wait(timeout=180) == 0, run.err
    assert "replicas identical on all 4 ranks" in run.out
    assert "epoch 2/2" in run.out
    nothing_left(token, sshd_pool)


def test_every_rank_on_every_host_gets_the_torchrun_environment(
    launch, tmp_path: Path, token: str, job_env: dict[str, str], sshd_pool: SshdPool
) -> None:
    script = write_script(tmp_path / "dump.py", ENV_DUMP)
    env = dict(job_env, NCCL_DEBUG="INFO", TORCH_SHOW_CPP_STACKTRACES="1", UNRELATED_SECRET="stays-home")
    run = launch("--hosts", "host1,host2", "--nproc", "2", "--env", "EXTRA=yes", script, str(tmp_path), env=env)
    assert run.wait(timeout=120) == 0, run.err
    dumps = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    envs = [d["env"] for d in dumps]
    assert [d["sum"] for d in dumps] == [6.0] * 4
    assert [e["NODE_RANK"] for e in envs] == ["0", "0", "1", "1"]
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1", "0", "1"]
    assert [e["SSH_CONNECTION"].split()[2] for e in envs] == ["127.0.1.2"] * 2 + ["127.0.1.3"] * 2
    for env_seen in envs:
        assert env_seen["WORLD_SIZE"] == "4" and env_seen["GROUP_WORLD_SIZE"] == "2"
        assert env_seen["MASTER_ADDR"] == "127.0.1.2"  # host1 as the head reached it
        assert env_seen["TORCHELASTIC_USE_AGENT_STORE"] == "False"  # rank 0 hosts it, as with env://
        assert env_seen["NCCL_DEBUG"] == "INFO" and env_seen["TORCH_SHOW_CPP_STACKTRACES"] == "1"
        assert env_seen["EXTRA"] == "yes"
        assert "UNRELATED_SECRET" not in env_seen
    assert len({e["TORCHELASTIC_RUN_ID"] for e in envs}) == 1
    assert len({e["MASTER_PORT"] for e in envs}) == 1
    assert {d["cwd"] for d in dumps} == {str(tmp_path)}
    nothing_left(token, sshd_pool)


HOSTILE_ARGS = [
    "two words",
    "it's",
    '"double"',
    "$(touch {marker})",
    "`touch {marker}`",
    "; touch {marker}",
    "a\\b",
    "ünïcødé 🚀",
    "--flag=x y",
    "",
    "*",
    "line\nbreak",
]


def test_hostile_arguments_and_env_values_arrive_byte_exact(
    launch, tmp_path: Path, token: str, sshd_pool: SshdPool
) -> None:
    script = write_script(tmp_path / "dump.py", PLAIN_DUMP)
    marker = tmp_path / "pwned"
    args = [a.format(marker=marker) for a in HOSTILE_ARGS]
    hostile_env = f"$(touch {marker}); 'q' \"dq\" `x` ünï \\ *"
    run = launch("--hosts", "host1,host2", "--nproc", "1", "--env", f"HOSTILE={hostile_env}",
                 script, str(tmp_path), *args)
    assert run.wait(timeout=120) == 0, run.err
    for rank in (0, 1):
        dump = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert dump["argv"] == args
        assert dump["env"]["HOSTILE"] == hostile_env
    assert not marker.exists()
    nothing_left(token, sshd_pool)


def test_unknown_host_key_is_refused_then_accepted_with_the_flag(
    launch, tmp_path: Path, ssh_home: SshHome, token: str, sshd_pool: SshdPool
) -> None:
    script = write_script(tmp_path / "dump.py", PLAIN_DUMP)
    ssh_home.write_known_hosts(omit=["host2"])
    run = launch("--hosts", "host1,host2", script, str(tmp_path))
    assert run.wait(timeout=60) == 2
    assert "host2" in run.err and "--ssh-accept-new-host-keys" in run.err and "Traceback" not in run.err
    assert not list(tmp_path.glob("rank*.json"))
    nothing_left(token, sshd_pool)
    run = launch("--hosts", "host1,host2", "--ssh-accept-new-host-keys", script, str(tmp_path))
    assert run.wait(timeout=120) == 0, run.err
    assert "host2 (root@127.0.1.3:" in run.err and "): permanently added its ED25519 key SHA256:" in run.err
    assert "host1 (" not in run.err
    assert ssh_home.known_hosts.read_text().count("\n") == len(sshd_pool.servers)  # hashed, one more line
    nothing_left(token, sshd_pool)


def test_unreachable_host_is_named_and_nothing_starts(launch, tmp_path: Path, token: str, sshd_pool: SshdPool) -> None:
    script = write_script(tmp_path / "dump.py", ENV_DUMP)
    run = launch("--hosts", "host1,127.0.1.250", script, str(tmp_path))
    assert run.wait(timeout=60) == 2
    assert "127.0.1.250" in run.err and "connection refused" in run.err and "Traceback" not in run.err
    assert not list(tmp_path.glob("rank*.json"))
    nothing_left(token, sshd_pool)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--chdir", "/no/such/dir"], "host2: working directory /no/such/dir does not exist there"),
        (["--python", "/no/such/python"], "host2: no Python at /no/such/python"),
        (["--python", "/bin/true"], "host2: the agent exited"),
    ],
)
def test_a_host_that_cannot_run_the_job_is_named_before_anything_starts(
    launch, tmp_path: Path, token: str, sshd_pool: SshdPool, args: list[str], needle: str
) -> None:
    script = write_script(tmp_path / "dump.py", ENV_DUMP)
    run = launch("--hosts", "host1,host2", *args, script, str(tmp_path))
    assert run.wait(timeout=60) == 2, run.err
    assert needle in run.err and "nothing was started" in run.err and "Traceback" not in run.err
    assert not list(tmp_path.glob("rank*.json"))
    nothing_left(token, sshd_pool)


def test_missing_script_is_named_per_host(launch, tmp_path: Path, token: str, sshd_pool: SshdPool) -> None:
    run = launch("--hosts", "host1,host2", "no_such_script.py")
    assert run.wait(timeout=60) == 2
    lines = [line.strip() for line in run.err.splitlines() if "SCRIPT 'no_such_script.py' not found" in line]
    assert [line.split(":")[0] for line in lines] == ["host1", "host2"]
    assert all(line.endswith("or --no-python for an executable.") for line in lines), lines  # nothing after it
    nothing_left(token, sshd_pool)


def test_a_remote_worker_failing_stops_every_host_and_the_report_names_it(
    launch, tmp_path: Path, token: str, job_env: dict[str, str], sshd_pool: SshdPool
) -> None:
    script = write_script(tmp_path / "sleeper.py", SLEEPER)
    run = launch("--hosts", "host1,host2", "--nproc", "2", "--env", "FAIL_RANK=3", script)
    assert run.wait(timeout=60) == 7, run.err
    assert "Root cause (first observed failure): rank 3" in run.err
    assert "host host2" in run.err
    assert "exit code 7" in run.err
    nothing_left(token, sshd_pool)


def _wait_all_up(run: Run, count: int) -> None:
    run.wait_lines("| up ", count, timeout=60)


def test_ctrl_c_at_the_head_stops_every_host(launch, tmp_path: Path, token: str, sshd_pool: SshdPool) -> None:
    script = write_script(tmp_path / "sleeper.py", SLEEPER)
    run = launch("--hosts", "host1,host2", "--nproc", "2", script)
    _wait_all_up(run, 4)
    run.signal(signal.SIGINT)
    assert run.wait(timeout=30) == 130
    nothing_left(token, sshd_pool)


def test_signals_to_handle_makes_the_head_stop_every_host_on_that_signal(
    launch, tmp_path: Path, token: str, sshd_pool: SshdPool
) -> None:
    """--signals-to-handle SIGTERM,SIGUSR1: SIGUSR1 at the head is a stop for every host, and
    the workers get SIGUSR1 itself (their default action ends them: 128 + 10)."""
    script = write_script(tmp_path / "sleeper.py", SLEEPER)
    run = launch("--hosts", "host1,host2", "--nproc", "1", "--signals-to-handle", "SIGTERM,SIGUSR1", script)
    _wait_all_up(run, 2)
    run.signal(signal.SIGUSR1)
    assert run.wait(timeout=30) == 128 + signal.SIGUSR1
    assert "got SIGUSR1: stopping the workers on every host" in run.err
    nothing_left(token, sshd_pool)


def test_a_killed_remote_agent_stops_the_job_everywhere(
    launch, tmp_path: Path, token: str, sshd_pool: SshdPool
) -> None:
    script = write_script(tmp_path / "sleeper.py", SLEEPER)
    run = launch("--hosts", "host1,host2", "--nproc", "2", script)
    _wait_all_up(run, 4)
    agents = [
        p for p in processes_with_token(token, in_command_line=True)
        if "--agent" in p.cmdline() and "host2" in p.cmdline() and p.name() != "ddplaunch-guard"
    ]
    assert len(agents) == 1
    agents[0].send_signal(signal.SIGKILL)
    assert run.wait(timeout=30) != 0
    assert "host2" in run.err
    nothing_left(token, sshd_pool)


def test_a_dropped_ssh_session_stops_the_job_everywhere(
    launch, tmp_path: Path, token: str, sshd_pool: SshdPool
) -> None:
    script = write_script(tmp_path / "sleeper.py", SLEEPER)
    run = launch("--hosts", "host1,host2", "--nproc", "2", script)
    _wait_all_up(run, 4)
    sessions = psutil.Process(sshd_pool.server("host2").process.pid).children()  # one sshd per connection
    assert len(sessions) == 1
    sessions[0].send_signal(signal.SIGKILL)
    assert run.wait(timeout=30) != 0
    assert "lost host2" in run.err
    nothing_left(token, sshd_pool)


def test_a_killed_head_leaves_nothing_on_any_host(launch, tmp_path: Path, token: str, sshd_pool: SshdPool) -> None:
    script = write_script(tmp_path / "sleeper.py", SLEEPER)
    run = launch("--hosts", "host1,host2", "--nproc", "2", script)
    _wait_all_up(run, 4)
    run.signal(signal.SIGKILL)
    run.wait(timeout=10)
    nothing_left(token, sshd_pool)


def test_two_jobs_on_the_same_hosts_leave_each_other_alone(
    start, ssh_home: SshHome, job_env: dict[str, str], tmp_path: Path, sshd_pool: SshdPool
) -> None:
    script = write_script(tmp_path / "sleeper.py", SLEEPER)
    tokens = ["first-" + os.urandom(4).hex(), "second-" + os.urandom(4).hex()]
    runs = [
        start("--env", f"{TOKEN_VARIABLE}={t}", "--run-id", t, "--hosts", "host1,host2", "--nproc", "1", script,
              env=ssh_home.env(job_env))
        for t in tokens
    ]
    try:
        for run in runs:
            _wait_all_up(run, 2)
        runs[0].signal(signal.SIGTERM)
        assert runs[0].wait(timeout=30) == 143
        wait_until(lambda: not processes_with_token(tokens[0], in_command_line=True), 15, "the first job's processes gone")
        time.sleep(0.5)  # give a wrong kill the chance to land before we look (no event exists for it)
        assert len(without_warm_interpreters(processes_with_token(tokens[1]))) == 2  # its two workers, untouched
        assert runs[1].proc.poll() is None
        runs[1].signal(signal.SIGTERM)
        assert runs[1].wait(timeout=30) == 143
    finally:
        for t in tokens:
            kill_token(t)
    nothing_left(tokens[1], sshd_pool)


def test_hostfile_with_slots_and_dry_run_shows_the_forwarded_environment(
    launch, tmp_path: Path, job_env: dict[str, str]
) -> None:
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\nhost1 slots=2\n\nhost2 slots=2  # the second\n")
    script = write_script(tmp_path / "dump.py", ENV_DUMP)
    run = launch("--hostfile", str(hostfile), "--dry-run", script, env=dict(job_env, NCCL_SOCKET_IFNAME="lo"))
    assert run.wait(timeout=30) == 0, run.err
    assert "NCCL_SOCKET_IFNAME=lo" in run.out
    assert "host1" in run.out and "host2" in run.out
    assert "--nproc 2" in run.out
    assert "stdin: forwarded from here to rank 0 on its host; the other ranks read /dev/null" in run.out


def test_ranks_filter_and_log_dir_on_the_head(launch, tmp_path: Path, token: str, sshd_pool: SshdPool) -> None:
    script = write_script(tmp_path / "hello.py", "import os\nprint('hello from', os.environ['RANK'])\n")
    logs = tmp_path / "logs"
    run = launch("--hosts", "host1,host2", "--nproc", "2", "--ranks", "2", "--log-dir", str(logs), script)
    assert run.wait(timeout=60) == 0, run.err
    assert run.seen["out"] == ["2 | hello from 2"]
    for rank in range(4):
        assert (logs / f"rank{rank}.log").read_text() == f"hello from {rank}\n"
    events = (logs / "launcher.log").read_text()
    assert "host2: started rank 3 pid" in events and "host1: started rank 0 pid" in events
    nothing_left(token, sshd_pool)


def test_redirects_keep_a_stream_off_the_heads_terminal(launch, tmp_path: Path, token: str, sshd_pool: SshdPool) -> None:
    """--redirects 2 over SSH: stderr of every rank goes to the head's rank logs only; without
    --log-dir those are in a temporary directory the head names."""
    script = write_script(
        tmp_path / "both.py",
        "import os, sys\nprint('out', os.environ['RANK'])\nprint('err', os.environ['RANK'], file=sys.stderr)\n",
    )
    run = launch("--hosts", "host1,host2", "--nproc", "1", "--redirects", "2", script)
    assert run.wait(timeout=60) == 0, run.err
    assert sorted(run.seen["out"]) == ["0 | out 0", "1 | out 1"]
    assert not [line for line in run.seen["err"] if "| err" in line or "! err" in line]
    named = [line for line in run.seen["err"] if "every rank's output is in" in line]
    assert len(named) == 1, run.err
    logs = Path(named[0].rsplit(" ", 1)[1]).parent
    try:
        for rank in range(2):
            assert sorted((logs / f"rank{rank}.log").read_text().splitlines()) == [f"err {rank}", f"out {rank}"]
    finally:
        shutil.rmtree(logs, ignore_errors=True)
    nothing_left(token, sshd_pool)


def test_restarts_run_again_on_every_host(launch, tmp_path: Path, token: str, sshd_pool: SshdPool) -> None:
    script = write_script(
        tmp_path / "flaky.py",
        """
import os, sys
import torch.distributed as dist
dist.init_process_group("gloo")
attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
dist.barrier()
print(f"rank {os.environ['RANK']} attempt {attempt}", flush=True)
if attempt == "0" and os.environ["RANK"] == "1":
    os._exit(5)
if attempt == "1":
    dist.barrier()
""",
    )
    # One rank a host: each host's agent restarts its own. This is the cold test of restarts
    # across nodes (test_static_nodes.py's runs --warm).
    run = launch("--hosts", "host1,host2", "--nproc", "1", "--max-restarts", "1", script)
    assert run.wait(timeout=120) == 0, run.err
    assert sorted(line for line in run.seen["out"] if "attempt 1" in line) == [
        f"{r} | rank {r} attempt 1" for r in range(2)
    ]
    assert "restarting all workers (restart 1 of 1)" in run.err
    nothing_left(token, sshd_pool)


def test_a_busy_master_port_on_the_first_host_starts_nothing(
    launch, tmp_path: Path, token: str, sshd_pool: SshdPool
) -> None:
    import socket

    script = write_script(tmp_path / "sleeper.py", SLEEPER)
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = launch("--hosts", "host1,host2", "--master-port", str(port), script)
        assert run.wait(timeout=60) == 2, run.err
    assert f"host1: --master-port {port} is already in use" in run.err
    assert "nothing was started" in run.err and "Traceback" not in run.err
    nothing_left(token, sshd_pool)


def test_one_remote_host_is_a_one_node_job(launch, tmp_path: Path, token: str, sshd_pool: SshdPool) -> None:
    script = write_script(tmp_path / "dump.py", ENV_DUMP)
    # Warm (one import of torch for both ranks): the cold test of the environment over SSH is
    # test_every_rank_on_every_host_gets_the_torchrun_environment.
    run = launch("--warm", "--hosts", "host3", "--nproc", "2", script, str(tmp_path))
    assert run.wait(timeout=120) == 0, run.err
    envs = [json.loads((tmp_path / f"rank{r}.json").read_text())["env"] for r in range(2)]
    assert [(e["RANK"], e["WORLD_SIZE"], e["NODE_RANK"]) for e in envs] == [("0", "2", "0"), ("1", "2", "0")]
    assert {e["MASTER_ADDR"] for e in envs} == {"127.0.1.4"}
    nothing_left(token, sshd_pool)


REMOTE_BAR = """
import os, time
from tqdm import tqdm
print("COLUMNS=" + os.environ.get("COLUMNS", "-"), "FORCE_COLOR=" + os.environ.get("FORCE_COLOR", "-"))
for _ in tqdm(range(100), mininterval=0.01):
    time.sleep(0.01)
"""


def test_remote_progress_bars_redraw_on_the_heads_terminal(
    ssh_home: SshHome, job_env: dict[str, str], tmp_path: Path, token: str, sshd_pool: SshdPool
) -> None:
    """Agents send raw bytes; the head, at a terminal, redraws each rank's bar in place and tells
    remote workers its width and colour (their own stdout is a pipe on an SSH channel)."""
    script = write_script(tmp_path / "bar.py", REMOTE_BAR)
    marks = ("--env", f"{TOKEN_VARIABLE}={token}", "--run-id", token)
    argv = launcher_argv(*marks, "--hosts", "host1,host2", "--nproc", "1", script)
    code, data = run_on_terminal(argv, cwd=tmp_path, env=ssh_home.env(job_env), size=(100, 30), timeout=60)
    assert code == 0, data[-3000:]
    screen = Terminal(100, 30)
    screen.feed(data)
    rows = screen.rows()
    bars = sorted(row for row in rows if "/100" in row)
    assert [bar[:9] for bar in bars] == ["0 ! 100%|", "1 ! 100%|"], rows
    assert all(len(bar) >= 97 for bar in bars), bars  # 100 columns less the prefix, as tqdm leaves one
    assert sum("COLUMNS=96 FORCE_COLOR=1" in row for row in rows) == 2, rows


# -- --stdin: the head forwards its stdin to the chosen rank's host ---------------------------------

STDIN_DIGEST = """
import hashlib, os, sys
data = sys.stdin.buffer.read()  # returns at the end of file only
print(f"rank {os.environ['RANK']} read {len(data)} bytes {hashlib.sha256(data).hexdigest()[:16]}", flush=True)
"""


@pytest.mark.parametrize(("flags", "reader"), [([], 0), (["--stdin", "1"], 1)], ids=["rank-0-on-host1", "rank-1-on-host2"])
def test_stdin_reaches_the_chosen_rank_on_its_host_and_its_end_closes_it(
    launch, tmp_path: Path, token: str, sshd_pool: SshdPool, flags: list[str], reader: int
) -> None:
    import hashlib

    data = bytes(range(256)) * 1200 + b"no newline at the end"  # 300 kB: several pieces, every byte value
    script = write_script(tmp_path / "digest.py", STDIN_DIGEST)
    run = launch("--hosts", "host1,host2", "--nproc", "1", *flags, script, input=data)
    assert run.wait(timeout=60) == 0, run.err
    for rank in (0, 1):
        seen = data if rank == reader else b""  # the other rank reads /dev/null
        assert f"{rank} | rank {rank} read {len(seen)} bytes {hashlib.sha256(seen).hexdigest()[:16]}" in run.out
    nothing_left(token, sshd_pool)


def test_pdb_on_rank_0_over_ssh_reads_the_heads_stdin(launch, tmp_path: Path, token: str, sshd_pool: SshdPool) -> None:
    script = write_script(tmp_path / "bp.py", """
        import os
        x = 41
        if os.environ["RANK"] == "0":
            breakpoint()
        print("done")
    """)
    run = launch("--hosts", "host1,host2", "--nproc", "1", script, input=b"p x+1\nc\n")
    assert run.wait(timeout=60) == 0, run.err
    answers = sorted(line for line in run.seen["out"] if line.endswith(("42", "done")))
    assert answers == ["0 | (Pdb) 42", "0 | (Pdb) done", "1 | done"], run.out
    assert "BdbQuit" not in run.err
    nothing_left(token, sshd_pool)


def test_a_restarted_rank_on_another_host_reads_on_from_the_same_stdin(
    launch, tmp_path: Path, token: str, sshd_pool: SshdPool
) -> None:
    script = write_script(tmp_path / "restart.py", """
        import os, sys
        attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
        print(f"attempt {attempt} read {os.read(0, 6)!r}", flush=True)
        sys.exit(3 if attempt == "0" and os.environ["RANK"] == "1" else 0)
    """)
    run = launch("--hosts", "host1,host2", "--nproc", "1", "--stdin", "1", "--max-restarts", "1", script,
                 input=b"first\nsecnd\n")
    assert run.wait(timeout=60) == 0, run.err
    assert sorted(line for line in run.seen["out"] if line.startswith("1 |")) == [
        "1 | attempt 0 read b'first\\n'", "1 | attempt 1 read b'secnd\\n'",
    ]
    # rank 0 reads /dev/null (in attempt 0 it may be stopped before it says so)
    assert "0 | attempt 1 read b''" in run.seen["out"]
    assert all(line.endswith("read b''") for line in run.seen["out"] if line.startswith("0 |"))
    nothing_left(token, sshd_pool)


LEAVES_A_DAEMON = """
import subprocess, sys
# start_new_session: it leaves the worker's process group, as a daemon would
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
print("done", flush=True)
"""


def test_a_remote_worker_that_succeeds_but_leaves_a_daemon_ends_the_job_with_0(
    launch, tmp_path: Path, token: str, sshd_pool: SshdPool
) -> None:
    """The agent stops the daemon (a stop it begins itself) and still tells the head its
    workers succeeded: the job ended there, it used to wait for that word forever."""
    script = write_script(tmp_path / "daemon.py", LEAVES_A_DAEMON)
    run = launch("--hosts", "host3", "--nproc", "1", "--grace", "1", script)
    assert run.wait(timeout=30) == 0, run.err
    nothing_left(token, sshd_pool)
