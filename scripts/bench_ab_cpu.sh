#!/usr/bin/env bash
# Same-run comparison of two kiln builds on the cpu backend (a change against its base):
# SigLIP So400m/14 at 224 px (batch 1, `kiln bench`) and Gemma 2 2B from a bf16 checkpoint
# (a 128-token prompt, then ms per decoded token, `kiln generate`). The two binaries alternate,
# `rounds` times each, and every run is printed (the CPU machines are shared and noisy).
# Usage: scripts/bench_ab_cpu.sh <kiln-A> <kiln-B> [rounds] [threads] [models]
# models: "siglip gemma" (the default), "siglip" or "gemma".
# Build each side with `cargo build --release --no-default-features` (the cube backend is not
# timed here), e.g. the base in a `git worktree`.
set -euo pipefail
a=$1
b=$2
rounds=${3:-2}
threads=${4:-2}
models=${5:-siglip gemma}
dir=${KILN_BENCH_DIR:-/tmp/kiln-bench}
export RAYON_NUM_THREADS=$threads
grep -m1 'model name' /proc/cpuinfo
siglip=$dir/siglip-so400m-14-224
gemma=$dir/gemma2-2b-bf16
case " $models " in *" siglip "*) [ -f "$siglip/model.safetensors" ] || "$a" synth siglip-so400m-14-224 -o "$siglip" ;; esac
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
    if [[ " $models " == *" siglip "* ]]; then
      s=$("$bin" bench "$siglip" --batch 1 --runs 3 --json)
      echo "round $r $side so400m-224 $s"
    fi
    if [[ " $models " == *" gemma "* ]]; then
      # Builds whose generate writes step_logits only when asked are asked, so both sides' files
      # hold the same tensors.
      extra=()
      if "$bin" generate --help | grep -q -- --step-logits; then extra=(--step-logits); fi
      g=$("$bin" generate "$gemma" --inputs "$inputs" --max-new-tokens 8 "${extra[@]}" --out "$gemma/ab_out_$side.safetensors" | grep '^{')
      echo "round $r $side gemma2-2b-bf16 $g"
    fi
  done
done
# Both sides must generate the same tokens.
if [[ " $models " == *" gemma "* ]]; then
  "$a" compare "$gemma/ab_out_A.safetensors" "$gemma/ab_out_B.safetensors" --tol 0 >/dev/null && echo "A and B generate the same ids and step logits"
fi
