#!/usr/bin/env bash
# Decode ms per token against the KV cache's capacity, for two kiln binaries on the same
# machine, alternating runs (issue 16: decode cost must follow the tokens in the cache, not
# the capacity --max-new-tokens sets). The model is the tiny Gemma 2 fixture
# (tests/fixtures/gemma/gemma2_gqa) with max_position_embeddings raised to 8192; each binary
# compiles a generation program for an 8-token prompt bucket and caches of each capacity, and
# `kiln bench --entry decode --breakdown` times its decode step (bench's inputs: cache_position
# 0, so one filled key, and an attention mask of ones). Bench copies every input in and out
# of each run, the whole cache included (a copy that follows the capacity and that generation,
# whose cache stays in place as state, does not make), so the line reports the median with
# those copies and, from the breakdown (one run, each step synchronised), the time in the
# steps and in attention alone.
# Usage: scripts/bench_decode_capacity.sh <kiln-before> <kiln-after> [rounds] [runs] [capacities...]
set -euo pipefail
before=$1
after=$2
rounds=${3:-3}
runs=${4:-200}
shift $(( $# < 4 ? $# : 4 ))
caps=("${@:-32 4096}")
read -r -a caps <<< "${caps[*]}"
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${KILN_BENCH_DIR:-/tmp/kiln-bench}/gemma2-tiny-long
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2}
mkdir -p "$dir"
python3 - "$root/tests/fixtures/gemma/gemma2_gqa/config.json" "$dir/config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
c["max_position_embeddings"] = 8192
json.dump(c, open(sys.argv[2], "w"), indent=1)
PY
cp -f "$root/tests/fixtures/gemma/gemma2_gqa/model.safetensors" "$root/tests/fixtures/gemma/gemma2_gqa/generation_config.json" "$dir/"
for which in before after; do
  for n in "${caps[@]}"; do
    "${!which}" compile "$dir" --generate --seq-len 8 --max-new-tokens $((n - 8)) -o "$dir/${which}_$n.kiln" > /dev/null
  done
done
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq "$rounds"); do
  for n in "${caps[@]}"; do
    for which in before after; do
      out=$("${!which}" bench "$dir/${which}_$n.kiln" --entry decode --runs "$runs" --breakdown 2>/dev/null)
      median=$(grep -o 'median [0-9.]* ms' <<< "$out" | grep -o '[0-9.]*')
      total=$(grep '^total (one run)' <<< "$out" | awk '{print $NF}')
      outside=$(grep '^outside steps' <<< "$out" | awk '{print $(NF-1)}')
      attn=$(grep '(attention)' <<< "$out" | awk '{print $(NF-1)}')
      steps=$(python3 -c "import sys; print(f'{float(sys.argv[1]) - float(sys.argv[2]):.3f}')" "$total" "$outside")
      echo "round $r capacity $n $which: median $median ms with copies (runs $runs); one run: steps $steps ms, attention $attn ms; load $(cut -d' ' -f1 /proc/loadavg)"
    done
  done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
