#!/usr/bin/env bash
# `kiln rank` over 8 synthesized checkpoints on 512 generated images (8 classes x 64, PNGs of
# 48-96 px), images/s per model; then an ensemble artifact of 4 of them (3 resolutions) against
# its members' artifacts run one by one, alternating sides, every run reported. cpu backend,
# random weights (`kiln synth <config.json>`): accuracies mean nothing, speeds do.
#
# The checkpoints (small, so the whole run takes minutes on 2 cores):
#   vit-s16-gap, vit-s16-map, vit-s16-tok   big_vision ViT-S/16 (384 wide, 12 layers, sincos2d) @64
#   vit-b16-gap                             big_vision ViT-B/16 (768 wide, 12 layers, sincos2d) @64
#   vmoe-s32-e8, vmoe-s32-dense             vmoe S/32 (384 wide, 8 layers, E=8 K=2 every other
#                                           block, groups of 8 images) @224 (learned position table)
#   siglip-s16-64                           SigLIP vision tower 384 wide, 12 layers, patch 16, 64 px
#   siglip-b16-224                          `kiln synth siglip-b16-224`, run @64 (table interpolated)
#
# Usage: scripts/bench_rank_cpu.sh [reps] [threads] [batch]
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${1:-3}
threads=${2:-2}
batch=${3:-8}
root=${KILN_BENCH_DIR:-/tmp/kiln-bench-rank}
cargo build --release --no-default-features --bin kiln --quiet
kiln=./target/release/kiln
export RAYON_NUM_THREADS=$threads
mkdir -p "$root/configs"

vit() { # name width depth mlp heads pool
  local rep=false; [ "$6" = tok ] && rep=true
  echo "{\"model_name\": \"vit\", \"model\": {\"width\": $2, \"depth\": $3, \"mlp_dim\": $4, \"num_heads\": $5, \"patch_size\": [16, 16],
    \"num_classes\": 1000, \"posemb\": \"sincos2d\", \"pool_type\": \"$6\", \"rep_size\": $rep}}" > "$root/configs/$1.json"
}
vmoe() { # name experts
  local moe=""
  [ "$2" -gt 0 ] && moe=", \"moe\": {\"layers\": [1, 3, 5, 7], \"num_experts\": $2, \"group_size\": 400,
    \"router\": {\"num_selected_experts\": 2, \"noise_std\": 1.0, \"importance_loss_weight\": 0.005, \"load_loss_weight\": 0.005,
    \"dispatcher\": {\"name\": \"einsum\", \"bfloat16\": false, \"capacity_factor\": 1.05, \"batch_priority\": false,
    \"capacity_ceil_or_round\": \"ceil\", \"capacity_multiple_of\": 4}}}"
  echo "{\"model_name\": \"vmoe\", \"model\": {\"num_classes\": 1000, \"patch_size\": [32, 32], \"hidden_size\": 384,
    \"classifier\": \"token\", \"deterministic\": true, \"encoder\": {\"num_layers\": 8, \"mlp_dim\": 1536, \"num_heads\": 6,
    \"dropout_rate\": 0.0, \"attention_dropout_rate\": 0.0$moe}}}" > "$root/configs/$1.json"
}
vit vit-s16-gap 384 12 1536 6 gap
vit vit-s16-map 384 12 1536 6 map
vit vit-s16-tok 384 12 1536 6 tok
vit vit-b16-gap 768 12 3072 12 gap
vmoe vmoe-s32-e8 8
vmoe vmoe-s32-dense 0
cat > "$root/configs/siglip-s16-64.json" <<'EOF'
{"architectures": ["SiglipVisionModel"], "hidden_act": "gelu_pytorch_tanh", "hidden_size": 384, "image_size": 64,
 "intermediate_size": 1536, "layer_norm_eps": 1e-6, "model_type": "siglip_vision_model", "num_attention_heads": 6,
 "num_channels": 3, "num_hidden_layers": 12, "patch_size": 16, "vision_use_head": true}
