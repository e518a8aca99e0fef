"""The head ships its own agent: a zip of its code, cached per host by content hash.

The pure part (the zip is the same bytes for the same code, and runs as the launcher) is
tested directly; the rest over real sshd hosts (as in test_ssh_launch), with a bare
virtualenv made here standing in for a fresh host: no ddplaunch, no torch. The remote cache
is a folder of the test's own (DDPLAUNCH_AGENT_CACHE), so "first run" means first.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers_sftp import LocalSftp
from helpers_cli import TOKEN_VARIABLE, Run, processes_with_token, wait_until, write_script
from ddplaunch.agent import PythonFacts
from ddplaunch.fanout import preflight_problem, remote_command
from ddplaunch.ship import CACHE_VARIABLE, OLD_PYTHON, ZIP_TIME, AgentPlace, AgentZip, build_agent_zip, place_of, upload
from sshd import SshdPool, SshHome

PYENV = Path("/root/.pyenv/versions")
# True once the agent's path needs only the standard library (branch i11-agentcli, merged):
# the fresh host then gets no copy of the head's click/psutil/rich, and the other CPython
# minors lose their xfail mark. Until then the agent imports click (cli.py) there.

# A worker that needs no torch: it says which bootstrap it ran (the stack reports' sitecustomize).
WORKER = """
import os, sys
boot = sys.modules.get("sitecustomize")
print(f"ok rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']} boot {getattr(boot, '__file__', None)}", flush=True)
"""


def interpreter(version: str) -> str:
    """That pyenv Python; skipped where it is missing, never under CI (its machine has them all)."""
    python = PYENV / version / "bin" / "python3"
    if not python.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{python} is missing; CI's machine must have every CPython minor")
        pytest.skip(f"{python} is not installed here")
    return str(python)


# -- the zip (pure, and a local run) --------------------------------------------------------------


@pytest.mark.unit
def test_the_same_code_makes_the_same_zip_named_by_its_hash() -> None:
    first, second = build_agent_zip(), build_agent_zip()
    assert first.data == second.data
    assert first.name == f"agent-{hashlib.sha256(first.data).hexdigest()[:16]}.zip"
    with zipfile.ZipFile(io.BytesIO(first.data)) as archive:
        entries = archive.infolist()
    names = [e.filename for e in entries]
    assert names[0] == "__main__.py" and names[1:] == sorted(names[1:])
    assert "ddplaunch/bootstrap/sitecustomize.py" in names and "ddplaunch/ship.py" in names and "ddplaunch/cli.py" in names
    assert not any("__pycache__" in n or not n.endswith((".py", ".pyc")) for n in names)
    assert all(n[:-1] in names for n in names if n.endswith(".pyc"))  # bytecode only beside its source
    assert {e.date_time for e in entries} == {ZIP_TIME}


@pytest.mark.unit
def test_a_python_facts_note_reads_back_and_other_notes_are_not_one() -> None:
    facts = PythonFacts("3.12.1", "/usr/bin/python3", False)
    assert PythonFacts.from_note(facts.to_note()) == facts
    assert PythonFacts.from_note("host1 says hello") is None
    assert PythonFacts.from_note("ddplaunch-python {not json") is None


@pytest.mark.unit
def test_upload_makes_private_folders_renames_into_place_and_skips_a_copy_of_that_size(tmp_path: Path) -> None:
    sftp, agent = LocalSftp(tmp_path), AgentZip(b"PK-zip-bytes")
    place = place_of(agent, {})  # ~/.cache/ddplaunch
    assert upload(sftp, agent, place) is True
    written = tmp_path / ".cache" / "ddplaunch" / agent.name
    assert written.read_bytes() == agent.data and [p.name for p in written.parent.iterdir()] == [agent.name]
    assert stat.S_IMODE(written.parent.stat().st_mode) == stat.S_IMODE(written.parent.parent.stat().st_mode) == 0o700
    assert upload(sftp, agent, place) is False and sftp.writes == 1  # there, whole: not sent again
    written.write_bytes(b"PK-cut")  # a copy cut short (another size) is replaced
    assert upload(sftp, agent, place) is True and written.read_bytes() == agent.data


@pytest.fixture(scope="session")
def agent_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("zip") / "agent.zip"
    path.write_bytes(build_agent_zip().data)
    return path


def test_the_zip_runs_as_the_launcher_from_bytecode_and_an_old_python_says_why_not(agent_zip: Path, tmp_path: Path) -> None:
    bad = subprocess.run([sys.executable, str(agent_zip), "--agent"], cwd=tmp_path, capture_output=True, timeout=30)
    assert bad.returncode == 2 and b"Traceback" not in bad.stderr, bad.stderr  # the CLI's own bad-usage exit
    old = subprocess.run([interpreter("3.9.18"), str(agent_zip), "--agent"], capture_output=True, timeout=30)
    assert old.returncode == OLD_PYTHON
    assert b"Python 3.9.18 at" in old.stderr and b"needs Python 3.10 or newer" in old.stderr
    assert b"--python PATH" in old.stderr
    # This Python loads the modules' bytecode from the zip; another minor compiles the source.
    where = "import sys; sys.path.insert(0, sys.argv[1]); import ddplaunch.agent as a; print(a.__file__)"
    for python, suffix in ((sys.executable, ".pyc"), (interpreter("3.12.1"), ".py")):
        loaded = subprocess.run([python, "-c", where, str(agent_zip)], capture_output=True, text=True, timeout=30)
        assert loaded.stdout.strip() == f"{agent_zip}/ddplaunch/agent{suffix}", loaded.stderr


def test_run_from_the_zip_the_bootstrap_is_written_into_the_jobs_private_folder(agent_zip: Path, tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    code = (f"import sys; sys.path.insert(0, {str(agent_zip)!r}); from ddplaunch import snapshot; "
            f"snapshot.prepare_bootstrap({str(private)!r}); print(snapshot.bootstrap_dir())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    folder = Path(done.stdout.strip())
    assert folder == private / "bootstrap" and stat.S_IMODE(folder.stat().st_mode) == 0o700
    source = Path(__file__).parents[1] / "launcher" / "bootstrap" / "sitecustomize.py"
    assert (folder / "sitecustomize.py").read_bytes() == source.read_bytes()


# -- over SSH: a fresh host ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def fresh_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A bare virtualenv of 3.11 (whose base has click; a bare venv does not see it): no
    ddplaunch, no click, rich, paramiko or psutil, no torch: only the standard library."""
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    subprocess.run([interpreter("3.11.7"), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    for module in ("ddplaunch", "click", "psutil"):
        lacks = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True, timeout=30, cwd=venv)
        assert lacks.returncode != 0, module  # not there
    return str(python)


def nothing_left(token: str, pool: SshdPool) -> None:
    wait_until(lambda: not processes_with_token(token, in_command_line=True), 15, "no worker or agent of the job left")
    wait_until(lambda: not pool.session_processes(), 15, "no SSH session left on any host")


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "remote-cache" / "ddplaunch"  # absolute: every test host is this machine


@pytest.fixture
def launch(start, ssh_home: SshHome, job_env: dict[str, str], token: str, cache: Path):
    def _launch(*args: str) -> Run:
        env = ssh_home.env({**job_env, CACHE_VARIABLE: str(cache)})
        return start("--env", f"{TOKEN_VARIABLE}={token}", "--run-id", token, *args, env=env)

    return _launch


def test_a_fresh_host_gets_the_agent_once_and_runs_the_job_there(
    launch, fresh_python: str, cache: Path, tmp_path: Path, token: str, sshd_pool: SshdPool
) -> None:
    script = write_script(tmp_path / "worker.py", WORKER)
    first = launch("--hosts", "host1,host2", "--nproc", "1", "--python", fresh_python, script)
    assert first.wait(timeout=60) == 0, first.err
    zips = list(cache.glob("agent-*.zip"))
    assert [z.name for z in zips] == [build_agent_zip().name] and not list(cache.glob("*.part"))
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700 and stat.S_IMODE(cache.parent.stat().st_mode) == 0o700
    sent = [line for line in first.err.splitlines() if "sending ddplaunch's agent" in line]
    assert len(sent) == 1 and sent[0].endswith(f"to {zips[0]} on host1, host2"), first.err  # both at once
    assert f"host1, host2: Python 3.11.7 at {fresh_python}" in first.err
    for host in ("host1", "host2"):
        assert f"warning: {host}: torch is not importable by {fresh_python}" in first.err
    lines = sorted(line for line in first.out.splitlines() if " ok rank " in line)
    assert len(lines) == 2 and all("of 2 boot /" in line and ".zip" not in line for line in lines), first.out
    assert first.err.index("warning: host2") < first.err.index("all 2 hosts ready")  # before anything started
    before = zips[0].stat()

    # Again, cached: nothing is sent; a --no-python job needs no torch, so no warning either.
    second = launch("--hosts", "host1,host2", "--nproc", "1", "--python", fresh_python, "--no-python", "/bin/echo", "hi")
    assert second.wait(timeout=60) == 0, second.err
    # No "sending": each host's command found the copy itself (one round trip, no SFTP).
    assert "sending ddplaunch's agent" not in second.err and "torch is not importable" not in second.err
    assert "hi" in second.out and f"Python 3.11.7 at {fresh_python}" in second.err
    after = zips[0].stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    nothing_left(token, sshd_pool)


def test_a_python_older_than_3_10_is_named_per_host_and_nothing_starts(
    launch, tmp_path: Path, token: str, sshd_pool: SshdPool
) -> None:
    python = interpreter("3.9.18")
    marker = tmp_path / "started"
    script = write_script(tmp_path / "worker.py", f"open({str(marker)!r}, 'w').close()")
    run = launch("--hosts", "host1,host2", "--python", python, script)
    assert run.wait(timeout=60) == 2, run.err
    for host in ("host1", "host2"):
        assert f"{host}: Python 3.9.18 at {python} is too old" in run.err, run.err
    assert "--python PATH" in run.err and "nothing was started" in run.err and "Traceback" not in run.err
    assert not marker.exists()
    nothing_left(token, sshd_pool)


@pytest.mark.parametrize("version", ["3.10.13", "3.12.1", "3.13.0"])
def test_the_agent_runs_on_every_other_cpython_minor(
    launch, version: str, tmp_path: Path, token: str, sshd_pool: SshdPool
) -> None:
    python = interpreter(version)
    script = write_script(tmp_path / "worker.py", WORKER)
    run = launch("--hosts", "host1", "--nproc", "1", "--python", python, script)
    assert run.wait(timeout=60) == 0, run.err
    assert f"host1: Python {version} at {python}" in run.err
    assert "ok rank 0 of 1 boot /" in run.out
    nothing_left(token, sshd_pool)


# The remote line, run by a real shell: which interpreter becomes the agent.
PRINT_ARGV = '#!/bin/sh\nprintf "%s\\n" "$0" "$@"\n'


@pytest.mark.parametrize("heads_there", [True, False])
def test_a_host_without_the_heads_python_runs_the_agent_with_python3(tmp_path: Path, heads_there: bool) -> None:
    """A fresh host has no copy of the head's virtualenv: the line falls back to python3 there;
    where the head's path exists (a shared filesystem, a cloned machine) that one wins."""
    bin_dir, venv = tmp_path / "bin", tmp_path / "venv"
    bin_dir.mkdir()
    (venv / "bin").mkdir(parents=True)
    for stub in [bin_dir / "python3", *([venv / "bin" / "python"] if heads_there else [])]:
        stub.write_text(PRINT_ARGV)
        stub.chmod(0o755)
    (tmp_path / "agent-x.zip").write_bytes(b"zip")
    place = AgentPlace(str(tmp_path), "agent-x.zip", 3)
    line = remote_command((str(venv / "bin" / "python"), "python3"), place, ["--agent", "a b"], str(tmp_path))
    ran = subprocess.run(["sh", "-c", line], env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)},
                         capture_output=True, text=True, timeout=10)
    chosen = str(venv / "bin" / "python") if heads_there else str(bin_dir / "python3")
    assert (ran.returncode, ran.stdout.splitlines()) == (0, [chosen, str(tmp_path / "agent-x.zip"), "--agent", "a b"])


def test_a_host_with_neither_python_says_so_before_anything_is_sent(tmp_path: Path) -> None:
    place = AgentPlace(str(tmp_path), "agent-x.zip", 3)  # not there either: the Python is named first
    line = remote_command(("/no/venv/bin/python", "python3"), place, ["--agent"], str(tmp_path))
    ran = subprocess.run(["/bin/sh", "-c", line], env={"PATH": str(tmp_path), "HOME": str(tmp_path)},
                         capture_output=True, text=True, timeout=10)
    assert ran.returncode == 121
    said = preflight_problem("host1", 121, [], str(tmp_path), "/no/venv/bin/python or python3")
    assert said == ("host1: no Python at /no/venv/bin/python or python3; install Python 3.10 or newer there or "
                    "pass --python PATH.")
