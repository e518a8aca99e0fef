"""torchrun's command lines run unchanged: every torchrun 2.13 option, in both spellings and from
PET_*, through the real CLI; the options that have a meaning here, with real workers and signals."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ddplaunch.cli import command
from helpers_cli import (
    REPO,
    cli_env,
    install_fake_nvidia_smi,
    processes_with_token,
    run_cli,
    wait_until,
    write_script,
)
from test_cli_errors import assert_usage_error
from test_ssh_launch import launch, nothing_left  # noqa: F401  (launch is a fixture)

# torchrun's dest -> ours, where the names differ
OUR_NAME = {"nproc_per_node": "nproc", "rdzv_id": "run_id", "shutdown_timeout": "grace"}
# A value each option accepts here on its own (torchrun's flags take none)
VALUES = {
    "nnodes": "1", "nproc_per_node": "2", "rdzv_backend": "c10d", "rdzv_endpoint": "localhost:0",
    "rdzv_id": "r1", "rdzv_conf": "join_timeout=5", "max_restarts": "1", "monitor_interval": "0.5",
    "start_method": "fork", "event_log_handler": "null", "role": "trainer", "log_dir": "logs",
    "redirects": "0:1", "tee": "3", "local_ranks_filter": "0", "duplicate_stdout_filters": "loss",
    "duplicate_stderr_filters": "warn", "node_rank": "0", "master_addr": "127.0.0.1", "master_port": "29555",
    "local_addr": "127.0.0.1", "logs_specs": "default", "numa_binding": "socket",
    "signals_to_handle": "SIGTERM,SIGUSR1", "shutdown_timeout": "7",
}


def torchrun_options() -> list[argparse.Action]:
    """Every option of the installed torchrun (2.13), read from its own parser."""
    from torch.distributed.run import get_args_parser

    actions = [a for a in get_args_parser()._actions if a.option_strings and a.dest != "help"]
    assert len(actions) >= 30, [a.dest for a in actions]  # 30 in torch 2.13
    return actions


def parsed(args: list[str]) -> dict[str, object]:
    """What click makes of a command line (nothing runs), as the Options fields."""
    with command.make_context("ddplaunch", [*args, "train.py"]) as ctx:
        return dict(ctx.params)


def expected_value(action: argparse.Action, text: str | None) -> object:
    if text is None:
        return True
    if action.type in (int, float) or action.dest in ("shutdown_timeout", "monitor_interval"):
        return float(text) if action.dest in ("shutdown_timeout", "monitor_interval") else int(text)
    return text


def test_every_torchrun_option_is_accepted_in_every_spelling() -> None:
    for action in torchrun_options():
        text = None if action.nargs == 0 else VALUES[action.dest]
        for spelling in action.option_strings:
            params = parsed([spelling] if text is None else [spelling, text])
            name = OUR_NAME.get(action.dest, action.dest)
            assert params[name] == expected_value(action, text), (spelling, params[name])


def test_every_torchrun_option_is_read_from_its_pet_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [key for key in os.environ if key.startswith("PET_")]:
        monkeypatch.delenv(name)
    for action in torchrun_options():
        text = None if action.nargs == 0 else VALUES[action.dest]
        variable = f"PET_{action.dest.upper()}"  # torchrun's rule (torch/distributed/argparse_util.py)
        monkeypatch.setenv(variable, "1" if text is None else text)
        params = parsed([])
        monkeypatch.delenv(variable)
        assert params[OUR_NAME.get(action.dest, action.dest)] == expected_value(action, text), variable


def test_the_command_line_wins_over_pet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PET_ROLE", "from-env")
    monkeypatch.setenv("PET_VIRTUAL_LOCAL_RANK", "0")
    assert parsed(["--role", "typed"])["role"] == "typed"
    assert parsed(["--virtual-local-rank"])["virtual_local_rank"] is True


# -- the torchtitan line ------------------------------------------------------------------------

TORCHTITAN = ["--nproc_per_node=2", "--rdzv_backend", "c10d", "--rdzv_endpoint=localhost:0",
              "--local-ranks-filter", "0", "--role", "rank", "--tee", "3", "-m", "mypkg.main",
              "--job.config_file", "x.toml"]


@pytest.fixture
def mypkg(tmp_path: Path) -> Path:
    """A tiny package in tmp_path: mypkg.main prints its arguments and environment, on both streams."""
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    write_script(
        tmp_path / "mypkg" / "main.py",
        """
        import os, sys
        env = {k: os.environ[k] for k in ("ROLE_NAME", "LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR")}
        print("args", sys.argv[1:], "env", sorted(env.items()))
        print("stderr of", os.environ["RANK"], file=sys.stderr)
        """,
    )
    return tmp_path


def test_torchtitans_line_runs_and_shows_local_rank_0_only(mypkg: Path) -> None:
    logs = mypkg / "logs"
    env = cli_env(TMPDIR=str(mypkg))
    result = run_cli(["--log-dir", str(logs), *TORCHTITAN], env, cwd=mypkg)
    assert result.code == 0, result.output
    args = "args ['--job.config_file', 'x.toml']"
    expected_env = "('LOCAL_RANK', '0'), ('MASTER_ADDR', 'localhost'), ('RANK', '0'), ('ROLE_NAME', 'rank')"
    assert result.stdout.splitlines() == [f"0 | {args} env [{expected_env}, ('WORLD_SIZE', '2')]"]
    assert "0 ! stderr of 0" in result.stderr and "stderr of 1" not in result.stderr
    assert sorted(p.name for p in logs.iterdir()) == ["errors", "launcher.log", "rank0.log", "rank1.log"]
    rank1 = (logs / "rank1.log").read_text()
    assert "('LOCAL_RANK', '1'), ('MASTER_ADDR', 'localhost'), ('RANK', '1'), ('ROLE_NAME', 'rank')" in rank1
    assert "stderr of 1" in rank1


def test_torchtitans_line_as_is_writes_no_files(mypkg: Path) -> None:
    """--tee alone hides nothing from the terminal, so no temporary log dir is made (torchrun makes one)."""
    result = run_cli(TORCHTITAN, cli_env(TMPDIR=str(mypkg)), cwd=mypkg)
    assert result.code == 0, result.output
    assert result.stdout.startswith("0 | args ['--job.config_file', 'x.toml']")
    assert not list(mypkg.glob("ddplaunch-logs-*"))


def test_pet_variables_drive_a_run(mypkg: Path) -> None:
    env = cli_env(TMPDIR=str(mypkg), PET_NPROC_PER_NODE="2", PET_ROLE="from-pet", PET_MODULE="1",
                  PET_LOCAL_RANKS_FILTER="1", PET_RDZV_ENDPOINT="localhost:0", PET_REDIRECTS="2")
    result = run_cli(["mypkg.main"], env, cwd=mypkg)
    assert result.code == 0, result.output
    assert result.stdout.startswith("1 | args [] env [('LOCAL_RANK', '1')")
    assert "('ROLE_NAME', 'from-pet')" in result.stdout and "0 |" not in result.stdout
    assert "stderr of" not in result.stderr  # PET_REDIRECTS=2: stderr to the files only
    (logs,) = mypkg.glob("ddplaunch-logs-*")
    assert f"every rank's output is in {logs}/rankN.log" in result.stderr
    assert "stderr of 0" in (logs / "rank0.log").read_text()


def test_torchruns_worker_options_cross_ssh(launch, tmp_path: Path, token: str, sshd_pool) -> None:  # noqa: F811
    script = write_script(
        tmp_path / "show.py",
        """
        import os
        keys = ("RANK", "LOCAL_RANK", "ROLE_NAME", "TORCHELASTIC_SIGNALS_TO_HANDLE", "CUDA_VISIBLE_DEVICES")
        print(*(os.environ[k] for k in keys))
        """,
    )
    run = launch("--hosts", "host1,host2", "--nproc", "2", "--local-ranks-filter", "0", "--role", "rank",
                 "--signals-to-handle", "SIGTERM,SIGUSR1", "--virtual-local-rank", script)
    assert run.wait(timeout=60) == 0, run.err
    assert sorted(run.seen["out"]) == ["0 | 0 0 rank SIGTERM,SIGUSR1 0", "2 | 2 0 rank SIGTERM,SIGUSR1 0"]
    nothing_left(token, sshd_pool)


# -- output: --redirects, --duplicate-*-filters ---------------------------------------------------


def test_redirects_per_local_rank_keep_those_streams_in_the_files(tmp_path: Path) -> None:
    script = write_script(tmp_path / "both.py", "import os, sys\nr = os.environ['RANK']\nprint('out', r)\nprint('err', r, file=sys.stderr)\n")
    logs = tmp_path / "logs"
    result = run_cli(["--nproc", "2", "-r", "0:1,1:3", "--log-dir", str(logs), script], cli_env(), cwd=tmp_path)
    assert result.code == 0, result.output
    assert result.stdout == ""
    assert "0 ! err 0" in result.stderr and "err 1" not in result.stderr
    for rank in (0, 1):
        assert (logs / f"rank{rank}.log").read_text() in (f"out {rank}\nerr {rank}\n", f"err {rank}\nout {rank}\n")


def test_duplicate_filters_copy_the_shown_lines_that_match(tmp_path: Path) -> None:
    script = write_script(
        tmp_path / "losses.py",
        """
        import os, sys
        r = os.environ["RANK"]
        print(f"step 1 loss=0.{r}")
        print(f"step 1 acc=0.{r}")
        print(f"warn, from {r}", file=sys.stderr)
        """,
    )
    logs = tmp_path / "logs"
    args = ["--nproc", "2", "--local-ranks-filter", "1", "--duplicate-stdout-filters", "loss=,nothing",
            "--duplicate_stderr_filters", "warn,, from", "--log-dir", str(logs), script]
    result = run_cli(args, cli_env(), cwd=tmp_path)
    assert result.code == 0, result.output
    assert (logs / "filtered_stdout.log").read_text() == "1 | step 1 loss=0.1\n"
    assert (logs / "filtered_stderr.log").read_text() == "1 ! warn, from 1\n"


# -- signals: --signals-to-handle, --shutdown-timeout -------------------------------------------

USR1_CHECKPOINT = """
import os, signal, sys
def checkpoint(signum, frame):
    print("checkpoint on", signal.Signals(signum).name, os.environ["RANK"])
    sys.exit(0)
