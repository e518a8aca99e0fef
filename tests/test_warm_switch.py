"""DDPLAUNCH_WARM: --warm as a user's own default, and --no-warm over it (nothing runs)."""

from __future__ import annotations

import click
import pytest

from ddplaunch.api import option_flags
from ddplaunch.cli import command

pytestmark = pytest.mark.unit


def parsed(args: list[str]) -> bool:
    with command.make_context("ddplaunch", [*args, "train.py"]) as ctx:
        return bool(ctx.params["warm"])


@pytest.mark.parametrize(("variable", "args", "warm"), [
    (None, [], False),  # cold unless asked
    (None, ["--warm"], True),
    ("1", [], True),
    ("yes", [], True),
    ("0", [], False),
    ("", [], False),
    ("1", ["--no-warm"], False),  # the command line wins over the variable
    ("0", ["--warm"], True),
])
def test_ddplaunch_warm_is_the_default_that_the_command_line_overrides(
    monkeypatch: pytest.MonkeyPatch, variable: str | None, args: list[str], warm: bool
) -> None:
    if variable is None:
        monkeypatch.delenv("DDPLAUNCH_WARM", raising=False)
    else:
        monkeypatch.setenv("DDPLAUNCH_WARM", variable)
    assert parsed(args) is warm


def test_a_bad_ddplaunch_warm_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DDPLAUNCH_WARM", "maybe")
    with pytest.raises(click.BadParameter, match=r"DDPLAUNCH_WARM=maybe is neither on nor off: set it to 1"):
        parsed([])


def test_the_python_apis_warm_false_overrides_the_variable() -> None:
    assert option_flags({"warm": False}) == ["--no-warm"]  # a caller's False is not "the default"
    assert option_flags({"warm": True}) == ["--warm"]
