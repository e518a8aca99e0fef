"""--hosts / --hostfile mistakes: one paragraph naming the flag, exit 2, no host contacted."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers_cli import cli_env, run_cli


@pytest.mark.parametrize(
    ("args", "hostfile", "needle"),
    [
        (["--hosts", "a,b", "--nnodes", "2"], None, "--nnodes does not go with --hosts/--hostfile"),
        (["--hosts", "a,b", "--node-rank", "1"], None, "--node-rank does not go with --hosts/--hostfile"),
        (["--hosts", "a", "--hostfile", "{hostfile}"], "a slots=1\n", "--hosts and --hostfile both name the hosts"),
        (["--hostfile", "{hostfile}"], "a slots=2\nb slots=4\n", "every host must run the same number of workers"),
        (["--hostfile", "{dir}/missing"], None, "--hostfile"),
        (["--hosts", "a,,b"], None, "entry 2 is empty"),
        (["--hosts", "a,a"], None, "lists 'a' twice"),
        (["--hosts", "n1:4,n2:4"], None, "Horovod"),
        (["--hosts", "a", "--ranks", "x"], None, "--ranks 'x'"),
        (["--hosts", "a,b", "--nproc", "1", "--stdin", "2"], None, "--stdin 2 names a rank outside 0..1"),
        (["--hosts", "a,b", "--stdin", "first"], None, "--stdin 'first' is not a rank"),
    ],
)
def test_host_list_mistakes(tmp_path: Path, args: list[str], hostfile: str | None, needle: str) -> None:
    script = tmp_path / "train.py"
    script.write_text("")
    path = tmp_path / "hosts"
    if hostfile is not None:
        path.write_text(hostfile)
    argv = [a.replace("{hostfile}", str(path)).replace("{dir}", str(tmp_path)) for a in args]
    done = run_cli([*argv, str(script)], cli_env(), cwd=tmp_path)
    assert done.code == 2, done.output
    assert needle in done.stderr and "Traceback" not in done.stderr
    assert "connecting" not in done.stderr