signal.signal(signal.SIGUSR1, checkpoint)
print("ready", os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"])
signal.pause()
"""


def test_a_listed_signal_stops_the_job_and_reaches_every_worker(start, tmp_path: Path, token: str) -> None:
    script = write_script(tmp_path / "usr1.py", USR1_CHECKPOINT)
    run = start("--nproc", "2", "--signals-to-handle", "SIGTERM,SIGINT,SIGUSR1", script)
    run.wait_lines("ready SIGTERM,SIGINT,SIGUSR1", 2)
    run.signal(signal.SIGUSR1)
    assert run.wait() == 128 + signal.SIGUSR1
    assert sorted(line for line in run.seen["out"] if "checkpoint" in line) == [
        "0 | checkpoint on SIGUSR1 0", "1 | checkpoint on SIGUSR1 1"]
    assert "got SIGUSR1: stopping all workers" in run.err
    assert processes_with_token(token) == []


def test_a_signal_left_out_is_not_caught_and_the_guard_stops_the_workers(start, tmp_path: Path, token: str) -> None:
    script = write_script(tmp_path / "wait.py", "import os, signal\nprint('ready', os.getpid())\nsignal.pause()\n")
    run = start("--nproc", "2", "--signals-to-handle", "SIGTERM", script)
    run.wait_lines("ready", 2)
    run.signal(signal.SIGINT)
    assert run.wait() == -signal.SIGINT  # the system's default for SIGINT: the launcher ends
    wait_until(lambda: processes_with_token(token) == [], 5, "the guard to stop the workers")


@pytest.mark.parametrize(
    ("args", "extra_env"),
    [(["--shutdown-timeout", "0.4"], {}), ([], {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "0.4"}),
     ([], {"PET_SHUTDOWN_TIMEOUT": "0.4"})],
    ids=["flag", "torch-variable", "pet"],
)
def test_shutdown_timeout_is_the_grace(start, tmp_path: Path, job_env: dict[str, str], args: list[str],
                                       extra_env: dict[str, str]) -> None:
    script = write_script(tmp_path / "stubborn.py", "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready')\nsignal.pause()\n")
    run = start(*args, script, env={**job_env, **extra_env})
    run.wait_line("ready")
    run.signal(signal.SIGTERM)
    assert run.wait() == 128 + signal.SIGTERM
    assert "workers still running 0.4s after the stop signal: sending SIGKILL" in run.err


# -- what each worker runs and sees ----------------------------------------------------------------

SHOW_GPU = "import os\nprint(os.environ['LOCAL_RANK'], os.environ['CUDA_VISIBLE_DEVICES'])\n"


def test_virtual_local_rank_gives_each_worker_one_gpu(tmp_path: Path) -> None:
    script = write_script(tmp_path / "gpu.py", SHOW_GPU)
    bin_dir = install_fake_nvidia_smi(tmp_path / "bin", "8gpu")
    result = run_cli(["--gpu-ids", "1,3", "--virtual-local-rank", script], cli_env(bin_dir), cwd=tmp_path)
    assert result.code == 0, result.output
    assert sorted(result.stdout.splitlines()) == ["0 | 0 1", "1 | 0 3"]


def test_run_path_behaves_as_under_torchrun(tmp_path: Path) -> None:
    """The same script under `torchrun --run-path` and `ddplaunch --run-path` sees the same world."""
    (tmp_path / "sub").mkdir()
    script = write_script(
        tmp_path / "sub" / "show.py",
        """
        import os, sys
        seen = dict(name=__name__, file=__file__, argv=sys.argv, path0=os.path.abspath(sys.path[0] or "."),
                    script_dir_on_path=os.path.dirname(__file__) in sys.path)
        if os.environ["LOCAL_RANK"] == "0":
            print(sorted(seen.items()))
        """,
    )
    args = ["--nproc-per-node", "1", "--run-path", script, "--flag", "a b"]
    ours = run_cli(args, cli_env(), cwd=tmp_path)
    theirs = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", *args], cwd=tmp_path,
                            env=cli_env(), capture_output=True, text=True, timeout=120)
    assert ours.code == 0 and theirs.returncode == 0, ours.output + theirs.stderr
    assert ours.stdout == "0 | " + theirs.stdout
    assert f"('argv', ['{script}', '--flag', 'a b'])" in ours.stdout and f"('path0', '{tmp_path}')" in ours.stdout


def test_a_directory_with_main_runs_as_python_runs_it(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    write_script(tmp_path / "app" / "__main__.py", "print('main of app')\n")
    result = run_cli(["app"], cli_env(), cwd=tmp_path)
    assert (result.code, result.stdout) == (0, "0 | main of app\n"), result.output


def test_local_addr_is_master_addr_on_one_node(tmp_path: Path) -> None:
    script = write_script(tmp_path / "addr.py", "import os\nprint(os.environ['MASTER_ADDR'])\n")
    result = run_cli(["--local-addr", "localhost", script], cli_env(), cwd=tmp_path)
    assert (result.code, result.stdout) == (0, "0 | localhost\n"), result.output


def test_torchruns_options_without_meaning_are_noted_once_each(tmp_path: Path) -> None:
    script = write_script(tmp_path / "ok.py", "print('ran')\n")
    args = ["--monitor-interval", "1", "--start_method", "forkserver", "--event-log-handler", "null",
            "--logs-specs", "x", "--rdzv-conf", "is_host=1,join_timeout=5", script]
    result = run_cli(args, cli_env(), cwd=tmp_path)
    assert result.code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if "no meaning here" in line]
    assert [note.split()[1] for note in notes] == ["--monitor-interval", "--start-method", "--event-log-handler",
                                                   "--logs-specs", "--rdzv-conf"]
    assert "--rdzv-conf is_host: no meaning here" in result.stderr


@pytest.fixture
def one_cpu() -> Iterator[None]:
    """This process (and so the CLI it starts) may run on one CPU only, as under `taskset -c 0`."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def test_nproc_beyond_the_machine_needs_force(one_cpu: None, tmp_path: Path) -> None:
    script = write_script(tmp_path / "mark.py", "import os\nopen(os.environ['MARKER'] + os.environ['RANK'], 'w').close()\n")
    env = cli_env(MARKER=str(tmp_path / "started"))
    refused = run_cli(["--nproc", "5", script], env, cwd=tmp_path)
    assert_usage_error(refused, tmp_path / "started0", "--nproc 5 is far more workers", "1 usable CPU(s)", "--force")
    forced = run_cli(["--nproc", "5", "--force", script], env, cwd=tmp_path)
    assert forced.code == 0, forced.output
    assert sorted(p.name for p in tmp_path.glob("started*")) == [f"started{i}" for i in range(5)]
    assert run_cli(["--nproc", "4", script], env, cwd=tmp_path).code == 0  # 4 per CPU is fine


# -- mistakes: one paragraph naming the flag, exit 2, nothing started -----------------------------

MARKER_SCRIPT = "import os\nopen(os.environ['MARKER'], 'w').close()\n"

# (id, args before SCRIPT, extra environment, texts the message must contain)
BAD_INPUT = [
    ("redirects-5", ["--redirects", "5"], {}, ["--redirects '5' is not torchrun's stream choice"]),
    ("tee-word", ["-t", "all"], {}, ["--tee 'all'"]),
    ("local-ranks-beyond-nproc", ["--nproc", "2", "--local-ranks-filter", "2"], {},
     ["--local-ranks-filter '2' names a rank outside 0..1"]),
    ("rdzv-conf-no-value", ["--rdzv-conf", "join_timeout"], {}, ["--rdzv-conf", "is not KEY=VALUE"]),
    ("signals-sigkill", ["--signals-to-handle", "SIGTERM,SIGKILL"], {}, ["SIGKILL cannot be caught"]),
    ("signals-unknown", ["--signals_to_handle", "SIGFOO"], {}, ["'SIGFOO' is not a signal name"]),
    ("backend-etcd", ["--rdzv-backend", "etcd"], {}, ["--rdzv-backend etcd", "--rdzv-backend c10d"]),
    ("endpoint-port-0-nodes", ["--nnodes", "2", "--rdzv-endpoint", "n0:0"], {}, ["port 0 (a free port)"]),
    ("role-empty", ["--role", ""], {}, ["--role is empty"]),
    ("shutdown-timeout-negative", ["--shutdown-timeout", "-1"], {}, ["--grace -1 (--shutdown-timeout)"]),
    ("shutdown-variable-word", [], {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "soon"}, ["TORCH_ELASTIC_SHUTDOWN_TIMEOUT 'soon'"]),
    ("start-method-thread", ["--start-method", "thread"], {}, ["--start-method", "'thread' is not one of"]),
    ("numa-binding-word", ["--numa-binding", "near"], {}, ["--numa-binding", "'near' is not one of"]),
    ("join-timeouts-disagree", ["--join-timeout", "5", "--rdzv-conf", "join_timeout=9"], {}, ["disagree"]),
    ("run-path-and-module", ["--run-path", "-m"], {}, ["--run-path runs a file and -m/--module a module"]),
    ("local-addr-elsewhere", ["--local-addr", "192.0.2.1"], {}, ["--local-addr 192.0.2.1: not an address of this machine"]),
    ("virtual-local-rank-one-gpu", ["--nproc", "2", "--virtual-local-rank"], {"CUDA_VISIBLE_DEVICES": "0"},
     ["--virtual-local-rank: local rank 1 has no GPU"]),
    ("nproc-99999", ["--nproc", "99999"], {}, ["--nproc 99999 is far more workers", "--force"]),
    ("deepspeed-num-gpus", ["--num_gpus", "2"], {}, ["No such option: --num_gpus", "DeepSpeed's", "--nproc N", "Usage:"]),
    ("mpirun-np", ["-np", "4"], {}, ["No such option: -np", "--nproc N (per node)"]),
    ("accelerate-machine-rank", ["--machine_rank=1"], {}, ["No such option: --machine_rank", "--node-rank R"]),
    ("still-unknown", ["--bogus"], {}, ["No such option", "--bogus"]),
]


@pytest.mark.parametrize(("args", "extra_env", "mentions"), [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_torchrun_style_input(tmp_path: Path, args: list[str], extra_env: dict[str, str], mentions: list[str]) -> None:
    script = write_script(tmp_path / "marker.py", MARKER_SCRIPT)
    marker = tmp_path / "marker"
    result = run_cli([*args, script], cli_env(MARKER=str(marker), **extra_env), cwd=tmp_path)
    assert_usage_error(result, marker, *mentions)


def test_a_missing_module_is_refused_without_running_its_parents(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    ran = tmp_path / "parent-ran"
    (tmp_path / "pkg" / "__init__.py").write_text(f"open({str(ran)!r}, 'w').close()\n")
    for name, says in [("pkg.nope", "package 'pkg'"), ("no.such.module", "no module 'no'")]:
        result = run_cli(["-m", name], cli_env(MARKER=str(tmp_path / "marker")), cwd=tmp_path)
        assert_usage_error(result, ran, f"-m {name}: {says}", "Check the name")


def test_a_directory_without_main_says_so(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    result = run_cli(["src"], cli_env(), cwd=tmp_path)
    assert_usage_error(result, tmp_path / "none", "SCRIPT 'src' is a directory (with no __main__.py)", "src/train.py")


def test_help_lists_torchruns_options() -> None:
    result = run_cli(["--help"], cli_env(), cwd=REPO)
    for option in ("--rdzv-backend", "--redirects", "--tee", "--local-ranks-filter", "--signals-to-handle",
                   "--shutdown-timeout", "--virtual-local-rank", "--numa-binding", "--run-path", "--force"):
        assert option in result.stdout, option
