"""Table tests of cluster detection and Slurm host lists (launcher/detect.py): pure functions,
environments given as plain dicts shaped like what srun and mpirun set."""

from __future__ import annotations

import time

import pytest

from ddplaunch.detect import (
    MAX_EXPANDED_HOSTS,
    Detected,
    HostlistError,
    describe,
    detect_cluster,
    expand_hostlist,
    first_host,
    hostlist_size,
)
from ddplaunch.errors import LaunchError

pytestmark = pytest.mark.unit

# -- expand_hostlist / first_host ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("node1", ["node1"]),
        ("node1,node2", ["node1", "node2"]),
        ("node-1.cluster", ["node-1.cluster"]),  # dashes and dots are part of the name
        ("node-1.cluster.example.org,node-2", ["node-1.cluster.example.org", "node-2"]),
        ("gpu[01-04,07]", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]),  # padding kept
        ("pre[1-3,5,8]", ["pre1", "pre2", "pre3", "pre5", "pre8"]),  # ANCHORS.md's example
        ("n[8-10]", ["n8", "n9", "n10"]),  # no padding: widths grow
        ("n[08-10]", ["n08", "n09", "n10"]),
        ("n[001-002]", ["n001", "n002"]),
        ("n[7]", ["n7"]),
        ("n[5,1]", ["n5", "n1"]),  # order as written
        ("a[1-2]b[3-4]", ["a1b3", "a1b4", "a2b3", "a2b4"]),  # a product, last group fastest
        ("rack[1-2]-ib", ["rack1-ib", "rack2-ib"]),  # text after the brackets
        ("r[1-2]n[01-02].x", ["r1n01.x", "r1n02.x", "r2n01.x", "r2n02.x"]),
        ("[1-3]", ["1", "2", "3"]),  # no prefix at all
        ("login1,gpu[1-2],cpu-[001-002]", ["login1", "gpu1", "gpu2", "cpu-001", "cpu-002"]),
        ("gpu[01-02],gpu[10-11]", ["gpu01", "gpu02", "gpu10", "gpu11"]),
        (" a , b ", ["a", "b"]),  # space around entries is dropped
        ("node_a,node_b", ["node_a", "node_b"]),
    ],
)
def test_expand_hostlist(text: str, expected: list[str]) -> None:
    assert expand_hostlist(text) == expected
    assert first_host(text) == expected[0]
    assert hostlist_size(text) == len(expected)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("gpu[01-04", "never closed"),
        ("gpu01-04]", "no matching '['"),
        ("a[[1-2]]", "inside another bracket"),
        ("gpu[3-1]", "runs backwards"),
        ("gpu[a-c]", "not a number"),
        ("gpu[1-x]", "not a number"),
        ("gpu[1-]", "not a number"),
        ("gpu[-1]", "not a number"),
        ("gpu[1-2-3]", "not a number"),
        ("gpu[1,,2]", "not a number"),
        ("gpu[ 1-2]", "contains a space"),
        ("gpu[²]", "not a number"),  # a Unicode digit int() would refuse
        ("gpu[]", "holds no number"),
        ("a,,b", "host 2 is empty"),
        ("a,", "host 2 is empty"),
        (",a", "host 1 is empty"),
        ("a b", "contains a space"),
    ],
)
def test_expand_hostlist_rejects(text: str, problem: str) -> None:
    for parse in (expand_hostlist, first_host, hostlist_size):
        with pytest.raises(HostlistError) as caught:
            parse(text)
        message = str(caught.value)
        assert problem in message
        assert repr(text) in message  # the message quotes what was given
        assert "\n" not in message
        assert isinstance(caught.value, LaunchError)


def test_first_host_does_not_expand() -> None:
    start = time.monotonic()
    assert first_host("n[1-100000000]") == "n1"
    assert first_host("a[0001-9999]b[1-100000000]") == "a0001b1"
    assert hostlist_size("a[1-100000]b[1-100000]") == 10**10
    assert time.monotonic() - start < 1.0


