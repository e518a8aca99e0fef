#!/usr/bin/env bash
# One command on a fresh machine: set up the virtualenv and run the whole test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k supervisor -x; scripts/test.sh -m unit runs
# only the pure tests (no process, no sshd, no torch) in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-venv.sh
# The SSH tests start real sshd servers on loopback addresses and never skip, so install the
# server where it is missing (a fresh Debian or Ubuntu machine has only the client).
if [ ! -x /usr/sbin/sshd ]; then
    apt_log="$(mktemp)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server; } >"$apt_log" 2>&1; then
        cat "$apt_log" >&2
        echo "scripts/test.sh: installing openssh-server failed (see above); the SSH tests need /usr/sbin/sshd." >&2
        exit 1
    fi
    rm -f "$apt_log"
fi
exec "$VENV/bin/python" -m pytest "$@"
