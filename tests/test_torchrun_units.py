"""torchrun's options, the pure parts: their parsers, what they decide, the plan they make, the
terminal filter and the copies. The real CLI runs in tests/test_torchrun_options.py."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from ddplaunch.copies import CopyingPrinter
from ddplaunch.decide import (
    C10D_DEFAULT_PORT,
    Facts,
    check_capacity,
    decide,
    files_wanted,
    grace_of,
    join_timeout_of,
    notes_of,
    rendezvous_address,
)
from ddplaunch.devices import DeviceMap, Gpu, default_device_map, map_gpu_ids
from ddplaunch.dryrun import render_plan, terminal_line
from ddplaunch.errors import LaunchError
from ddplaunch.fanout import Host, agent_argv, check_for_hosts, head_filter
from ddplaunch.hosts import HostSpec
from ddplaunch.logs import Printer
from ddplaunch.modules import find_module, worker_sys_path
from ddplaunch.options import (
    Options,
    StdSpec,
    TerminalFilter,
    check_rdzv_backend,
    foreign_option_hint,
    parse_filters,
    parse_local_ranks,
    parse_rdzv_conf,
    parse_signals,
    parse_std,
    seconds,
)
from ddplaunch.plan import RUN_PATH_CODE, PlanInputs, Program, build_plan
from ddplaunch.ssh import SshTarget
from ddplaunch.supervisor import RELAYED_SIGNALS, STOP_SIGNALS, SignalPlan

pytestmark = pytest.mark.unit


def options(**changes: object) -> Options:
    """Options as click gives them when only SCRIPT is typed, with `changes` on top."""
    base: dict[str, object] = dict(
        script="train.py", script_args=(), nproc=None, nnodes=None, node_rank=None, master_addr=None,
        master_port=None, rdzv_endpoint=None, rdzv_backend=None, join_timeout=None, standalone=False,
        gpu_ids=None, module=False, no_python=False, local_rank_arg=False, log_dir=None, ranks=None,
        max_restarts=0, env=(), dry_run=False, grace=None, run_id=None, no_color=False, hosts=None,
        hostfile=None, ssh_accept_new_host_keys=False, chdir=None, python=None, stdin="0", agent=False,
        host_name=None,
    )
    base.update(changes)
    return Options(**base)  # type: ignore[arg-type]


# -- --redirects / --tee / --local-ranks-filter ---------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", StdSpec(0)),
        ("3", StdSpec(3)),
        (" 2 ", StdSpec(2)),
        ("0:1,1:2", StdSpec(0, ((0, 1), (1, 2)))),
        ("0:3", StdSpec(0, ((0, 3),))),
        ("12:2, 3:0", StdSpec(0, ((12, 2), (3, 0)))),  # torchrun's regex allows one digit; more is harmless
    ],
)
def test_parse_std(text: str, expected: StdSpec) -> None:
    assert parse_std(text, "--tee") == expected


@pytest.mark.parametrize("text", ["4", "a", "", "0:4", "0:", ":1", "0:1,", "-1:1", "0:1:2", "²"])
def test_parse_std_refuses_what_torchrun_refuses(text: str) -> None:
    with pytest.raises(LaunchError, match=r"--redirects .* is not torchrun's stream choice.*--redirects 0:3,1:2"):
        parse_std(text, "--redirects")


def test_std_spec_by_local_rank_defaults_to_nothing_as_torchrun() -> None:
    spec = parse_std("1:3", "--tee")
    assert [spec.bits(i) for i in range(3)] == [0, 3, 0]
    assert [StdSpec(2).bits(i) for i in range(3)] == [2, 2, 2]


SHOWN_CASES = [
    # (id, filter, {rank: (stdout shown, stderr shown)})
    ("nothing-given", TerminalFilter(2), {0: (True, True), 1: (True, True)}),
    ("local-ranks", TerminalFilter(2, local_ranks=frozenset({0})), {0: (True, True), 1: (False, False)}),
    ("redirect-both", TerminalFilter(2, redirects=StdSpec(3)), {0: (False, False), 1: (False, False)}),
    ("redirect-stdout", TerminalFilter(2, redirects=StdSpec(1)), {0: (False, True), 1: (False, True)}),
    ("redirect-per-rank", TerminalFilter(2, redirects=StdSpec(0, ((0, 1), (1, 2)))),
     {0: (False, True), 1: (True, False)}),
    ("tee-wins-over-redirect", TerminalFilter(2, redirects=StdSpec(3), tee=StdSpec(0, ((1, 2),))),
     {0: (False, False), 1: (False, True)}),
    ("tee-alone-hides-nothing", TerminalFilter(2, tee=StdSpec(3)), {0: (True, True), 1: (True, True)}),
    # node 1 of two: global ranks 2 and 3 are local ranks 0 and 1
    ("local-ranks-on-every-node", TerminalFilter(2, local_ranks=frozenset({1})), {2: (False, False), 3: (True, True)}),
    ("global-and-local-both-apply", TerminalFilter(2, ranks=frozenset({0, 3}), local_ranks=frozenset({0})),
     {0: (True, True), 1: (False, False), 2: (False, False), 3: (False, False)}),
    ("ranks-and-redirects", TerminalFilter(2, ranks=frozenset({1}), redirects=StdSpec(2)),
     {0: (False, False), 1: (True, False)}),
]


@pytest.mark.parametrize(("terminal", "expected"), [c[1:] for c in SHOWN_CASES], ids=[c[0] for c in SHOWN_CASES])
def test_terminal_filter_shows(terminal: TerminalFilter, expected: dict[int, tuple[bool, bool]]) -> None:
    assert {rank: (terminal.shows(rank, 1), terminal.shows(rank, 2)) for rank in expected} == expected


def test_terminal_filter_knows_when_streams_are_hidden_and_which_ranks_show() -> None:
    assert not TerminalFilter(2, tee=StdSpec(3), local_ranks=frozenset({0})).hides_streams()
    assert TerminalFilter(2, redirects=StdSpec(0, ((1, 2),))).hides_streams()
    assert not TerminalFilter(2, redirects=StdSpec(0, ((5, 2),))).hides_streams()  # no local rank 5
    assert TerminalFilter(2, local_ranks=frozenset({0})).shown_ranks(6) == frozenset({0, 2, 4})
    assert TerminalFilter(2, ranks=frozenset({1, 2}), local_ranks=frozenset({0})).shown_ranks(4) == frozenset({2})
    assert TerminalFilter(2).shown_ranks(4) is None


@pytest.mark.parametrize(("text", "expected"), [("0", {0}), ("0,2", {0, 2}), ("1-3", {1, 2, 3}), (" 0 , 1", {0, 1})])
def test_parse_local_ranks(text: str, expected: set[int]) -> None:
    assert parse_local_ranks(text, 4) == frozenset(expected)


@pytest.mark.parametrize(
    ("text", "message"),
    [("4", r"--local-ranks-filter '4' names a rank outside 0\.\.3 \(--nproc 4"), ("x", r"'x' is not a rank"),
     ("0,", r"'' is not a rank"), ("-1", r"'-1' is not a rank")],
)
def test_parse_local_ranks_refuses(text: str, message: str) -> None:
    with pytest.raises(LaunchError, match=message):
        parse_local_ranks(text, 4)


# -- --duplicate-std*-filters, --rdzv-conf, --signals-to-handle, --rdzv-backend ----------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("apple,orange", ("apple", "orange")), ("a,,b", ("a,b",)), ("", ()), ("a,", ("a",)), ("loss=", ("loss=",)),
     ("a,,,,b", ("a,,b",))],
)
def test_parse_filters_as_torchruns_comma_separated_list(text: str, expected: tuple[str, ...]) -> None:
    assert parse_filters(text) == expected


@pytest.mark.parametrize(
    ("text", "timeout", "ignored"),
    [
        ("join_timeout=900", 900.0, ()),
        ("timeout=120", 120.0, ()),  # the static backend's name for it
        ("join_timeout=5,timeout=7", 5.0, ("timeout",)),
        ("is_host=1, last_call_timeout=30", None, ("is_host", "last_call_timeout")),
        (" join_timeout = 2.5 ", 2.5, ()),
    ],
)
def test_parse_rdzv_conf(text: str, timeout: float | None, ignored: tuple[str, ...]) -> None:
    conf = parse_rdzv_conf(text)
    assert (conf.join_timeout, conf.ignored) == (timeout, ignored)


@pytest.mark.parametrize(
    ("text", "message"),
    [("join_timeout", r"'join_timeout' is not KEY=VALUE"), ("=5", r"'=5' is not KEY=VALUE"),
     ("a=1,,b=2", r"'' is not KEY=VALUE"), ("join_timeout=soon", r"--rdzv-conf join_timeout 'soon'"),
     ("timeout=0", r"--rdzv-conf timeout '0': use a number of seconds, above 0")],
)
def test_parse_rdzv_conf_refuses(text: str, message: str) -> None:
    with pytest.raises(LaunchError, match=message):
        parse_rdzv_conf(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("SIGTERM,SIGINT,SIGHUP,SIGQUIT", "SIGTERM,SIGINT,SIGHUP,SIGQUIT"), ("usr1, SIGTERM", "SIGUSR1,SIGTERM"),
     ("sigusr2", "SIGUSR2"), ("TERM,SIGTERM", "SIGTERM")],
)
def test_parse_signals_in_torchruns_spelling(text: str, expected: str) -> None:
    assert parse_signals(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [("SIGBOGUS", r"'SIGBOGUS' is not a signal name"), ("", r"'' is not a signal name"),
     ("SIG_DFL", r"'SIG_DFL' is not a signal name"), ("9", r"'9' is not a signal name"),
     ("SIGKILL", r"SIGKILL cannot be caught"), ("SIGTERM,STOP", r"SIGSTOP cannot be caught"),
     ("SIGCHLD", r"SIGCHLD is how ddplaunch learns a worker ended")],
)
def test_parse_signals_refuses(text: str, message: str) -> None:
    with pytest.raises(LaunchError, match=message):
        parse_signals(text)


def test_signal_plan_stops_on_the_list_and_still_relays_usr_signals_left_out() -> None:
    assert SignalPlan() == SignalPlan(STOP_SIGNALS, RELAYED_SIGNALS)
    plan = SignalPlan.handling("SIGTERM,SIGUSR1")
    assert plan.stop == (signal.SIGTERM, signal.SIGUSR1)
    assert plan.relayed == (signal.SIGUSR2,)


@pytest.mark.parametrize("backend", ["static", "c10d"])
def test_both_backends_meet_at_node_0(backend: str) -> None:
    check_rdzv_backend(backend)


@pytest.mark.parametrize(
    ("backend", "message"), [("etcd", r"not at an etcd server.*--rdzv-backend c10d"), ("etcd-v2", r"etcd"),
                             ("zmq", r"--rdzv-backend 'zmq': use static or c10d")],
)
def test_other_backends_are_refused_with_the_fix(backend: str, message: str) -> None:
    with pytest.raises(LaunchError, match=message):
        check_rdzv_backend(backend)


@pytest.mark.parametrize(("text", "expected"), [("30", 30.0), ("0", 0.0), ("2.5", 2.5)])
def test_seconds(text: str, expected: float) -> None:
    assert seconds(text, "--x", above_zero=False) == expected


@pytest.mark.parametrize("text", ["-1", "nan", "inf", "soon", ""])
def test_seconds_refuses(text: str) -> None:
    with pytest.raises(LaunchError, match=r"--x .*: use a number of seconds, 0 or more"):
        seconds(text, "--x", above_zero=False)


# -- the hint for other launchers' options ---------------------------------------------------------


@pytest.mark.parametrize(
    ("typed", "points_to"),
    [("--num_gpus", "--nproc"), ("--num-gpus", "--nproc"), ("--num_nodes", "--nnodes"), ("-np", "--nproc"),
     ("--num_processes", "--nproc"), ("--num-processes", "--nproc"), ("--machine_rank", "--node-rank"),
     ("--main_process_ip", "--master-addr"), ("--main-process-port", "--master-port"), ("-x", "--env"),
     ("--use_env", "--local-rank-arg"), ("--use-env", "--local-rank-arg"), ("--output-filename", "--log-dir"),
     ("--include", "--gpu-ids"), ("--num_machines", "--nnodes"), ("--ntasks-per-node", "--nproc")],
)
def test_foreign_options_point_to_ddplaunchs(typed: str, points_to: str) -> None:
    hint = foreign_option_hint(typed)
    assert hint is not None and points_to in hint


@pytest.mark.parametrize("typed", ["--bogus", "--tee", "-q", "--nproc"])
def test_other_options_get_no_foreign_hint(typed: str) -> None:
    assert foreign_option_hint(typed) is None


# -- what the options decide --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "nnodes", "expected"),
    [
        (dict(rdzv_endpoint="localhost:0"), 1, ("localhost", None)),  # torchtitan's line: a free port
        (dict(rdzv_endpoint="localhost:0", master_port=29600), 1, ("localhost", 29600)),
        (dict(rdzv_endpoint="n0", rdzv_backend="c10d"), 2, ("n0", C10D_DEFAULT_PORT)),
        (dict(rdzv_endpoint="n0", rdzv_backend="static"), 2, ("n0", 29500)),
        (dict(rdzv_endpoint="n0:29401", rdzv_backend="c10d"), 2, ("n0", 29401)),
        (dict(local_addr="10.0.0.5"), 1, ("10.0.0.5", None)),
        (dict(local_addr="10.0.0.5", rdzv_endpoint="localhost:0"), 1, ("10.0.0.5", None)),
        (dict(local_addr="10.0.0.5", master_addr="127.0.0.1"), 1, ("127.0.0.1", None)),
        (dict(local_addr="10.0.0.5", master_addr="10.0.0.1"), 2, ("10.0.0.1", 29500)),  # names this node only
    ],
)
def test_rendezvous_address(changes: dict[str, object], nnodes: int, expected: tuple[str, int | None]) -> None:
    assert rendezvous_address(options(**changes), nnodes) == expected


def test_a_free_port_cannot_be_shared_across_nodes() -> None:
    with pytest.raises(LaunchError, match=r"--rdzv-endpoint n0:0: port 0 .* one node only.*n0:29500"):
        rendezvous_address(options(rdzv_endpoint="n0:0"), 2)


@pytest.mark.parametrize(
    ("grace", "environ", "expected"),
    [(None, {}, 30.0), (None, {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "5"}, 5.0),
     (2.0, {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "5"}, 2.0), (None, {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": ""}, 30.0)],
)
def test_grace_as_torchruns_shutdown_timeout(grace: float | None, environ: dict[str, str], expected: float) -> None:
    assert grace_of(options(grace=grace), environ) == expected


def test_a_bad_shutdown_timeout_variable_is_named() -> None:
    with pytest.raises(LaunchError, match=r"TORCH_ELASTIC_SHUTDOWN_TIMEOUT 'soon'"):
        grace_of(options(), {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "soon"})


@pytest.mark.parametrize(
    ("join_timeout", "conf", "expected"),
    [(None, None, 600.0), (None, "join_timeout=900", 900.0), (900.0, "join_timeout=900", 900.0),
     (30.0, None, 30.0), (None, "is_host=1", 600.0)],
)
def test_join_timeout_from_either_spelling(join_timeout: float | None, conf: str | None, expected: float) -> None:
    assert join_timeout_of(options(join_timeout=join_timeout, rdzv_conf=conf)) == expected


def test_join_timeout_spellings_that_disagree_are_refused() -> None:
    with pytest.raises(LaunchError, match=r"--join-timeout 30 and --rdzv-conf join_timeout=900 disagree"):
        join_timeout_of(options(join_timeout=30.0, rdzv_conf="join_timeout=900"))


def test_notes_name_each_ignored_option_once() -> None:
    notes = notes_of(options(monitor_interval=5.0, start_method="fork", rdzv_conf="is_host=1,join_timeout=9"))
    assert len(notes) == 3
    assert notes[0].startswith("--monitor-interval is torchrun's and has no meaning here")
    assert notes[1].startswith("--start-method is torchrun's")
    assert notes[2].startswith("--rdzv-conf is_host: no meaning here")
    assert notes_of(options()) == ()


@pytest.mark.parametrize(
    ("nproc", "cpus", "gpus", "force", "ok"),
    [(8, 2, 0, False, True), (9, 2, 0, False, False), (9, 2, 0, True, True), (8, 1, 8, False, True),
     (99999, 16, 8, False, False), (5, 1, 0, False, False)],
)
def test_check_capacity(nproc: int, cpus: int, gpus: int, force: bool, ok: bool) -> None:
    if ok:
        check_capacity(nproc, cpus, gpus, force=force)
        return
    with pytest.raises(LaunchError, match=rf"--nproc {nproc} is far more workers .* add --force"):
        check_capacity(nproc, cpus, gpus, force=force)


def test_files_are_wanted_only_for_what_the_terminal_does_not_show() -> None:
    assert files_wanted(TerminalFilter(2, tee=StdSpec(3)), ((), ())) is None
    assert files_wanted(TerminalFilter(2, local_ranks=frozenset({0})), ((), ())) is None
    assert files_wanted(TerminalFilter(2, redirects=StdSpec(1)), ((), ())) == "--redirects keeps output off the terminal"
    assert files_wanted(TerminalFilter(2), ((), ("nan",))) is not None


# -- the plan: --role, --virtual-local-rank, --run-path, --signals-to-handle ------------------------------

GPUS = tuple(Gpu(i, f"GPU-{i:04d}") for i in range(8))


def plan_inputs(**changes: object) -> PlanInputs:
    base: dict[str, object] = dict(
        program=Program("script", "train.py", ("--lr", "1")), nproc=2, master_addr="127.0.0.1", master_port=29500,
        run_id="r", python="py", hostname="h", cpu_count=4, devices=default_device_map(2, (), None),
        base_env={"HOME": "/h"},
    )
    base.update(changes)
    return PlanInputs(**base)  # type: ignore[arg-type]


def test_role_and_signals_reach_every_worker() -> None:
    plan = build_plan(plan_inputs(role="trainer", signals_to_handle="SIGTERM,SIGUSR1"))
    for worker in plan.workers:
        env = plan.environment_of(worker)
        assert env["ROLE_NAME"] == "trainer"
        assert env["TORCHELASTIC_SIGNALS_TO_HANDLE"] == "SIGTERM,SIGUSR1"


VIRTUAL_CASES = [
    # (id, changes, CUDA_VISIBLE_DEVICES per worker, device per worker)
    ("gpu-ids", dict(devices=map_gpu_ids(("2", "5"), GPUS, None)), ["2", "5"], ["cuda:0", "cuda:0"]),
    ("inherited-list", dict(base_env={"CUDA_VISIBLE_DEVICES": "4, 6"}), ["4", "6"], ["cpu", "cpu"]),
    ("env-flag-list", dict(base_env={"CUDA_VISIBLE_DEVICES": "1,2"}, extra_env=(("CUDA_VISIBLE_DEVICES", "7,3"),)),
     ["7", "3"], ["cpu", "cpu"]),
    ("no-list", dict(devices=default_device_map(2, GPUS, None)), ["0", "1"], ["cuda:0", "cuda:0"]),
]


@pytest.mark.parametrize(("changes", "visible", "devices"), [c[1:] for c in VIRTUAL_CASES], ids=[c[0] for c in VIRTUAL_CASES])
def test_virtual_local_rank_gives_each_worker_its_own_gpu(
    changes: dict[str, object], visible: list[str], devices: list[str]
) -> None:
    plan = build_plan(plan_inputs(virtual_local_rank=True, **changes))
    envs = [plan.environment_of(w) for w in plan.workers]
    assert [env["LOCAL_RANK"] for env in envs] == ["0", "0"]
    assert [env["CUDA_VISIBLE_DEVICES"] for env in envs] == visible
    assert [env["RANK"] for env in envs] == ["0", "1"]
    assert [w.device for w in plan.workers] == devices
    assert "CUDA_VISIBLE_DEVICES" not in plan.common_env


def test_virtual_local_rank_without_a_gpu_for_a_worker_is_refused() -> None:
    with pytest.raises(LaunchError, match=r"--virtual-local-rank: local rank 1 has no GPU .*CUDA_VISIBLE_DEVICES=3"):
        build_plan(plan_inputs(virtual_local_rank=True, base_env={"CUDA_VISIBLE_DEVICES": "3"}))


def test_without_virtual_local_rank_every_worker_sees_the_whole_list() -> None:
    plan = build_plan(plan_inputs(devices=map_gpu_ids(("2", "5"), GPUS, None)))
    assert [plan.environment_of(w)["LOCAL_RANK"] for w in plan.workers] == ["0", "1"]
    assert plan.common_env["CUDA_VISIBLE_DEVICES"] == "2,5"


def test_run_path_runs_the_script_through_runpy_with_its_arguments() -> None:
    plan = build_plan(plan_inputs(program=Program("run-path", "/abs/train.py", ("--lr", "1")), local_rank_arg=True))
    argv = plan.workers[1].argv
    assert argv == ("py", "-u", "-c", RUN_PATH_CODE, "/abs/train.py", "--local-rank=1", "--lr", "1")


def test_dry_run_shows_each_workers_own_gpu_and_what_the_terminal_shows() -> None:
    plan = build_plan(plan_inputs(virtual_local_rank=True, devices=map_gpu_ids(("2", "5"), GPUS, None)))
    text = render_plan(plan)
    assert "rank 1: LOCAL_RANK=0 RANK=1 ROLE_RANK=1 CUDA_VISIBLE_DEVICES=5" in text
    terminal = TerminalFilter(2, local_ranks=frozenset({0}), redirects=StdSpec(2))
    assert terminal_line(plan, terminal.shows) == (
        "on the terminal: rank 0 stdout, rank 1 nothing (log files, when written, get every line)"
    )
    assert terminal_line(plan, TerminalFilter(2).shows) is None


# -- -m without importing the package ----------------------------------------------------------------


@pytest.fixture
def packages(tmp_path: Path) -> Path:
    """pkg/ (whose __init__ writes a file when run), pkg/main.py, pkg/sub/ (no __main__), tool/__main__.py,
    a namespace package ns/mod.py, and dyn/ whose __init__ extends its __path__."""
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text(f"open({str(tmp_path / 'IMPORTED')!r}, 'w').close()\n")
    (tmp_path / "pkg" / "main.py").write_text("")
    (tmp_path / "pkg" / "sub" / "__init__.py").write_text("")
    (tmp_path / "tool").mkdir()
    (tmp_path / "tool" / "__init__.py").write_text("")
    (tmp_path / "tool" / "__main__.py").write_text("")
    (tmp_path / "ns").mkdir()
    (tmp_path / "ns" / "mod.py").write_text("")
    (tmp_path / "dyn").mkdir()
    (tmp_path / "dyn" / "__init__.py").write_text("from pkgutil import extend_path\n__path__ = extend_path(__path__, __name__)\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "lib.py").write_text("")
    return tmp_path


MODULE_CASES = [
    ("pkg.main", "found", ""),
    ("tool", "found", ""),
    ("ns.mod", "found", ""),
    ("lib", "found", ""),  # on PYTHONPATH
    ("json.tool", "found", ""),  # the interpreter's own
    ("pkg.nope", "missing", "package 'pkg' (at {root}/pkg) has no module 'nope'"),
    ("nope.main", "missing", "no module 'nope' on the worker's Python path"),
    ("pkg", "missing", "'pkg' is a package with no __main__ module"),
    ("pkg.sub", "missing", "'pkg.sub' is a package with no __main__ module"),
    ("ns.nope", "missing", "package 'ns' (at {root}/ns) has no module 'nope'"),
    ("pkg..main", "missing", "'pkg..main' is not a module name"),
    ("dyn.anything", "unsure", ""),  # its __init__ may find it anywhere: let the worker try
    ("os.path", "unsure", ""),  # a module registers it in sys.modules when imported
]


@pytest.mark.parametrize(("name", "verdict", "missing"), MODULE_CASES, ids=[c[0] for c in MODULE_CASES])
def test_find_module_without_importing(packages: Path, name: str, verdict: str, missing: str) -> None:
    path = worker_sys_path(str(packages), str(packages / "elsewhere"), sys.path)
    found = find_module(name, path)
    assert found.verdict == verdict
    assert missing.format(root=packages) in found.missing
    assert not (packages / "IMPORTED").exists(), "pkg/__init__.py was run"
    assert "pkg" not in sys.modules


def test_worker_sys_path_is_cwd_then_pythonpath_then_the_interpreters() -> None:
    assert worker_sys_path("/w", f"/a{os.pathsep}{os.pathsep}/b", ["/launcher-bin", "/lib"]) == ["/w", "/a", "/w", "/b", "/lib"]
    assert worker_sys_path("/w", None, ["/launcher-bin", "/lib"]) == ["/w", "/lib"]


# -- the terminal per stream, and the copies -----------------------------------------------------------


class Outputs:
    """The printer's stdout and stderr as two files, read back at the end."""

    def __init__(self, root: Path) -> None:
        self.paths = root / "out", root / "err"
        self.fds = [os.open(p, os.O_WRONLY | os.O_CREAT, 0o644) for p in self.paths]

    def read(self) -> tuple[bytes, bytes]:
        for fd in self.fds:
            os.close(fd)
        return self.paths[0].read_bytes(), self.paths[1].read_bytes()


