#!/usr/bin/env bash
# Per-kernel tables and roofline plots of SigLIP So400m/14 at 224 and 896 px on the cpu
# backend (`kiln bench kernels`), written under bench-results/ with today's date.
# Usage: scripts/bench_kernels_cpu.sh [runs-224] [runs-896]
# The 896 px profile is the 224 checkpoint compiled with --resolution 896 (position table
# resampled at compile time; the kernels and their shapes are those of the 896 checkpoint).
set -euo pipefail
cd "$(dirname "$0")/.."
runs224=${1:-5}
runs896=${2:-2}
dir=${KILN_BENCH_DIR:-/tmp/kiln-bench}/siglip-so400m-14-224
out=bench-results
day=$(date -u +%Y-%m-%d)
mkdir -p "$out"
cargo build --release --locked --quiet --bin kiln
[ -f "$dir/model.safetensors" ] || ./target/release/kiln synth siglip-so400m-14-224 -o "$dir"
kiln=./target/release/kiln
$kiln bench kernels --model "$dir" --resolution 224 --warmup 2 --runs "$runs224" --by-shape \
  --plot "$out/roofline-so400m-224-cpu-$day.svg" | tee "$out/kernels-so400m-224-cpu-$day.txt"
$kiln bench kernels --model "$dir" --resolution 896 --warmup 1 --runs "$runs896" --by-shape \
  --plot "$out/roofline-so400m-896-cpu-$day.svg" | tee "$out/kernels-so400m-896-cpu-$day.txt"
$kiln bench kernels --warmup 2 --runs 10 --plot "$out/roofline-single-kernels-cpu-$day.svg" \
  | tee "$out/kernels-single-cpu-$day.txt"
