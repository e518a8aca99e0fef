"""Table tests of --warm's pure parts: the modules option, the environment split between the
warm interpreter and each rank, a rank's request, and when a job starts cold."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import pytest
from helpers_cli import head_options

from ddplaunch.decide import warm_notes, warm_of
from ddplaunch.devices import DeviceMap
from ddplaunch.errors import LaunchError
from ddplaunch.plan import PlanInputs, Program, build_plan
from ddplaunch.procfs import KernelWait
from ddplaunch.supervisor import Unkillable, pick_unkillable
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
from ddplaunch.zygote import RankRequest

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
