"""--sync over real sshd hosts: this directory's copy on every host, the job run from it.

Every test host is this machine, so the head's directory is there too: the workers show
they run from the copy by their working directory and their script's path. The copy's
folder is under the test's own remote cache (DDPLAUNCH_AGENT_CACHE), so "first" means first.
The counting tests use one host (two hosts on one machine share one copy and race for it,
which is benign but makes the counts vary); the fresh-host test uses two.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_cli import TOKEN_VARIABLE, Run, processes_with_token, wait_until
from helpers_screen import run_on_terminal

from ddplaunch.ship import CACHE_VARIABLE
from ddplaunch.syncplan import MANIFEST_NAME
from sshd import SshdPool, SshHome

REPO = Path(__file__).resolve().parent.parent
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
# Says where it runs and what it finds there, as JSON.
WORKER = """
import json, os
print("seen " + json.dumps({
    "cwd": os.getcwd(), "file": os.path.abspath(__file__), "rank": os.environ["RANK"],
    "exec": os.access("tool.sh", os.X_OK), "link": os.readlink("latest") if os.path.islink("latest") else None,
    "conf": open("conf/a.txt").read(), "notes": os.path.exists("notes.txt"),
    "ignored": os.path.exists("ignored.log"), "data": os.path.exists("data"),
}), flush=True)
"""


def write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "remote-cache"


@pytest.fixture
def sync_run(ssh_home: SshHome, job_env: dict[str, str], token: str, cache: Path):
    runs: list[Run] = []

    def _run(project: Path, *args: str) -> Run:
        env = ssh_home.env({**job_env, CACHE_VARIABLE: str(cache)})
        run = Run(["--env", f"{TOKEN_VARIABLE}={token}", "--run-id", token, *args], env, project)
        runs.append(run)
        return run

    yield _run
    for run in runs:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait(timeout=10)


def seen(run: Run) -> list[dict[str, object]]:
    return [json.loads(line.split("seen ", 1)[1]) for line in run.out.splitlines() if " seen " in line]


def copy_of(cache: Path) -> Path:
    (copy,) = (cache / "sync").iterdir()
    return copy


def nothing_left(token: str, pool: SshdPool) -> None:
    wait_until(lambda: not processes_with_token(token, in_command_line=True), 15, "no worker or agent of the job left")
    wait_until(lambda: not pool.session_processes(), 15, "no SSH session left on any host")


def test_the_job_runs_in_the_copy_and_only_what_changed_is_sent_again(
    sync_run, tmp_path: Path, cache: Path, token: str, sshd_pool: SshdPool
) -> None:
    project = tmp_path / "project"
    write(project, "worker.py", WORKER)
    write(project, "tool.sh", "#!/bin/sh\necho tool\n").chmod(0o755)
    (project / "latest").symlink_to("conf/a.txt")
    write(project, "conf/a.txt", "first")
    write(project, "conf/b.txt", "stays")
    write(project, ".gitignore", "*.log\n")
    write(project, "ignored.log", "never goes")
    write(project, "data/shard0.bin", "excluded")
    subprocess.run([*GIT, "init", "-q"], cwd=project, check=True, timeout=30)
    subprocess.run([*GIT, "add", "worker.py", "tool.sh", "latest", "conf", ".gitignore", "data"], cwd=project,
                   check=True, timeout=30)
    write(project, "notes.txt", "untracked, not ignored: goes")
    sync = ("--hosts", "host1", "--nproc", "1", "--sync", "--sync-exclude", "data")

    first = sync_run(project, *sync, "worker.py")
    assert first.wait(timeout=60) == 0, first.err
    copy = copy_of(cache)
    assert f"to {copy} on host1" in first.err and "host1: sent 7 files" in first.err, first.err
    (worker,) = seen(first)
    assert worker["cwd"] == str(copy) and worker["file"] == str(copy / "worker.py")  # not the head's folder
    assert worker["exec"] is True and worker["link"] == "conf/a.txt" and worker["conf"] == "first"
    assert worker["notes"] is True and worker["ignored"] is False and worker["data"] is False
    kept = (copy / "conf" / "b.txt").stat()

    write(project, "conf/a.txt", "second")  # changed
    (project / "notes.txt").unlink()  # deleted here
    os.utime(project / "conf" / "b.txt", ns=(1, 1))  # touched, same bytes: hashed, not sent
    again = sync_run(project, *sync, "worker.py")
    assert again.wait(timeout=60) == 0, again.err
    assert "host1: sent 1 file (6 B), deleted 1, 5 unchanged" in again.err, again.err
    (worker,) = seen(again)
    assert worker["conf"] == "second" and worker["notes"] is False and not (copy / "notes.txt").exists()
    after = (copy / "conf" / "b.txt").stat()
    assert (after.st_ino, after.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)

    third = sync_run(project, *sync, "worker.py")
    assert third.wait(timeout=60) == 0, third.err
    assert "host1: up to date (6 files)" in third.err, third.err
    assert sorted(p.name for p in copy.iterdir()) == sorted([MANIFEST_NAME, ".gitignore", "conf", "latest",
                                                               "tool.sh", "worker.py"])
    nothing_left(token, sshd_pool)


def test_a_dry_run_reads_each_host_and_lists_what_would_go(sync_run, tmp_path: Path, cache: Path) -> None:
    project = tmp_path / "plain"  # not a git work tree: everything but the fixed skips
    write(project, "worker.py", "print('hi')")
    write(project, "__pycache__/worker.cpython-311.pyc", "")
    write(project, "env/pyvenv.cfg", "home = /usr")
    write(project, "env/lib/site.py", "")
    run = sync_run(project, "--hosts", "host1,host2", "--sync", "--dry-run", "worker.py")
    assert run.wait(timeout=60) == 0, run.err
    assert "nothing was started; the hosts were only read, for --sync" in run.out
    assert "  host1, host2: would send 1 file (11 B), delete 0; 0 unchanged\n    send    worker.py" in run.out, run.out
    assert not (cache / "sync").exists()  # nothing written anywhere


def test_a_folder_that_cannot_be_written_is_named_per_host_and_nothing_starts(
    sync_run, tmp_path: Path, token: str, sshd_pool: SshdPool
) -> None:
    project = tmp_path / "project"
    marker = tmp_path / "started"
    write(project, "worker.py", f"open({str(marker)!r}, 'w').close()")
    run = sync_run(project, "--hosts", "host1,host2", "--sync", "--chdir", "/proc/ddplaunch-sync", "worker.py")
    assert run.wait(timeout=60) == 2, run.err
    for host in ("host1", "host2"):
        assert f"  {host}: cannot make the folder /proc/ddplaunch-sync for --sync there" in run.err, run.err
    assert "pass --chdir DIR to a folder you can write" in run.err and "nothing was started" in run.err
    assert "Traceback" not in run.err and not marker.exists()
    nothing_left(token, sshd_pool)


def test_mistakes_are_refused_before_any_host_is_contacted(sync_run, tmp_path: Path, sshd_pool: SshdPool) -> None:
    project = tmp_path / "project"
    write(project, "train.py", "")
    write(project, ".gitignore", "secret_*.py\n")
    write(project, "secret_train.py", "")
    write(project, "weights.pt", "w" * 5000)
    subprocess.run([*GIT, "init", "-q"], cwd=project, check=True, timeout=30)
    cases = {
        ("--sync", "--sync-max-size", "4K", "train.py"): "over the cap of 4.0 KiB. The largest: weights.pt (4.9 KiB)",
        ("--sync", "secret_train.py"): "--sync would not send secret_train.py: it is ignored by git",
        ("--sync", str(tmp_path / "elsewhere.py")): "and " + str(tmp_path / "elsewhere.py") + " is outside it",
        ("--sync-exclude", "x", "train.py"): "--sync-exclude only mean something with --sync",
        ("--sync", "--sync-max-size", "lots", "train.py"): "--sync-max-size 'lots': give a size such as 500M",
    }
    for args, message in cases.items():
        run = sync_run(project, "--hosts", "host1", *args)
        assert run.wait(timeout=30) == 2 and message in run.err and "Traceback" not in run.err, (args, run.err)
        assert "connecting" not in run.err
    assert not sshd_pool.session_processes()


@pytest.fixture(scope="session")
def torch_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh host's Python: a bare virtualenv that sees torch (and numpy...) but not ddplaunch,
    nor its click, rich, paramiko and psutil: a folder of links to the rest of this venv's
    site-packages, put on its path by a .pth (whose own .pth files are then not run)."""
    import site

    base = Path(site.getsitepackages()[0])
    venv = tmp_path_factory.mktemp("fresh-torch") / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    shown = venv.parent / "packages"
    shown.mkdir()
    left_out = ("ddplaunch", "launcher", "cli", "click", "rich", "paramiko", "psutil", "__editable__")
    for entry in base.iterdir():
        if not entry.name.lower().startswith(left_out) and entry.suffix != ".pth":
            (shown / entry.name).symlink_to(entry)
    python = venv / "bin" / "python"
    (next((venv / "lib").glob("python3.*")) / "site-packages" / "packages.pth").write_text(f"{shown}\n")
    for module, there in (("torch", True), ("launcher", False), ("click", False), ("paramiko", False)):
        found = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True, timeout=60, cwd=venv)
        assert (found.returncode == 0) is there, (module, found.stderr)
    return str(python)


