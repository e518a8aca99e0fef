"""The head's pure planning: what each host runs, which variables cross, per-host GPUs."""

from __future__ import annotations

import shlex

import pytest
from helpers_cli import head_options

from ddplaunch.options import Options
from ddplaunch.errors import LaunchError
from ddplaunch.fanout import (
    Host, agent_argv, forwarded_env, per_host_nproc, preflight_problem, pythons_of, remote_command,
)
from ddplaunch.hosts import HostSpec, parse_hostfile
from ddplaunch.ship import AgentPlace
from ddplaunch.ssh import SshTarget

pytestmark = pytest.mark.unit


def options(**changes: object) -> Options:
    return head_options(**{"join_timeout": 600.0, **changes})


def host(rank: int, spec: HostSpec, nproc: int | None = None) -> Host:
    return Host(rank, spec, SshTarget(spec.host, spec.host, 22, "u", ()), nproc)


def test_hostfile_gpus_become_that_hosts_gpu_ids() -> None:
    specs = parse_hostfile("a slots=2 gpus=0,1\nb slots=2 gpus=1,3\n", "hosts")
    nproc = per_host_nproc(specs, None)
    argv = agent_argv(options(hosts=None, hostfile="hosts"), host(1, specs[1], nproc), 2)
    assert argv[argv.index("--gpu-ids") + 1] == "1,3"
    assert argv[argv.index("--nproc") + 1] == "2"
    assert argv[argv.index("--node-rank") + 1] == "1" and argv[argv.index("--nnodes") + 1] == "2"
    assert argv[:1] == ["--agent"]  # after the interpreter and the shipped zip (remote_command)
    assert argv[-3:] == ["train.py", "--lr", "0.1"]


@pytest.mark.parametrize("stdin", ["0", "3", "none"])
def test_every_agent_is_told_which_rank_reads_stdin(stdin: str) -> None:
    """Each agent checks whether the rank is its own; only that one asks the head for stdin."""
    spec = parse_hostfile("a slots=2\nb slots=2\n", "hosts")[1]
    argv = agent_argv(options(stdin=stdin), host(1, spec, 2), 2)
    assert argv[argv.index("--stdin") + 1] == stdin
    assert argv.index("--stdin") < argv.index("train.py")


@pytest.mark.parametrize(("grace", "said"), [(5.0, "5"), (0.1234567, "0.1234567"), (1e-7, "1e-07"), (2.5, "2.5")])
def test_a_float_reaches_the_agent_exactly(grace: float, said: str) -> None:
    """Six significant digits (Python's :g) made --grace 0.1234567 arrive as 0.123457."""
    spec = parse_hostfile("a slots=2\nb slots=2\n", "hosts")[1]
    argv = agent_argv(options(grace=grace), host(1, spec, 2), 2)
    assert argv[argv.index("--grace") + 1] == said and float(said) == grace


def test_unequal_slots_are_refused() -> None:
    with pytest.raises(LaunchError, match="same number of workers"):
        per_host_nproc(parse_hostfile("a slots=2\nb slots=4\n", "hosts"), None)


def test_forwarded_environment_is_the_documented_set_and_env_wins() -> None:
    environ = {"NCCL_DEBUG": "INFO", "TORCH_LOGS": "x", "HOME": "/root", "AWS_SECRET": "s", "OMP_NUM_THREADS": "4",
               "TORCHELASTIC_RUN_ID": "no"}
    assert forwarded_env(environ, [("NCCL_DEBUG", "WARN"), ("X", "1")]) == [
        ("NCCL_DEBUG", "WARN"), ("OMP_NUM_THREADS", "4"), ("TORCH_LOGS", "x"), ("X", "1"),
    ]


def test_the_remote_line_is_one_shell_word_per_argument() -> None:
    argv = ["--agent", "$(id)", "a'b", "ü 🚀", "x\ny"]
    place = AgentPlace(".cache/ddplaunch", "agent-0123456789abcdef.zip", 1234)
    line = remote_command(("/p y/python",), place, argv, "/work dir")
    assert line.startswith("cd -- '/work dir' 2>/dev/null || exit 120; ")
    zip_path = '"$HOME"/.cache/ddplaunch/agent-0123456789abcdef.zip'
    assert f'[ "$(wc -c 2>/dev/null <{zip_path})" -eq 1234 ] 2>/dev/null || exit 122; ' in line
    exec_part = line.split("; exec ", 1)[1]
    assert shlex.split(exec_part) == ["/p y/python", "$HOME/.cache/ddplaunch/agent-0123456789abcdef.zip", *argv]


@pytest.mark.parametrize("bootstrap_off", [False, True])
def test_agents_leave_the_stall_watch_to_the_head_and_follow_its_bootstrap_switch(bootstrap_off: bool) -> None:
    spec = parse_hostfile("a slots=2\nb slots=2\n", "hosts")[1]
    given = options(stall_timeout=30.0, stall_action="stop", no_stack_bootstrap=bootstrap_off)
    argv = agent_argv(given, host(1, spec, 2), 2)
    assert argv[argv.index("--stall-timeout") + 1] == "0"  # the head sees every rank's lines; it watches
    assert "--stall-action" not in argv  # stop with a timeout of 0 is refused, and the head stops the job
    assert ("--no-stack-bootstrap" in argv) == bootstrap_off
    assert argv.index("--stall-timeout") < argv.index("train.py")


@pytest.mark.parametrize(
    ("status", "printed", "expected"),
    [
        (120, [], "h1: working directory /w does not exist there; create it or pass --chdir DIR."),
        (121, [], "h1: no Python at /py; install Python 3.10 or newer there or pass --python PATH."),
        (122, [], "h1: ddplaunch's agent is still not at ~/.cache/a.zip after it was sent there"),
        (123, ["Python 3.9.18 at /py is too old: ddplaunch's agent needs Python 3.10 or newer; pass --python PATH"],
         "h1: Python 3.9.18 at /py is too old"),
        (1, ["Traceback (most recent call last):", "zipimport.ZipImportError: not a Zip file"],
         "h1: ddplaunch's agent (sent to ~/.cache/a.zip) cannot run with /py: zipimport.ZipImportError: not a Zip "
         "file. Pass --python PATH to a Python 3.10 or newer that can, or delete that file there"),
        (3, ["ddplaunch: error: --nproc: bad"], "h1: --nproc: bad"),
    ],
)
def test_a_host_that_cannot_start_its_agent_is_named_with_the_fix(status: int, printed: list[str], expected: str) -> None:
    assert preflight_problem("h1", status, printed, "/w", "/py", "~/.cache/a.zip").startswith(expected)


def test_hosts_try_the_heads_python_then_python3_unless_one_is_given() -> None:
    import sys

    assert pythons_of(options(python=None)) == (sys.executable, "python3")
    assert pythons_of(options(python="/opt/py/bin/python3")) == ("/opt/py/bin/python3",)
