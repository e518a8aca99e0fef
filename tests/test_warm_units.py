"""Table tests of --warm's pure parts: the modules option, the environment split between the
warm interpreter and each rank, a rank's request, and when a job starts cold."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from dataclasses import replace

import pytest
from helpers_cli import head_options

from ddplaunch.decide import warm_notes, warm_of
from ddplaunch.devices import DeviceMap
from ddplaunch.errors import LaunchError
from ddplaunch.plan import PlanInputs, Program, build_plan
from ddplaunch.procfs import KernelWait
from ddplaunch.supervisor import Unkillable, pick_unkillable
from ddplaunch.proctitle import ROOM_VARIABLE, Areas, environment_bytes, parse_areas, room_for, title_bytes
from ddplaunch.snapshot import StackFrame
from ddplaunch.stackparse import parse_faulthandler, parse_py_spy, without_zygote_frames
from ddplaunch.warm import (
    DEFAULT_MODULES,
    EarlyWrite,
    cold_reason,
    early_environment_writes,
    early_writes_reason,
    import_time_conflicts,
    parse_modules,
    rank_request,
    shared_environment,
)
from ddplaunch import zygote
from ddplaunch.zygote import RankRequest, cold_argv, cuda_driver_initialised, mapped_library, warm_title

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("text", "modules"), [
    ("torch", ("torch",)),
    ("torch,numpy", ("torch", "numpy")),
    (" torch , transformers.models ", ("torch", "transformers.models")),
])
def test_warm_modules_are_dotted_names(text: str, modules: tuple[str, ...]) -> None:
    assert parse_modules(text) == modules


@pytest.mark.parametrize("text", ["", "torch,", "torch,,numpy", "my-module", "1torch", "a..b"])
def test_warm_modules_that_are_not_module_names_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_modules(text)


@pytest.mark.parametrize(("environments", "shared"), [
    ([{"A": "1", "RANK": "0"}, {"A": "1", "RANK": "1"}], {"A": "1"}),
    ([{"A": "1", "B": "x"}, {"A": "2", "B": "x"}], {"B": "x"}),  # differs: not the zygote's
    ([{"A": "1", "B": "x"}, {"B": "x"}], {"B": "x"}),  # missing in one rank: not shared either
    ([{"RANK": "0", "LOCAL_RANK": "0", "TORCHELASTIC_RESTART_COUNT": "0"}], {}),  # one rank: still per rank
])
def test_the_warm_interpreter_gets_what_every_rank_shares(
    environments: list[dict[str, str]], shared: dict[str, str]
) -> None:
    assert shared_environment(environments) == shared


@pytest.mark.parametrize(("environments", "conflicts"), [
    ([{"RANK": "0", "OMP_NUM_THREADS": "4"}, {"RANK": "1", "OMP_NUM_THREADS": "4"}], ()),
    ([{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}], ("CUDA_VISIBLE_DEVICES",)),
    ([{"OMP_NUM_THREADS": "1", "MY_FLAG": "a"}, {"OMP_NUM_THREADS": "2", "MY_FLAG": "b"}], ("OMP_NUM_THREADS",)),
    ([{"TORCHELASTIC_ERROR_FILE": "/e/0"}, {"TORCHELASTIC_ERROR_FILE": "/e/1"}], ()),  # torch reads it late
])
def test_a_per_rank_variable_that_an_import_may_read_is_a_conflict(
    environments: list[dict[str, str]], conflicts: tuple[str, ...]
) -> None:
    assert import_time_conflicts(environments, shared_environment(environments)) == conflicts


@pytest.mark.parametrize(("argv", "kind", "target", "args"), [
    (("/py", "-u", "train.py", "--lr", "0.1"), "script", "train.py", ("--lr", "0.1")),
    (("/py", "-u", "-m", "pkg.train", "--x"), "module", "pkg.train", ("--x",)),
    (("/py", "-u", "t.py", "-m"), "script", "t.py", ("-m",)),  # the script's own -m
])
def test_a_rank_request_runs_what_the_cold_command_line_would(
    argv: tuple[str, ...], kind: str, target: str, args: tuple[str, ...]
) -> None:
    request = rank_request(argv, {"RANK": "3"}, frozenset({5, 1}), "/work")
    assert (request.kind, request.target, request.args) == (kind, target, args)
    assert json.loads(request.encode()) == {
        "kind": kind, "target": target, "args": list(args), "environment": {"RANK": "3"}, "cpus": [1, 5], "cwd": "/work",
    }


@pytest.mark.parametrize("argv", [
    ("/bin/tool", "--x"),  # --no-python
    ("/py", "-u", "-c", "import runpy", "t.py"),  # --run-path
])
def test_a_command_line_that_is_not_a_script_or_module_has_no_request(argv: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        rank_request(argv, {}, None, "/")


def test_the_warm_interpreter_decodes_a_request_as_written() -> None:
    text = b'{"kind": "module", "target": "m", "args": ["a"], "environment": {"K": "v"}, "cpus": null, "cwd": "/w"}'
    assert RankRequest.decode(text) == RankRequest("module", "m", ("a",), {"K": "v"}, None, "/w")
    with pytest.raises(ValueError):
        RankRequest.decode(text.replace(b'"module"', b'"exec"'))


def _plan(**changes: object) -> object:
    inputs = PlanInputs(
        program=Program("script", "train.py"), nproc=2, master_addr="127.0.0.1", master_port=29500,
        run_id="r", python=sys.executable, hostname="h", cpu_count=8, devices=DeviceMap(None, ()),
    )
    return build_plan(replace(inputs, **changes))  # type: ignore[arg-type]


@pytest.mark.parametrize(("changes", "reason"), [
    ({}, None),
    ({"python": "/usr/bin/python2"}, "the workers' Python (/usr/bin/python2) is not the launcher's"),
    ({"program": Program("exec", "/bin/true")}, "only a Python script or -m module can start warm"),
    ({"virtual_local_rank": True, "base_env": {"CUDA_VISIBLE_DEVICES": "0,1"}},
     "CUDA_VISIBLE_DEVICES differ(s) between ranks, and an import may read it"),
])
def test_when_a_plan_starts_cold(changes: dict[str, object], reason: str | None) -> None:
    found = cold_reason(_plan(**changes))  # type: ignore[arg-type]
    assert found == reason or (reason is not None and found is not None and found.startswith(reason))


@pytest.mark.parametrize(("changes", "modules", "note"), [
    ({"warm": True, "hosts": None}, DEFAULT_MODULES, None),
    ({"warm": True, "hosts": None, "warm_modules": "torch,numpy"}, ("torch", "numpy"), None),
    ({"hosts": None}, None, None),
    ({"warm": True}, DEFAULT_MODULES, None),  # the head's hosts: each node's agent goes warm
    ({"warm": True, "hosts": None, "no_python": True}, None,
     "--warm: --no-python runs an executable, not Python; starting the workers cold"),
    ({"warm": True, "hosts": None, "run_path": True}, None,
     "--warm: --run-path is not supported warm yet; starting the workers cold"),
])
def test_which_launches_go_warm(changes: dict[str, object], modules: tuple[str, ...] | None, note: str | None) -> None:
    options = head_options(**changes)
    assert warm_of(options) == modules
    assert warm_notes(options) == (() if note is None else (note,))


@pytest.mark.parametrize(("changes", "words"), [
    ({"warm_modules": "torch"}, "--warm-modules torch means nothing without --warm"),
    ({"warm": True, "warm_modules": "torch,my-lib"}, "'my-lib' is not a module name"),
])
def test_bad_warm_options_are_usage_errors(changes: dict[str, object], words: str) -> None:
    with pytest.raises(LaunchError, match=words):
        warm_of(head_options(hosts=None, **changes))


D, S, Z = KernelWait("D (disk sleep)", "__refrigerator"), KernelWait("S (sleeping)", None), KernelWait("Z (zombie)", None)


@pytest.mark.parametrize(("seen", "unkillable"), [
    ([(100, 100, D)], [Unkillable(100, 0, True, D)]),  # rank 0 itself, stuck in the kernel
    ([(101, 100, D)], [Unkillable(101, 0, False, D)]),  # its child, in its group
    ([(300, 300, S)], [Unkillable(300, None, False, S)]),  # a stray that left every group (setsid)
    ([(200, 200, S)], []),  # the warm interpreter: a helper, never signalled, is not unkillable
    ([(201, 200, S)], []),  # a middle process it forked, in its group
    ([(50, 1, S)], []),  # in the launcher's own group
    ([(100, 100, Z), (102, 100, None)], []),  # a zombie, a process gone since the scan
])
def test_what_is_named_unkillable_after_sigkill(
    seen: list[tuple[int, int, KernelWait | None]], unkillable: list[Unkillable]
) -> None:
    assert pick_unkillable(seen, {100: 0}, own_group=1, helpers={200}) == tuple(unkillable)


W = EarlyWrite


@pytest.mark.parametrize(("source", "writes", "imported"), [
    ('import os\nos.environ["OMP_NUM_THREADS"] = "4"\nimport torch\n', [W("OMP_NUM_THREADS", 2)], "torch"),
    ("import os\nos.environ.setdefault('MKL_NUM_THREADS', '1')\nimport torch.nn as nn\n", [W("MKL_NUM_THREADS", 2)], "torch.nn"),
    ("import os\nos.environ.update({'OMP_NUM_THREADS': '1', 'MY_FLAG': 'x'})\nfrom torch import nn\n", [W("OMP_NUM_THREADS", 2)], "torch"),
    ("import os\nos.environ.update(OMP_NUM_THREADS='1')\nimport torch\n", [W("OMP_NUM_THREADS", 2)], "torch"),
    ("import os\nos.environ.update(settings)\nimport torch\n", [W(None, 2)], "torch"),  # keys unknown: counted
    ("import os\nos.environ |= {'TORCH_LOGS': 'dynamo'}\nimport torch\n", [W("TORCH_LOGS", 2)], "torch"),
    ("import os\nos.putenv('OMP_NUM_THREADS', '4')\nimport torch\n", [W("OMP_NUM_THREADS", 2)], "torch"),
    ("from os import environ\nenviron['OMP_NUM_THREADS'] = '4'\nimport torch\n", [W("OMP_NUM_THREADS", 2)], "torch"),
    ("import os as o\no.environ['OMP_NUM_THREADS'] = '4'\nimport torch\n", [W("OMP_NUM_THREADS", 2)], "torch"),
    ("import os\nkey = 'OMP_NUM_THREADS'\nos.environ[key] = '4'\nimport torch\n", [W(None, 3)], "torch"),  # not literal: counted
    ("import os\nif True:\n    try:\n        os.environ['OMP_NUM_THREADS'] = '4'\n    except KeyError:\n        pass\n"
     "with open('x'):\n    os.environ['KMP_AFFINITY'] = 'y'\nimport torch\n", [W("OMP_NUM_THREADS", 4), W("KMP_AFFINITY", 8)], "torch"),
    ("import os\ndef main():\n    os.environ['OMP_NUM_THREADS'] = '4'\nimport torch\n", [], "torch"),  # in a function: ignored
    ("import os\nclass C:\n    os.environ['OMP_NUM_THREADS'] = '4'\nf = lambda: os.environ.setdefault('OMP_X', '1')\nimport torch\n", [], "torch"),
    ("import os, torch\nos.environ['OMP_NUM_THREADS'] = '4'\n", [], "torch"),  # after the import: ignored
    ("import os\nos.environ['MASTER_PORT'] = '1234'\nimport torch\n", [], "torch"),  # not read at import: ignored
    ("import os\nos.environ['OMP_NUM_THREADS'] = '4'\nimport numpy\ndef main():\n    import torch\n", [W("OMP_NUM_THREADS", 2)], None),
    ("import os\nos.environ['OMP_NUM_THREADS'] = '4'\nimport transformers\n", [W("OMP_NUM_THREADS", 2)], "transformers"),  # a --warm-modules package
    ("import os\nos.environ['OMP_NUM_THREADS'] = \n", [], None),  # a syntax error: the run reports it
])
def test_an_import_time_variable_set_before_a_warm_import_is_found(
    source: str, writes: list[EarlyWrite], imported: str | None
) -> None:
    assert early_environment_writes(source, ("torch", "transformers.models")) == (tuple(writes), imported)


@pytest.mark.parametrize(("writes", "module", "reason"), [
    ([W("OMP_NUM_THREADS", 2)], "torch", "train.py sets OMP_NUM_THREADS (line 2) before importing torch, which reads it at import"),
    ([W("OMP_NUM_THREADS", 2), W(None, 5)], "torch",
     "train.py sets OMP_NUM_THREADS (line 2), a variable named at run time (line 5) before importing torch, "
     "which may read them at import"),
])
def test_the_early_write_note(writes: list[EarlyWrite], module: str, reason: str) -> None:
    assert early_writes_reason("train.py", writes, module) == reason


_SCRIPT = StackFrame("/job/train.py", 3, "<module>")
_INNER = StackFrame("/job/train.py", 9, "step")
_BOOT = StackFrame("<string>", 1, "<module>")


def _zygote(folder: str, function: str) -> StackFrame:
    return StackFrame(f"{folder}/ddplaunch/zygote.py", 300, function)


_VENV, _SITE, _AGENT = "/w/.venv/ddplaunch-path", "/usr/lib/python3.11/site-packages", "/tmp/d/agent.zip"


@pytest.mark.parametrize(("frames", "kept"), [
    # a warm rank, wherever the package lies: only the script's frames stay
    ((_INNER, _SCRIPT, _zygote(_VENV, "_run_script"), _zygote(_VENV, "become_rank"), _zygote(_VENV, "main"), _BOOT),
     (_INNER, _SCRIPT)),
    ((_SCRIPT, _zygote(_SITE, "_run_module"), _zygote(_SITE, "main"), _BOOT), (_SCRIPT,)),
    ((_SCRIPT, _zygote(_AGENT, "_run_script"), _zygote(_AGENT, "main"), _BOOT), (_SCRIPT,)),
    ((_SCRIPT, _zygote(_VENV, "main")), (_SCRIPT,)),  # no BOOT frame (py-spy's view, say)
    # a cold rank, and the user's own "<string>" frames: kept
    ((_INNER, _SCRIPT), (_INNER, _SCRIPT)),
    ((_INNER, _BOOT), (_INNER, _BOOT)),  # python -c
    ((_BOOT, _SCRIPT, _zygote(_VENV, "_run_script"), _BOOT), (_BOOT, _SCRIPT)),  # exec'd inside the script
    ((_zygote(_VENV, "_run_script"), _SCRIPT), (_zygote(_VENV, "_run_script"), _SCRIPT)),  # not outermost
    ((_SCRIPT, StackFrame("/x/other/zygote.py", 1, "main"), _BOOT),
     (_SCRIPT, StackFrame("/x/other/zygote.py", 1, "main"), _BOOT)),  # somebody else's zygote.py
    ((_zygote(_VENV, "become_rank"), _BOOT), (_zygote(_VENV, "become_rank"), _BOOT)),  # before the script: all there is
    ((), ()),
])
def test_a_warm_rank_s_stack_is_shown_without_the_warm_interpreter_s_frames(
    frames: tuple[StackFrame, ...], kept: tuple[StackFrame, ...]
) -> None:
    assert without_zygote_frames(frames) == kept


def test_both_stack_parsers_drop_the_warm_interpreter_s_frames() -> None:
    dump = (
        "Current thread 0x00007f0000000001 (most recent call first):\n"
        '  File "/job/train.py", line 3 in <module>\n'
        f'  File "{_VENV}/ddplaunch/zygote.py", line 353 in _run_script\n'
        '  File "<string>", line 1 in <module>\n'
    )
    assert parse_faulthandler(dump, "0x01")[0].frames == (_SCRIPT,)
    spied = [{"thread_id": 1, "os_thread_id": 10, "frames": [
        {"name": "<module>", "filename": "/job/train.py", "line": 3},
        {"name": "main", "filename": f"{_VENV}/ddplaunch/zygote.py", "line": 116},
        {"name": "<module>", "filename": "<string>", "line": 1}]}]
    assert parse_py_spy(spied, 10)[0].frames == (_SCRIPT,)


_STAT_TAIL = " ".join(["0"] * 44) + " 1000 1100 1100 1300 0"  # fields 4-47, then 48-52


@pytest.mark.parametrize(("stat", "areas"), [
    (f"12 (python3) S {_STAT_TAIL}", Areas(1000, 1100, 1100, 1300)),
    (f"12 (a) b (c) S {_STAT_TAIL}", Areas(1000, 1100, 1100, 1300)),  # a command name with ") "
    ("12 (python3) S " + " ".join(["0"] * 44), None),  # a kernel before 3.5: no such fields
    (f"12 (python3) S {_STAT_TAIL}".replace("1000 1100", "1100 1000"), None),  # an empty argv area
])
def test_where_the_command_line_and_environment_lie(stat: str, areas: Areas | None) -> None:
    assert parse_areas(stat) == areas


@pytest.mark.parametrize(("title", "size", "written"), [
    ("python -u t.py", 20, b"python -u t.py\0\0\0\0\0."),  # its NUL ends it; a last byte that is not NUL makes it a title
    ("python -u train.py", 10, b"python -\0."),  # truncated to fit
    ("a\0b", 5, b"a b\0."),
    ("x", 2, None),
])
def test_a_title_fills_the_argv_area_exactly(title: str, size: int, written: bytes | None) -> None:
    assert title_bytes(title, size) == written


def test_a_title_is_at_most_the_page_the_kernel_reads() -> None:
    written = title_bytes("x" * 10000, 8192)
    assert written is not None and len(written) == 8192 and written.index(b"\0") == 4094


_ROOM = f"{ROOM_VARIABLE}=.........................".encode()


@pytest.mark.parametrize(("current", "wanted", "written"), [
    # the shared entries stay in place (a pointer a library kept still reads them); the rank's own take the room
    (b"A=1\0B=2\0" + _ROOM + b"\0", {"A": "1", "B": "2", "RANK": "3"},
     b"A=1\0B=2\0RANK=3\0" + b"\0" * (len(_ROOM) - 6)),
    (_ROOM + b"\0", {"RANK": "0"}, b"RANK=0\0" + b"\0" * (len(_ROOM) - 6)),
    (b"A=1\0" + _ROOM + b"\0", {"A": "2", "RANK": "3"}, None),  # another value: not the rank's
    (b"A=1\0" + _ROOM + b"\0", {"RANK": "3"}, None),  # a variable the rank has not
    (_ROOM + b"\0A=1\0", {"A": "1", "RANK": "3"}, None),  # the room is not last
    (b"A=1\0B=2\0", {"A": "1", "B": "2"}, None),  # no room
    (_ROOM + b"\0", {"RANK": "3", "LONG": "x" * 60}, None),  # too little room
])
def test_a_rank_s_environment_is_written_over_the_room(
    current: bytes, wanted: dict[str, str], written: bytes | None
) -> None:
    found = environment_bytes(current, wanted)
    assert found == written
    assert found is None or len(found) == len(current)


def test_the_room_makes_the_argv_area_a_page() -> None:
    argv = ("/usr/bin/python3", "-u", "-c", "pass")
    assert sum(len(a) + 1 for a in (*argv, room_for(argv))) == 4096  # each with its NUL
    assert room_for(("x" * 5000,)) == "."


@pytest.mark.parametrize(("request_", "argv"), [
    (RankRequest("script", "train.py", ("--lr", "0.1"), {}), ["/py", "-u", "train.py", "--lr", "0.1"]),
    (RankRequest("module", "pkg.train", ("-x",), {}), ["/py", "-u", "-m", "pkg.train", "-x"]),
])
def test_a_warm_rank_shows_its_cold_command_line(request_: RankRequest, argv: list[str]) -> None:
    assert cold_argv(request_, "/py") == argv


def test_the_warm_interpreter_s_title_names_its_modules_and_job() -> None:
    assert warm_title("torch,numpy", "ab12") == "ddplaunch --warm: torch, numpy (job ab12)"
    assert warm_title("torch", None) == "ddplaunch --warm: torch"


MAPS = """\
7f0000000000-7f0000001000 r--p 00000000 08:01 1234   /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000002000-7f0000003000 rw-p 00000000 00:00 0
7f0000004000-7f0000005000 r-xp 00001000 08:01 5678   /usr/lib/x86_64-linux-gnu/libcuda.so.535.104.05
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0      [stack]
"""


def test_the_cuda_driver_is_looked_for_among_the_mapped_libraries(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text(MAPS)
    assert mapped_library(str(maps), "libcuda.so") == "/usr/lib/x86_64-linux-gnu/libcuda.so.535.104.05"
    assert mapped_library(str(maps), "libcudart.so") is None
    assert mapped_library(str(tmp_path / "gone"), "libcuda.so") is None
    maps.write_text(MAPS.replace("libcuda.so.535.104.05", "libnccl.so.2"))
    assert not cuda_driver_initialised(str(maps))  # no driver loaded: nothing ran cuInit
    maps.write_text(MAPS.replace("/usr/lib/x86_64-linux-gnu/libcuda.so.535.104.05", str(tmp_path / "libcuda.so.1")))
    assert cuda_driver_initialised(str(maps))  # mapped but not loadable: assume the worst


def test_a_warm_interpreter_whose_imports_initialised_the_cuda_driver_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zygote, "_threads", lambda: 1)  # this test process's threads are not the question
    monkeypatch.setattr(zygote, "cuda_driver_initialised", lambda: True)
    why = zygote._warm_up(["json"])
    assert why is not None and "initialised the CUDA driver" in why and "PYTORCH_NVML_BASED_CUDA_CHECK=1" in why
    monkeypatch.setattr(zygote, "cuda_driver_initialised", lambda: False)
    assert zygote._warm_up(["json"]) is None
