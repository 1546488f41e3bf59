#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine with Python 3.11:
# Debian packages for the real mail servers, a virtualenv with the project and its test
# extra, then ruff, mypy (strict on service/), pytest, and the container image check.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v dovecot >/dev/null 2>&1 || need_pkgs+=(dovecot-pop3d)
command -v smtp-sink >/dev/null 2>&1 || [ -x /usr/sbin/smtp-sink ] || need_pkgs+=(postfix)
# Headless Chromium renders /docs/ with the network blocked (the offline docs test).
command -v chromium >/dev/null 2>&1 || need_pkgs+=(chromium)
# Node for the TypeScript client scenario (tests/client/test_typescript_client.py).
command -v npm >/dev/null 2>&1 || need_pkgs+=(nodejs npm)
# PostgreSQL for the store tests: unless a server is given (MAILROOM_TEST_POSTGRES) or one
# answers on 127.0.0.1:5432, the suite starts a throw-away cluster and needs the binaries.
if [ -z "${MAILROOM_TEST_POSTGRES:-}" ] && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null \
    && ! (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; then
    need_pkgs+=(postgresql)
fi
if [ "${#need_pkgs[@]}" -gt 0 ]; then
    echo "== installing Debian packages: ${need_pkgs[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}"
fi

bash scripts/venv.sh test
echo "== npm ci (clients/typescript: pinned openapi-typescript, openapi-fetch, TypeScript)"
npm ci --prefix clients/typescript --no-audit --no-fund

echo "== ruff"
.venv/bin/ruff check service tests bench
.venv/bin/ruff format --check service tests bench
echo "== mypy (strict, service/)"
.venv/bin/mypy
echo "== redocly lint (the OpenAPI document, recommended rules: no error, no warning)"
REDOCLY=(npx --yes @redocly/cli@2.77.0 lint --config redocly.yaml openapi/openapi.json)
# Redocly fails only on errors; a warning fails here too (then the readable report).
"${REDOCLY[@]}" --format=json 2>/dev/null | .venv/bin/python -c 'import json, sys
totals = json.load(sys.stdin)["totals"]
print(f"redocly: {totals}")
sys.exit(1 if totals["errors"] or totals["warnings"] else 0)' || { "${REDOCLY[@]}"; exit 1; }
# The app-level suites run again on PostgreSQL (MAILROOM_TEST_STORE=postgres), beside the
# whole suite on SQLite: the tests mostly wait on servers and timers (together they keep
# about a third of two cores busy), every server and database a test starts is its own, so
# running both passes at once halves the wall time. The PostgreSQL report follows the other.
echo "== pytest (SQLite), and the app-level suites on PostgreSQL beside it"
pg_log="$(mktemp)"
MAILROOM_TEST_STORE=postgres .venv/bin/python -m pytest -p no:cacheprovider \
    tests/api tests/outbox tests/retrieval tests/hardening tests/verify \
    tests/webhooks tests/bounces tests/autoconfig tests/oauth >"$pg_log" 2>&1 &
pg_pid=$!
trap 'kill "$pg_pid" 2>/dev/null || true; rm -f "$pg_log"' EXIT
sqlite_rc=0
.venv/bin/python -m pytest "$@" || sqlite_rc=$?
pg_rc=0
wait "$pg_pid" || pg_rc=$?
echo "== pytest, the app-level suites on PostgreSQL (MAILROOM_TEST_STORE=postgres)"
cat "$pg_log"
if [ "$sqlite_rc" -ne 0 ] || [ "$pg_rc" -ne 0 ]; then
    echo "pytest failed: SQLite pass exit $sqlite_rc, PostgreSQL pass exit $pg_rc"
    exit 1
fi
echo "== container image (Dockerfile built with buildah, run and checked)"
if [ "$(id -u)" -eq 0 ]; then
    bash scripts/container_test.sh
else
    echo "skipped: building the image without a Docker engine needs root (buildah --isolation chroot)"
fi
