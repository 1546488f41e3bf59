#!/usr/bin/env bash
# Create .venv (installing Debian's python3-venv if this Python lacks venv/ensurepip) and
# install the project into it. Usage: scripts/venv.sh [EXTRA]   e.g. scripts/venv.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    if ! "$PYTHON" -m venv .venv >/dev/null 2>&1; then
        rm -rf .venv
        echo "== installing python3-venv"
        SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv
        "$PYTHON" -m venv .venv
    fi
fi
spec="."
[ -n "${1:-}" ] && spec=".[$1]"
echo "== installing $spec into .venv"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e "$spec"
