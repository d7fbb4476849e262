#!/usr/bin/env bash
# kiln against transformers on the same random full-size Gemma 2 weights, in the same run, on
# this machine: prefill of a 128-token prompt (batch 1) and milliseconds per decoded token.
# Usage: scripts/bench_gemma_cpu.sh [synth-name] [new-tokens] [threads]
# Needs the Python venv of scripts/requirements-fixtures.txt (KILN_VENV, default /opt/kiln-venv)
# and about 11 GB of disk for the f32 weights; kiln and PyTorch run one after the other.
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:-gemma2-2b}
new=${2:-8}
threads=${3:-2}
venv=${KILN_VENV:-/opt/kiln-venv}
dir=${KILN_BENCH_DIR:-/tmp/kiln-bench}/$name
cargo build --release --locked --quiet
[ -f "$dir/model.safetensors" ] || ./target/release/kiln synth "$name" -o "$dir"
inputs=$dir/bench_inputs.safetensors
"$venv/bin/python" - "$inputs" <<'PY'
import sys, torch
from safetensors.torch import save_file
g = torch.Generator().manual_seed(0)
save_file({"input_ids": torch.randint(3, 256000, (1, 128), generator=g, dtype=torch.int64)}, sys.argv[1])
PY
export RAYON_NUM_THREADS=$threads
kiln_json=$(./target/release/kiln generate "$dir" --inputs "$inputs" --max-new-tokens "$new" --out "$dir/kiln_out.safetensors" | grep '^{')
torch_json=$("$venv/bin/python" scripts/bench_torch_gemma.py "$dir" --inputs "$inputs" --max-new-tokens "$new" --threads "$threads")
echo "kiln:    $kiln_json"
echo "pytorch: $torch_json"
"$venv/bin/python" - "$kiln_json" "$torch_json" "$dir/kiln_out.safetensors" <<'PY'
import json, sys
k, t = json.loads(sys.argv[1]), json.loads(sys.argv[2])
from safetensors.numpy import load_file
seq = load_file(sys.argv[3])["sequences"][0].tolist()
kiln_new = seq[-len(t["new_ids"]):]
print(f"new ids: kiln {kiln_new}, pytorch {t['new_ids']}: {'equal' if kiln_new == t['new_ids'] else 'DIFFERENT'}")
print(f"prefill 128: kiln {k['prefill_ms']:.0f} ms, pytorch {t['prefill_ms']:.0f} ms (pytorch/kiln {t['prefill_ms']/k['prefill_ms']:.2f}x)")
print(f"decode: kiln {k['decode_ms_per_token']:.0f} ms/token, pytorch {t['decode_ms_per_token']:.0f} ms/token "
      f"(pytorch/kiln {t['decode_ms_per_token']/k['decode_ms_per_token']:.2f}x)")
PY