def feed_two_ranks(printer: Printer) -> None:
    for rank in (0, 1):
        printer.feed(rank, 1, f"out {rank} loss=1\nout {rank} acc\n".encode())
        printer.feed(rank, 2, f"err {rank} loss=2\n".encode())
        printer.end_of_stream(rank, 1)
        printer.end_of_stream(rank, 2)
    printer.close()


def test_printer_shows_each_stream_as_told_and_files_get_everything(tmp_path: Path) -> None:
    outputs = Outputs(tmp_path)
    terminal = TerminalFilter(2, redirects=StdSpec(0, ((0, 2), (1, 1))))
    printer = Printer(world_ranks=[0, 1], world_size=2, colour=False, log_dir=str(tmp_path / "logs"),
                      stdout_fd=outputs.fds[0], stderr_fd=outputs.fds[1], shows=terminal.shows)
    feed_two_ranks(printer)
    assert outputs.read() == (b"0 | out 0 loss=1\n0 | out 0 acc\n", b"1 ! err 1 loss=2\n")
    assert (tmp_path / "logs" / "rank0.log").read_bytes() == b"out 0 loss=1\nout 0 acc\nerr 0 loss=2\n"
    assert (tmp_path / "logs" / "rank1.log").read_bytes() == b"out 1 loss=1\nout 1 acc\nerr 1 loss=2\n"


