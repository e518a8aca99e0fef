"""Table tests of the pure planning core (launcher/plan.py)."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from ddplaunch.devices import DeviceMap, Gpu, default_device_map, map_gpu_ids
from ddplaunch.dryrun import render_plan
from ddplaunch.errors import LaunchError
from ddplaunch.logs import rank_prefixes
from ddplaunch.plan import (
    RANK_VARIABLES,
    PlanInputs,
    Program,
    Terminal,
    build_plan,
    omp_threads,
    parse_env_assignments,
    parse_nproc,
    prefix_width,
    resolve_nproc,
    validate_topology,
    worker_argv,
)

pytestmark = pytest.mark.unit

PY = "/usr/bin/python3"
CPU_DEVICES_4 = DeviceMap(cuda_visible_devices=None, physical=("",) * 4)


def inputs(**overrides: object) -> PlanInputs:
    """Plan inputs for one CPU node of 4 workers, with fixed facts; override any field."""
    base = dict(
        program=Program("script", "train.py", ("--lr", "0.1")),
        nproc=4,
        master_addr="127.0.0.1",
        master_port=29500,
        run_id="run42",
        python=PY,
        hostname="node0",
        cpu_count=16,
        devices=CPU_DEVICES_4,
        base_env={"HOME": "/home/u", "PATH": "/usr/bin"},
        error_dir="/tmp/errs",
    )
    base.update(overrides)
    if "devices" not in overrides and base["nproc"] != 4:
        base["devices"] = DeviceMap(None, ("",) * int(base["nproc"]))  # type: ignore[arg-type]
    return PlanInputs(**base)  # type: ignore[arg-type]


# -- parse_nproc -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "gpu_count", "cpu_count", "expected"),
    [
        ("1", 0, 8, 1),
        ("4", 0, 8, 4),
        ("16", 2, 8, 16),  # a number is a number, whatever the machine has
        (" 3 ", 0, 8, 3),
        ("007", 0, 8, 7),
        ("auto", 8, 32, 8),  # GPUs first
        ("auto", 0, 32, 32),  # else CPUs
        ("AUTO", 2, 32, 2),
        ("gpu", 4, 32, 4),
        ("Gpu", 1, 32, 1),
        ("cpu", 8, 32, 32),
        ("cpu", 0, 3, 3),
    ],
)
def test_parse_nproc_ok(text: str, gpu_count: int, cpu_count: int, expected: int) -> None:
    assert parse_nproc(text, gpu_count=gpu_count, cpu_count=cpu_count) == expected


@pytest.mark.parametrize("text", ["0", "-1", "abc", "", " ", "1.5", "2x", "4,4", "+3", "gpus", "0x2"])
def test_parse_nproc_bad_value(text: str) -> None:
    with pytest.raises(LaunchError) as info:
        parse_nproc(text, gpu_count=2, cpu_count=8)
    message = str(info.value)
    assert "--nproc" in message
    assert repr(text) in message  # the bad value is quoted back
    assert "positive integer" in message


def test_parse_nproc_gpu_without_gpus() -> None:
    with pytest.raises(LaunchError) as info:
        parse_nproc("gpu", gpu_count=0, cpu_count=8)
    message = str(info.value)
    assert "--nproc gpu" in message
    assert "no GPU" in message
    assert "--nproc cpu" in message  # the way out


# -- resolve_nproc -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "gpu_ids", "gpu_count", "cpu_count", "expected"),
    [
        (None, None, 0, 8, 1),  # default: one worker
        (None, None, 8, 8, 1),  # GPUs on the box do not change the default
        (None, (), 8, 8, 1),
        (None, ("0", "2", "4", "6"), 8, 8, 4),  # default: one per listed GPU
        (None, ("GPU-abc1",), 8, 8, 1),
        ("auto", ("1", "3"), 8, 8, 2),  # auto/gpu with --gpu-ids: the list decides
        ("gpu", ("1", "3"), 8, 8, 2),
        ("GPU", ("1", "3", "5"), 8, 8, 3),
        ("2", ("1", "3"), 8, 8, 2),  # an explicit count that matches
        ("4", None, 0, 8, 4),
        ("auto", None, 8, 32, 8),
        ("auto", None, 0, 32, 32),
        ("cpu", None, 8, 32, 32),
    ],
)
def test_resolve_nproc(text, gpu_ids, gpu_count, cpu_count, expected) -> None:
    assert resolve_nproc(text, gpu_ids=gpu_ids, gpu_count=gpu_count, cpu_count=cpu_count) == expected


@pytest.mark.parametrize(
    ("text", "gpu_ids"),
    [
        ("3", ("0", "1")),
        ("1", ("0", "1")),
        ("cpu", ("0", "1")),  # cpu count 8 != 2 GPUs
    ],
)
def test_resolve_nproc_mismatch(text: str, gpu_ids: tuple[str, ...]) -> None:
    with pytest.raises(LaunchError) as info:
        resolve_nproc(text, gpu_ids=gpu_ids, gpu_count=8, cpu_count=8)
    message = str(info.value)
    assert "--nproc" in message and "--gpu-ids" in message
    assert ",".join(gpu_ids) in message
    assert "does not match" in message


def test_resolve_nproc_bad_value_is_reported_as_such() -> None:
    with pytest.raises(LaunchError, match="--nproc 'zero'"):
        resolve_nproc("zero", gpu_ids=None, gpu_count=0, cpu_count=8)


# -- parse_env_assignments ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pairs", "gpu_ids_given", "expected"),
    [
        ((), False, ()),
        (("FOO=bar",), False, (("FOO", "bar"),)),
        (("FOO=",), False, (("FOO", ""),)),  # empty value is a value
        (("A=b=c",), False, (("A", "b=c"),)),  # split at the first '='
        (("_X1=1", "NCCL_DEBUG=INFO"), False, (("_X1", "1"), ("NCCL_DEBUG", "INFO"))),
        (("X=1", "X=2"), False, (("X", "1"), ("X", "2"))),  # order kept, the last one wins later
        (("X= spaced value ",), False, (("X", " spaced value "),)),
        (("CUDA_VISIBLE_DEVICES=0,1",), False, (("CUDA_VISIBLE_DEVICES", "0,1"),)),  # free without --gpu-ids
        (("OMP_NUM_THREADS=4",), True, (("OMP_NUM_THREADS", "4"),)),
        (("TORCH_NCCL_ASYNC_ERROR_HANDLING=0",), False, (("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0"),)),
        (("rank=3",), False, (("rank", "3"),)),  # variables are case-sensitive
    ],
)
def test_parse_env_assignments_ok(pairs, gpu_ids_given, expected) -> None:
    assert parse_env_assignments(pairs, gpu_ids_given=gpu_ids_given) == expected


@pytest.mark.parametrize("pair", ["FOO", "", "=x", "1X=2", "A-B=1", "A B=1", " A=1", "A.B=1", "É=1"])
def test_parse_env_assignments_malformed(pair: str) -> None:
    with pytest.raises(LaunchError) as info:
        parse_env_assignments(("OK=1", pair), gpu_ids_given=False)
    message = str(info.value)
    assert f"--env {pair!r}" in message
    assert "KEY=VALUE" in message


@pytest.mark.parametrize(
    ("key", "gpu_ids_given", "flag"),
    [
        ("MASTER_PORT", False, "--master-port"),
        ("MASTER_ADDR", False, "--master-addr"),
        ("NODE_RANK", False, "--node-rank"),
        ("GROUP_RANK", False, "--node-rank"),
        ("WORLD_SIZE", False, "--nproc and --nnodes"),
        ("LOCAL_WORLD_SIZE", False, "--nproc"),
        ("TORCHELASTIC_RUN_ID", False, "--run-id"),
        ("TORCHELASTIC_MAX_RESTARTS", False, "--max-restarts"),
        ("CUDA_VISIBLE_DEVICES", True, "--gpu-ids"),
    ],
)
def test_parse_env_reserved_names_the_flag(key: str, gpu_ids_given: bool, flag: str) -> None:
    with pytest.raises(LaunchError) as info:
        parse_env_assignments((f"{key}=1",), gpu_ids_given=gpu_ids_given)
    message = str(info.value)
    assert f"--env {key}=" in message
    assert f"use {flag} instead" in message


@pytest.mark.parametrize("key", ["RANK", "LOCAL_RANK", "ROLE_RANK", "ROLE_NAME", "TORCHELASTIC_RESTART_COUNT",
                                 "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE", "GROUP_WORLD_SIZE",
                                 "ROLE_WORLD_SIZE", "TORCHELASTIC_SIGNALS_TO_HANDLE"])
def test_parse_env_reserved_without_flag(key: str) -> None:
    with pytest.raises(LaunchError) as info:
        parse_env_assignments((f"{key}=3",), gpu_ids_given=False)
    message = str(info.value)
    assert f"--env {key}=" in message
    assert "sets it for every worker" in message


def test_every_rank_variable_is_reserved() -> None:
    for key in RANK_VARIABLES:
        with pytest.raises(LaunchError):
            parse_env_assignments((f"{key}=x",), gpu_ids_given=False)


# -- validate_topology -------------------------------------------------------------------------


def _topology_accepted(nnodes: int, node_rank: int) -> bool:
    try:
        validate_topology(nnodes, node_rank)
    except LaunchError:
        return False
    return True


@pytest.mark.parametrize("nnodes", [1, 2, 16])
def test_validate_topology_ok(nnodes: int) -> None:
    """Exactly ranks 0..nnodes-1 pass: the edges and one step past each side are tried."""
    tried = range(-2, nnodes + 2)
    assert [rank for rank in tried if _topology_accepted(nnodes, rank)] == list(range(nnodes))


@pytest.mark.parametrize(
    ("nnodes", "node_rank", "flag"),
    [
        (0, 0, "--nnodes 0"),
        (-1, 0, "--nnodes -1"),
        (1, 1, "--node-rank 1"),
        (2, 2, "--node-rank 2"),
        (2, -1, "--node-rank -1"),
        (4, 7, "--node-rank 7"),
    ],
)
def test_validate_topology_bad(nnodes: int, node_rank: int, flag: str) -> None:
    with pytest.raises(LaunchError) as info:
        validate_topology(nnodes, node_rank)
    assert flag in str(info.value)


def test_validate_topology_names_the_range() -> None:
    with pytest.raises(LaunchError, match=r"outside 0\.\.1 for --nnodes 2"):
        validate_topology(2, 2)


# -- build_plan: the environment of every rank -------------------------------------------------


def test_single_node_env_of_every_rank() -> None:
    plan = build_plan(inputs())
    assert plan.world_size == 4 and plan.nproc == 4 and plan.nnodes == 1
    assert [w.global_rank for w in plan.workers] == [0, 1, 2, 3]
    for i, worker in enumerate(plan.workers):
        env = plan.environment_of(worker)
        expected = {
            "RANK": str(i),
            "LOCAL_RANK": str(i),
            "ROLE_RANK": str(i),
            "WORLD_SIZE": "4",
            "LOCAL_WORLD_SIZE": "4",
            "GROUP_RANK": "0",
            "NODE_RANK": "0",
            "ROLE_NAME": "default",
            "GROUP_WORLD_SIZE": "1",
            "ROLE_WORLD_SIZE": "4",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29500",
            "TORCHELASTIC_RUN_ID": "run42",
            "TORCHELASTIC_RESTART_COUNT": "0",
            "TORCHELASTIC_MAX_RESTARTS": "0",
            "TORCHELASTIC_USE_AGENT_STORE": "False",
            "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT",
            "TORCHELASTIC_ERROR_FILE": f"/tmp/errs/attempt0/rank{i}.json",
            "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
            "OMP_NUM_THREADS": "4",  # 16 CPUs / 4 workers
            "HOME": "/home/u",
            "PATH": "/usr/bin",
        }
        assert env == expected, f"rank {i}"
        assert worker.local_rank == i and worker.node_rank == 0 and worker.host == "node0"
        assert worker.error_file == f"/tmp/errs/attempt0/rank{i}.json"
        assert worker.device == "cpu" and worker.physical_gpu == ""
        assert "CUDA_VISIBLE_DEVICES" not in env


def test_error_files_are_distinct_per_rank_and_attempt() -> None:
    first = build_plan(inputs())
    again = build_plan(inputs(restart_count=2, max_restarts=3))
    files = [w.error_file for w in first.workers] + [w.error_file for w in again.workers]
    assert len(set(files)) == 8
    assert again.workers[1].error_file == "/tmp/errs/attempt2/rank1.json"
    env = again.environment_of(again.workers[1])
    assert env["TORCHELASTIC_RESTART_COUNT"] == "2"
    assert env["TORCHELASTIC_MAX_RESTARTS"] == "3"


def test_no_error_dir_means_no_error_file() -> None:
    plan = build_plan(inputs(error_dir=None))
    for worker in plan.workers:
        assert worker.error_file is None
        assert "TORCHELASTIC_ERROR_FILE" not in worker.env_added


@pytest.mark.parametrize(("node_rank", "expected_ranks"), [(0, [0, 1, 2, 3]), (1, [4, 5, 6, 7])])
def test_two_nodes(node_rank: int, expected_ranks: list[int]) -> None:
    plan = build_plan(inputs(nnodes=2, node_rank=node_rank, master_addr="10.0.0.1"))
    assert plan.world_size == 8
    assert [w.global_rank for w in plan.workers] == expected_ranks
    for local_rank, worker in enumerate(plan.workers):
        env = plan.environment_of(worker)
        rank = node_rank * 4 + local_rank
        assert env["RANK"] == str(rank)
        assert env["ROLE_RANK"] == str(rank)
        assert env["LOCAL_RANK"] == str(local_rank)
        assert env["WORLD_SIZE"] == "8"
        assert env["ROLE_WORLD_SIZE"] == "8"
        assert env["LOCAL_WORLD_SIZE"] == "4"
        assert env["GROUP_WORLD_SIZE"] == "2"
        assert env["GROUP_RANK"] == str(node_rank)
        assert env["NODE_RANK"] == str(node_rank)
        assert env["MASTER_ADDR"] == "10.0.0.1"
        assert env["TORCHELASTIC_ERROR_FILE"] == f"/tmp/errs/attempt0/rank{rank}.json"
        assert worker.node_rank == node_rank


def test_user_env_passes_through_untouched() -> None:
    user = {
        "HOME": "/home/u",
        "WEIRD": "a b\tc=d",
        "EMPTY": "",
        "CUDA_VISIBLE_DEVICES": "3,1",  # no --gpu-ids: the user's value stays
        "NCCL_DEBUG": "WARN",
        "LD_LIBRARY_PATH": "/opt/x",
    }
    plan = build_plan(inputs(base_env=user))
    for worker in plan.workers:
        env = plan.environment_of(worker)
        for key, value in user.items():
            assert env[key] == value
        assert set(env) - set(user) == set(worker.env_added)
    assert dict(plan.base_env) == user


def test_stale_rank_variables_in_user_env_are_replaced() -> None:
    plan = build_plan(inputs(base_env={"RANK": "99", "WORLD_SIZE": "99", "MASTER_PORT": "1"}))
    env = plan.environment_of(plan.workers[2])
    assert env["RANK"] == "2" and env["WORLD_SIZE"] == "4" and env["MASTER_PORT"] == "29500"


@pytest.mark.parametrize(
    ("base_env", "extra_env", "expected"),
    [
        ({}, (), "4"),  # 16 CPUs / 4 workers
        ({"OMP_NUM_THREADS": "7"}, (), "7"),  # the user's own setting wins, and is not added
        ({}, (("OMP_NUM_THREADS", "3"),), "3"),  # --env wins
        ({"OMP_NUM_THREADS": "7"}, (("OMP_NUM_THREADS", "3"),), "3"),
    ],
)
def test_omp_num_threads(base_env, extra_env, expected) -> None:
    plan = build_plan(inputs(base_env=base_env, extra_env=extra_env))
    for worker in plan.workers:
        assert plan.environment_of(worker)["OMP_NUM_THREADS"] == expected
    if "OMP_NUM_THREADS" in base_env and not extra_env:
        assert "OMP_NUM_THREADS" not in plan.common_env
        assert all("OMP_NUM_THREADS" not in w.env_added for w in plan.workers)


@pytest.mark.parametrize(
    ("cpu_count", "nproc", "expected"),
    [(16, 4, 4), (8, 3, 2), (2, 8, 1), (1, 1, 1), (0, 4, 1), (64, 1, 64)],
)
def test_omp_threads(cpu_count: int, nproc: int, expected: int) -> None:
    assert omp_threads(cpu_count, nproc) == expected


def test_nccl_async_error_handling_kept_when_user_set_it() -> None:
    plan = build_plan(inputs(base_env={"TORCH_NCCL_ASYNC_ERROR_HANDLING": "0"}))
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in plan.common_env
    for worker in plan.workers:
        assert plan.environment_of(worker)["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "0"


def test_env_extras_appear_for_every_worker() -> None:
    extras = (("NCCL_DEBUG", "INFO"), ("MY_FLAG", "a=b"), ("HOME", "/override"))
    plan = build_plan(inputs(extra_env=extras))
    for key, value in extras:
        assert plan.common_env[key] == value
    for worker in plan.workers:
        env = plan.environment_of(worker)
        assert env["NCCL_DEBUG"] == "INFO"
        assert env["MY_FLAG"] == "a=b"
        assert env["HOME"] == "/override"  # --env beats the inherited value


# -- the terminal, as workers on pipes should see it ---------------------------------------------

TERM_200 = Terminal(200, 50, colour=True)
COLOURS = {"FORCE_COLOR": "1", "CLICOLOR_FORCE": "1", "PY_COLORS": "1", "TTY_INTERACTIVE": "0"}


@pytest.mark.parametrize(
    ("terminal", "nproc", "base_env", "extra_env", "expected"),
    [
        pytest.param(None, 4, {}, (), {}, id="no-terminal-nothing"),
        pytest.param(TERM_200, 4, {}, (), {"COLUMNS": "196", "LINES": "50", "TQDM_NCOLS": "195", **COLOURS},
                     id="4-ranks-prefix-4-wide"),
        pytest.param(TERM_200, 11, {}, (), {"COLUMNS": "195", "LINES": "50", "TQDM_NCOLS": "194", **COLOURS},
                     id="11-ranks-prefix-5-wide"),
        pytest.param(Terminal(200, 50, colour=False), 4, {"NO_COLOR": "1"}, (),
                     {"COLUMNS": "196", "LINES": "50", "TQDM_NCOLS": "195"}, id="no-colour-sets-none"),
        pytest.param(TERM_200, 4, {"COLUMNS": "80", "FORCE_COLOR": "0"}, (("TQDM_NCOLS", "60"),),
                     {"LINES": "50", "CLICOLOR_FORCE": "1", "PY_COLORS": "1", "TTY_INTERACTIVE": "0"},
                     id="user-set-wins-and-is-not-added"),
        pytest.param(Terminal(8, 5, colour=False), 4, {}, (), {"COLUMNS": "10", "LINES": "5", "TQDM_NCOLS": "9"},
                     id="tiny-terminal-floor"),
    ],
)
def test_terminal_env(terminal, nproc, base_env, extra_env, expected) -> None:
    plan = build_plan(inputs(terminal=terminal, nproc=nproc, base_env=base_env, extra_env=extra_env))
    names = {"COLUMNS", "LINES", "TQDM_NCOLS", *COLOURS}
    assert {k: v for k, v in plan.common_env.items() if k in names and k not in dict(extra_env)} == expected
    for worker in plan.workers:  # what the user set reaches the workers unchanged
        env = plan.environment_of(worker)
        for key, value in {**base_env, **dict(extra_env)}.items():
            assert env[key] == value


@pytest.mark.parametrize("world_size", [1, 2, 10, 11, 100, 101, 5000])
def test_prefix_width_is_what_the_printer_draws(world_size: int) -> None:
    for rank in (0, world_size - 1):
        out, err = rank_prefixes(rank, world_size, colour=False)
        assert len(out) == len(err) == prefix_width(world_size)


def test_gpu_ids_set_cuda_visible_devices_over_the_users() -> None:
    gpus = tuple(Gpu(i, f"GPU-{i:04d}-x") for i in range(8))
    devices = map_gpu_ids(("0", "2", "4", "6"), gpus, None)
    plan = build_plan(inputs(devices=devices, base_env={"CUDA_VISIBLE_DEVICES": "7"}))
    assert [w.physical_gpu for w in plan.workers] == ["0", "2", "4", "6"]
    assert [w.device for w in plan.workers] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    for worker in plan.workers:
        assert plan.environment_of(worker)["CUDA_VISIBLE_DEVICES"] == "0,2,4,6"


def test_plan_is_frozen() -> None:
    plan = build_plan(inputs())
    with pytest.raises(TypeError):
        plan.common_env["X"] = "1"  # type: ignore[index]
    with pytest.raises(TypeError):
        plan.workers[0].env_added["X"] = "1"  # type: ignore[index]
    with pytest.raises(TypeError):
        plan.base_env["X"] = "1"  # type: ignore[index]


@pytest.mark.parametrize(
    ("overrides", "flag"),
    [
        ({"nproc": 0, "devices": DeviceMap(None, ())}, "--nproc 0"),
        ({"master_port": 0}, "--master-port 0"),
        ({"master_port": 65536}, "--master-port 65536"),
        ({"nnodes": 2, "node_rank": 2}, "--node-rank 2"),
        ({"nnodes": 0}, "--nnodes 0"),
    ],
)
def test_build_plan_rejects_impossible_inputs(overrides: dict, flag: str) -> None:
    with pytest.raises(LaunchError) as info:
        build_plan(inputs(**overrides))
    assert flag in str(info.value)


# -- worker argv -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("program", "local_rank_arg", "local_rank", "expected"),
    [
        (Program("script", "train.py", ("--lr", "0.1")), False, 0, (PY, "-u", "train.py", "--lr", "0.1")),
        (Program("script", "train.py", ()), False, 3, (PY, "-u", "train.py")),
        (Program("script", "a b.py", ("x y",)), False, 0, (PY, "-u", "a b.py", "x y")),
        (Program("module", "pkg.train", ("--x",)), False, 1, (PY, "-u", "-m", "pkg.train", "--x")),
        (Program("exec", "/bin/echo", ("hi",)), False, 2, ("/bin/echo", "hi")),
        (Program("script", "train.py", ("--lr", "0.1")), True, 2,
         (PY, "-u", "train.py", "--local-rank=2", "--lr", "0.1")),
        (Program("module", "pkg.train", ("--x",)), True, 1, (PY, "-u", "-m", "pkg.train", "--local-rank=1", "--x")),
        (Program("exec", "/bin/echo", ("hi",)), True, 3, ("/bin/echo", "--local-rank=3", "hi")),
    ],
)
def test_worker_argv(program: Program, local_rank_arg: bool, local_rank: int, expected: tuple) -> None:
    ins = inputs(program=program, local_rank_arg=local_rank_arg)
    assert worker_argv(ins, local_rank) == expected
    assert build_plan(ins).workers[local_rank].argv == expected


def test_argv_is_the_same_for_every_worker_without_local_rank_arg() -> None:
    plan = build_plan(inputs())
    assert len({w.argv for w in plan.workers}) == 1


# -- purity ------------------------------------------------------------------------------------


def test_build_plan_does_not_mutate_its_input() -> None:
    base_env = {"HOME": "/home/u", "OMP_NUM_THREADS": "2"}
    snapshot = dict(base_env)
    ins = inputs(base_env=base_env, extra_env=(("FOO", "1"),))
    plan = build_plan(ins)
    assert base_env == snapshot
    env = plan.environment_of(plan.workers[0])
    env["HOME"] = "/changed"
    env["NEW"] = "x"
    assert base_env == snapshot
    assert plan.environment_of(plan.workers[0])["HOME"] == "/home/u"
    assert "NEW" not in plan.environment_of(plan.workers[0])
    # the plan holds a copy: changing the caller's dict later does not change the plan
    base_env["HOME"] = "/later"
    assert plan.environment_of(plan.workers[0])["HOME"] == "/home/u"
    assert ins.base_env is base_env  # PlanInputs keeps what it was given


def test_build_plan_is_deterministic() -> None:
    assert build_plan(inputs()) == build_plan(inputs())
    assert render_plan(build_plan(inputs())) == render_plan(build_plan(inputs()))


def test_plan_and_dry_run_never_read_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    distinctive = {
        "DDPLAUNCH_LEAK_CANARY": "leaked!",
        "CUDA_VISIBLE_DEVICES": "LEAK",
        "OMP_NUM_THREADS": "999",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "LEAK",
        "MASTER_PORT": "1111",
        "RANK": "77",
    }
    for key in list(os.environ):
        monkeypatch.delenv(key)
    for key, value in distinctive.items():
        monkeypatch.setenv(key, value)
    fake_env = {"ONLY_THIS": "yes"}
    gpus = (Gpu(0, "GPU-a0a0"), Gpu(1, "GPU-b1b1"))
    for ins in (
        inputs(base_env=fake_env),
        inputs(base_env=fake_env, nproc=2, devices=default_device_map(2, gpus, None)),
        inputs(base_env=fake_env, nproc=2, devices=map_gpu_ids(("1", "0"), gpus, None)),
    ):
        plan = build_plan(ins)
        text = render_plan(plan)
        assert "LEAK" not in text and "999" not in text and "1111" not in text and "leaked" not in text
        for worker in plan.workers:
            env = plan.environment_of(worker)
            assert "DDPLAUNCH_LEAK_CANARY" not in env
            assert env["ONLY_THIS"] == "yes"
            assert env["OMP_NUM_THREADS"] != "999"
            assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
            assert env["MASTER_PORT"] == "29500"
            assert env["RANK"] == str(worker.global_rank)
            assert env.get("CUDA_VISIBLE_DEVICES") in (None, "1,0")
        if ins.devices.cuda_visible_devices is None:
            assert "(unset)" in text  # the CVD column comes from base_env, not the process


def test_build_plan_with_replace_keeps_everything_else() -> None:
    ins = inputs()
    again = build_plan(replace(ins, master_port=12345))
    assert again.master_port == 12345
    assert again.environment_of(again.workers[0])["MASTER_PORT"] == "12345"
    assert build_plan(ins).master_port == 29500
