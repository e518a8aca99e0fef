"""Which module may import which: the library never reaches back into the command line, and
the SSH path never loads the store rendezvous (which imports torch)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.unit
def test_nothing_in_the_library_imports_the_command_line() -> None:
    # launcher/__main__.py is `python -m ddplaunch`, the same entry as the console script,
    # launcher/cli.py a link to the command line itself (installed as ddplaunch.cli), and
    # launcher/api.py checks a Python caller's keywords against the command line's options
    entries = ("__main__.py", "cli.py", "api.py")
    library = [p for p in sorted((REPO / "launcher").glob("*.py")) if p.name not in entries]
    assert len(library) > 20
    offenders = [p.name for p in library if {"cli", "ddplaunch.cli"} & imported_modules(p)]
    assert offenders == []


@pytest.mark.unit
def test_the_import_finder_sees_a_function_level_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from cli import Options\n    import cli\n")
    assert imported_modules(module) == {"cli"}


def test_the_ssh_path_does_not_import_the_store_rendezvous() -> None:
    modules = "ddplaunch.agent, ddplaunch.fanout, ddplaunch.head, ddplaunch.channel"
    code = f"import sys, {modules}; print('ddplaunch.rendezvous' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr
