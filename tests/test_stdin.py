"""--stdin: the launcher's stdin reaches one rank (0 by default), the others read /dev/null.

Real launches on one node: pdb at a breakpoint driven through a pipe and at a terminal (a
pty that the launcher controls, where Ctrl-C must still stop the job), the choice of rank,
restarts, a closed stdin and a launcher in the background of its terminal. Over SSH:
tests/test_ssh_launch.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers_cli import TerminalRun, processes_with_token, run_cli, table_column, wait_until, write_script
from ddplaunch.dryrun import stdin_line
from ddplaunch.errors import LaunchError
from ddplaunch.frames import STDIN_EOF_LINE, decode_stdin
from ddplaunch.options import parse_stdin
from ddplaunch.stdin_relay import PIECE_BYTES, PIECES_IN_FLIGHT, ForwardedStdin, StdinPipe

BREAKPOINT = """
x = 41
breakpoint()
print("done")
"""

# Each rank says what its stdin held, up to its end of file.
READ_ALL = """
import os, sys
print(f"rank {os.environ['RANK']} read {sys.stdin.read()!r}", flush=True)
"""


def pdb_answers(stdout: str) -> list[str]:
    """Rank 0's lines after pdb's prompt: what `p` printed, then the script's own."""
    return re.findall(r"^0 \| (?:\(Pdb\) )+(.*)$", stdout, re.MULTILINE)


def test_pdb_at_a_breakpoint_reads_the_launchers_stdin(tmp_path: Path, job_env: dict[str, str]) -> None:
    script = write_script(tmp_path / "bp.py", BREAKPOINT)
    result = run_cli(["--nproc", "1", script], job_env, cwd=tmp_path, input=b"p x+1\nc\n")
    assert result.code == 0, result.output
    assert pdb_answers(result.stdout) == ["42", "done"], result.stdout
    assert "BdbQuit" not in result.output


@pytest.mark.parametrize(
    ("flags", "reads"),
    [
        ([], {0: "'line\\n'", 1: "''"}),
        (["--stdin", "1"], {0: "''", 1: "'line\\n'"}),
        (["--stdin", "none"], {0: "''", 1: "''"}),
        (["--stdin", "NONE"], {0: "''", 1: "''"}),
    ],
    ids=["default-rank-0", "rank-1", "none", "none-any-case"],
)
def test_one_rank_reads_stdin_the_others_dev_null(
    tmp_path: Path, job_env: dict[str, str], flags: list[str], reads: dict[int, str]
) -> None:
    script = write_script(tmp_path / "read.py", READ_ALL)
    result = run_cli(["--nproc", "2", *flags, script], job_env, cwd=tmp_path, input=b"line\n")
    assert result.code == 0, result.output
    for rank, read in reads.items():
        assert f"{rank} | rank {rank} read {read}" in result.stdout, result.stdout


def test_a_restarted_rank_reads_on_where_the_failed_one_stopped(tmp_path: Path, job_env: dict[str, str]) -> None:
    script = write_script(tmp_path / "restart.py", """
        import os, sys
        attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
        print(f"attempt {attempt} read {os.read(0, 6)!r}", flush=True)
        sys.exit(3 if attempt == "0" else 0)
    """)
    result = run_cli(["--max-restarts", "1", script], job_env, cwd=tmp_path, input=b"first\nsecnd\n")
    assert result.code == 0, result.output
    assert "0 | attempt 0 read b'first\\n'" in result.stdout
    assert "0 | attempt 1 read b'secnd\\n'" in result.stdout


def test_a_closed_stdin_reads_as_empty(tmp_path: Path, job_env: dict[str, str]) -> None:
    """`ddplaunch ... <&-`: rank 0 reads /dev/null, not whatever file the launcher opened as fd 0."""
    import subprocess
    import sys

    script = write_script(tmp_path / "read.py", READ_ALL)
    log_dir = tmp_path / "logs"  # the launcher opens its log files before it starts the workers
    argv = [sys.executable, "-m", "ddplaunch", "--log-dir", str(log_dir), "--nproc", "2", script]
    done = subprocess.run(
        ["sh", "-c", 'exec "$@" <&-', "sh", *argv], cwd=tmp_path, env=job_env, capture_output=True, timeout=30
    )
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()
    assert "0 | rank 0 read ''" in out and "1 | rank 1 read ''" in out


