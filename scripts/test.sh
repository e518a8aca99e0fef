#!/usr/bin/env bash
# One command on a fresh machine: set up the virtualenv and run the whole test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k supervisor -x; scripts/test.sh -m unit runs
# only the pure tests (no process, no sshd, no torch) in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-venv.sh
# The SSH tests start real sshd servers on loopback addresses, and the network-cut tests drop
# their packets with iptables; neither ever skips, so install what is missing (a fresh Debian or
# Ubuntu machine has only the SSH client).
missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v iptables >/dev/null 2>&1 || missing+=(iptables)
if [ "${#missing[@]}" -gt 0 ]; then
    apt_log="$(mktemp)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >"$apt_log" 2>&1; then
        cat "$apt_log" >&2
        echo "scripts/test.sh: installing ${missing[*]} failed (see above); the SSH and network-cut tests need them." >&2
        exit 1
    fi
    rm -f "$apt_log"
fi
exec "$VENV/bin/python" -m pytest "$@"
