"""`import ddplaunch`: spawn and run from Python, with the launcher's supervision (launcher.api).

Real processes throughout: the launcher runs as this process's child, the ranks as its. The
functions the ranks run are in tests/api_functions.py, found by name as mp.spawn finds them;
a lambda goes by value (cloudpickle). What must not leak into the caller (descriptors,
threads, signal handlers, children, folders) is counted over 100 calls.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import zipfile
from pathlib import Path

import psutil
import pytest
from api_functions import all_reduce, environment, fail_on_rank_one, noop
from helpers_cli import REPO, TOKEN_VARIABLE, cli_env, processes_with_token, wait_until

import ddplaunch

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def marked(token: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The launcher and every rank inherit this test's token (so what is left can be found)."""
    monkeypatch.setenv(TOKEN_VARIABLE, token)
    return token


def test_spawn_returns_each_ranks_value_and_every_rank_has_torchruns_environment(
    marked: str, capsys: pytest.CaptureFixture[str]
) -> None:
    values = ddplaunch.spawn(environment, args=("hello",), nprocs=3)
    assert isinstance(values, list) and [v["RANK"] for v in values] == ["0", "1", "2"]
    assert {v["WORLD_SIZE"] for v in values} == {"3"} and len({v["MASTER_PORT"] for v in values}) == 1
    assert len({v["TORCHELASTIC_RUN_ID"] for v in values}) == 1 and values[2]["LOCAL_RANK"] == "2"
    out = capsys.readouterr().out  # pytest's capture is no file descriptor: the output is copied into it
    assert sorted(line for line in out.splitlines() if "hello" in line) == [
        f"{rank} | hello from rank {rank}" for rank in range(3)]
    assert processes_with_token(marked) == []


def test_a_failing_rank_raises_job_failed_with_its_traceback_once_nothing_runs(
    marked: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ddplaunch.JobFailed) as raised:
        ddplaunch.spawn(fail_on_rank_one, nprocs=3, grace=5)
    assert processes_with_token(marked) == []  # the sleeping ranks were stopped before it was raised
    cause = raised.value.root_cause
    assert cause is not None and (cause.rank, cause.exit_code, cause.signal) == (1, 1, None)
    assert cause.description == "rank 1 failed (exit code 1)"
    assert cause.traceback is not None and cause.traceback.endswith("ValueError: rank 1 is unhappy")
    assert 'in fail_on_rank_one\n    raise ValueError(f"rank {rank} is unhappy")' in cause.traceback
    assert "spawned.py" not in cause.traceback  # it starts at the user's function
    assert cause.last_lines[-1] == "ValueError: rank 1 is unhappy"
    result = raised.value.result
    assert result.exit_code == 1 and result.rank_exit_codes == {0: -15, 1: 1, 2: -15}
    assert [line.split(":", 1)[1] for line in result.others] == [" terminated by ddplaunch (SIGTERM)"] * 2
    assert "ValueError: rank 1 is unhappy" in str(raised.value)
    assert "Root cause (first observed failure): rank 1" in capsys.readouterr().err


def test_a_lambda_goes_by_value_and_without_cloudpickle_the_error_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    offset = 100
    assert ddplaunch.spawn(lambda rank: rank + offset, nprocs=2) == [100, 101]
    monkeypatch.setitem(sys.modules, "cloudpickle", None)  # as if it were not installed
    with pytest.raises(ddplaunch.LaunchError, match="pip install cloudpickle") as raised:
        ddplaunch.spawn(lambda rank: rank, nprocs=2)
    assert "Move it to a module" in str(raised.value)