def test_copies_are_the_shown_lines_that_contain_a_filter(tmp_path: Path) -> None:
    outputs = Outputs(tmp_path)
    terminal = TerminalFilter(2, local_ranks=frozenset({1}))
    printer = CopyingPrinter((("loss", "nothing"), ("loss=2",)), log_dir=str(tmp_path), world_ranks=[0, 1],
                             world_size=2, colour=False, shows=terminal.shows)
    printer._out[1].fd, printer._out[2].fd = outputs.fds  # the terminal, here two files
    feed_two_ranks(printer)
    assert outputs.read() == (b"1 | out 1 loss=1\n1 | out 1 acc\n", b"1 ! err 1 loss=2\n")
    assert (tmp_path / "filtered_stdout.log").read_bytes() == b"1 | out 1 loss=1\n"
    assert (tmp_path / "filtered_stderr.log").read_bytes() == b"1 ! err 1 loss=2\n"


def test_no_copy_file_for_a_stream_without_filters(tmp_path: Path) -> None:
    printer = CopyingPrinter((("x",), ()), log_dir=str(tmp_path), world_ranks=[0], world_size=1, colour=False,
                             shows=TerminalFilter(1).shows)
    printer.close()
    assert (tmp_path / "filtered_stdout.log").exists() and not (tmp_path / "filtered_stderr.log").exists()


