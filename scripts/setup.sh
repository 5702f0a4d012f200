#!/usr/bin/env bash
# Creates .venv beside the project (once) and installs the project with its test extras into it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

# The real-registry, containerd and forward-proxy (curl) tests need these Debian packages; install them when missing and we may
# (root, or password-less sudo). Without them those tests skip, so this step never fails the setup.
missing=""
for bin in containerd runc docker-registry busybox curl; do
    command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || [ -x "/usr/bin/$bin" ] || missing="$missing $bin"
done
if [ -n "$missing" ]; then
    as_root=""
    if [ "$(id -u)" -eq 0 ]; then
        as_root="env"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        as_root="sudo -n env"
    fi
    if [ -z "$as_root" ] || ! { $as_root apt-get update -qq &&
        $as_root DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            containerd runc docker-registry busybox-static curl; } >/dev/null 2>&1; then
        echo "setup: could not install${missing}; the real-registry and containerd tests will skip" >&2
    fi
fi

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
