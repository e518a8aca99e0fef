"""What ddplaunch may print of an environment variable: the value, or only its length (pure).

A variable whose name looks secret (it contains TOKEN, SECRET, PASSWORD, PASSWD, KEY,
CREDENTIAL or AUTH, in any case) is shown as `HF_TOKEN=<hidden, 37 chars>` in dry runs, error
messages and launcher.log. Erring on the side of hiding is cheap (a MONKEY_COUNT shows its
length only); a token in a log file or a terminal's scrollback is not.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "KEY", "CREDENTIAL", "AUTH")
# Free text is searched for secret values no shorter than this: a 1-3 character value ("1",
# "yes") would blank out unrelated words, and is no secret anyway.
MIN_REDACTED_LENGTH = 4
# NAME=VALUE in free text, also as an option (--hf-token=...): the value runs to the next blank.
_ASSIGNMENT = re.compile(r"(?<![\w-])(-{0,2}[A-Za-z_][\w-]*)=(\S+)")


def looks_secret(name: str) -> bool:
    upper = name.upper()
    return any(word in upper for word in SECRET_WORDS)


def hidden(value: str) -> str:
    """What is shown instead of a secret value: only its length, which helps to spot an empty
    or truncated one."""
    return f"<hidden, {len(value)} char{'' if len(value) == 1 else 's'}>"


def shown(name: str, value: str) -> str:
    """`NAME=value`, or `NAME=<hidden, N chars>` when the name looks secret."""
    return f"{name}={hidden(value) if looks_secret(name) else value}"


def redact(text: str, env: Iterable[tuple[str, str]]) -> str:
    """`text` with the value of every secret-looking variable of `env` replaced by <hidden NAME>:
    for text ddplaunch did not write itself (an agent's stderr), which may quote a value anywhere."""
    secrets = {value: name for name, value in env if looks_secret(name) and len(value) >= MIN_REDACTED_LENGTH}
    for value in sorted(secrets, key=len, reverse=True):  # a longer value may contain a shorter one
        text = text.replace(value, f"<hidden {secrets[value]}>")
    return text


def scrub(text: str) -> str:
    """`text` with every NAME=VALUE whose name looks secret shown as NAME=<hidden, N chars>:
    for lines that go to files (launcher.log), whatever event wrote them."""
    return _ASSIGNMENT.sub(lambda m: shown(m[1], m[2]), text)
