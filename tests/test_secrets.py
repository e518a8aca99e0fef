"""Secrets with real processes: over real sshd no --env or forwarded value is on any command line
of the machine (every "host" is this one, so one scan of /proc sees sshd, the shells, the agents
and the workers); --env KEY and --env-file reach the workers; and what ddplaunch prints (dry
runs, errors, failure reports, launcher.log, a remote preflight's words) shows no value of a
secret-looking variable."""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import pytest

from helpers_cli import TOKEN_VARIABLE, cli_env, run_cli, wait_until, write_script
from sshd import SshdPool, SshHome
from test_ssh_launch import nothing_left

# Each rank writes its environment, says it waits, then blocks on its own FIFO until the test
# opens it: the job is surely running while the test looks at every process.
WAITER = """
import json, os, sys
rank = os.environ["RANK"]
with open(os.path.join(sys.argv[1], f"env{rank}.json"), "w") as f:
    json.dump(dict(os.environ), f)
print("waiting", rank, flush=True)
with open(os.path.join(sys.argv[1], f"release{rank}")) as f:
    f.read()
"""


def secret(tag: str) -> str:
    return f"{tag}-{os.urandom(12).hex()}"


def command_lines_holding(value: str) -> list[int]:
    """Every process on this machine whose command line holds `value` (read raw from /proc)."""
    needle = value.encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as file:
                    if needle in file.read():
                        found.append(int(entry))
            except OSError:
                continue  # it ended while we looked
    return found


def release(fifo: Path) -> None:
    """Open the rank's FIFO for writing, once it has opened it for reading, and close it: its read ends."""

    def opened() -> bool:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            return True
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no reader yet
                return False
            raise

    wait_until(opened, 20, f"a reader on {fifo.name}")


def test_no_value_is_on_any_command_line_over_ssh_and_the_workers_get_them_all(
    start, ssh_home: SshHome, job_env: dict[str, str], token: str, tmp_path: Path, sshd_pool: SshdPool
) -> None:
    values = {name: secret(name.lower()) for name in ("HF_TOKEN", "SHELL_SECRET_TOKEN", "FILE_PASSWORD", "ARG_SECRET")}
    env_file = tmp_path / "job.env"
    env_file.write_text(f"# for the workers\nexport FILE_PASSWORD='{values['FILE_PASSWORD']}'\n")
    for rank in (0, 1):
        os.mkfifo(tmp_path / f"release{rank}")
    script = write_script(tmp_path / "waiter.py", WAITER)
    head_env = ssh_home.env(dict(job_env, HF_TOKEN=values["HF_TOKEN"], SHELL_SECRET_TOKEN=values["SHELL_SECRET_TOKEN"]))
    run = start(
        "--env", f"{TOKEN_VARIABLE}={token}", "--run-id", token, "--hosts", "host1,host2", "--nproc", "1",
        "--log-dir", str(tmp_path / "logs"), "--env", "SHELL_SECRET_TOKEN", "--env-file", str(env_file),
        "--env", f"ARG_SECRET={values['ARG_SECRET']}", script, str(tmp_path), env=head_env,
    )
    try:
        run.wait_lines("| waiting", 2, timeout=60)
        holders = {name: command_lines_holding(value) for name, value in values.items()}
        # Only what the user typed on the head's own command line is there, and only there.
        assert holders == {"HF_TOKEN": [], "SHELL_SECRET_TOKEN": [], "FILE_PASSWORD": [], "ARG_SECRET": [run.proc.pid]}
    finally:
        for rank in (0, 1):
            release(tmp_path / f"release{rank}")
    assert run.wait(timeout=60) == 0, run.err
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"env{rank}.json").read_text())
        assert {name: seen.get(name) for name in values} == values
    printed = run.out + run.err + (tmp_path / "logs" / "launcher.log").read_text()
    assert not [name for name, value in values.items() if value in printed]
    nothing_left(token, sshd_pool)


FAKE_AGENT = """#!{python}
# A remote "agent" whose error quotes the values it was sent (as a careless one might).
import base64, json, sys
pairs = json.loads(base64.b64decode(sys.stdin.readline().split()[1]))
print("ddplaunch: error: cannot use " + " ".join(f"{{k}}={{v}}" for k, v in pairs), file=sys.stderr)
sys.exit(2)
"""