# -- over SSH: what the head passes on, and what it refuses ---------------------------------------


def ssh_hosts(count: int, nproc: int | None) -> list[Host]:
    return [Host(i, HostSpec(f"h{i}", f"h{i}"), SshTarget(f"h{i}", f"h{i}", 22, "u", ()), nproc) for i in range(count)]


def test_the_head_passes_torchruns_worker_options_to_every_agent() -> None:
    given = options(role="trainer", signals_to_handle="SIGTERM,SIGUSR1", numa_binding="node", grace=5.0,
                    virtual_local_rank=True, run_path=True, force=True, hosts="h0,h1")
    argv = agent_argv(given, ssh_hosts(2, 2)[1], 2)
    for flag, value in [("--role", "trainer"), ("--signals-to-handle", "SIGTERM,SIGUSR1"), ("--numa-binding", "node"),
                        ("--grace", "5")]:
        assert argv[argv.index(flag) + 1] == value
    for switch in ("--virtual-local-rank", "--run-path", "--force"):
        assert switch in argv
    plain = agent_argv(options(hosts="h0,h1"), ssh_hosts(2, 2)[1], 2)
    assert "--role" not in plain and "--force" not in plain and "--signals-to-handle" not in plain


@pytest.mark.parametrize(
    ("changes", "expected"),
    [(dict(local_ranks_filter="0"), {0, 2, 4}), (dict(local_ranks_filter="1", ranks="0-3"), {1, 3}),
     (dict(ranks="4"), {4}), (dict(tee="3"), None), (dict(redirects="3", tee="3"), None)],
)
def test_the_head_shows_the_global_ranks_of_the_local_ranks_filter(changes: dict[str, object], expected: set[int] | None) -> None:
    shown, shows = head_filter(options(hosts="h0,h1,h2", **changes), ssh_hosts(3, 2))
    assert shown == (None if expected is None else frozenset(expected))
    assert shows is None  # every stream of a shown rank