def test_expand_hostlist_refuses_huge_lists() -> None:
    with pytest.raises(HostlistError, match="more than"):
        expand_hostlist(f"n[1-{MAX_EXPANDED_HOSTS + 1}]")


# -- Slurm ---------------------------------------------------------------------------------------


UNSET = "<unset>"  # as an override: drop the variable


def srun_task(**overrides: str) -> dict[str, str]:
    """Task 2 of `srun -N4 --ntasks-per-node=1` in job 1238234, as srun sets it, plus noise."""
    env = {
        "HOME": "/home/u",
        "SLURM_JOB_ID": "1238234",
        "SLURM_JOBID": "1238234",
        "SLURM_STEP_ID": "0",
        "SLURM_STEPID": "0",
        "SLURM_JOB_NODELIST": "gpu[01-04]",
        "SLURM_NODELIST": "gpu[01-04]",
        "SLURM_STEP_NODELIST": "gpu[01-04]",
        "SLURM_NNODES": "4",
        "SLURM_JOB_NUM_NODES": "4",
        "SLURM_STEP_NUM_NODES": "4",
        "SLURM_NODEID": "2",
        "SLURM_PROCID": "2",
        "SLURM_LOCALID": "0",
        "SLURM_NTASKS": "4",
        "SLURM_STEP_NUM_TASKS": "4",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_STEP_TASKS_PER_NODE": "1(x4)",
        "SLURM_TASKS_PER_NODE": "1(x4)",
    }
    env.update(overrides)
    return {key: value for key, value in env.items() if value != UNSET}


# Only what the brief names: the job, the node id, the job's node list and count.
MINIMAL_SLURM = {
    "SLURM_JOB_ID": "1238234",
    "SLURM_STEP_ID": "0",
    "SLURM_NODEID": "2",
    "SLURM_JOB_NODELIST": "gpu[01-04]",
    "SLURM_NNODES": "4",
}


def test_slurm_full_answer() -> None:
    assert detect_cluster(srun_task()) == Detected(
        source="Slurm",
        nnodes=4,
        node_rank=2,
        master_addr="gpu01",
        master_port=15000 + 8234,  # Lightning's rule: 15000 + last 4 digits of the job id
        origins=(
            ("nnodes", "SLURM_STEP_NUM_NODES"),
            ("node_rank", "SLURM_NODEID"),
            ("master_addr", "first host of SLURM_STEP_NODELIST=gpu[01-04]"),
            ("master_port", "derived from SLURM_JOB_ID=1238234"),
        ),
    )


def test_slurm_minimal_variables() -> None:
    detected = detect_cluster(MINIMAL_SLURM)
    assert detected is not None
    assert detected.origins == (
        ("nnodes", "SLURM_NNODES"),
        ("node_rank", "SLURM_NODEID"),
        ("master_addr", "first host of SLURM_JOB_NODELIST=gpu[01-04]"),
        ("master_port", "derived from SLURM_JOB_ID=1238234"),
    )


