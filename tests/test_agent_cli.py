"""The agent's command line without click: what a head writes (fanout.agent_argv), the standard
library parser (ddplaunch.agent_cli) reads as click would, and a real agent runs on a Python
that has nothing but its standard library, on each CPython minor from 3.10 on."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
from helpers_cli import (
    REPO, TOKEN_VARIABLE, cli_env, head_options, interpreter, processes_with_token, run_cli, write_script,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from ddplaunch.agent_cli import CLICK_DEFAULTS, parse_agent_argv
from ddplaunch.errors import LaunchError
from ddplaunch.fanout import PASSED_OPTIONS, PASSED_SWITCHES, Host, agent_argv
from ddplaunch.frames import (
    ATTEMPT_END, DATA, EXIT, READY, SUCCEEDED, Frame, FrameReader, decode_exit, decode_ready, end_line, env_line,
    go_line,
)
from ddplaunch.hosts import HostSpec
from ddplaunch.options import Options
from ddplaunch.protocol import AttemptEnd
from ddplaunch.ssh import SshTarget

# What an agent's host need not have; -S below leaves it no site-packages to find them in.
THIRD_PARTY = {"click", "rich", "paramiko", "psutil", "torch"}
AGENT_TIMEOUT_S = 30.0


# -- the parser agrees with click (pure) -----------------------------------------------------------


def host(rank: int = 1, nproc: int | None = 2, gpus: tuple[str, ...] | None = None) -> Host:
    spec = HostSpec(f"h{rank}", f"h{rank}", gpus=gpus)
    return Host(rank, spec, SshTarget(spec.host, spec.host, 22, "u", ()), nproc)


def agent_args(options: Options, on: Host, nnodes: int = 2) -> list[str]:
    """agent_argv without the interpreter and how it is told to run us: from `--agent` on."""
    argv = agent_argv(options, on, nnodes)
    return argv[argv.index("--agent") :]


def click_options(args: list[str]) -> Options:
    from ddplaunch.cli import command

    context = command.make_context("ddplaunch", list(args))
    return Options(**context.params)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def no_pet_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """click reads PET_* for absent flags; the agent parser never does (the head's word is all)."""
    for name in os.environ:
        if name.startswith("PET_"):
            monkeypatch.delenv(name)


CASES = {
    "plain": (head_options(), host()),
    "node 0 of one": (head_options(hosts="a"), host(0, None)),
    "every passed option": (
        head_options(max_restarts=3, grace=2.5, join_timeout=60.0, master_port=29511, role="trainer",
                     signals_to_handle="SIGTERM,SIGUSR2", numa_binding="socket", stdin="none",
                     heartbeat_timeout=2.0, kill_timeout=0.25),
        host(),
    ),
    "every switch": (head_options(**{name: True for name in PASSED_SWITCHES}), host()),
    "nproc named, gpus per host": (head_options(nproc="gpu"), host(1, None, ("1", "3"))),
    "gpu ids from the head": (head_options(gpu_ids="0,2"), host(0, None)),
    "no run id": (head_options(run_id=None), host()),
    "a module with dashes for arguments": (
        head_options(module=True, script="pkg.train", script_args=("--", "--agent", "-m", "--nproc=9", "-")),
        host(),
    ),
    "no script arguments": (head_options(script="-", script_args=()), host()),
    "values that look like flags": (head_options(role="--force", run_id="-x", stdin="-1"), host()),
    "negative and odd numbers": (head_options(max_restarts=-1, grace=float("inf"), kill_timeout=1e-7), host()),
    "head-only options are not sent": (
        head_options(log_dir="/logs", ranks="0", dry_run=False, no_color=True, chdir="/w", stall_timeout=30.0,
                     stall_action="stop", env=("A=1",), env_file=("x.env",), master_addr="10.0.0.1"),
        host(),
    ),
}


@pytest.mark.unit
@pytest.mark.parametrize("case", CASES)
def test_the_agent_parser_reads_what_click_reads(case: str) -> None:
    options, on = CASES[case]
    args = agent_args(options, on)
    assert parse_agent_argv(args) == click_options(args)


@pytest.mark.unit
def test_an_absent_flag_is_what_click_leaves_it() -> None:
    args = ["--agent", "train.py"]
    parsed, clicked = parse_agent_argv(args), click_options(args)
    assert parsed == clicked
    assert {name: getattr(parsed, name) for name in CLICK_DEFAULTS} == CLICK_DEFAULTS


_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
_SECONDS = st.none() | st.floats(min_value=-1e9, max_value=1e9, allow_nan=False)
_PASSED = {
    "max_restarts": st.integers(-5, 100), "grace": _SECONDS, "join_timeout": _SECONDS,
    "master_port": st.none() | st.integers(0, 65535), "role": st.none() | _TEXT,
    "signals_to_handle": st.none() | _TEXT, "numa_binding": st.sampled_from([None, "node", "socket", "exclusive"]),
    "stdin": _TEXT, "heartbeat_timeout": _SECONDS, "kill_timeout": _SECONDS,
    "warm_modules": st.sampled_from(["torch", "torch,numpy", "a.b,c"]),
}


@pytest.mark.unit
def test_the_random_cases_draw_every_passed_flag() -> None:
    assert set(_PASSED) == set(PASSED_OPTIONS)


@pytest.mark.unit
@settings(max_examples=150, deadline=None)
@given(
    passed=st.fixed_dictionaries(_PASSED),
    switches=st.fixed_dictionaries({name: st.booleans() for name in PASSED_SWITCHES}),
    nproc=st.none() | st.sampled_from(["1", "8", "auto", "gpu", "cpu"]),
    gpus=st.none() | st.lists(st.sampled_from("01234567"), min_size=1, max_size=4, unique=True).map(tuple),
    run_id=st.none() | _TEXT,
    script=_TEXT.filter(lambda text: text == "-" or not text.startswith("-")).filter(bool),
    script_args=st.lists(st.sampled_from(["--", "--agent", "-m", "--nproc", "9", "-", "x y", ""]) | _TEXT, max_size=5),
    node_rank=st.integers(0, 7),
)
def test_any_head_command_line_reads_the_same_both_ways(
    passed: dict[str, object], switches: dict[str, bool], nproc: str | None, gpus: tuple[str, ...] | None,
    run_id: str | None, script: str, script_args: list[str], node_rank: int,
) -> None:
    options = head_options(**passed, **switches, nproc=nproc, run_id=run_id, script=script,
                           script_args=tuple(script_args))
    args = agent_args(options, host(node_rank, None, gpus), nnodes=8)
    assert parse_agent_argv(args) == click_options(args)


@pytest.mark.unit
@pytest.mark.parametrize(("args", "says"), [
    (["--agent", "--bogus", "train.py"], "'--bogus' is not a flag a head sends"),
    (["--agent", "--log-dir", "/x", "train.py"], "'--log-dir' is not a flag a head sends"),  # head-only
    (["--agent", "-m", "pkg"], "'-m' is not a flag a head sends"),  # only the long spellings are sent
    (["--agent", "--grace", "soon", "train.py"], "--grace 'soon' is not a valid float"),
    (["--agent", "--node-rank", "1.5", "train.py"], "--node-rank '1.5' is not a valid int"),
    (["--agent", "--force=yes", "train.py"], "--force takes no value"),
    (["--agent", "--run-id"], "--run-id needs a value"),
    (["--agent", "--nproc", "2"], "no SCRIPT after the flags"),
])
def test_a_command_line_no_head_writes_is_refused_by_name(args: list[str], says: str) -> None:
    with pytest.raises(LaunchError, match="^agent: ") as refused:
        parse_agent_argv(args)
    assert says in str(refused.value)
    assert "\n" not in str(refused.value)


@pytest.mark.unit
def test_every_options_field_is_covered_by_the_head_or_left_absent() -> None:
    """A new Options field without a default needs CLICK_DEFAULTS or a None/False/() default."""
    parsed = parse_agent_argv(["--agent", "train.py"])
    assert {f.name for f in fields(Options)} == set(vars(parsed))


# -- a real agent on a bare Python (processes) -------------------------------------------------------


def bare_python(minor: int) -> str:
    python = interpreter(minor)
    if python is None and not os.environ.get("CI"):  # CI's machine has them all (pyenv): never skip there
        pytest.skip(f"no python3.{minor} here")
    assert python is not None, f"no python3.{minor} on this machine"
    return python


def bare_argv(python: str, args: list[str]) -> list[str]:
    """`python -m ddplaunch ARGS` with no site-packages at all (-S: nothing but the standard
    library and PYTHONPATH), every import it makes written to stderr (-X importtime)."""
    return [python, "-S", "-X", "importtime", "-m", "ddplaunch", *args]


@pytest.fixture(scope="module")
def bare_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding only the package, under its import name (the repository calls it launcher/)."""
    folder = tmp_path_factory.mktemp("bare-path")
    (folder / "ddplaunch").symlink_to(REPO / "launcher")
    return folder


def bare_env(token: str, path: Path) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(path), TOKEN_VARIABLE: token}


def imported(stderr: str) -> set[str]:
    """Top-level names of every import -X importtime saw (attempts included)."""
    lines = [line.rpartition("|")[2].strip() for line in stderr.splitlines() if line.startswith("import time:")]
    return {name.split(".")[0] for name in lines[1:]}  # the first line is the table's header


@dataclass
class AgentRun:
    exit_frame: int | None = None  # the code in the agent's EXIT frame
    output: bytes = b""  # its workers' output (DATA frames)
    stderr: bytes = b""


def drive_one_node_agent(proc: subprocess.Popen[bytes]) -> AgentRun:
    """Be its head: the env line, a go after READY, the end it says (or success's after
    SUCCEEDED); read its
    stdout and stderr to their end, and only then close its stdin (end of file is a stop)."""
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    proc.stdin.write(env_line([("FROM_HEAD", "a value 'quoted' $(not run)")]))
    proc.stdin.flush()
    run, reader = AgentRun(), FrameReader()
    open_pipes = [proc.stdout, proc.stderr]
    deadline = time.monotonic() + AGENT_TIMEOUT_S
    while open_pipes:
        left = deadline - time.monotonic()
        readable = select.select(open_pipes, [], [], max(left, 0))[0]
        assert readable, f"the agent was not done after {AGENT_TIMEOUT_S}s; so far {run}"
        for pipe in readable:
            data = os.read(pipe.fileno(), 65536)
            if not data:
                open_pipes.remove(pipe)
            elif pipe is proc.stderr:
                run.stderr += data
            else:
                for frame in reader.feed(data):
                    answer(proc, frame, run)
    proc.wait(timeout=AGENT_TIMEOUT_S)
    proc.stdin.close()
    return run


def answer(proc: subprocess.Popen[bytes], frame: Frame, run: AgentRun) -> None:
    assert proc.stdin is not None
    if frame.kind == READY:
        proc.stdin.write(go_line(*decode_ready(frame)))
    elif frame.kind == SUCCEEDED:
        proc.stdin.write(end_line(AttemptEnd("success", 0, "h0", "", 0).to_text()))
    elif frame.kind == ATTEMPT_END:  # the only node's word is the job's
        proc.stdin.write(end_line(frame.text))
    elif frame.kind == DATA:
        run.output += frame.payload
    elif frame.kind == EXIT:
        run.exit_frame = decode_exit(frame)
    proc.stdin.flush()


def run_one_node_agent(
    python: str, script: str, tmp_path: Path, token: str, bare_path: Path
) -> tuple[subprocess.Popen[bytes], AgentRun]:
    """A one-node job's agent as the head starts it, on this bare `python`, driven to its end."""
    options = head_options(hosts="h0", python=python, script=script, script_args=(), grace=2.0,
                           heartbeat_timeout=2.0, kill_timeout=2.0, run_id=token)
    proc = subprocess.Popen(bare_argv(python, agent_args(options, host(0, 1), nnodes=1)), cwd=tmp_path,
                            env=bare_env(token, bare_path), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        return proc, drive_one_node_agent(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.parametrize("minor", [10, 11, 12, 13])
def test_an_agent_runs_a_job_on_a_python_with_only_its_standard_library(
    minor: int, tmp_path: Path, token: str, bare_path: Path
) -> None:
    python = bare_python(minor)
    script = write_script(tmp_path / "hello.py", """
        import os, sys
        print("hello from", sys.version_info[:2], os.environ["RANK"], os.environ["FROM_HEAD"], flush=True)
    """)
    proc, run = run_one_node_agent(python, script, tmp_path, token, bare_path)
    stderr = run.stderr.decode(errors="replace")
    assert (proc.returncode, run.exit_frame) == (0, 0), stderr[-2000:]
    assert run.output.decode() == f"hello from (3, {minor}) 0 a value 'quoted' $(not run)\n"
    assert "ddplaunch.agent_cli" in stderr  # the importtime table was written: the check below is real
    assert imported(stderr) & THIRD_PARTY == set()


def test_an_agent_stops_a_daemon_its_failed_worker_left_without_psutil(tmp_path: Path, token: str,
                                                                       bare_path: Path) -> None:
    """The daemon left the worker's process group: the agent finds it through /proc."""
    python = bare_python(10)
    script = write_script(tmp_path / "daemon.py", """
        import subprocess, sys
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
        sys.exit(3)
    """)
    proc, run = run_one_node_agent(python, script, tmp_path, token, bare_path)
    stderr = run.stderr.decode(errors="replace")
    assert (proc.returncode, run.exit_frame) == (3, 3), stderr[-2000:]
    assert "ddplaunch.workers" in stderr and imported(stderr) & THIRD_PARTY == set()
    assert processes_with_token(token) == []  # the daemon is gone


@pytest.mark.parametrize("args", [["--agent", "--bogus", "x.py"], ["--agent", "--nproc", "2"]])
def test_a_bad_agent_command_line_is_one_line_and_exit_2_without_click(args: list[str], token: str,
                                                                       bare_path: Path) -> None:
    python = bare_python(10)
    done = subprocess.run([python, "-S", "-m", "ddplaunch", *args], env=bare_env(token, bare_path),
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=AGENT_TIMEOUT_S)
    said = done.stderr.decode()
    assert (done.returncode, done.stdout) == (2, b"")
    assert said.startswith("ddplaunch: error: agent: ") and said.count("\n") == 1, said


def test_agent_among_the_scripts_arguments_is_the_scripts(tmp_path: Path) -> None:
    """Only the first word makes an agent: elsewhere --agent is click's (or the script's)."""
    script = write_script(tmp_path / "s.py", "pass\n")
    done = run_cli(["--nproc", "1", "--dry-run", script, "--agent"], cli_env())
    assert done.code == 0, done.output
    assert f"{script} --agent" in done.stdout

