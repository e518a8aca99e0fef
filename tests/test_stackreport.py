"""Tables for the stack report's text (launcher/stackreport.py): ranks, frames, groups, reports."""

from __future__ import annotations

import pytest

from launcher.snapshot import StackFrame
from launcher.stackreport import compact_ranks, headline, is_user_frame

pytestmark = pytest.mark.unit

SITE = "/opt/conda/lib/python3.11/site-packages"
C10D = StackFrame(f"{SITE}/torch/distributed/distributed_c10d.py", 2501, "all_reduce")
LOGGER = StackFrame(f"{SITE}/torch/distributed/c10d_logger.py", 81, "wrapper")
THREADING = StackFrame("/opt/conda/lib/python3.11/threading.py", 327, "wait")
STEP = StackFrame("/home/ana/proj/train.py", 50, "step")
MAIN = StackFrame("/home/ana/proj/train.py", 88, "main")
MODULE = StackFrame("/home/ana/proj/train.py", 92, "<module>")


# -- compact_ranks, is_user_frame, headline ------------------------------------------------------


@pytest.mark.parametrize(
    ("ranks", "text"),
    [
        ([3], "3"),
        ([0, 1, 2, 3, 4, 5, 6], "0-6"),
        ([9, 0, 8, 1, 2, 5, 7], "0-2, 5, 7-9"),
        ([4, 5], "4-5"),
        ([1, 3, 5], "1, 3, 5"),
        ([2, 2, 3], "2-3"),
        ([], ""),
    ],
)
def test_compact_ranks(ranks: list[int], text: str) -> None:
    assert compact_ranks(ranks) == text
    assert compact_ranks(iter(ranks)) == text  # any iterable, read once


@pytest.mark.parametrize(
    ("file", "user"),
    [
        ("train.py", True),
        ("/home/ana/proj/train.py", True),
        ("/home/ana/proj/models/attention.py", True),
        ("<string>", True),
        ("/home/ana/torchvision_tricks/aug.py", True),  # "torch" in a name, not a directory
        (f"{SITE}/torch/distributed/distributed_c10d.py", False),
        (f"{SITE}/numpy/core/fromnumeric.py", False),
        ("/usr/lib/python3/dist-packages/yaml/__init__.py", False),
        ("/home/ana/.venv/lib/python3.12/site-packages/datasets/load.py", False),
        ("/home/ana/src/pytorch/torch/nn/modules/module.py", False),  # torch from a checkout
        ("torch/distributed/distributed_c10d.py", False),
        ("/usr/lib/python3.11/threading.py", False),
        ("/opt/conda/lib/python3.11/multiprocessing/connection.py", False),
        ("/home/ana/.pyenv/versions/3.10.14/lib/python3.10/selectors.py", False),
        ("/usr/lib64/python3.9/queue.py", False),
        ("/usr/local/lib/python3.13t/threading.py", False),
        ("<frozen runpy>", False),
        ("<frozen importlib._bootstrap>", False),
    ],
)
def test_is_user_frame(file: str, user: bool) -> None:
    assert is_user_frame(StackFrame(file, 1, "f")) is user


@pytest.mark.parametrize(
    ("frames", "expected"),
    [
        ((C10D, LOGGER, STEP, MAIN, MODULE), STEP),
        ((STEP, MAIN), STEP),
        ((THREADING, C10D), THREADING),  # no user frame: the innermost
        ((), None),
    ],
)
def test_headline_is_the_innermost_user_frame(frames: tuple[StackFrame, ...], expected: StackFrame | None) -> None:
    assert headline(frames) == expected
