#!/usr/bin/env bash
# JetFormer-350M at 256 px (`kiln synth jetformer-350m-256`: the published decoder, mixture head
# and Jet sizes, random weights) on the cpu backend: text-to-image images per second at batch 1
# and 4 with a 64-token prompt and no guidance (256 image tokens: prefill + 255 cached decoder
# steps, host-side mixture draws, then the Jet inverse), the decoder's and the flow's seconds
# printed apart by `kiln sample` (compile and weight loading excluded); then `nll` at batch 8
# (`kiln bench --entry nll`: encode + Jet forward + the teacher-forced decoder over 64 + 1 + 256
# positions + the NLL sums), one warm-up and `rounds` timed runs.
# Usage: scripts/bench_jetformer_cpu.sh <kiln> [rounds] [threads]
set -euo pipefail
kiln=$1
rounds=${2:-1}
export RAYON_NUM_THREADS=${3:-2}
dir=${KILN_BENCH_DIR:-/tmp/kiln-bench}/jetformer-350m-256
grep -m1 'model name' /proc/cpuinfo
[ -f "$dir/params.npz" ] || "$kiln" synth jetformer-350m-256 -o "$dir"
prompt=$(seq -s, 100 163)
for b in 1 4; do
  echo "== text-to-image, batch $b"
  "$kiln" sample "$dir" --prompt "$prompt" --count "$b" --seed 0 -o "/tmp/jetformer-350m-b$b.png"
done
echo "== nll, batch 8"
"$kiln" bench "$dir" --entry nll --batch 8 --seq-len 64 --runs "$rounds" --json
