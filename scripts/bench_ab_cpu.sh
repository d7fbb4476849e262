#!/usr/bin/env bash
# Same-run comparison of two kiln builds on the cpu backend (a change against its base):
# SigLIP So400m/14 at 224 px (batch 1, `kiln bench`) and Gemma 2 2B from a bf16 checkpoint
# (a 128-token prompt, then ms per decoded token, `kiln generate`). The two binaries alternate,
# `rounds` times each, and every run is printed (the CPU machines are shared and noisy).
# Usage: scripts/bench_ab_cpu.sh <kiln-A> <kiln-B> [rounds] [threads]
# Build each side with `cargo build --release --no-default-features` (the cube backend is not
# timed here), e.g. the base in a `git worktree`.
set -euo pipefail
a=$1
b=$2
rounds=${3:-2}
threads=${4:-2}
dir=${KILN_BENCH_DIR:-/tmp/kiln-bench}
export RAYON_NUM_THREADS=$threads
grep -m1 'model name' /proc/cpuinfo
siglip=$dir/siglip-so400m-14-224
gemma=$dir/gemma2-2b-bf16
[ -f "$siglip/model.safetensors" ] || "$a" synth siglip-so400m-14-224 -o "$siglip"
[ -d "$gemma" ] || "$a" synth gemma2-2b-bf16 -o "$gemma"
inputs=$gemma/ab_inputs.safetensors
# 128 token ids (int64) in a safetensors file, written without numpy.
python3 - "$inputs" <<'PY'
import json, random, struct, sys
random.seed(0)
ids = [random.randrange(3, 256000) for _ in range(128)]
data = struct.pack("<128q", *ids)
header = json.dumps({"input_ids": {"dtype": "I64", "shape": [1, 128], "data_offsets": [0, len(data)]}}).encode()
header += b" " * (-len(header) % 8)
with open(sys.argv[1], "wb") as f:
    f.write(struct.pack("<Q", len(header)) + header + data)
PY
for r in $(seq "$rounds"); do
  for side in A B; do
    bin=$a
    [ "$side" = B ] && bin=$b
    s=$("$bin" bench "$siglip" --batch 1 --runs 3 --json)
    echo "round $r $side so400m-224 $s"
    g=$("$bin" generate "$gemma" --inputs "$inputs" --max-new-tokens 8 --out "$gemma/ab_out_$side.safetensors" | grep '^{')
    echo "round $r $side gemma2-2b-bf16 $g"
  done
done
# Both sides must generate the same tokens.
"$a" compare "$gemma/ab_out_A.safetensors" "$gemma/ab_out_B.safetensors" --tol 0 >/dev/null && echo "A and B generate the same ids and step logits"