EOF
for c in "$root"/configs/*.json; do
  m=$(basename "$c" .json)
  [ -f "$root/$m/config.json" ] || $kiln synth "$c" -o "$root/$m" > /dev/null
done
[ -f "$root/siglip-b16-224/model.safetensors" ] || $kiln synth siglip-b16-224 -o "$root/siglip-b16-224" > /dev/null

# 512 images: 8 classes (a base colour and a stripe period each) x 64, noisy, 48-96 px.
[ -d "$root/data" ] || python3 - "$root/data" <<'EOF'
import os, random, struct, sys, zlib
random.seed(0)
def png(path, w, h, rows):
    def chunk(k, d):
        return struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d) & 0xFFFFFFFF)
    raw = b"".join(b"\0" + bytes(r) for r in rows)
    open(path, "wb").write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
for c in range(8):
    base = [random.randrange(40, 216) for _ in range(3)]
    period = 2 + c
    os.makedirs(os.path.join(sys.argv[1], f"class{c}"), exist_ok=True)
    for i in range(64):
        w, h = random.randrange(48, 97), random.randrange(48, 97)
        rows = []
        for y in range(h):
            stripe = 40 if (y // period) % 2 else -40
            rows.append([max(0, min(255, base[k] + stripe + random.randrange(-60, 61))) for x in range(w) for k in range(3)])
        png(os.path.join(sys.argv[1], f"class{c}", f"{i:03d}.png"), w, h, rows)
EOF

echo "== kiln rank, 512 images, batch $batch, $threads threads ($(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"
cmd=("$kiln" rank "$root/vit-s16-gap@64" "$root/vit-s16-map@64" "$root/vit-s16-tok@64" "$root/vit-b16-gap@64" "$root/vmoe-s32-e8"
  "$root/vmoe-s32-dense" "$root/siglip-s16-64" "$root/siglip-b16-224@64" --data "$root/data" --k 5 --batch "$batch")
echo "${cmd[*]}"
t0=$(date +%s.%N)
"${cmd[@]}" --json > "$root/rank.json"
t1=$(date +%s.%N)
python3 - "$root/rank.json" "$t0" "$t1" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{'model':<34} {'accuracy':>8} {'images/s':>9} {'embed s':>8} {'compile s':>9}")
for m in r["ranked"]:
    print(f"{m['model'].split('/')[-1]:<34} {m['accuracy']:8.4f} {m['images_per_s']:9.1f} {m['embed_s']:8.2f} {m['compile_s']:9.2f}")
for f in r["failed"]:
    print(f"FAILED {f['model']}: {f['error']}")
print(f"whole command (image decoding, 8 compiles, 8 x 512 images): {float(sys.argv[3]) - float(sys.argv[2]):.1f} s")
EOF

echo
echo "== ensemble artifact against its members one by one, batch $batch, $reps repetitions (median of 5 runs each)"
members=("$root/vit-s16-gap@64" "$root/vit-s16-map@48" "$root/vit-b16-gap@64" "$root/vmoe-s32-e8")
$kiln compile --ensemble "${members[@]}" --batch "$batch" -o "$root/ens.kiln" | grep -E "^(compiled|  entry)"
arts=()
for i in "${!members[@]}"; do
  spec=${members[$i]}; dir=${spec%@*}; res=""; [ "$spec" != "$dir" ] && res="--resolution ${spec##*@}"
  $kiln compile "$dir" $res --batch "$batch" -o "$root/member$i.kiln" | grep -E "^  entry" | sed "s|^|  member $i: |"
  arts+=("$root/member$i.kiln")
done
median() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])["median_ms"])' "$1"; }
printf "%-4s %-8s %14s %16s %8s\n" rep first ensemble_ms members_sum_ms ratio
for rep in $(seq 1 "$reps"); do
  ens() { median "$($kiln bench "$root/ens.kiln" --runs 5 --json)"; }
  mem() { local s=0; for a in "${arts[@]}"; do s=$(python3 -c "print($s + $(median "$($kiln bench "$a" --runs 5 --json)"))"); done; echo "$s"; }
  if [ $((rep % 2)) -eq 1 ]; then e=$(ens); m=$(mem); first=ensemble; else m=$(mem); e=$(ens); first=members; fi
  python3 -c "print(f'{$rep:<4} {\"$first\":<8} {$e:14.1f} {$m:16.1f} {$m/$e:8.3f}')"
done