def test_run_returns_the_jobs_result_and_a_mistake_raises_before_anything_starts(marked: str) -> None:
    failed = ddplaunch.run(["sh", "-c", '[ "$RANK" = 1 ] && exit 3; exec sleep 60'], nproc=2, no_python=True, grace=5)
    assert (failed.exit_code, failed.ok, failed.rank_exit_codes) == (3, False, {0: -15, 1: 3})
    assert failed.root_cause is not None and failed.root_cause.rank == 1
    done = ddplaunch.run("/bin/true", nproc=2, no_python=True)
    assert done.ok and done.rank_exit_codes == {0: 0, 1: 0} and done.root_cause is None
    with pytest.raises(ddplaunch.LaunchError, match="no option 'nprocs'"):
        ddplaunch.run(["train.py"], nprocs=2)
    script = str(TESTS / "api_functions.py")
    with pytest.raises(ddplaunch.LaunchError, match="--nproc 'lots'"):  # the launcher's own checks, raised here
        ddplaunch.run([script], nproc="lots")
    with pytest.raises(ddplaunch.LaunchError, match="SCRIPT 'train.py' not found"):
        ddplaunch.run(["train.py"], nproc=1)
    assert processes_with_token(marked) == []


def caller_state() -> dict[str, object]:
    me = psutil.Process()
    return {
        "fds": sorted(os.listdir("/proc/self/fd")),
        "threads": sorted(t.name for t in threading.enumerate()),
        "handlers": [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGQUIT)],
        "children": [p.pid for p in me.children(recursive=True)],
        "folders": sorted(p.name for p in Path(tempfile.gettempdir()).iterdir()),
        "subreaper": is_subreaper(),  # the launcher, not the caller, adopts the ranks' orphans
    }


def is_subreaper() -> int:
    import ctypes

    value = ctypes.c_int()
    ctypes.CDLL(None, use_errno=True).prctl(37, ctypes.byref(value), 0, 0, 0)  # PR_GET_CHILD_SUBREAPER
    return value.value


def test_a_hundred_calls_leave_the_caller_as_it_was(
    marked: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the caller's folders, and the launchers'
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    before = caller_state()
    for _ in range(96):
        assert ddplaunch.run("/bin/true", no_python=True, nproc=1).ok
    assert ddplaunch.spawn(noop, nprocs=2) == [0, 1]
    context = ddplaunch.spawn(fail_on_rank_one, nprocs=2, grace=5, join=False)
    assert isinstance(context, ddplaunch.SpawnContext)
    for _ in range(2):  # every join says so
        with pytest.raises(ddplaunch.JobFailed, match="rank 1 failed"):
            context.join()
    assert ddplaunch.spawn(noop, nprocs=1, join=False).join()
    after = caller_state()
    assert {key: value for key, value in after.items() if before[key] != value} == {}


DRIVER = """
import os, sys
sys.path.insert(0, {tests!r})
import ddplaunch
from api_functions import sleep_with_a_child
if __name__ == "__main__":
    try:
        ddplaunch.spawn(sleep_with_a_child, args=({folder!r},), nprocs=2, grace=5)
    except KeyboardInterrupt:
        print("caught KeyboardInterrupt", flush=True)
"""


def start_driver(tmp_path: Path, token: str) -> tuple[subprocess.Popen[str], Path]:
    folder, temp = tmp_path / "running", tmp_path / "tmp"
    folder.mkdir()
    temp.mkdir()
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(tests=str(TESTS), folder=str(folder)))
    env = cli_env(**{TOKEN_VARIABLE: token, "TMPDIR": str(temp)})
    driver = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    wait_until(lambda: len(list(folder.glob("running-*"))) == 2, 30, "both ranks running")
    return driver, temp


def test_ctrl_c_in_the_caller_stops_every_rank_and_is_raised_again(tmp_path: Path, token: str) -> None:
    driver, temp = start_driver(tmp_path, token)
    assert len(processes_with_token(token)) >= 6  # driver, launcher, its guard, 2 ranks, 2 children
    driver.send_signal(signal.SIGINT)
    out, err = driver.communicate(timeout=30)
    assert "caught KeyboardInterrupt" in out and driver.returncode == 0, err
    assert "stopped by SIGINT" in err
    assert processes_with_token(token) == [] and list(temp.iterdir()) == []


def test_a_killed_caller_leaves_no_process_and_no_folder(tmp_path: Path, token: str) -> None:
    driver, temp = start_driver(tmp_path, token)
    driver.kill()
    driver.wait(timeout=10)
    wait_until(lambda: not processes_with_token(token), 15, "every process of the job gone")
    wait_until(lambda: not list(temp.iterdir()), 5, "the caller's folder removed")


def test_a_main_script_without_a_main_guard_is_told_to_add_one(tmp_path: Path, token: str) -> None:
    """Each rank runs the caller's script again to find its function there, as mp.spawn does:
    an unguarded spawn() must not start ranks of its own in every rank."""
    script = tmp_path / "unguarded.py"
    script.write_text("import ddplaunch\ndef work(rank):\n    return rank\nprint(ddplaunch.spawn(work, nprocs=2))\n")
    done = subprocess.run([sys.executable, str(script)], env=cli_env(**{TOKEN_VARIABLE: token}), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1 and done.stderr.count("ddplaunch: starting 2 worker(s)") == 1, done.stderr
    assert "Put the call under `if __name__ == \"__main__\":`" in done.stderr
    assert "ddplaunch.api.JobFailed: rank " in done.stderr and processes_with_token(token) == []


def test_a_two_rank_gloo_all_reduce_through_spawn() -> None:
    """The README's pytest example."""
    assert ddplaunch.spawn(all_reduce, args=(1.0,), nprocs=2) == [3.0, 3.0]


def test_installed_the_package_is_ddplaunch_and_nothing_else_is_at_the_top(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(REPO)], check=True, timeout=300, capture_output=True)
    (wheel,) = tmp_path.glob("ddplaunch-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        top = {name.split("/")[0] for name in names}
        assert top == {"ddplaunch", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, top
        assert archive.read("ddplaunch/cli.py") == (REPO / "cli.py").read_bytes()  # the file, not a link
        assert "ddplaunch/bootstrap/sitecustomize.py" in names and "ddplaunch/spawned.py" in names
        info = next(name for name in names if name.endswith("dist-info/entry_points.txt"))
        assert "ddplaunch = ddplaunch.cli:main" in archive.read(info).decode()
        assert json.dumps(sorted(top))  # readable in the failure message above


NOTEBOOK_CELL = """
import ddplaunch, os, time
def hello(rank):
    print("hello from", rank, flush=True)
    return rank * 2
print("values", ddplaunch.spawn(hello, nprocs=2))
"""
SLEEPING_CELL = """
def sleeper(rank):
    print("sleeping", rank, flush=True)
    time.sleep(60)
ddplaunch.spawn(sleeper, nprocs=2, env={{"{name}": "{token}"}})
"""


def cell_output(client, code: str, on_stream=None) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    """Execute a cell; its stream and error messages, until the kernel is idle again."""
    import queue
    import time

    msg_id = client.execute(code)
    said: list[tuple[str, str]] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            msg = client.get_iopub_msg(timeout=5)
        except queue.Empty:
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            said.append((msg["content"]["name"], msg["content"]["text"]))
            if on_stream is not None:
                on_stream(said)
        elif msg["msg_type"] == "error":
            said.append(("error", msg["content"]["ename"]))
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return said
    raise AssertionError(f"the cell did not finish: {said}")


def test_in_a_jupyter_kernel_a_cells_function_runs_its_output_lands_in_the_cell_and_interrupt_stops_it(
    token: str
) -> None:
    from jupyter_client.manager import start_new_kernel

    manager, client = start_new_kernel(kernel_name="python3", env={**os.environ, TOKEN_VARIABLE: token})
    try:
        said = cell_output(client, NOTEBOOK_CELL)  # hello is the cell's: it goes by value
        out = "".join(text for name, text in said if name == "stdout")
        assert "0 | hello from 0\n" in out and "1 | hello from 1\n" in out and "values [0, 2]\n" in out, said

        def interrupt_once_both_sleep(so_far: list[tuple[str, str]]) -> None:
            if "".join(text for _, text in so_far).count("sleeping") == 2:
                manager.interrupt_kernel()  # Jupyter's "interrupt kernel": SIGINT to the kernel

        cell = SLEEPING_CELL.format(name=TOKEN_VARIABLE, token=token)
        said = cell_output(client, cell, on_stream=interrupt_once_both_sleep)
        assert ("error", "KeyboardInterrupt") in said, said
        assert [p for p in processes_with_token(token) if "ipykernel" not in " ".join(p.cmdline())] == []
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
