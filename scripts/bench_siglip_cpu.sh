#!/usr/bin/env bash
# kiln against PyTorch on the same random full-size weights, in the same run, on this machine.
# Usage: scripts/bench_siglip_cpu.sh [synth-name] [runs] [threads]
# Needs the Python venv of scripts/requirements-fixtures.txt (KILN_VENV, default /opt/kiln-venv).
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:-siglip-so400m-14-224}
runs=${2:-3}
threads=${3:-2}
venv=${KILN_VENV:-/opt/kiln-venv}
dir=${KILN_BENCH_DIR:-/tmp/kiln-bench}/$name
cargo build --release --locked --quiet
[ -f "$dir/model.safetensors" ] || ./target/release/kiln synth "$name" -o "$dir"
export RAYON_NUM_THREADS=$threads
kiln_json=$(./target/release/kiln bench "$dir" --batch 1 --runs "$runs" --json)
torch_json=$("$venv/bin/python" scripts/bench_torch_siglip.py "$dir" --batch 1 --runs "$runs" --threads "$threads")
echo "kiln:    $kiln_json"
echo "pytorch: $torch_json"
python3 - "$kiln_json" "$torch_json" <<'PY'
import json, sys
k, t = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"median: kiln {k['median_ms']:.1f} ms, pytorch {t['median_ms']:.1f} ms, kiln/pytorch = {k['median_ms']/t['median_ms']:.3f}")
PY