def test_a_remote_preflight_error_that_quotes_a_value_shows_it_hidden(
    start, ssh_home: SshHome, job_env: dict[str, str], token: str, tmp_path: Path, sshd_pool: SshdPool
) -> None:
    fake = tmp_path / "python"
    fake.write_text(FAKE_AGENT.format(python=sys.executable))
    fake.chmod(0o755)
    value = secret("hf")
    run = start("--env", f"{TOKEN_VARIABLE}={token}", "--run-id", token, "--hosts", "host1", "--python", str(fake),
                "--env", "NCCL_DEBUG=INFO", "script.py", env=ssh_home.env(dict(job_env, HF_TOKEN=value)))
    assert run.wait(timeout=60) == 2, run.err
    assert "host1: cannot use " in run.err and "HF_TOKEN=<hidden HF_TOKEN>" in run.err and "NCCL_DEBUG=INFO" in run.err
    assert value not in run.err + run.out
    nothing_left(token, sshd_pool)


@pytest.mark.parametrize(
    "mode",
    [[], ["--nnodes", "2", "--node-rank", "1", "--master-addr", "127.0.0.1"], ["--hosts", "host1,host2"]],
    ids=["one-node", "static-node", "ssh"],
)
def test_dry_runs_resolve_env_files_then_env_and_hide_secret_values(tmp_path: Path, mode: list[str]) -> None:
    shell_value, file_value = secret("shell"), secret("file")
    (tmp_path / "a.env").write_text(f"API_KEY={file_value}\nWHERE=a.env\nORDER=a.env\n")
    (tmp_path / "b.env").write_text("ORDER=b.env\nLEVEL='from b'\n")
    script = write_script(tmp_path / "train.py", "print('hi')\n")
    env = cli_env(DB_PASSWORD=shell_value)
    result = run_cli(
        ["--dry-run", *mode, "--env-file", str(tmp_path / "a.env"), "--env", "LEVEL=flag", "--env", "DB_PASSWORD",
         "--env-file", str(tmp_path / "b.env"), script], env, cwd=tmp_path,
    )
    assert result.code == 0, result.output
    for line in ("WHERE=a.env", "ORDER=b.env", "LEVEL=flag", f"API_KEY=<hidden, {len(file_value)} chars>",
                 f"DB_PASSWORD=<hidden, {len(shell_value)} chars>"):
        assert f"  {line}" in result.stdout, result.stdout
    assert shell_value not in result.output and file_value not in result.output


@pytest.mark.parametrize(
    ("contents", "args", "needle"),
    [
        ("OK=1\nMY_TOKEN='{value}\n", ["--env-file", "{file}"],
         "--env-file {file} line 2: the value of MY_TOKEN opens a quote"),
        ("", ["--env-file", "{file}.missing"], "--env-file {file}.missing: cannot read it (No such file or directory)"),
        ("", ["--env", "MY-TOKEN={value}"], "--env 'MY-TOKEN=<hidden, 25 chars>' is not KEY=VALUE"),
        ("", ["--env", "{value}"], "--env <hidden, 25 chars>: that is the value of HF_TOKEN"),
    ],
    ids=["bad-line", "missing-file", "bad-name", "value-for-name"],
)
def test_env_mistakes_are_named_without_the_value(tmp_path: Path, contents: str, args: list[str], needle: str) -> None:
    value = "hf_" + os.urandom(11).hex()  # 25 characters; a valid name, too
    env_file = tmp_path / "job.env"
    env_file.write_text(contents.format(value=value))
    marker = tmp_path / "started"
    script = write_script(tmp_path / "w.py", f"open({str(marker)!r}, 'w').close()\n")
    argv = [a.format(file=env_file, value=value) for a in args]
    result = run_cli([*argv, script], cli_env(HF_TOKEN=value), cwd=tmp_path)
    assert result.code == 2, result.output
    assert needle.format(file=env_file) in result.stderr and "Traceback" not in result.output
    assert value not in result.output and not marker.exists()


def test_a_failure_report_and_launcher_log_hide_secret_arguments(tmp_path: Path) -> None:
    """The report's command line and launcher.log's start events show a --hf-token=... by length."""
    value = secret("hf")
    (tmp_path / "job.env").write_text(f"HF_TOKEN={value}\n")
    script = write_script(tmp_path / "fail.py", "import os, sys\nassert os.environ['HF_TOKEN']\nsys.exit(3)\n")
    logs = tmp_path / "logs"
    result = run_cli(["--log-dir", str(logs), "--env-file", str(tmp_path / "job.env"), script, f"--hf-token={value}"],
                     cli_env(), cwd=tmp_path)
    assert result.code == 3, result.output
    launcher_log = (logs / "launcher.log").read_text()
    hidden = f"--hf-token=<hidden, {len(value)} chars>"
    assert "Root cause" in result.stderr and hidden in result.stderr and hidden in launcher_log
    assert value not in result.output + launcher_log
