#!/usr/bin/env bash
# Captions per second of the synthesized CapPa B/16 captioner with a 6-layer decoder
# (`kiln synth cappa-b16-224`) on the cpu backend: batch 1 and 8, 32 greedy tokens (no EOS,
# so every caption is 32 tokens), the cross-attention keys and values cached once per image
# (kiln) against recomputed at every step (`--recompute-cross`, big_vision's loop), the two
# alternating, every run printed. Times are `kiln generate`'s `generate_ms` (encode + 32
# decode steps, compile excluded).
# Usage: scripts/bench_cappa_cpu.sh <kiln> [rounds] [threads]
set -euo pipefail
kiln=$1
rounds=${2:-2}
export RAYON_NUM_THREADS=${3:-2}
dir=${KILN_BENCH_DIR:-/tmp/kiln-bench}/cappa-b16-224
grep -m1 'model name' /proc/cpuinfo
[ -f "$dir/params.npz" ] || "$kiln" synth cappa-b16-224 -o "$dir"
for b in 1 8; do
  # images [b, 224, 224, 3] in [-1, 1], prompts [b, 32] of zeros, eos_token [-1].
  python3 - "$dir/in_b$b.safetensors" "$b" <<'PY'
import json, random, struct, sys
path, b = sys.argv[1], int(sys.argv[2])
random.seed(b)
img = struct.pack(f"<{b*224*224*3}f", *[random.uniform(-1, 1) for _ in range(b * 224 * 224 * 3)])
prompts = struct.pack(f"<{b*32}q", *([0] * (b * 32)))
eos = struct.pack("<q", -1)
tensors = [("eos_token", "I64", [1], eos), ("images", "F32", [b, 224, 224, 3], img), ("prompts", "I64", [b, 32], prompts)]
header, data = {}, b""
for name, dt, shape, raw in tensors:
    header[name] = {"dtype": dt, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
    data += raw
h = json.dumps(header).encode()
h += b" " * (-len(h) % 8)
open(path, "wb").write(struct.pack("<Q", len(h)) + h + data)
PY
done
for r in $(seq "$rounds"); do
  for b in 1 8; do
    for mode in cached recomputed; do
      flag=""
      [ "$mode" = recomputed ] && flag="--recompute-cross"
      ms=$("$kiln" generate "$dir" --inputs "$dir/in_b$b.safetensors" --out "$dir/out_$mode.safetensors" $flag 2>&1 >/dev/null | grep -o '"generate_ms":[0-9.]*' | cut -d: -f2)
      echo "round $r batch $b $mode generate_ms $ms captions_per_s $(python3 -c "print(round($b / ($ms / 1000), 3))")"
    done
  done
  if cmp -s "$dir/out_cached.safetensors" "$dir/out_recomputed.safetensors"; then echo "round $r: cached and recomputed wrote identical outputs (batch 8)"; else "$kiln" compare "$dir/out_recomputed.safetensors" "$dir/out_cached.safetensors" --tol 1e-4; fi
done
