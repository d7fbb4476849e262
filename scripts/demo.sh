#!/usr/bin/env bash
# kiln's main job on a small model the repository ships: compile a SigLIP vision tower to an
# artifact, show its plan, run it on the shipped inputs and compare with transformers' outputs.
set -euo pipefail
cd "$(dirname "$0")/.."
model=tests/fixtures/siglip/vision_map
out=${TMPDIR:-/tmp}/kiln-demo
mkdir -p "$out"
cargo build --release --locked --quiet
./target/release/kiln compile "$model" --batch 2 -o "$out/vision_map.kiln"
./target/release/kiln inspect "$out/vision_map.kiln" | tail -n 4
./target/release/kiln run "$out/vision_map.kiln" --inputs "$model/inputs.safetensors" --out "$out/outputs.safetensors"
./target/release/kiln compare "$out/outputs.safetensors" "$model/reference.safetensors"
