#!/usr/bin/env bash
# Runs every test of the workspace on a fresh machine. It installs what the tests need first
# (today: only the Rust toolchain the machine has; the cube and cuda backends will add
# lavapipe and the NVRTC wheel here).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null; then
  echo "cargo is missing: install Rust (rustup) first" >&2
  exit 1
fi
cargo test --workspace --all-targets --locked