@pytest.mark.parametrize(
    ("overrides", "field", "expected"),
    [
        ({"SLURM_NODEID": "0"}, "node_rank", 0),
        ({"SLURM_NODEID": "3"}, "node_rank", 3),
        ({"SLURM_JOB_ID": "42"}, "master_port", 15042),  # fewer than 4 digits
        ({"SLURM_JOB_ID": "990000"}, "master_port", 15000),
        ({"SLURM_JOB_ID": "99999"}, "master_port", 24999),
        ({"MASTER_PORT": "29501"}, "master_port", 29501),  # the user's value wins
        ({"MASTER_ADDR": "10.0.0.7"}, "master_addr", "10.0.0.7"),
        ({"MASTER_ADDR": "  "}, "master_addr", "gpu01"),  # blank counts as unset
        # A step on part of the job's nodes: node 0 is the step's first host, not the job's.
        (
            {"SLURM_STEP_NODELIST": "gpu[03-04]", "SLURM_STEP_NUM_NODES": "2", "SLURM_NODEID": "1",
             "SLURM_NNODES": "2", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
             "SLURM_STEP_TASKS_PER_NODE": "1(x2)"},
            "master_addr",
            "gpu03",
        ),
        # No step list: SLURM_JOB_NODELIST, then SLURM_NODELIST.
        (
            {"SLURM_STEP_NODELIST": UNSET, "SLURM_JOB_NODELIST": "a[1-4]", "SLURM_NODELIST": "b[1-4]"},
            "master_addr",
            "a1",
        ),
        ({"SLURM_STEP_NODELIST": UNSET, "SLURM_JOB_NODELIST": UNSET, "SLURM_NODELIST": "b[1-4]"}, "master_addr", "b1"),
        # No count at all: the list's length.
        ({"SLURM_STEP_NUM_NODES": UNSET, "SLURM_NNODES": UNSET, "SLURM_JOB_NUM_NODES": UNSET}, "nnodes", 4),
        ({"SLURM_STEP_NUM_NODES": UNSET, "SLURM_NNODES": UNSET}, "nnodes", 4),
        # Per-node counts may come from sbatch; the step's own count decides.
        ({"SLURM_NTASKS_PER_NODE": "4", "SLURM_STEP_TASKS_PER_NODE": "1(x4)"}, "nnodes", 4),
        ({"SLURM_STEP_TASKS_PER_NODE": UNSET, "SLURM_NTASKS_PER_NODE": UNSET, "SLURM_NTASKS": UNSET,
          "SLURM_STEP_NUM_TASKS": UNSET}, "nnodes", 4),
        (
            {"SLURM_STEP_NODELIST": "login1,gpu[1-2],cpu-[001-002]", "SLURM_STEP_NUM_NODES": "5",
             "SLURM_NTASKS": "5", "SLURM_STEP_NUM_TASKS": "5", "SLURM_STEP_TASKS_PER_NODE": "1(x5)"},
            "master_addr",
            "login1",
        ),
    ],
)
def test_slurm_fields(overrides: dict[str, str], field: str, expected: object) -> None:
    detected = detect_cluster(srun_task(**overrides))
    assert detected is not None and detected.source == "Slurm"
    assert getattr(detected, field) == expected


def test_slurm_master_overrides_are_credited() -> None:
    detected = detect_cluster(srun_task(MASTER_ADDR="head", MASTER_PORT="29500"))
    assert detected is not None
    assert (detected.master_addr, detected.master_port) == ("head", 29500)
    assert detected.origin("master_addr") == "MASTER_ADDR"
    assert detected.origin("master_port") == "MASTER_PORT"


