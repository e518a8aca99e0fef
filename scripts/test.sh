#!/usr/bin/env bash
# One command on a fresh machine: set up the virtualenv and run the whole test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k supervisor -x
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-venv.sh
exec "$VENV/bin/python" -m pytest "$@"
