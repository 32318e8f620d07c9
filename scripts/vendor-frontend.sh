#!/usr/bin/env bash
# Refresh the dashboard's vendored charting library (uPlot) from npm: no build chain runs at test time or in CI.
# Usage: scripts/vendor-frontend.sh [VERSION]   (then update frontend/vendor/README.md and commit the files)
set -euo pipefail
VERSION=${1:-1.6.32}
DEST="$(cd "$(dirname "$0")/.." && pwd)/frontend/vendor"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
(cd "$WORK" && npm pack --silent "uplot@$VERSION" >/dev/null && tar xzf "uplot-$VERSION.tgz")
cp "$WORK/package/dist/uPlot.esm.js" "$DEST/uPlot.esm.js"
cp "$WORK/package/dist/uPlot.min.css" "$DEST/uPlot.min.css"
cp "$WORK/package/LICENSE" "$DEST/uPlot.LICENSE"
sha256sum "$DEST/uPlot.esm.js" "$DEST/uPlot.min.css"
echo "vendored uplot@$VERSION into $DEST"
