"""The node agent's command line, read with the standard library only (`python -m ddplaunch --agent ...`).

A head starts one agent per host (ddplaunch.fanout.agent_argv), on a host that may have nothing
but Python: no click, rich, paramiko or psutil. So the agent's flags are read here, not by
cli.py, and only the flags a head sends are accepted: the ones it passes on unchanged
(fanout.PASSED_OPTIONS, PASSED_SWITCHES) and its per-host ones (AGENT_OPTIONS). Every other
field of Options gets what click gives an option that is not on the command line, so the two
parsers agree field by field (tests/test_agent_cli.py holds them to it).

Only a head writes this command line; one wrong is a version mismatch or a bug, so it gets one
line on stderr (which the head shows as the host's problem) and exit 2. PET_* variables are not
read: on the agent the head's command line is the whole word, whatever the host's shell sets.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import MISSING, Field, fields
from typing import NoReturn

from ddplaunch.errors import LaunchError
from ddplaunch.fanout import PASSED_OPTIONS, PASSED_SWITCHES
from ddplaunch.options import Options

# The flags agent_argv writes for each host itself, beside the passed ones.
AGENT_OPTIONS = ("host_name", "nnodes", "node_rank", "nproc", "gpu_ids", "stall_timeout", "run_id")
AGENT_SWITCHES = ("agent",)
# What click gives an absent option whose Options field has no default of its own (cli.py's
# `default=`); other absent fields are None, False (a switch) or () (a repeatable option).
CLICK_DEFAULTS: dict[str, object] = {"max_restarts": 0, "stdin": "0"}
_CONVERTERS = {"int": int, "float": float, "str": str}
_FIELDS = {field.name: field for field in fields(Options)}


def flag_of(name: str) -> str:
    """An Options field's long flag, as agent_argv spells it: join_timeout -> --join-timeout."""
    return "--" + name.replace("_", "-")


VALUE_FLAGS = {flag_of(name): name for name in (*PASSED_OPTIONS, *AGENT_OPTIONS)}
SWITCH_FLAGS = {flag_of(name): name for name in (*PASSED_SWITCHES, *AGENT_SWITCHES)}


def parse_agent_argv(args: Sequence[str]) -> Options:
    """The agent's flags, then SCRIPT and its arguments, as click reads them: the first word
    that is not a flag (or the word after `--`) is SCRIPT, and everything after it is the
    script's, unread. LaunchError names the word that is not what a head sends."""
    given: dict[str, object] = {}
    words = list(args)
    at = 0
    while at < len(words) and words[at].startswith("-") and words[at] != "-":
        word = words[at]
        at += 1
        if word == "--":
            break
        flag, has_value, value = word.partition("=")
        if flag in SWITCH_FLAGS:
            if has_value:
                raise LaunchError(f"agent: {flag} takes no value (got {word!r})")
            given[SWITCH_FLAGS[flag]] = True
        elif flag in VALUE_FLAGS:
            if not has_value:
                if at == len(words):
                    raise LaunchError(f"agent: {flag} needs a value")
                value = words[at]
                at += 1
            given[VALUE_FLAGS[flag]] = _converted(VALUE_FLAGS[flag], flag, value)
        else:
            raise LaunchError(f"agent: {word!r} is not a flag a head sends; is ddplaunch the same version here?")
    if at == len(words):
        raise LaunchError("agent: no SCRIPT after the flags")
    return options_of(given, words[at], tuple(words[at + 1 :]))


def _converted(name: str, flag: str, text: str) -> object:
    kind = _annotation(_FIELDS[name]).split(" | ")[0]
    try:
        return _CONVERTERS[kind](text)
    except ValueError:
        raise LaunchError(f"agent: {flag} {text!r} is not a valid {kind}") from None


def options_of(given: dict[str, object], script: str, script_args: tuple[str, ...]) -> Options:
    """Options with `given` set and every other field as click leaves an absent option."""
    values = {name: given[name] if name in given else absent_value(field) for name, field in _FIELDS.items()}
    values.update(script=script, script_args=script_args)
    return Options(**values)  # type: ignore[arg-type]


def absent_value(field: Field[object]) -> object:
    if field.default is not MISSING:
        return field.default
    if field.name in CLICK_DEFAULTS:
        return CLICK_DEFAULTS[field.name]
    annotation = _annotation(field)
    if annotation == "bool":
        return False
    if annotation.startswith("tuple["):
        return ()
    return None


def _annotation(field: Field[object]) -> str:
    # `from __future__ import annotations` in ddplaunch.options: every annotation is its text
    return field.type if isinstance(field.type, str) else field.type.__name__


def leave(code: int) -> NoReturn:
    """Exit with `code`. After torch (a static node's store), at once: the interpreter's
    teardown of torch costs ~0.5 s, and every resource of ours is already released."""
    if "torch" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """`python -m ddplaunch --agent ...`: parse, run the agent's job, exit with its code."""
    try:
        options = parse_agent_argv(sys.argv[1:] if argv is None else argv)
    except LaunchError as exc:
        print(f"ddplaunch: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
    from ddplaunch.job import run_command

    leave(run_command(options))
