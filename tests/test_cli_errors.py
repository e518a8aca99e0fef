"""Every bad input: a clear message naming the flag, exit 2, no traceback, and nothing started.

The worker script creates a marker file (its path comes in the MARKER variable); if any case
started a worker, the marker would exist afterwards. These runs are real (no --dry-run), so
a check that came too late would show up as a started worker.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from helpers_cli import CliResult, cli_env, install_fake_nvidia_smi, run_cli

MARKER_SCRIPT = """\
import os
with open(os.environ["MARKER"], "a") as f:
    f.write("started rank %s\\n" % os.environ.get("RANK"))
"""


@pytest.fixture
def job(tmp_path: Path):
    """job(args, gpus=...) runs the CLI with the marker script as SCRIPT (placeholder "{script}")."""
    script = tmp_path / "marker_worker.py"
    script.write_text(MARKER_SCRIPT)
    marker = tmp_path / "marker.txt"

    def run(args: list[str], *, gpus: str | None = None, append_script: bool = True) -> CliResult:
        bin_dir = install_fake_nvidia_smi(tmp_path / f"bin-{gpus}", gpus)
        env = cli_env(bin_dir, only_bin_dir=gpus is None, MARKER=str(marker))
        argv = [a.replace("{script}", str(script)) for a in args]
        if append_script:
            argv.append(str(script))
        return run_cli(argv, env, cwd=tmp_path)

    run.marker = marker  # type: ignore[attr-defined]
    run.script = script  # type: ignore[attr-defined]
    return run


def assert_usage_error(result: CliResult, marker: Path, *mentions: str) -> None:
    assert result.code == 2, f"exit {result.code}\n{result.output}"
    assert "Traceback" not in result.output, result.output
    assert result.stdout == "", result.stdout  # errors go to stderr; nothing was run
    for text in mentions:
        assert text in result.stderr, f"{text!r} not in:\n{result.stderr}"
    assert not marker.exists(), "a worker was started"


# (id, args, fake nvidia-smi, texts the message must contain)
CASES = [
    ("nproc-0", ["--nproc", "0"], None, ["ddplaunch: error:", "--nproc '0'"]),
    ("nproc-negative", ["--nproc", "-1"], None, ["ddplaunch: error:", "--nproc '-1'"]),
    ("nproc-word", ["--nproc", "abc"], None, ["ddplaunch: error:", "--nproc 'abc'", "positive integer"]),
    ("nproc-float", ["--nproc", "1.5"], None, ["--nproc '1.5'"]),
    ("nproc-gpu-no-gpu", ["--nproc", "gpu"], "nogpu", ["--nproc gpu", "no GPU found"]),
    ("gpu-ids-gap", ["--gpu-ids", "0,,2"], "8gpu", ["--gpu-ids '0,,2' has an empty entry"]),
    ("gpu-ids-letter", ["--gpu-ids", "a"], "8gpu", ["--gpu-ids", "'a' is not a GPU index or UUID"]),
    ("gpu-ids-negative", ["--gpu-ids", "-1"], "8gpu", ["--gpu-ids", "'-1' is not a GPU index or UUID"]),
    ("gpu-ids-twice", ["--gpu-ids", "1,1"], "8gpu", ["--gpu-ids lists GPU 1 twice"]),
    ("gpu-not-present", ["--gpu-ids", "7"], "2gpu", ["--gpu-ids", "GPU 7 is not on this machine", "0, 1"]),
    ("gpu-ids-no-gpu", ["--gpu-ids", "0"], "nogpu", ["--gpu-ids", "no GPU found"]),
    ("gpu-ids-no-nvidia-smi", ["--gpu-ids", "0"], None, ["--gpu-ids", "no GPU found"]),
    ("gpu-ids-broken-smi", ["--gpu-ids", "0"], "broken", ["nvidia-smi", "--gpu-ids"]),
    ("gpu-ids-failing-smi", ["--gpu-ids", "0"], "failing", ["nvidia-smi failed (exit 9", "--gpu-ids"]),
    ("nproc-vs-gpu-ids", ["--nproc", "3", "--gpu-ids", "0,1"], "8gpu",
     ["--nproc 3 does not match --gpu-ids 0,1"]),
    ("node-rank-too-big", ["--node-rank", "2", "--nnodes", "2", "--master-addr", "127.0.0.1"], None,
     ["--node-rank 2", "0..1", "--nnodes 2"]),
    ("node-rank-negative", ["--node-rank", "-1"], None, ["--node-rank -1"]),
    ("nnodes-0", ["--nnodes", "0"], None, ["--nnodes 0"]),
    ("nnodes-word", ["--nnodes", "two"], None, ["--nnodes 'two'"]),
    ("nnodes-elastic", ["--nnodes", "1:2"], None, ["--nnodes '1:2'", "elastic"]),
    ("nnodes-without-master-addr", ["--nnodes", "2"], None, ["--nnodes 2 needs --master-addr"]),
    ("master-port-too-big", ["--master-port", "70000"], None, ["--master-port 70000", "1-65535"]),
    ("master-port-0", ["--master-port", "0"], None, ["--master-port 0", "1-65535"]),
    ("master-port-not-int", ["--master-port", "http"], None, ["--master-port", "'http' is not a valid integer"]),
    ("missing-script", ["does_not_exist.py"], None, ["SCRIPT 'does_not_exist.py' not found"]),
    ("module-and-no-python", ["-m", "--no-python"], None, ["-m/--module", "--no-python", "exclude each other"]),
    ("no-python-missing-exe", ["--no-python", "./no-such-exe"], None, ["--no-python", "'./no-such-exe'"]),
    ("no-python-missing-command", ["--no-python", "no-such-command-xyz"], None,
     ["--no-python", "'no-such-command-xyz'", "not an executable"]),
    ("no-python-not-executable", ["--no-python", "{script}"], None, ["--no-python", "not an executable"]),
    ("env-key-unset", ["--env", "DDPLAUNCH_UNSET_FOO"], None,
     ["--env DDPLAUNCH_UNSET_FOO: DDPLAUNCH_UNSET_FOO is not set in this shell"]),
    ("env-bad-name", ["--env", "1FOO"], None, ["--env '1FOO' is not KEY=VALUE (nor KEY)"]),
    ("env-bad-key", ["--env", "1FOO=1"], None, ["--env '1FOO=1' is not KEY=VALUE"]),
    ("env-rank", ["--env", "RANK=3"], None, ["--env RANK=", "sets it for every worker"]),
    ("env-master-port", ["--env", "MASTER_PORT=1"], None, ["--env MASTER_PORT=", "use --master-port instead"]),
    ("env-cvd-with-gpu-ids", ["--gpu-ids", "0", "--env", "CUDA_VISIBLE_DEVICES=1"], "8gpu",
     ["--env CUDA_VISIBLE_DEVICES=", "use --gpu-ids instead"]),
    ("unknown-option", ["--bogus"], None, ["No such option", "--bogus"]),
    ("missing-script-argument", [], None, ["Missing argument 'SCRIPT'"]),
    ("ranks-out-of-range", ["--ranks", "9", "--nproc", "2"], None, ["--ranks '9'", "0..1", "world size 2"]),
    ("ranks-garbage", ["--ranks", "0,x"], None, ["--ranks '0,x'", "'x' is not a rank"]),
    ("ranks-open-range", ["--ranks", "0-"], None, ["--ranks '0-'"]),
    ("max-restarts-negative", ["--max-restarts", "-1"], None, ["--max-restarts -1"]),
    ("grace-negative", ["--grace", "-1"], None, ["--grace -1"]),
    ("standalone-two-nodes", ["--standalone", "--nnodes", "2", "--master-addr", "x"], None,
     ["--standalone", "--nnodes 2"]),
    ("stdin-out-of-range", ["--nproc", "2", "--stdin", "2"], None, ["--stdin 2", "0..1", "world size 2", "or none"]),
    ("stdin-word", ["--stdin", "all"], None, ["--stdin 'all' is not a rank", "none"]),
    ("stdin-negative", ["--stdin", "-1"], None, ["--stdin '-1' is not a rank"]),
]

# Cases where SCRIPT is part of the args (or deliberately missing).
_OWN_SCRIPT = {"missing-script", "no-python-missing-exe", "no-python-missing-command", "no-python-not-executable",
               "missing-script-argument"}


@pytest.mark.parametrize(("args", "gpus", "mentions"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(request: pytest.FixtureRequest, job, args: list[str], gpus: str | None, mentions: list[str]) -> None:
    case_id = request.node.callspec.id
    result = job(args, gpus=gpus, append_script=case_id not in _OWN_SCRIPT)
    assert_usage_error(result, job.marker, *mentions)


def test_click_usage_errors_show_usage(job) -> None:
    result = job(["--bogus"])
    assert "Usage:" in result.stderr
    assert "--help" in result.stderr


@pytest.mark.parametrize("host", ["", "127.0.0.1"])
def test_master_port_in_use(job, host: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind((host, 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = job(["--nproc", "2", "--master-port", str(port)])
    assert_usage_error(result, job.marker, f"--master-port {port} is already in use")


def test_marker_script_does_run_when_input_is_good(job) -> None:
    """The control for every case above: the same setup with good input starts the workers."""
    result = job(["--nproc", "2"])
    assert result.code == 0, result.output
    assert job.marker.exists()
    assert sorted(job.marker.read_text().splitlines()) == ["started rank 0", "started rank 1"]


def test_dry_run_reports_the_same_errors(job) -> None:
    result = job(["--dry-run", "--nproc", "0"])
    assert_usage_error(result, job.marker, "--nproc '0'")


# -- bugs found and fixed: kept as regression tests ---------------------------------------------


@pytest.mark.parametrize(
    "args", [["--nproc", "²"], ["--nnodes", "²"], ["--ranks", "²"], ["--stdin", "²"]],
    ids=["nproc", "nnodes", "ranks", "stdin"],
)
def test_unicode_digit_is_a_usage_error(job, args: list[str]) -> None:
    result = job(args)
    assert_usage_error(result, job.marker, args[0])


def test_grace_nan_is_a_usage_error(job) -> None:
    result = job(["--grace", "nan"])
    assert_usage_error(result, job.marker, "--grace")


def test_empty_master_addr_is_a_usage_error(job) -> None:
    result = job(["--master-addr", ""])
    assert_usage_error(result, job.marker, "--master-addr")
