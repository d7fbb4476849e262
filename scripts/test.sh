#!/usr/bin/env bash
# Runs every test of the workspace on a fresh machine. It installs what the tests need first
# (today: only the Rust toolchain the machine has; the cube and cuda backends will add
# lavapipe and the NVRTC wheel here), then prints one closing line with the totals.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null; then
  echo "cargo is missing: install Rust (rustup) first" >&2
  exit 1
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --all-targets --locked 2>&1 | tee "$log" || status=$?
passed=$(awk '/^test result:/ { for (i = 1; i < NF; i++) if ($(i+1) ~ /^passed/) s += $i } END { print s + 0 }' "$log")
failed=$(awk '/^test result:/ { for (i = 1; i < NF; i++) if ($(i+1) ~ /^failed/) s += $i } END { print s + 0 }' "$log")
echo "tests: ${passed:-0} passed, ${failed:-0} failed"
exit $status
