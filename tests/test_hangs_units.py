"""The pure parts of stack reports: when a stall is due, what SIGQUIT does, the flags' checks,
and how a rank that raised on its own is told apart from one that was only stopped."""

from __future__ import annotations

import signal

import pytest

from ddplaunch.errors import LaunchError
from ddplaunch.hangs import StallWatch
from ddplaunch.logs import Exceptions
from ddplaunch.options import DEFAULT_STALL_TIMEOUT_S, Stall, stall_of
from ddplaunch.supervisor import SignalPlan

pytestmark = pytest.mark.unit


def test_a_stall_is_due_after_the_timeout_then_after_each_doubling() -> None:
    watch = StallWatch(10.0, since=100.0)
    assert watch.due_in(105.0) == 5.0
    assert watch.take_due(109.9) is None
    assert watch.take_due(110.0) == 10.0  # the first report
    assert watch.take_due(115.0) is None
    assert watch.due_in(115.0) == 5.0  # the next at 20 s of silence
    assert watch.take_due(120.0) == 20.0
    assert watch.take_due(130.0) is None  # then at 40 s
    assert watch.take_due(140.0) == 40.0


def test_output_resets_the_stall_clock_and_the_doubling() -> None:
    watch = StallWatch(10.0, since=0.0)
    assert watch.take_due(10.0) == 10.0
    watch.heard(12.0)
    assert watch.take_due(21.0) is None
    assert watch.take_due(22.0) == 10.0  # 10 s after the last output, not 20
    watch.heard(None)  # no rank has printed: nothing changes
    watch.heard(5.0)  # older news changes nothing either
    assert watch.due_in(22.0) == 10.0  # the next at 20 s of silence: 32


@pytest.mark.parametrize(
    ("given", "stops", "reports"),
    [
        (None, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}, (signal.SIGQUIT,)),
        ("SIGTERM,SIGINT,SIGHUP,SIGQUIT", {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT}, ()),
        ("SIGTERM", {signal.SIGTERM}, (signal.SIGQUIT,)),
    ],
)
def test_sigquit_asks_for_stacks_unless_listed_in_signals_to_handle(
    given: str | None, stops: set[int], reports: tuple[int, ...]
) -> None:
    plan = SignalPlan.handling(given)
    assert set(plan.stop) == stops
    assert plan.report == reports


@pytest.mark.parametrize(
    ("timeout", "action", "expected"),
    [
        (None, "report", Stall(DEFAULT_STALL_TIMEOUT_S, False)),
        (0.0, "report", Stall(0.0, False)),
        (30.0, "stop", Stall(30.0, True)),
    ],
)
def test_stall_flags(timeout: float | None, action: str, expected: Stall) -> None:
    from dataclasses import replace

    assert stall_of(replace(_options(), stall_timeout=timeout, stall_action=action)) == expected


@pytest.mark.parametrize(
    ("timeout", "action", "message"),
    [
        (-1.0, "report", "--stall-timeout -1: use a number of seconds, 0 or more"),
        (float("nan"), "report", "--stall-timeout nan"),
        (0.0, "stop", "--stall-action stop needs a stall to act on"),
    ],
)
def test_bad_stall_flags_are_named(timeout: float, action: str, message: str) -> None:
    from dataclasses import replace

    with pytest.raises(LaunchError, match=message.replace("(", r"\(")):
        stall_of(replace(_options(), stall_timeout=timeout, stall_action=action))


@pytest.mark.parametrize(
    ("lines", "raised"),
    [
        ([b"Traceback (most recent call last):", b'  File "t.py", line 3, in <module>', b"ValueError: bad"],
         ["ValueError: bad"]),
        ([b"[rank3]: Traceback (most recent call last):", b'[rank3]:   File "t.py", line 3, in f',
          b"[rank3]: RuntimeError: Connection closed by peer"], ["RuntimeError: Connection closed by peer"]),
        # a chained exception: the last one is what ended the rank
        ([b"Traceback (most recent call last):", b"  x", b"KeyError: 'a'", b"",
          b"During handling of the above exception, another exception occurred:", b"",
          b"Traceback (most recent call last):", b"  y", b"SystemExit: 3"], ["KeyError: 'a'", "SystemExit: 3"]),
        ([b"no traceback here", b"ValueError: printed by the script itself"], []),
    ],
)
def test_uncaught_exceptions_are_read_from_pythons_traceback_layout(lines: list[bytes], raised: list[str]) -> None:
    found = Exceptions()
    found.scan(lines, now=1.0)
    assert [line for _, line in found.raised] == raised


def _options():  # type: ignore[no-untyped-def]
    from ddplaunch.options import Options

    return Options(
        script="t.py", script_args=(), nproc="1", nnodes=None, node_rank=None, master_addr=None,
        master_port=None, rdzv_endpoint=None, rdzv_backend=None, join_timeout=None, standalone=False,
        gpu_ids=None, module=False, no_python=False, local_rank_arg=False, log_dir=None, ranks=None,
        max_restarts=0, env=(), dry_run=False, grace=None, run_id=None, no_color=False, hosts=None,
        hostfile=None, ssh_accept_new_host_keys=False, chdir=None, python=None, stdin="0", agent=False,
        host_name=None,
    )