def test_slurm_batch_script_of_one_node_is_fine() -> None:
    # sbatch --ntasks-per-node=4 on one node, ddplaunch run directly by the script: no srun
    # step, and the batch script is one process whatever the task counts say.
    env = {
        "SLURM_JOB_ID": "77",
        "SLURM_NODEID": "0",
        "SLURM_JOB_NODELIST": "gpu07",
        "SLURM_NNODES": "1",
        "SLURM_NTASKS": "4",
        "SLURM_NTASKS_PER_NODE": "4",
        "SLURM_TASKS_PER_NODE": "4",
    }
    detected = detect_cluster(env)
    assert detected is not None
    assert (detected.nnodes, detected.node_rank, detected.master_addr) == (1, 0, "gpu07")


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        # srun started more than one task per node.
        ({"SLURM_STEP_TASKS_PER_NODE": "4(x4)", "SLURM_NTASKS": "16"}, ["4 tasks per node", "--ntasks-per-node=1"]),
        ({"SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_NTASKS": "7"}, ["SLURM_STEP_TASKS_PER_NODE", "2 tasks"]),
        ({"SLURM_STEP_TASKS_PER_NODE": UNSET, "SLURM_NTASKS_PER_NODE": "2"}, ["SLURM_NTASKS_PER_NODE=2"]),
        ({"SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_TASKS_PER_NODE": UNSET,
          "SLURM_NTASKS_PER_NODE": UNSET}, ["8 tasks on 4 nodes", "SLURM_STEP_NUM_TASKS", "--ntasks-per-node=1"]),
        ({"SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": UNSET, "SLURM_STEP_TASKS_PER_NODE": UNSET,
          "SLURM_NTASKS_PER_NODE": UNSET}, ["SLURM_NTASKS=8", "--ntasks-per-node=1"]),
        # The batch script of a multi-node job: only this node would join.
        (
            {"SLURM_STEP_ID": UNSET, "SLURM_STEPID": UNSET},
            ["batch script", "SLURM_STEP_ID", "srun --ntasks-per-node=1"],
        ),
        # Malformed numbers name their variable.
        ({"SLURM_NODEID": "two"}, ["SLURM_NODEID='two'", "DDPLAUNCH_CLUSTER=none"]),
        ({"SLURM_NODEID": "-1"}, ["SLURM_NODEID='-1'"]),
        ({"SLURM_NODEID": "4"}, ["SLURM_NODEID=4", "node count 4"]),
        ({"SLURM_STEP_NUM_NODES": "four"}, ["SLURM_STEP_NUM_NODES='four'"]),
        ({"SLURM_STEP_NUM_NODES": "0"}, ["SLURM_STEP_NUM_NODES='0'"]),
        ({"SLURM_STEP_NUM_NODES": "3"}, ["SLURM_STEP_NUM_NODES=3", "SLURM_STEP_NODELIST=gpu[01-04]", "4 hosts"]),
        ({"SLURM_JOB_ID": "12ab"}, ["SLURM_JOB_ID='12ab'"]),
        ({"SLURM_NTASKS": "many", "SLURM_STEP_NUM_TASKS": UNSET}, ["SLURM_NTASKS='many'"]),
        ({"SLURM_STEP_TASKS_PER_NODE": "1(x)"}, ["SLURM_STEP_TASKS_PER_NODE='1(x)'"]),
        ({"SLURM_STEP_TASKS_PER_NODE": "one"}, ["SLURM_STEP_TASKS_PER_NODE='one'"]),
        ({"SLURM_STEP_NODELIST": "gpu[01-04"}, ["SLURM_STEP_NODELIST='gpu[01-04'", "never closed"]),
        ({"SLURM_STEP_NODELIST": "gpu[4-1]"}, ["SLURM_STEP_NODELIST", "runs backwards"]),
        ({"MASTER_PORT": "http"}, ["MASTER_PORT='http'", "1-65535"]),
        ({"MASTER_PORT": "0"}, ["MASTER_PORT='0'"]),
        ({"MASTER_PORT": "65536"}, ["MASTER_PORT='65536'"]),
        ({"MASTER_ADDR": "a b"}, ["MASTER_ADDR='a b'"]),
    ],
)
def test_slurm_rejects(overrides: dict[str, str], names: list[str]) -> None:
    with pytest.raises(LaunchError) as caught:
        detect_cluster(srun_task(**overrides))
    message = str(caught.value)
    for name in names:
        assert name in message
    assert "\n" not in message


def test_slurm_bad_node_list_is_a_hostlist_error() -> None:
    with pytest.raises(HostlistError) as caught:
        detect_cluster(srun_task(SLURM_STEP_NODELIST="gpu]"))
    assert caught.value.variable == "SLURM_STEP_NODELIST"


# -- Open MPI ------------------------------------------------------------------------------------


def mpirun_process(**overrides: str) -> dict[str, str]:
    """Process 1 of `mpirun -np 2 -npernode 1`."""
    env = {
        "OMPI_COMM_WORLD_SIZE": "2",
        "OMPI_COMM_WORLD_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_RANK": "0",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "1",
        "OMPI_COMM_WORLD_NODE_RANK": "0",
    }
    env.update(overrides)
    return {key: value for key, value in env.items() if value != UNSET}


