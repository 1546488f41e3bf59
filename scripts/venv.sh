#!/usr/bin/env bash
# Create .venv (installing Debian's python3-venv if this Python lacks venv/ensurepip) and
# install the project into it. Usage: scripts/venv.sh [EXTRA]   e.g. scripts/venv.sh test
#
# The install runs only when needed: a stamp in .venv records the hash of pyproject.toml,
# the extra and the version installed, so a restart with nothing changed needs no package
# index. Installs are editable: code changes need none. MAILROOM_FORCE_INSTALL=1 installs
# anyway.
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
extra="${1:-}"
spec="."
[ -n "$extra" ] && spec=".[$extra]"

installed_version() {
    .venv/bin/python -c 'import importlib.metadata as m; print(m.version("mailroom"))' 2>/dev/null || true
}
project_hash="$(sha256sum pyproject.toml | cut -d' ' -f1)"
stamp_dir=.venv/mailroom-stamps
# What is installed satisfies the request when a stamp for this pyproject.toml, this extra
# (or, for no extra, any extra: each includes the base dependencies) and the version still
# installed exists.
up_to_date() {
    local version stamp
    version="$(installed_version)"
    [ -n "$version" ] || return 1
    for stamp in "$stamp_dir"/*; do
        [ -f "$stamp" ] || continue
        if [ -n "$extra" ] && [ "$(basename "$stamp")" != "extra-$extra" ]; then
            continue
        fi
        [ "$(cat "$stamp")" = "$project_hash $version" ] && return 0
    done
    return 1
}

if [ "${MAILROOM_FORCE_INSTALL:-}" != "1" ] && up_to_date; then
    echo "== .venv is up to date with pyproject.toml (mailroom $(installed_version)$([ -n "$extra" ] && echo ", extra $extra")): nothing to install"
    exit 0
fi
echo "== installing $spec into .venv"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e "$spec"
version="$(installed_version)"
mkdir -p "$stamp_dir"
# Stamps of other extras were made for another pyproject.toml, perhaps: keep only current ones.
for stamp in "$stamp_dir"/*; do
    [ -f "$stamp" ] && [ "$(cut -d' ' -f1 "$stamp")" != "$project_hash" ] && rm -f "$stamp"
done
echo "$project_hash $version" > "$stamp_dir/extra-${extra:-base}"
