#!/usr/bin/env bash
# Set up and run the service on its embedded default (SQLite under ./data/).
# The project is installed into .venv only when pyproject.toml or the installed version
# changed (see scripts/venv.sh), so a restart needs no package index.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh
exec .venv/bin/python -m service
