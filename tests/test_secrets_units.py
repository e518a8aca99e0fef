"""Secrets, the pure parts: which names hide their values, --env and --env-file parsing (tables
and properties), the agent's env line, and every printer of variables: dry runs, launcher.log."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ddplaunch.agent import _read_line, receive_env
from ddplaunch.errors import LaunchError
from ddplaunch.fanout import Host, render_hosts
from ddplaunch.frames import BEAT_LINE, decode_env, env_line, go_line, parse_command
from ddplaunch.hosts import HostSpec
from ddplaunch.logs import Printer
from ddplaunch.plan import RANK_VARIABLES, is_env_name, parse_env_assignments, parse_env_file, resolve_env
from ddplaunch.secrets import hidden, looks_secret, redact, scrub, shown
from ddplaunch.ssh import SshTarget

pytestmark = pytest.mark.unit

TOKEN = "hf_" + "x" * 34  # 37 characters, as the brief's example
PROPERTY = settings(max_examples=100, deadline=None)  # the unit tier stays a few seconds


# -- which names, and how they show -----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("HF_TOKEN", True), ("WANDB_API_KEY", True), ("AWS_SECRET_ACCESS_KEY", True), ("DB_PASSWORD", True),
        ("MYSQL_PASSWD", True), ("GOOGLE_APPLICATION_CREDENTIALS", True), ("NPM_AUTH", True),
        ("hf_token", True), ("Api_Key", True), ("auth_header", True),
        ("NCCL_DEBUG", False), ("OMP_NUM_THREADS", False), ("PYTHONPATH", False), ("CUDA_VISIBLE_DEVICES", False),
        ("HF_HOME", False), ("WANDB_PROJECT", False), ("TOKENIZERS_PARALLELISM", True),  # over-hiding is cheap
    ],
)
def test_names_that_look_secret(name: str, secret: bool) -> None:
    assert looks_secret(name) is secret


@pytest.mark.parametrize(
    ("name", "value", "text"),
    [
        ("HF_TOKEN", TOKEN, "HF_TOKEN=<hidden, 37 chars>"),
        ("DB_PASSWORD", "a", "DB_PASSWORD=<hidden, 1 char>"),
        ("API_KEY", "", "API_KEY=<hidden, 0 chars>"),
        ("NCCL_DEBUG", "INFO", "NCCL_DEBUG=INFO"),
    ],
)
def test_shown(name: str, value: str, text: str) -> None:
    assert shown(name, value) == text


def test_redact_hides_each_secret_value_anywhere_and_nothing_else() -> None:
    env = [("HF_TOKEN", TOKEN), ("SHORT_KEY", "ab1"), ("NCCL_DEBUG", "INFO"), ("A_SECRET", TOKEN[:10])]
    text = f"cannot use {TOKEN} (INFO) ab1"
    assert redact(text, env) == "cannot use <hidden HF_TOKEN> (INFO) ab1"  # the longer value first


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("started rank 0 pid 9: python -u train.py --hf-token=abc123",
         "python -u train.py --hf-token=<hidden, 6 chars>"),
        ("HF_TOKEN=abc def", "HF_TOKEN=<hidden, 3 chars> def"),
        ("OMP_NUM_THREADS=4 per worker", "OMP_NUM_THREADS=4 per worker"),
        ("x --lr=0.1 api_key=zz", "x --lr=0.1 api_key=<hidden, 2 chars>"),
    ],
)
def test_scrub_hides_secret_assignments_in_free_text(text: str, expected: str) -> None:
    assert scrub(text).endswith(expected)


# -- --env-file -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "pairs"),
    [
        ("", ()),
        ("A=1", (("A", "1"),)),
        ("A=1\nB=2\n", (("A", "1"), ("B", "2"))),
        ("\n  \n# comment\n   # indented comment\nA=1\n", (("A", "1"),)),
        ("export A=1\nexport\tB=2", (("A", "1"), ("B", "2"))),
        ("export=1", (("export", "1"),)),  # a variable named export
        ("  A = spaced  ", (("A", "spaced"),)),
        ("A='  kept  '", (("A", "  kept  "),)),
        ('A="  kept  "', (("A", "  kept  "),)),
        ("A='it's'", (("A", "it's"),)),  # no escapes: the outer quotes go, the rest stays
        ("A=\"say 'hi'\"", (("A", "say 'hi'"),)),
        ("A=1 # not a comment", (("A", "1 # not a comment"),)),
        ("A=$HOME", (("A", "$HOME"),)),  # no expansion
        ("A=b=c", (("A", "b=c"),)),
        ("A=", (("A", ""),)),
        ("A=''", (("A", ""),)),
        ("A=ab'", (("A", "ab'"),)),  # a quote only at the end is part of the value
        ("A=1\r\nB=2\r\n", (("A", "1"), ("B", "2"))),  # CRLF
        ("\ufeffA=1", (("A", "1"),)),  # a BOM
        ("A='x\ry'", (("A", "x\ry"),)),  # a lone CR is not a line break
        ("A=1\nA=2", (("A", "1"), ("A", "2"))),  # order kept; resolve_env keeps the last
    ],
)
def test_env_file_lines(text: str, pairs: tuple[tuple[str, str], ...]) -> None:
    assert parse_env_file(text, "x.env") == pairs


@pytest.mark.parametrize(
    ("text", "line", "why"),
    [
        ("A=1\nNOEQUALS", 2, "not NAME=value"),
        ("A-B=1", 1, "not NAME=value"),
        ("1A=1", 1, "not NAME=value"),
        ("=value", 1, "not NAME=value"),
        ("export =1", 1, "not NAME=value"),
        ("\n\nA='unterminated", 3, "opens a quote (')"),
        ('A="', 1, 'opens a quote (")'),
        ("A='mixed\"", 1, "opens a quote (')"),
        ("A=x\x00y", 1, "NUL"),
        ("RANK=3", 1, "sets it for every worker"),
        ("MASTER_PORT=1", 1, "use --master-port instead"),
    ],
)
def test_a_bad_env_file_line_is_named_by_file_and_number(text: str, line: int, why: str) -> None:
    with pytest.raises(LaunchError) as info:
        parse_env_file(text, "secrets.env")
    assert f"--env-file secrets.env line {line}:" in str(info.value)
    assert why in str(info.value)


@pytest.mark.parametrize("line", ["HF-TOKEN=hf_topsecret", "MY_TOKEN='hf_topsecret", "export =hf_topsecret",
                                  "hf_topsecret", "RANK=hf_topsecret"])
def test_an_env_file_error_never_prints_the_value(line: str) -> None:
    with pytest.raises(LaunchError) as info:
        parse_env_file(line, "s.env")
    assert "topsecret" not in str(info.value)


# -- --env, and the precedence -------------------------------------------------------------------


def test_env_files_then_env_flags_later_wins() -> None:
    files = [("a.env", "A=file-a\nB=file-a\nC=file-a"), ("b.env", "B=file-b\nC=file-b")]
    pairs = resolve_env(("C=flag", "D"), files, {"D": "from-shell"}, gpu_ids_given=False)
    assert dict(pairs) == {"A": "file-a", "B": "file-b", "C": "flag", "D": "from-shell"}
    assert len(pairs) == 4  # each variable once


def test_env_key_alone_forwards_this_shells_value_or_is_an_error() -> None:
    assert resolve_env(("HF_TOKEN",), [], {"HF_TOKEN": TOKEN}, gpu_ids_given=False) == (("HF_TOKEN", TOKEN),)
    with pytest.raises(LaunchError, match="--env HF_TOKEN: HF_TOKEN is not set in this shell"):
        resolve_env(("HF_TOKEN",), [], {}, gpu_ids_given=False)


def test_env_given_a_secrets_value_instead_of_its_name_does_not_echo_it() -> None:
    """`--env $HF_TOKEN` (the value, which is a valid name) must not print the token."""
    with pytest.raises(LaunchError) as info:
        resolve_env((TOKEN,), [], {"HF_TOKEN": TOKEN}, gpu_ids_given=False)
    assert TOKEN not in str(info.value) and "--env HF_TOKEN" in str(info.value)


@pytest.mark.parametrize("arg", ["HF-TOKEN=hf_topsecret", "1_KEY=hf_topsecret", "MY SECRET=hf_topsecret"])
def test_a_bad_env_flag_hides_a_secret_looking_value(arg: str) -> None:
    with pytest.raises(LaunchError) as info:
        resolve_env((arg,), [], {}, gpu_ids_given=False)
    assert "topsecret" not in str(info.value) and "<hidden, 12 chars>" in str(info.value)


def test_reserved_names_from_a_file_name_the_file() -> None:
    with pytest.raises(LaunchError, match=r"--env-file f.env line 2: CUDA_VISIBLE_DEVICES=\.\.\. .*--gpu-ids"):
        resolve_env((), [("f.env", "A=1\nCUDA_VISIBLE_DEVICES=3")], {}, gpu_ids_given=True)


# -- properties: any text parses to valid pairs or raises LaunchError ---------------------------

NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True).filter(lambda n: n not in RANK_VARIABLES)
# A file's value: one line's worth, anything else allowed (quotes, #, =, $, unicode, blanks).
VALUES = st.text(st.characters(blacklist_characters="\n\x00", blacklist_categories=("Cs",)), max_size=30)


def _valid(pairs: tuple[tuple[str, str], ...]) -> bool:
    return all(is_env_name(k) and "\x00" not in v and k not in RANK_VARIABLES for k, v in pairs)


# Random text rarely holds a line that nearly parses; this alphabet makes most lines nearly do.
LINE_PIECES = "AB_1= '\"#\n\r\t\x00\ufeff" + "export "


@PROPERTY
@given(st.one_of(st.text(max_size=200), st.text(LINE_PIECES, max_size=60)))
def test_any_env_file_text_parses_or_raises_launch_error(text: str) -> None:
    try:
        pairs = parse_env_file(text, "f")
    except LaunchError:
        return
    assert _valid(pairs)


@PROPERTY
@given(st.lists(st.one_of(st.text(max_size=30), st.text(LINE_PIECES, max_size=10)), max_size=5),
       st.dictionaries(st.text("AB_1", max_size=3), st.text(max_size=8)))
def test_any_env_flags_parse_or_raise_launch_error(args: list[str], environ: dict[str, str]) -> None:
    for parse in (
        lambda: resolve_env(tuple(args), [], environ, gpu_ids_given=False),
        lambda: parse_env_assignments(tuple(args), gpu_ids_given=False),
    ):
        try:
            pairs = parse()
        except LaunchError:
            continue
        assert _valid(pairs)


def _write_line(name: str, value: str, style: int, export: bool, pad: str) -> str:
    """The test's own writer of one env-file line (not the module's): quoted when it must be."""
    must_quote = value != value.strip(" \t") or value[:1] in "'\"" or value.endswith("\r")
    if style == 0 and not must_quote:
        text = value
    else:
        text = ("'" if style != 2 else '"') + value + ("'" if style != 2 else '"')
    return f"{'export ' if export else ''}{name}{pad}={pad}{text}"


@PROPERTY
@given(st.lists(st.tuples(NAMES, VALUES, st.integers(0, 2), st.booleans(), st.sampled_from(["", " ", "\t "])),
                max_size=8),
       st.lists(st.sampled_from(["", "   ", "# a comment", "  # x=1", "#"]), max_size=4),
       st.sampled_from(["\n", "\r\n"]))
def test_generated_env_files_read_back_exactly(lines, noise: list[str], newline: str) -> None:
    written = [_write_line(*line) for line in lines]
    text = newline.join(noise + written) + newline
    assert parse_env_file(text, "gen.env") == tuple((name, value) for name, value, *_ in lines)


# -- the agent's env line ---------------------------------------------------------------------


@PROPERTY
@given(st.lists(st.tuples(NAMES, st.text(max_size=20)), max_size=5))
def test_env_line_is_one_line_and_carries_every_value(pairs: list[tuple[str, str]]) -> None:
    line = env_line(pairs)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    command = parse_command(line.decode())
    assert command is not None and command[0] == "env"
    assert decode_env(command[1]) == tuple(pairs)


@PROPERTY
@given(st.text(max_size=100))
def test_any_env_argument_decodes_or_is_none(argument: str) -> None:
    found = decode_env(argument)
    assert found is None or all(isinstance(k, str) and isinstance(v, str) for k, v in found)


def test_the_agent_reads_its_env_first_past_a_beat_and_leaves_the_go_for_the_handshake() -> None:
    read, write = os.pipe()
    try:
        # A beat may come first (the head's beats start once every agent is sent its line).
        os.write(write, BEAT_LINE + env_line([("HF_TOKEN", TOKEN), ("HOSTILE", "a\nb 'c' $(x)")]) + go_line("10.0.0.1", 29500))
        assert receive_env(read) == (("HF_TOKEN", TOKEN), ("HOSTILE", "a\nb 'c' $(x)"))
        assert _read_line(read, None) == "go 10.0.0.1 29500\n"
    finally:
        os.close(read)
        os.close(write)


@pytest.mark.parametrize("first", [b"go 10.0.0.1 29500\n", b"env notbase64 " + TOKEN.encode() + b"\n", b""])
def test_an_agent_without_an_env_line_says_so_without_repeating_it(first: bytes) -> None:
    read, write = os.pipe()
    os.write(write, first)
    os.close(write)
    try:
        with pytest.raises(LaunchError) as info:
            receive_env(read)
    finally:
        os.close(read)
    assert "env line" in str(info.value) and TOKEN not in str(info.value)


# -- the printers of variables ------------------------------------------------------------------


def test_the_ssh_dry_run_hides_secret_values_and_its_command_line_holds_none() -> None:
    from test_fanout_plan import options

    hosts = [Host(i, HostSpec(h, h), SshTarget(h, h, 22, "u", ()), 1) for i, h in enumerate(["a", "b"])]
    env = [("HF_TOKEN", TOKEN), ("NCCL_DEBUG", "INFO"), ("PLAIN", "visible-value")]
    text = render_hosts(options(), hosts, env, "/work", 0)
    assert "  HF_TOKEN=<hidden, 37 chars>" in text and "  NCCL_DEBUG=INFO" in text
    command = text.split("command run on each host over SSH", 1)[1]
    assert TOKEN not in text and "visible-value" not in command and "--env" not in command


def test_the_dry_run_table_hides_secret_values(tmp_path: Path) -> None:
    from ddplaunch.dryrun import render_plan
    from ddplaunch.plan import build_plan
    from test_plan import inputs

    plan = build_plan(inputs(extra_env=(("WANDB_API_KEY", TOKEN), ("NCCL_DEBUG", "INFO"))))
    text = render_plan(plan)
    assert "  WANDB_API_KEY=<hidden, 37 chars>" in text and "  NCCL_DEBUG=INFO" in text
    assert TOKEN not in text


def test_launcher_log_hides_secret_assignments(tmp_path: Path) -> None:
    printer = Printer(world_ranks=[0], world_size=1, colour=False, shown_ranks=frozenset(), log_dir=str(tmp_path))
    try:
        printer.log_event(f"started rank 0 pid 1: python -u train.py --hf-token={TOKEN} --lr=0.1")
    finally:
        printer.close()
    log = (tmp_path / "launcher.log").read_text()
    assert TOKEN not in log and "--hf-token=<hidden, 37 chars> --lr=0.1" in log
