#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv with everything the demo and the tests need.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again (it skips work already done).
set -euo pipefail
VENV="${DDPLAUNCH_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.ddplaunch-installed"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
want="$(cat pyproject.toml scripts/setup-venv.sh | sha256sum | cut -d' ' -f1)"
pip_install() {
    # Some machines' pip config names index folders that do not exist; pip warns once per
    # package about them. Drop just that warning so real errors stay visible.
    "$VENV/bin/pip" install --quiet "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
    # torch first and pinned: an unpinned torch resolves the newest build with several GB of
    # CUDA packages; 2.13.0 installs the CPU wheel.
    pip_install "torch==2.13.0"
    # compat mode puts the checkout on sys.path with a .pth line; the default import hook
    # costs every Python start in this venv (the launcher's and each worker's) about 15 ms.
    pip_install --config-settings editable_mode=compat -e ".[torch,dev]"
    echo "$want" > "$STAMP"
fi
# The import name is ddplaunch; in the checkout its folder is launcher/ (pyproject maps it for a
# real install). A link under the import name, on the venv's path, replaces the checkout path
# that compat mode wrote: setuptools' other editable mode maps names with an import hook that
# costs every Python start ~20 ms, and the checkout on the path would expose `launcher` and `cli`.
link_dir="$(cd "$VENV" && pwd)/ddplaunch-path"
mkdir -p "$link_dir"
ln -sfn "$(pwd)/launcher" "$link_dir/ddplaunch"
site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$link_dir" > "$site/__editable__.ddplaunch-0.1.0.pth"
# An editable install compiles nothing, and where PYTHONDONTWRITEBYTECODE is set nothing is
# ever written: the launcher would compile its modules at every start (a failure's report
# alone costs ~25 ms that way). A wheel install compiles them; so do we (up-to-date files are
# skipped, so this is quick after the first time).
"$VENV/bin/python" -m compileall -q launcher cli.py >/dev/null
