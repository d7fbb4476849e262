#!/usr/bin/env bash
# The cuda backend on a real GPU (H100 / H200), in one run: kernels against the interpreter,
# fixtures end to end, then timings against PyTorch (bf16, SDPA) and torch.compile.
#
# Two halves, because the GPU machines have no Rust toolchain and no internet:
#   scripts/device_cuda.sh package   # here (CPU machine): release binaries into dist/cuda/
#   scripts/device_cuda.sh run       # there (GPU machine, dist/cuda/ carried): writes $OUT
#
# `run` needs: an NVIDIA driver (CUDA 13.0), PyTorch + transformers (for the peers), and
# libnvrtc.so.13 for programs compiled at load (found in PyTorch's nvidia-* packages, or set
# KILN_NVRTC_DIR). Results go under $OUT (default bench-out/device); the last thing printed
# is a short table. Nothing here has been run on a GPU yet (written without one).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
dist=dist/cuda

if [ "$mode" = package ]; then
  mkdir -p "$dist"
  # Without the cube backend (wgpu): smaller binaries; the carry to a GPU machine is limited.
  feats=(--no-default-features --features cuda)
  cargo build --release --locked -p kiln "${feats[@]}" --bin kiln
  cp target/release/kiln "$dist/kiln"
  # The test binaries: every op (tests/parity.rs) and the half-precision kernels.
  cargo test --release --locked -p kiln "${feats[@]}" --test parity --test cuda_device --no-run 2>&1 | tee /tmp/kiln-package.log
  for t in parity cuda_device; do
    exe=$(grep -o "target/release/deps/$t-[0-9a-f]*" /tmp/kiln-package.log | tail -1)
    cp "$exe" "$dist/$t"
  done
  strip "$dist"/* 2>/dev/null || true
  # Ahead-of-time artifacts of the fixtures with their CUBINs: loading them needs no NVRTC.
  export LD_LIBRARY_PATH="$PWD/.nvrtc/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  for m in tests/fixtures/siglip/*/ tests/fixtures/gemma/*/; do
    [ -f "$m/config.json" ] || continue
    n=$(basename "$m")
    "$dist/kiln" compile "$m" --backend cuda --arch sm_90a -o "$dist/$n.kiln" || echo "compile $n failed"
  done
  du -sh "$dist"/*
  echo "carry $dist to the GPU machine (the device tool's carry limit is 64 MiB in all)"
  exit 0
fi

[ "$mode" = run ] || { echo "usage: $0 package|run" >&2; exit 2; }
OUT=${OUT:-bench-out/device}
mkdir -p "$OUT"
kiln=${KILN_BIN:-$dist/kiln}
py=${KILN_PYTHON:-python3}
[ -x "$kiln" ] || { echo "$kiln missing: run '$0 package' on the CPU machine and carry $dist" >&2; exit 1; }

# libnvrtc: PyTorch's CUDA wheels ship it (nvidia/cu13/lib or nvidia/cuda_nvrtc/lib).
if [ -z "${KILN_NVRTC_DIR:-}" ]; then
  KILN_NVRTC_DIR=$("$py" - <<'PY' 2>/dev/null || true
import glob, site, sys
for sp in site.getsitepackages() + [site.getusersitepackages()]:
    for p in sorted(glob.glob(sp + "/nvidia/**/libnvrtc.so*", recursive=True)):
        print(p.rsplit("/", 1)[0]); sys.exit(0)
PY
)
fi
[ -n "${KILN_NVRTC_DIR:-}" ] && export LD_LIBRARY_PATH="$KILN_NVRTC_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export KILN_REQUIRE_GPU=1 KILN_REQUIRE_NVRTC=1
card=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)
echo "card: $card" | tee "$OUT/card.txt"
status=0

echo "== 1. kernels: NVRTC on this machine, then every op against the interpreter"
"$kiln" kernels check --arch sm_90a > "$OUT/kernels_check.txt" 2>&1 || status=1
tail -1 "$OUT/kernels_check.txt"
for t in parity cuda_device; do
  timeout 900 "$dist/$t" --test-threads=1 --nocapture > "$OUT/test_$t.txt" 2>&1 && echo "$t: ok" || { echo "$t: FAILED"; status=1; }
  grep -E "^test result|panicked" "$OUT/test_$t.txt" | head -5 || true