def test_openmpi_answer() -> None:
    assert detect_cluster(mpirun_process()) == Detected(
        source="Open MPI",
        nnodes=2,
        node_rank=1,
        master_addr=None,  # mpirun gives no rendezvous address
        master_port=None,
        origins=(("nnodes", "OMPI_COMM_WORLD_SIZE"), ("node_rank", "OMPI_COMM_WORLD_RANK")),
    )


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"MASTER_ADDR": "node0"}, (2, 1, "node0", None)),
        ({"MASTER_ADDR": "node0", "MASTER_PORT": "29500"}, (2, 1, "node0", 29500)),
        ({"OMPI_COMM_WORLD_LOCAL_SIZE": UNSET}, (2, 1, None, None)),
        ({"OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"}, (1, 0, None, None)),
        ({"OMPI_COMM_WORLD_SIZE": " 8 ", "OMPI_COMM_WORLD_RANK": "7"}, (8, 7, None, None)),
    ],
)
def test_openmpi_fields(overrides: dict[str, str], expected: tuple[object, ...]) -> None:
    detected = detect_cluster(mpirun_process(**overrides))
    assert detected is not None
    assert (detected.nnodes, detected.node_rank, detected.master_addr, detected.master_port) == expected


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, ["OMPI_COMM_WORLD_LOCAL_SIZE=4", "-npernode 1", "ppr:1:node"]),
        ({"OMPI_COMM_WORLD_SIZE": "x"}, ["OMPI_COMM_WORLD_SIZE='x'"]),
        ({"OMPI_COMM_WORLD_SIZE": "0", "OMPI_COMM_WORLD_RANK": "0"}, ["OMPI_COMM_WORLD_SIZE='0'"]),
        ({"OMPI_COMM_WORLD_RANK": "-1"}, ["OMPI_COMM_WORLD_RANK='-1'"]),
        ({"OMPI_COMM_WORLD_RANK": "2"}, ["OMPI_COMM_WORLD_RANK=2", "OMPI_COMM_WORLD_SIZE=2"]),
        ({"OMPI_COMM_WORLD_LOCAL_SIZE": "one"}, ["OMPI_COMM_WORLD_LOCAL_SIZE='one'"]),
        ({"MASTER_PORT": "port"}, ["MASTER_PORT='port'"]),
    ],
)
def test_openmpi_rejects(overrides: dict[str, str], names: list[str]) -> None:
    with pytest.raises(LaunchError) as caught:
        detect_cluster(mpirun_process(**overrides))
    for name in names:
        assert name in str(caught.value)


def test_openmpi_wins_over_an_inherited_slurm_allocation() -> None:
    # mpirun inside an sbatch script: its processes inherit the batch step's SLURM_* variables.
    env = {**srun_task(SLURM_STEP_ID=UNSET, SLURM_STEPID=UNSET, SLURM_NODEID="0"), **mpirun_process()}
    detected = detect_cluster(env)
    assert detected is not None
    assert (detected.source, detected.node_rank) == ("Open MPI", 1)


# -- choosing an environment ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"HOME": "/home/u", "PATH": "/usr/bin"},
        # salloc's shell: an allocation, but no task of a step.
        {"SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NNODES": "2"},
        {"SLURM_JOB_ID": "5", "SLURM_NODEID": "0"},  # no node list
        {"SLURM_JOB_ID": "", "SLURM_NODEID": "0", "SLURM_NODELIST": "n1"},  # blank counts as unset
        {"OMPI_COMM_WORLD_SIZE": "2"},  # no rank
        {**MINIMAL_SLURM, "DDPLAUNCH_CLUSTER": "none"},
        {**mpirun_process(), "DDPLAUNCH_CLUSTER": "NONE"},
        {"MASTER_ADDR": "x", "DDPLAUNCH_CLUSTER": "none"},
    ],
)
def test_nothing_detected(env: dict[str, str]) -> None:
    assert detect_cluster(env) is None


@pytest.mark.parametrize(
    ("env", "source"),
    [
        (MINIMAL_SLURM, "Slurm"),
        (mpirun_process(), "Open MPI"),
        ({**MINIMAL_SLURM, **mpirun_process(), "DDPLAUNCH_CLUSTER": "slurm"}, "Slurm"),
        ({**MINIMAL_SLURM, **mpirun_process(), "DDPLAUNCH_CLUSTER": "openmpi"}, "Open MPI"),
        ({**MINIMAL_SLURM, "DDPLAUNCH_CLUSTER": "auto"}, "Slurm"),
        ({**MINIMAL_SLURM, "DDPLAUNCH_CLUSTER": " Slurm "}, "Slurm"),
        ({**MINIMAL_SLURM, "DDPLAUNCH_CLUSTER": ""}, "Slurm"),
        ({"MASTER_ADDR": "head"}, "environment"),
        ({"MASTER_PORT": "29500"}, "environment"),
        ({**MINIMAL_SLURM, "MASTER_ADDR": "head", "DDPLAUNCH_CLUSTER": "environment"}, "environment"),
    ],
)
def test_source_chosen(env: dict[str, str], source: str) -> None:
    detected = detect_cluster(env)
    assert detected is not None and detected.source == source