def test_two_fresh_hosts_with_only_python_and_torch_train_the_demo_from_a_copy(
    sync_run, torch_python: str, tmp_path: Path, cache: Path, token: str, sshd_pool: SshdPool
) -> None:
    project = tmp_path / "demo"  # exists only here: the hosts get it from --sync
    write(project, "train_ddp.py", (REPO / "examples" / "train_ddp.py").read_text())
    run = sync_run(project, "--hosts", "host1,host2", "--nproc", "1", "--sync", "--python", torch_python,
                   "train_ddp.py", "--epochs", "2", "--samples", "256")
    assert run.wait(timeout=120) == 0, run.out + run.err
    assert "sending ddplaunch's agent" in run.err and f"host1, host2: Python 3.11.7 at {torch_python}" in run.err
    # Both hosts' copies are one folder here: whichever came second may find it up to date.
    assert "torch is not importable" not in run.err and ": sent 1 file (5.1 KiB)" in run.err, run.err
    assert "replicas identical on all 2 ranks" in run.out, run.out
    nothing_left(token, sshd_pool)


def test_a_terminal_shows_each_hosts_progress_while_it_syncs(
    ssh_home: SshHome, job_env: dict[str, str], tmp_path: Path, cache: Path
) -> None:
    project = tmp_path / "many"
    for i in range(400):
        write(project, f"pkg{i % 8}/m{i}.py", "x = 1\n" * 200)
    write(project, "worker.py", "print('ran')")
    env = ssh_home.env({**job_env, CACHE_VARIABLE: str(cache), "COLUMNS": "100"})
    argv = [sys.executable, "-m", "ddplaunch", "--hosts", "host1", "--sync", "worker.py"]
    code, screen = run_on_terminal(argv, cwd=project, env=env, size=(100, 30), timeout=60)
    text = screen.decode("utf-8", "replace")
    assert code == 0, text
    assert "host1: " in text and "/401 files, " in text, text  # the live line, while it ran
    assert "host1: sent 401 files (" in text, text
