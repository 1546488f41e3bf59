#!/usr/bin/env bash
# Refresh the Swagger UI files that /docs/ serves from the service itself (so the docs work
# offline). They come from the official `swagger-ui-dist` npm package at the pinned version;
# npm checks the tarball against the registry's integrity hash, and SHA256SUMS records what
# was vendored (a test checks the files against it).
# Usage: scripts/vendor-swagger-ui.sh [VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${1:-5.34.1}"
DEST=service/static/swagger-ui
FILES=(swagger-ui-bundle.js swagger-ui-bundle.js.LICENSE.txt swagger-ui.css favicon-32x32.png LICENSE NOTICE)
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "swagger-ui-dist@$VERSION" >/dev/null && tar xzf "swagger-ui-dist-$VERSION.tgz")
mkdir -p "$DEST"
rm -f "$DEST"/*
for f in "${FILES[@]}"; do
    cp "$work/package/$f" "$DEST/$f"
done
echo "$VERSION" > "$DEST/VERSION"
(cd "$DEST" && sha256sum "${FILES[@]}" > SHA256SUMS)
echo "vendored swagger-ui-dist $VERSION into $DEST"