done

echo "== 2. fixtures end to end on --backend cuda (f32 and bf16 against the stored outputs)"
"$py" scripts/device_fixtures.py "$kiln" "$dist" "$OUT" || status=1

echo "== 3. timings: kiln --backend cuda vs PyTorch bf16 SDPA and torch.compile, same run"
bench=${KILN_BENCH_DIR:-/tmp/kiln-bench}
mkdir -p "$bench"
for name in siglip-so400m-14-224 siglip-so400m-14-448 siglip-so400m-14-896 gemma2-2b; do
  [ -f "$bench/$name/config.json" ] || "$kiln" synth "$name" -o "$bench/$name" > /dev/null
done
: > "$OUT/timings.jsonl"
row() { echo "$1" | tee -a "$OUT/timings.jsonl"; }
for cfg in "224 32" "224 1" "448 8" "896 2"; do
  set -- $cfg
  dir="$bench/siglip-so400m-14-$1"
  k=$("$kiln" bench "$dir" --backend cuda --dtype bf16 --batch "$2" --runs 20 --json 2>>"$OUT/errors.txt" || echo '{"error": "kiln bench failed"}')
  row "{\"engine\": \"kiln-cuda\", \"model\": \"so400m-$1\", \"batch\": $2, \"result\": $k}"
  for mode in eager compile; do
    t=$("$py" scripts/bench_torch_cuda.py siglip "$dir" --batch "$2" --mode "$mode" 2>>"$OUT/errors.txt" || echo '{"error": "torch failed"}')
    row "{\"engine\": \"torch-$mode\", \"model\": \"so400m-$1\", \"batch\": $2, \"result\": $t}"
  done
done
g="$bench/gemma2-2b"
k=$("$kiln" bench "$g" --backend cuda --dtype bf16 --seq-len 1024 --runs 10 --json 2>>"$OUT/errors.txt" || echo '{"error": "kiln bench failed"}')
row "{\"engine\": \"kiln-cuda\", \"model\": \"gemma2-2b prefill 1024\", \"batch\": 1, \"result\": $k}"
"$py" - "$OUT/prompt.safetensors" <<'PY'
import sys, torch
from safetensors.torch import save_file
g = torch.Generator().manual_seed(0)
save_file({"input_ids": torch.randint(2, 256000, (1, 16), generator=g)}, sys.argv[1])
PY
k=$("$kiln" generate "$g" --backend cuda --inputs "$OUT/prompt.safetensors" --out "$OUT/gen.safetensors" --max-new-tokens 64 2>>"$OUT/errors.txt" | grep decode_ms_per_token || echo '{"error": "kiln generate failed"}')
row "{\"engine\": \"kiln-cuda\", \"model\": \"gemma2-2b decode\", \"batch\": 1, \"result\": $k}"
for mode in eager compile; do
  for what in prefill decode; do
    t=$("$py" scripts/bench_torch_cuda.py gemma "$g" --what "$what" --mode "$mode" 2>>"$OUT/errors.txt" || echo '{"error": "torch failed"}')
    row "{\"engine\": \"torch-$mode\", \"model\": \"gemma2-2b $what\", \"batch\": 1, \"result\": $t}"
  done
done

echo "== summary ($card)"
"$py" - "$OUT/timings.jsonl" <<'PY' | tee "$OUT/summary.txt"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"{'model':<26} {'batch':>5} {'engine':<14} {'median ms':>10} {'per item':>12}")
for r in rows:
    res = r["result"]
    ms = res.get("median_ms") or res.get("decode_ms_per_token") or res.get("prefill_ms")
    if ms is None:
        print(f"{r['model']:<26} {r['batch']:>5} {r['engine']:<14} {'error':>10}  {res.get('error', '')}")
        continue
    per = f"{r['batch'] * 1000 / ms:.1f}/s" if "so400m" in r["model"] else ""
    print(f"{r['model']:<26} {r['batch']:>5} {r['engine']:<14} {ms:>10.3f} {per:>12}")
PY
exit $status
