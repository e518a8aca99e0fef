#!/usr/bin/env bash
# One command on a fresh machine: set up the virtualenv and train a small model with DDP on
# CPU (gloo) through ddplaunch, 2 workers. Extra arguments go to the training script.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-venv.sh
exec "$VENV/bin/ddplaunch" --nproc "${NPROC:-2}" examples/train_ddp.py "$@"
