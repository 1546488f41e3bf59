#!/usr/bin/env bash
# Set up and run the service on its embedded default (SQLite under ./data/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh
exec .venv/bin/python -m service
