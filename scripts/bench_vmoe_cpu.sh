#!/usr/bin/env bash
# V-MoE-B/16 (E=8, K=2, every other block) against the dense ViT-B/16 it is built on, and a
# PatchMerger ViT-B/16 (8 tokens after block 6) against plain ViT-B/16: cpu backend, full-size
# random weights from `kiln synth`, every number of a table measured in this one run.
# Usage: scripts/bench_vmoe_cpu.sh [runs] [batch] [threads]
# batch must be a multiple of 8: V-MoE routes groups of 8 images (group_size 8 x 197 tokens).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
batch=${2:-8}
threads=${3:-2}
root=${KILN_BENCH_DIR:-/tmp/kiln-bench}
cargo build --release --locked --quiet
kiln=./target/release/kiln
for m in vmoe-b16-dense vmoe-b16-e8 vit-b16 vit-b16-pm8; do
  [ -f "$root/$m/params.npz" ] || $kiln synth "$m" -o "$root/$m"
done
export RAYON_NUM_THREADS=$threads
median() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])["median_ms"])' "$1"; }

echo "== V-MoE-B/16 against its dense ViT-B/16, batch $batch, $runs runs each (median ms)"
dense=$(median "$($kiln bench "$root/vmoe-b16-dense" --batch "$batch" --runs "$runs" --json)")
echo "dense ViT-B/16 (vmoe layout): $dense ms"
$kiln bench "$root/vmoe-b16-e8" --batch "$batch" --runs "$runs" --breakdown | grep -E "^(backend|MoE layers|cpu\.(topk|cumsum|take_along_axis|scatter_add|cast|moe_dispatch|moe_combine|softmax)|total)"

echo
echo "== capacity ratio sweep (BPR off, then on), images/s"
printf "%-6s %-5s %12s %12s %10s\n" C BPR median_ms images/s vs_dense
# BPR changes which tokens are kept, not how much work there is; it is timed at two ratios.
for run in "false 0.5" "false 0.75" "false 1.0" "false 1.5" "false 2.0" "true 0.5" "true 1.0"; do
  set -- $run
  bpr=$1 c=$2
  ms=$(median "$($kiln bench "$root/vmoe-b16-e8" --batch "$batch" --runs "$runs" --json --moe-capacity "$c" --moe-bpr "$bpr")")
  python3 -c 'import sys; c,b,ms,n,d=sys.argv[1:]; ms,n,d=float(ms),int(n),float(d); print(f"{c:<6} {b:<5} {ms:12.1f} {1e3*n/ms:12.2f} {d/ms:10.3f}")' "$c" "$bpr" "$ms" "$batch" "$dense"
done
printf "%-6s %-5s %12s %12s\n" dense - "$dense" "$(python3 -c "print(f'{1e3*$batch/$dense:.2f}')")"

echo
echo "== PatchMerger ViT-B/16 (8 tokens after block 6) against ViT-B/16, batch $batch"
vit=$(median "$($kiln bench "$root/vit-b16" --batch "$batch" --runs "$runs" --json)")
pm=$(median "$($kiln bench "$root/vit-b16-pm8" --batch "$batch" --runs "$runs" --json)")
python3 - "$vit" "$pm" <<'PY'
import sys
vit, pm = map(float, sys.argv[1:])
D, F, L, N, M = 768, 3072, 12, 196, 8
def block(n):  # encoder matmuls + attention, 2 FLOP per MAC
    return 2 * (4 * n * D * D + 2 * n * D * F + 2 * n * n * D)
base = L * block(N)
merged = 6 * block(N) + 6 * block(M) + 4 * N * M * D
print(f"ViT-B/16 {vit:.1f} ms, PatchMerger {pm:.1f} ms: measured speedup {vit / pm:.2f}x; "
      f"encoder FLOPs {base / 1e9:.1f} -> {merged / 1e9:.1f} GFLOP per image ({100 * (1 - merged / base):.1f}% fewer, {base / merged:.2f}x)")
PY
