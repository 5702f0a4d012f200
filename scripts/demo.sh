#!/usr/bin/env bash
# Sets everything up and runs the local demo: a daemon on loopback with its state under .demo/.
# Stop it with Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