def test_plain_environment_gives_only_the_rendezvous() -> None:
    assert detect_cluster({"MASTER_ADDR": "head", "MASTER_PORT": "29500"}) == Detected(
        "environment", None, None, "head", 29500, (("master_addr", "MASTER_ADDR"), ("master_port", "MASTER_PORT"))
    )


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"DDPLAUNCH_CLUSTER": "pbs"}, ["DDPLAUNCH_CLUSTER='pbs'", "slurm", "openmpi", "none"]),
        (
            {"DDPLAUNCH_CLUSTER": "slurm"},
            ["DDPLAUNCH_CLUSTER=slurm", "SLURM_JOB_ID", "SLURM_NODEID", "SLURM_JOB_NODELIST"],
        ),
        ({"DDPLAUNCH_CLUSTER": "slurm", "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n1"}, ["SLURM_NODEID is not set"]),
        ({"DDPLAUNCH_CLUSTER": "openmpi", "OMPI_COMM_WORLD_SIZE": "2"}, ["OMPI_COMM_WORLD_RANK is not set", "mpirun"]),
        ({"DDPLAUNCH_CLUSTER": "openmpi", **MINIMAL_SLURM}, ["OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"]),
        ({"DDPLAUNCH_CLUSTER": "environment"}, ["MASTER_ADDR or MASTER_PORT"]),
        ({"MASTER_PORT": "abc"}, ["MASTER_PORT='abc'"]),
    ],
)
def test_choice_rejects(env: dict[str, str], names: list[str]) -> None:
    with pytest.raises(LaunchError) as caught:
        detect_cluster(env)
    message = str(caught.value)
    for name in names:
        assert name in message
    assert "\n" not in message


def test_environ_is_not_changed() -> None:
    env = srun_task(MASTER_PORT="29500")
    before = dict(env)
    detect_cluster(env)
    assert env == before


# -- describe ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "lines"),
    [
        (
            MINIMAL_SLURM,
            [
                (
                    "detected Slurm: nnodes=4 from SLURM_NNODES, node_rank=2 from SLURM_NODEID, master_addr=gpu01 "
                    "from first host of SLURM_JOB_NODELIST=gpu[01-04], master_port=23234 derived from "
                    "SLURM_JOB_ID=1238234"
                ),
            ],
        ),
        (
            {**MINIMAL_SLURM, "MASTER_PORT": "29500"},
            [
                (
                    "detected Slurm: nnodes=4 from SLURM_NNODES, node_rank=2 from SLURM_NODEID, master_addr=gpu01 "
                    "from first host of SLURM_JOB_NODELIST=gpu[01-04], master_port=29500 from MASTER_PORT"
                ),
            ],
        ),
        (
            mpirun_process(),
            [
                "detected Open MPI: nnodes=2 from OMPI_COMM_WORLD_SIZE, node_rank=1 from OMPI_COMM_WORLD_RANK",
                "not detected: master_addr, master_port (taken from --master-addr, --master-port or their defaults)",
            ],
        ),
        (
            {"MASTER_ADDR": "head"},
            [
                "from the environment: master_addr=head from MASTER_ADDR",
                (
                    "not detected: nnodes, node_rank, master_port "
                    "(taken from --nnodes, --node-rank, --master-port or their defaults)"
                ),
            ],
        ),
    ],
)
def test_describe(env: dict[str, str], lines: list[str]) -> None:
    detected = detect_cluster(env)
    assert detected is not None
    assert describe(detected) == lines
