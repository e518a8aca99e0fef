"""Whether `python -m NAME` would find NAME, found without importing anything.

`importlib.util.find_spec("a.b")` imports the package `a` to read its `__path__`, which runs
`a/__init__.py` in the launcher: side effects, seconds of imports (torch), or a crash. Here
each part is looked up with `PathFinder.find_spec(part, path)` in the folders of the part
before it. When the answer cannot be known without running code (a package that rewrites its
`__path__`, a finder of its own), the answer is "unsure", and the caller lets the worker try.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.machinery import ModuleSpec, PathFinder
from typing import Literal

Verdict = Literal["found", "missing", "unsure"]
# Words in an __init__.py that can change where (or whether) its submodules are looked for.
_PATH_CHANGERS = ("__path__", "extend_path", "meta_path", "path_hooks", "declare_namespace", "sys.modules")


@dataclass(frozen=True)
class ModuleLookup:
    """The verdict for `python -m NAME`, and in words what is missing when it is."""

    verdict: Verdict
    missing: str = ""


def worker_sys_path(cwd: str, pythonpath: str | None, own_path: Sequence[str]) -> list[str]:
    """The worker's sys.path: `python -m` puts the working directory first, then PYTHONPATH,
    then the interpreter's own folders (the launcher's sys.path without its first entry, which
    is its script's folder)."""
    extra = [entry or cwd for entry in (pythonpath or "").split(os.pathsep) if pythonpath]
    return [cwd, *extra, *own_path[1:]]


def find_module(name: str, path: Sequence[str]) -> ModuleLookup:
    """Look `name` (dotted) up as `python -m` would, executing no module's code."""
    parts = name.split(".")
    if not all(parts) or os.sep in name:
        return ModuleLookup("missing", f"{name!r} is not a module name (names joined by dots, like pkg.main)")
    spec = _find_top(parts[0], path)
    if spec is None:
        return ModuleLookup("missing", f"no module {parts[0]!r} on the worker's Python path")
    for depth, part in enumerate(parts[1:], start=1):
        parent = ".".join(parts[:depth])
        if _may_change_its_path(spec):
            return ModuleLookup("unsure")
        if spec.submodule_search_locations is None:
            return ModuleLookup("unsure")  # a module may still register one (os registers os.path)
        found = PathFinder.find_spec(part, list(spec.submodule_search_locations))
        if found is None:
            return ModuleLookup("missing", f"package {parent!r} ({_where(spec)}) has no module {part!r}")
        spec = found
    return _runnable(name, spec)


def _find_top(name: str, path: Sequence[str]) -> ModuleSpec | None:
    """The top-level name on the worker's path, else through the interpreter's other finders
    (built-in modules, an editable install's finder), which are the worker's too."""
    spec = PathFinder.find_spec(name, list(path))
    if spec is not None:
        return spec
    for finder in sys.meta_path:
        if finder is PathFinder or not hasattr(finder, "find_spec"):
            continue
        try:
            spec = finder.find_spec(name, None)
        except Exception:  # a third-party finder's failure is not the user's mistake
            continue
        if spec is not None:
            return spec
    return None


def _runnable(name: str, spec: ModuleSpec) -> ModuleLookup:
    """A package runs as its __main__ submodule."""
    if spec.submodule_search_locations is None:
        return ModuleLookup("found")
    if _may_change_its_path(spec):
        return ModuleLookup("unsure")
    if PathFinder.find_spec("__main__", list(spec.submodule_search_locations)) is None:
        return ModuleLookup("missing", f"{name!r} is a package with no __main__ module, so it cannot run")
    return ModuleLookup("found")


def _may_change_its_path(spec: ModuleSpec) -> bool:
    """Whether a package's __init__ might look for its submodules elsewhere than its folder."""
    if spec.submodule_search_locations is None:
        return False  # a module: nothing is looked up inside it
    origin = spec.origin
    if origin in (None, "namespace"):
        return False  # a namespace package: its folders are all there is
    if not origin.endswith(".py"):
        return True  # compiled, frozen or in a zip: its code cannot be read here
    try:
        with open(origin, encoding="utf-8", errors="replace") as file:
            source = file.read()
    except OSError:
        return True
    return any(word in source for word in _PATH_CHANGERS)


def _where(spec: ModuleSpec) -> str:
    locations = list(spec.submodule_search_locations or [])
    return "at " + ", ".join(locations) if locations else "no folder"