def test_pdb_at_a_terminal_reads_typed_lines_and_ctrl_c_still_stops_the_job(
    tmp_path: Path, job_env: dict[str, str], token: str
) -> None:
    script = write_script(tmp_path / "bp.py", """
        import os, sys, time
        if os.environ["RANK"] == "1":
            print(f"rank 1 read {sys.stdin.read()!r}", flush=True)
            time.sleep(600)
        x = 41
        breakpoint()
        print("never: the job is stopped at the prompt")
    """)
    term = TerminalRun(["--nproc", "2", "--no-color", script], job_env, tmp_path)
    term.wait_for(rb"1 \| rank 1 read ''\r\n")  # rank 1 reads /dev/null, not the terminal
    term.wait_for(rb"0 \| -> print\(\"never")  # pdb stops at the line after breakpoint()
    term.wait_for(rb"0 \| \(Pdb\) ")  # its prompt shows, though it never ends its line
    term.type(b"p x+1\r")
    # what pdb printed for the typed line, after its prompt, whether that was drawn alone first or not
    term.wait_for(rb"0 \| (\(Pdb\) )?42\r\n")
    term.type(b"\x03")
    term.wait_for(rb"ddplaunch: got SIGINT: stopping all workers \(again to kill at once\)")
    # pdb takes the forwarded SIGINT and prompts again (--KeyboardInterrupt--; CPython's input()
    # loses one that lands while it flushes stderr), so the user presses Ctrl-C again:
    term.type(b"\x03")
    assert term.wait() == 130, term.screen.decode(errors="replace")
    assert b"killing all workers now" in term.screen
    assert b"0 | never: the job" not in term.screen
    wait_until(lambda: not processes_with_token(token), 10, "no worker of the job left")


def test_in_the_background_of_a_terminal_rank_0_does_not_take_the_shells_input(
    tmp_path: Path, job_env: dict[str, str]
) -> None:
    """A rank in its own session reads a terminal without SIGTTIN: a background job's rank 0
    would take the lines typed to the shell, so it reads /dev/null (and the launcher says so)."""
    script = write_script(tmp_path / "read.py", READ_ALL)
    term = TerminalRun(["--nproc", "1", "--no-color", script], job_env, tmp_path, job="background")
    assert term.wait() == 0, term.screen.decode(errors="replace")
    assert b"0 | rank 0 read ''\r\n" in term.screen
    assert b"started in the background of a terminal: rank 0 reads /dev/null" in term.screen


def test_dry_run_names_the_rank_that_reads_stdin(tmp_path: Path, job_env: dict[str, str]) -> None:
    script = write_script(tmp_path / "train.py", "print('never run')\n")
    result = run_cli(["--dry-run", "--nproc", "2", "--stdin", "1", script], job_env, cwd=tmp_path)
    assert result.code == 0, result.output
    assert "stdin: rank 1 reads ddplaunch's stdin; the other ranks read /dev/null\n" in result.stdout
    assert table_column(result.stdout, "global rank") == ["0", "1"]


# -- the pure parts ---------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "world_size", "rank"),
    [("0", 1, 0), ("3", 4, 3), (" 1 ", 2, 1), ("none", 4, None), ("None", 1, None), ("007", 8, 7)],
)
def test_parse_stdin(text: str, world_size: int, rank: int | None) -> None:
    assert parse_stdin(text, world_size) == rank


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "world_size", "message"),
    [
        ("4", 4, "--stdin 4 names a rank outside 0..3 (world size 4)"),
        ("-1", 4, "--stdin '-1' is not a rank"),
        ("all", 4, "--stdin 'all' is not a rank"),
        ("", 4, "--stdin '' is not a rank"),
        ("²", 4, "--stdin '²' is not a rank"),  # str.isdigit() accepts it, int() does not
    ],
)
def test_parse_stdin_refuses(text: str, world_size: int, message: str) -> None:
    with pytest.raises(LaunchError, match=re.escape(message)):
        parse_stdin(text, world_size)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("nnodes", "node_rank", "stdin_rank", "line"),
    [
        (1, 0, 0, "stdin: rank 0 reads ddplaunch's stdin; the other ranks read /dev/null"),
        (2, 1, 3, "stdin: rank 3 reads ddplaunch's stdin; the other ranks read /dev/null"),
        (2, 1, 0, "stdin: rank 0 is on another node, which gives it that node's stdin; every rank here reads /dev/null"),
        (1, 0, None, "stdin: none (--stdin none): every rank reads /dev/null"),
    ],
)
def test_dry_run_stdin_line(nnodes: int, node_rank: int, stdin_rank: int | None, line: str) -> None:
    from ddplaunch.devices import default_device_map
    from ddplaunch.plan import PlanInputs, Program, build_plan

    inputs = PlanInputs(
        program=Program("script", "train.py"), nproc=2, master_addr="10.0.0.1", master_port=29500, run_id="r",
        python="python3", hostname="h", cpu_count=2, devices=default_device_map(2, (), None), nnodes=nnodes,
        node_rank=node_rank, stdin_rank=stdin_rank,
    )
    assert stdin_line(build_plan(inputs)) == line


