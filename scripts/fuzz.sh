#!/usr/bin/env bash
# Runs one cargo-fuzz target (fuzz/, bodies in src/fuzz.rs) for a number of executions, with no
# sanitizer, starting from the committed seeds: scripts/fuzz.sh <target> <execs> [max seconds]
# New inputs go to fuzz/target/corpus-<target> (the committed fuzz/corpus/<target> is only
# read); a crash is written to fuzz/artifacts/<target>/: add it to fuzz/regressions/<target>/
# (tests/fuzz_replay.rs replays those on stable) and fix it. Needs a nightly toolchain and
# cargo-fuzz (cargo install cargo-fuzz). Targets: cargo +nightly fuzz list --fuzz-dir fuzz
set -euo pipefail
target=${1:?usage: scripts/fuzz.sh <target> <execs> [max seconds]}
runs=${2:?usage: scripts/fuzz.sh <target> <execs> [max seconds]}
secs=${3:-0}
cd "$(dirname "$0")/.."
mkdir -p "fuzz/target/corpus-$target"
exec cargo +nightly fuzz run --fuzz-dir fuzz --sanitizer none "$target" "fuzz/target/corpus-$target" "fuzz/corpus/$target" -- \
    -runs="$runs" -max_total_time="$secs" -rss_limit_mb=4096 -malloc_limit_mb=4096 -timeout=20 -print_final_stats=1
