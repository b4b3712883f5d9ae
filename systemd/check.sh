#!/usr/bin/env bash
# Checks systemd/ssp.service with systemd's own tools: `systemd-analyze verify` must pass and the offline security
# exposure score must be at most 1.1 (11 on the tool's 0-100 scale). Usage: systemd/check.sh PATH-TO-SSP-BINARY
set -euo pipefail
cd "$(dirname "$0")/.."
bin="$(realpath "$1")"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# verify checks that the executables exist: point the unit at the binary under test.
sed "s|/usr/local/bin/ssp|$bin|g" systemd/ssp.service > "$tmp/ssp.service"
systemd-analyze verify "$tmp/ssp.service"
systemd-analyze security --offline=true --threshold=11 "$tmp/ssp.service" | tail -n 1