# -- over SSH, each side on its own (the whole path: tests/test_ssh_launch.py) ----------------------


class Told:
    """Stands in for the agent's channel: the lines the head tells it."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def tell(self, line: bytes) -> None:
        self.lines.append(line)


def head_forwards(fd: int, asks: int) -> list[bytes]:
    """What the head tells the agent of stdin `fd`: `asks` asks first, then one more for each
    piece told (it went into the rank's pipe), as the agent does."""
    import selectors

    agent = Told()
    with selectors.DefaultSelector() as selector:
        stdin = ForwardedStdin(selector, lambda text: None, fd)
        for _ in range(asks):
            stdin.want(agent, 0)  # type: ignore[arg-type]
        answered = 0
        while STDIN_EOF_LINE not in agent.lines:
            if len(agent.lines) == asks + answered:  # every piece asked for is told
                assert fd not in selector.get_map(), "reads on, beyond what the agent asked for"
            if len(agent.lines) > answered:
                answered += 1
                stdin.want(agent, 0)  # type: ignore[arg-type]
                continue
            events = selector.select(timeout=5)  # the head's loop, waiting for stdin to be readable
            assert events, "stdin never became readable"
            for key, _ in events:
                key.data.forward()
    return agent.lines


def open_source(kind: str, data: bytes, tmp_path: Path) -> int:
    """The head's stdin as a pipe (fed by a thread), a regular file (which epoll refuses) or /dev/null."""
    import os
    import threading

    if kind == "file":
        (tmp_path / "input").write_bytes(data)
        return os.open(tmp_path / "input", os.O_RDONLY)
    if kind == "devnull":
        return os.open(os.devnull, os.O_RDONLY)
    read_fd, write_fd = os.pipe()

    def feed() -> None:
        with open(write_fd, "wb") as pipe:
            try:
                pipe.write(data)
            except BrokenPipeError:
                pass  # the test failed and closed the other end

    threading.Thread(target=feed, daemon=True).start()
    return read_fd


@pytest.mark.unit
@pytest.mark.parametrize(
    ("kind", "size", "asks"),
    [("pipe", 300_000, 1), ("pipe", 300_000, 3), ("pipe", 0, 1), ("file", 300_000, 2), ("devnull", 0, 1)],
    ids=["pipe", "pipe-3-asks", "empty-pipe", "file", "devnull"],
)
def test_the_head_forwards_its_stdin_a_piece_per_ask_then_its_end(
    kind: str, size: int, asks: int, tmp_path: Path
) -> None:
    import os

    data = bytes(range(256)) * (size // 256) + b"tail"[: size % 256]
    fd = open_source(kind, data, tmp_path)
    try:
        lines = head_forwards(fd, asks)
    finally:
        os.close(fd)
    *pieces, last = lines
    assert last == STDIN_EOF_LINE
    assert all(line.startswith(b"stdin ") for line in pieces)
    decoded = [decode_stdin(line.split()[1].decode()) for line in pieces]
    assert b"".join(decoded) == data
    assert all(0 < len(piece) <= PIECE_BYTES for piece in decoded)


@pytest.mark.unit
def test_the_agents_pipe_writes_the_pieces_in_order_asks_after_each_and_closes_at_the_end() -> None:
    import queue

    pieces = [b"a" * 100_000, b"b\n", b"\x00c"]  # the first fills the pipe: the writer waits for us
    queued: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
    for piece in [*pieces, None]:  # the head's lines may come before the pipe is made
        queued.put(piece)
    asks: list[int] = []
    pipe = StdinPipe(queued, lambda: asks.append(1))
    with open(pipe.read_fd, "rb") as rank_stdin:
        assert rank_stdin.read() == b"".join(pieces)  # read() returns at the end of file: closed
    assert len(asks) == PIECES_IN_FLIGHT + len(pieces)  # a few at the start, then one after each piece