def test_the_head_keeps_redirected_streams_off_its_terminal() -> None:
    shown, shows = head_filter(options(hosts="h0,h1", redirects="0:2,1:1"), ssh_hosts(2, 2))
    assert shown is None and shows is not None
    assert [(rank, stream) for rank in range(4) for stream in (1, 2) if shows(rank, stream)] == [
        (0, 1), (1, 2), (2, 1), (3, 2)
    ]


@pytest.mark.parametrize(
    ("changes", "nproc", "message"),
    [(dict(redirects="2"), None, r"--redirects with --hosts need the workers per host: give --nproc N"),
     (dict(local_ranks_filter="0"), None, r"--local-ranks-filter with --hosts need the workers per host: give --nproc N"),
     (dict(local_addr="10.0.0.5"), 2, r"--local-addr names one node"),
     (dict(duplicate_stdout_filters="loss"), 2, r"--duplicate-stdout-filters does not work with --hosts")],
)
def test_what_the_head_cannot_do_is_refused(changes: dict[str, object], nproc: int | None, message: str) -> None:
    given = options(hosts="h0,h1", **changes)
    with pytest.raises(LaunchError, match=message):
        check_for_hosts(given)
        head_filter(given, ssh_hosts(2, nproc))


@pytest.mark.parametrize(
    ("changes", "hostname", "master_addr"),
    [(dict(), "machine", "127.0.0.1"), (dict(local_addr="10.0.0.5"), "10.0.0.5", "10.0.0.5"),
     (dict(local_addr="10.0.0.5", nnodes="2", master_addr="10.0.0.1"), "10.0.0.5", "10.0.0.1")],
)
def test_local_addr_names_this_node_and_is_master_addr_on_one_node(
    changes: dict[str, object], hostname: str, master_addr: str
) -> None:
    facts = Facts(environ={}, cpu_count=4, hostname="machine", gpus=())
    inputs = decide(options(script=__file__, **changes), facts, None).inputs
    assert (inputs.hostname, inputs.master_addr) == (hostname, master_addr)
