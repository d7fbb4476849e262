#!/usr/bin/env bash
# Tokens per second of kiln against transformers on the same random full-size Gemma 2 2B
# weights (`kiln synth gemma2-2b-bf16`: a bfloat16 checkpoint; both sides compute in f32 on the
# CPU), in the same run, alternated: greedy, sampling with 4 samples per input
# (--num-samples 4), and beam search with 4 beams (1 returned). One 32-token prompt, EOS off
# (min_new_tokens = max_new_tokens on both sides), wall time of the whole generate call
# (prefill included); tokens/s counts the new tokens of every returned row.
# Usage: scripts/bench_decode_strategies_cpu.sh [new-tokens] [repeats] [threads]
# Needs the Python venv of scripts/requirements-fixtures.txt (KILN_VENV, default /opt/kiln-venv)
# and about 5 GB of disk for the bf16 weights.
set -euo pipefail
cd "$(dirname "$0")/.."
new=${1:-4}
repeats=${2:-2}
threads=${3:-2}
venv=${KILN_VENV:-/opt/kiln-venv}
dir=${KILN_BENCH_DIR:-/tmp/kiln-bench}/gemma2-2b-bf16
cargo build --release --locked --quiet
[ -f "$dir/model.safetensors" ] || ./target/release/kiln synth gemma2-2b-bf16 -o "$dir"
inputs=$dir/strategies_inputs.safetensors
"$venv/bin/python" - "$inputs" <<'PY'
import sys, torch
from safetensors.torch import save_file
g = torch.Generator().manual_seed(0)
save_file({"input_ids": torch.randint(3, 256000, (1, 32), generator=g, dtype=torch.int64)}, sys.argv[1])
PY
export RAYON_NUM_THREADS=$threads
kiln_opts() {
  case $1 in
    greedy) echo "" ;;
    samples) echo "--num-samples 4 --temperature 1 --seed 0" ;;
    beams) echo "--num-beams 4 --num-return-sequences 1 --min-new-tokens $new" ;;
  esac
}
# One line per run: rows, seconds, tokens/s (kiln: rows * (decode steps + 1) new tokens).
show() {
  python3 -c '
import json, sys
d = json.loads(sys.argv[2])
toks = d["rows"] * (d["decode_steps"] + 1) if "decode_steps" in d else d["rows"] * d["new_tokens"]
print("%s: %d rows, %.2f s, %.2f tokens/s" % (sys.argv[1], d["rows"], d["seconds"], toks / d["seconds"]))
' "$1" "$2"
}
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cpus; $threads threads; $new new tokens"
for r in $(seq 1 "$repeats"); do
  for mode in greedy samples beams; do
    # Alternate which side goes first from one repeat to the next.
    sides="kiln transformers"; [ $((r % 2)) -eq 0 ] && sides="transformers kiln"
    for side in $sides; do
      if [ "$side" = kiln ]; then
        # shellcheck disable=SC2046
        j=$(./target/release/kiln generate "$dir" --inputs "$inputs" --max-new-tokens "$new" \
              --out "$dir/strategies_out.safetensors" $(kiln_opts $mode) | grep '^{')
        show "repeat $r $mode kiln" "$j"
      else
        j=$("$venv/bin/python" scripts/bench_torch_decode_strategies.py "$dir" --inputs "$inputs" \
              --max-new-tokens "$new" --mode $mode --threads "$threads")
        show "repeat $r $mode transformers" "$j"
      fi
    done
  done
done
