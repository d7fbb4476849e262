#!/usr/bin/env bash
# kiln on a real NVIDIA GPU (H100 / H200) in one run: the cuda backend's kernels against the
# interpreter, the fixtures end to end, the cube backend on CubeCL's CUDA runtime, then
# timings against PyTorch (bf16 SDPA, eager and torch.compile) in the same run.
#
# Two halves, because the GPU machines have no Rust toolchain and no internet:
#   scripts/device_cuda.sh package   # here (CPU machine): release binaries into dist/cuda/
#   scripts/device_cuda.sh run       # there (dist/cuda.tgz carried): results under $OUT
#
# `run` needs an NVIDIA driver (CUDA 13), PyTorch + transformers (the peers), and libnvrtc /
# libcublasLt (found in PyTorch's nvidia-* wheels or /usr/local/cuda). Each section has its
# own time limit and a failing section does not stop the others; everything is logged under
# $KILN_WORK and packed into $OUT/results.tgz after each section (a device call returns at
# most 8 files), with $OUT/summary.txt, whose table is printed last.
# KILN_DEVICE_SECTIONS (default "half parity fixtures headline siglip gemma compile kernels
# cube gemma-compile load ncu tune", run in that order; "check", the on-device `kernels check`, is
# left out: it gives what the CPU machine's gives) picks
# sections; KILN_DEVICE_DEADLINE (seconds, default 560) bounds the whole run: each step's
# limit is cut to what is left, and steps are skipped once too little is.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
dist=dist/cuda

if [ "$mode" = package ]; then
  set -e
  mkdir -p "$dist"
  # cuda and cube-cuda in one binary (the carry to a GPU machine is limited to 64 MiB).
  feats=(--features cuda,cube-cuda)
  cargo build --release --locked -p kiln "${feats[@]}" --bin kiln
  cp target/release/kiln "$dist/kiln"
  cargo test --release --locked -p kiln "${feats[@]}" --test parity --test cuda_device --no-run --message-format=json \
    | python3 -c 'import json, sys, shutil
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        shutil.copy(m["executable"], sys.argv[1] + "/" + m["target"]["name"])' "$dist"
  strip "$dist/kiln" "$dist/parity" "$dist/cuda_device"
  # Every hand-written module compiled once here (NVRTC needs no GPU): loads there skip it.
  export LD_LIBRARY_PATH="$PWD/.nvrtc/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  rm -rf "$dist/cache"
  KILN_CUDA_CACHE="$dist/cache" "$dist/kiln" kernels check --arch sm_90a | tail -1
  # One ahead-of-time artifact with its CUBINs (device_fixtures.py loads it with no NVRTC;
  # the other fixtures compile at load). One only: each holds every module's CUBIN (1.8 MB).
  "$dist/kiln" compile tests/fixtures/siglip/siglip_full --batch 2 --backend cuda --arch sm_90a -o "$dist/siglip_full.kiln" > /dev/null
  tar czf dist/cuda.tgz -C dist cuda
  du -sh "$dist" dist/cuda.tgz
  echo "carry dist/cuda.tgz to the GPU machine (the device tool's carry limit is 64 MiB with the tree); 'run' unpacks it"
  exit 0
fi

[ "$mode" = run ] || { echo "usage: $0 package|run" >&2; exit 2; }
OUT=${OUT:-bench-out/device}
W=${KILN_WORK:-/tmp/kiln-device}
mkdir -p "$OUT" "$W"
kiln=$PWD/$dist/kiln
py=${KILN_PYTHON:-python3}
sections=${KILN_DEVICE_SECTIONS:-half parity fixtures headline siglip gemma compile kernels cube gemma-compile load ncu tune}
deadline=${KILN_DEVICE_DEADLINE:-560}
[ -x "$kiln" ] || [ ! -f dist/cuda.tgz ] || tar xzf dist/cuda.tgz -C dist
[ -x "$kiln" ] || { echo "$kiln missing: run '$0 package' on the CPU machine and carry $dist" >&2; exit 1; }
want() { [[ " $sections " == *" $1 "* ]]; }
log() { echo "[$(date -u +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$W/log.txt"; }
pack() { tar czf "$OUT/results.tgz" -C "$W" --exclude='models' --exclude='*.safetensors' . 2>/dev/null; }
# lim N: N seconds, or what is left before the deadline (less a margin to pack), if less.
lim() { local left=$((deadline - SECONDS - 15)); echo $(($1 < left ? $1 : left)); }
# run NAME LIMIT CMD...: output to $W/NAME.txt, never stops the script.
run() {
  local name=$1 limit; limit=$(lim "$2"); shift 2
  if [ "$limit" -lt 10 ]; then log "$name: skipped (deadline)"; return 124; fi
  timeout "$limit" "$@" > "$W/$name.txt" 2>&1
  local rc=$?
  log "$name: rc $rc"
  pack
  return $rc
}

# Libraries: NVRTC and cuBLASLt from PyTorch's wheels (nvidia/cu13/lib) or the toolkit.
libs=$("$py" - <<'PY' 2>/dev/null
import glob, site
seen = []
for sp in site.getsitepackages():
    for p in sorted(glob.glob(sp + "/nvidia/**/lib*.so*", recursive=True)):
        d = p.rsplit("/", 1)[0]
        if d not in seen and any(n in p for n in ("nvrtc", "cublasLt", "cudart")):
            seen.append(d)
print(":".join(seen))
PY
)
export LD_LIBRARY_PATH="${libs:+$libs:}/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
[ -z "${CUDA_PATH:-}" ] && [ -f /usr/local/cuda/include/cuda.h ] && export CUDA_PATH=/usr/local/cuda
export KILN_CUDA_CACHE=$PWD/$dist/cache KILN_REQUIRE_GPU=1 KILN_REQUIRE_NVRTC=1
# Every load's measured GEMM choices go into one tuning table (tuning/README.md): copy its
# entries into tuning/cuda.json from a run on the code that made them.
export KILN_CUDA_TUNING_OUT=$W/tuning.json
card=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)
log "card: $card; LD_LIBRARY_PATH=$LD_LIBRARY_PATH; CUDA_PATH=${CUDA_PATH:-unset}"
nvidia-smi > "$W/nvidia-smi.txt" 2>&1
"$py" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' >> "$W/log.txt" 2>&1

# The peers' models, made in the background while the GPU checks run.
models=$W/models
mkdir -p "$models"
synth() { [ -f "$models/$1/config.json" ] || "$kiln" synth "$1" -o "$models/$1" > "$W/synth_$1.txt" 2>&1; }
if want siglip || want cube || want gemma || want compile || want kernels || want gemma-compile || want load || want tune || want ncu; then
  ( want siglip || want cube || want compile || want kernels || want tune || want ncu ) && { synth siglip-so400m-14-224 && synth siglip-so400m-14-448 && synth siglip-so400m-14-896; } &
  ( want gemma || want gemma-compile || want load || want tune ) && synth gemma2-2b &
fi
# The headline's model first (its own job, waited for alone): PaliGemma 2 3B at 896 px.
if want headline; then
  { synth paligemma2-3b-896 && "$py" scripts/make_paligemma_assets.py "$models/paligemma2-3b-896" 896 > "$W/pg_assets.txt" 2>&1; } &
  pg_job=$!
fi

if want check; then
  run kernels_check 120 "$kiln" kernels check --arch sm_90a
  tail -1 "$W/kernels_check.txt"
fi

if want half; then
  # Tensor-core attention and cuBLASLt epilogues in bf16/f16; on a failure, again one step
  # at a time (KILN_CUDA_DEBUG=1) so a fault names its kernel.
  run half 240 "$dist/cuda_device" --test-threads=1 --nocapture \
    || KILN_CUDA_DEBUG=1 run half_debug 180 "$dist/cuda_device" --test-threads=1 --nocapture
  grep -cE "err [0-9.e+-]+ " "$W/half.txt" | sed 's/^/half cases run: /'
  # Gemma 2 2B's decode GEMMs timed at load: cuBLASLt's algorithms against kiln's GEMV.
  KILN_GEMV_BENCH=1 KILN_CUDA_VERBOSE=1 run gemv_bench 60 "$dist/cuda_device" --exact gemv_decode_shapes_timed_at_load --nocapture
  grep "kiln cuda: gemm" "$W/gemv_bench.txt"
fi

if want parity; then
  # Every op row in f32 against the interpreter, each test in its own process (a device
  # fault poisons its context), every case reported (KILN_PARITY_KEEP_GOING=1).
  export KILN_PARITY_KEEP_GOING=1
  for t in $("$dist/parity" --list 2>/dev/null | sed -n 's/: test$//p'); do
    KILN_PARITY_BACKENDS=cuda run "parity_$t" 120 "$dist/parity" --exact "$t" --test-threads=1 --nocapture
    grep -E "^PARITY (OK|FAIL)" "$W/parity_$t.txt" >> "$W/parity_cuda.txt"
    if grep -q "PARITY FAIL" "$W/parity_$t.txt"; then
      KILN_PARITY_BACKENDS=cuda KILN_CUDA_DEBUG=1 run "parity_debug_$t" 120 "$dist/parity" --exact "$t" --test-threads=1 --nocapture
    fi
  done
  touch "$W/parity_cuda.txt"
  log "parity cuda: $(grep -c "PARITY OK" "$W/parity_cuda.txt") ok, $(grep -c "PARITY FAIL" "$W/parity_cuda.txt") failed"
  unset KILN_PARITY_KEEP_GOING
fi

if want fixtures; then
  run fixtures 300 "$py" scripts/device_fixtures.py "$kiln" "$dist" "$W"
  tail -1 "$W/fixtures.txt"
fi

# Timings: one JSON row per (engine, model, batch).
rows=$W/timings.jsonl
touch "$rows"
row() { # engine model batch json
  local j=$4
  [ -n "$j" ] || j='{"error": "no output (see the logs)"}'
  echo "{\"engine\": \"$1\", \"model\": \"$2\", \"batch\": $3, \"result\": $j}" >> "$rows"
}
kbench() { # name limit args...: the last line of `kiln bench --json`
  local name=$1 limit; limit=$(lim "$2"); shift 2
  [ "$limit" -ge 10 ] || { echo '{"error": "skipped (deadline)"}'; return; }
  timeout "$limit" "$kiln" bench "$@" --json > "$W/$name.txt" 2>&1
  grep '^{' "$W/$name.txt" | tail -1
}
tbench() { # name limit args...
  local name=$1 limit; limit=$(lim "$2"); shift 2
  [ "$limit" -ge 10 ] || { echo '{"error": "skipped (deadline)"}'; return; }
  timeout "$limit" "$py" scripts/bench_torch_cuda.py "$@" > "$W/$name.txt" 2>&1
  grep '^{' "$W/$name.txt" | tail -1
}

if want siglip || want gemma || want headline; then
  row ceiling card 0 "$(tbench ceiling 120 ceiling -)"
fi

# headline ENGINE JSON: two rows (first token, decode per token) from one generate's JSON.
headline() {
  local field
  for field in first_token_ms decode_ms_per_token; do
    row "$1" "pg2-3b-896 ${field%%_ms*}" 1 "$(echo "$2" | "$py" -c 'import json, sys
f = sys.argv[1]
try:
    j = json.loads(sys.stdin.read())
except ValueError:
    j = {"error": "no output (see the logs)"}
print(json.dumps({"median_ms": j[f], "prompt_tokens": j.get("prompt_tokens")} if f in j else {"error": j.get("error", "no " + f)}))' "$field")"
  done
}

if want headline; then
  # The question a user asks first: PaliGemma 2 3B at 896 px (4096 image tokens), time to first
  # token (image preprocessing, So400m, the prefill) and decode per token, against
  # transformers on the same card, same image and prompt. kiln compiles in memory first
  # (compile_ms, reported apart in kiln_headline.txt).
  wait "$pg_job"
  d=$models/paligemma2-3b-896
  timeout "$(lim 240)" "$kiln" generate "$d" --backend cuda --dtype bf16 --prompt "caption en" --image "$d/bench.jpg" --max-new-tokens 33 > "$W/kiln_headline.txt" 2>&1
  headline kiln-cuda "$(grep '^{' "$W/kiln_headline.txt" | tail -1)"
  headline torch-eager "$(tbench torch_headline 240 paligemma "$d" --new-tokens 32)"
  log "headline: kiln $(grep '^{' "$W/kiln_headline.txt" | tail -1)"
  pack
fi

if want siglip; then
  wait
  for cfg in "224 1" "224 32" "448 8" "896 2"; do
    set -- $cfg
    dir=$models/siglip-so400m-14-$1
    # --breakdown: one more run, step by step, into the log (where the time goes).
    row kiln-cuda "so400m-$1" "$2" "$(kbench "kiln_$1_b$2" 240 "$dir" --backend cuda --dtype bf16 --batch "$2" --runs 30 --breakdown)"
    row torch-eager "so400m-$1" "$2" "$(tbench "torch_eager_$1_b$2" 240 siglip "$dir" --batch "$2" --mode eager)"
    log "so400m $1 b$2 done"
    pack
  done
fi

if want gemma; then
  wait
  g=$models/gemma2-2b
  row kiln-cuda "gemma2-2b prefill 1024" 1 "$(kbench kiln_gemma_prefill 300 "$g" --backend cuda --dtype bf16 --seq-len 1024 --runs 10)"
  "$py" - "$W/prompt.safetensors" <<'PY'
import sys, torch
from safetensors.torch import save_file
g = torch.Generator().manual_seed(0)
save_file({"input_ids": torch.randint(2, 256000, (1, 16), generator=g)}, sys.argv[1])
PY
  KILN_CUDA_VERBOSE=1 timeout "$(lim 300)" "$kiln" generate "$g" --backend cuda --dtype bf16 --inputs "$W/prompt.safetensors" --out "$W/gen.safetensors" --max-new-tokens 64 --breakdown --cuda-pdl off > "$W/kiln_gemma_decode.txt" 2>&1
  row kiln-cuda "gemma2-2b decode" 1 "$(grep '^{' "$W/kiln_gemma_decode.txt" | tail -1)"
  # The same decode with programmatic dependent launch (each kiln kernel may start while the
  # one before it finishes; the GEMVs prefetch their weights before they wait): what it buys
  # per token, and the same ids and log-probabilities bit for bit.
  KILN_CUDA_VERBOSE=1 timeout "$(lim 300)" "$kiln" generate "$g" --backend cuda --dtype bf16 --inputs "$W/prompt.safetensors" --out "$W/gen_pdl.safetensors" --max-new-tokens 64 --breakdown --cuda-pdl on > "$W/kiln_gemma_decode_pdl.txt" 2>&1
  row kiln-cuda-pdl-on "gemma2-2b decode" 1 "$(grep '^{' "$W/kiln_gemma_decode_pdl.txt" | tail -1)"
  "$kiln" compare "$W/gen_pdl.safetensors" "$W/gen.safetensors" --tol 0 > "$W/pdl_compare.txt" 2>&1
  log "gemma decode --cuda-pdl on against off (ids and log-probabilities, --tol 0): rc $? ($(grep -m1 'programmatic dependent launch' "$W/kiln_gemma_decode_pdl.txt"))"
  # The same decode with every step its own launches (no _x2 pairs, split attention as two
  # launches, the cache writes apart): what running them together buys, and the same ids.
  timeout "$(lim 300)" "$kiln" generate "$g" --backend cuda --dtype bf16 --inputs "$W/prompt.safetensors" --out "$W/gen_nofuse.safetensors" --max-new-tokens 64 --breakdown --cuda-fuse off > "$W/kiln_gemma_decode_nofuse.txt" 2>&1
  row kiln-cuda-fuse-off "gemma2-2b decode" 1 "$(grep '^{' "$W/kiln_gemma_decode_nofuse.txt" | tail -1)"
  "$kiln" compare "$W/gen_nofuse.safetensors" "$W/gen.safetensors" --tol 0 > "$W/fuse_compare.txt" 2>&1
  log "gemma decode --cuda-fuse off against on (ids and log-probabilities, --tol 0): rc $?"
  row torch-eager "gemma2-2b prefill 1024" 1 "$(tbench torch_gemma_prefill_eager 300 gemma "$g" --what prefill --mode eager)"
  row torch-eager "gemma2-2b decode" 1 "$(tbench torch_gemma_decode_eager 300 gemma "$g" --what decode --mode eager)"
  pack
fi

if want compile; then
  # torch.compile peers (each compiles for a minute or more): the goals name So400m 224 b32
  # and b1 against torch.compile; Gemma decode with its CUDA graphs (reduce-overhead).
  wait
  dir=$models/siglip-so400m-14-224
  row torch-compile so400m-224 32 "$(tbench torch_compile_224_b32 300 siglip "$dir" --batch 32 --mode compile)"
  pack
fi

if want kernels; then
  # Issue 9's tables on the GPU: every kernel of the program, its rate against the card's
  # ceilings (measured through the backend in the same run), and the roofline plot.
  for cfg in "224 32"; do
    set -- $cfg
    run "kernels_$1_b$2" 120 "$kiln" bench kernels --backend cuda --model "$models/siglip-so400m-14-$1" --dtype bf16 --batch "$2" --plot "$W/roofline_$1_b$2.svg"
  done
fi

if want cube; then
  # The cube backend on CubeCL's CUDA runtime: the same parity rows.
  KILN_PARITY_KEEP_GOING=1 KILN_PARITY_BACKENDS=cube-cuda run parity_cube 90 "$dist/parity" --test-threads=1 --nocapture
  log "parity cube-cuda: $(grep -c "PARITY OK" "$W/parity_cube.txt") ok, $(grep -c "PARITY FAIL" "$W/parity_cube.txt") failed"
fi

if want cube; then
  wait
  dir=$models/siglip-so400m-14-224
  row kiln-cube-cuda so400m-224 32 "$(kbench cube_224_b32 400 "$dir" --backend cube --device cuda --batch 32 --runs 10)"
  row torch-eager-f32 so400m-224 32 "$(tbench torch_f32_224_b32 240 siglip "$dir" --batch 32 --mode eager --dtype f32)"
  pack
fi

if want gemma-compile; then
  wait
  row torch-compile "gemma2-2b decode" 1 "$(tbench torch_gemma_decode_compile 400 gemma "$models/gemma2-2b" --what decode --mode compile)"
  pack
fi

if want load; then
  # Weight upload at load, Gemma 2 2B (5.2 GB bf16): pinned staging (the default) against
  # pageable copies, each a load plus one 16-token forward; the upload line is KILN_CUDA_VERBOSE's.
  wait
  for how in pinned pageable; do
    KILN_CUDA_UPLOAD=$how KILN_CUDA_VERBOSE=1 run "load_$how" 120 "$kiln" bench "$models/gemma2-2b" --backend cuda --dtype bf16 --seq-len 16 --runs 1
    log "load $how: $(grep -m1 'kiln cuda: uploaded' "$W/load_$how.txt")"
  done
  # The cuda prepared weight file (issue 24): one artifact loaded from its prepared file and,
  # with --no-prepared, from the checkpoint (the upload overlaps module loading in both); the
  # load line says which, with its time.
  run load_artifact 300 "$kiln" compile "$models/gemma2-2b" --backend cuda --dtype bf16 --seq-len 16 -o "$models/g16.kiln"
  for how in prepared no-prepared; do
    flag=()
    [ "$how" = no-prepared ] && flag=(--no-prepared)
    KILN_CUDA_VERBOSE=1 run "load_$how" 120 "$kiln" bench "$models/g16.kiln" "${flag[@]}" --runs 1
    log "load $how: $(grep -m1 '^load: ' "$W/load_$how.txt" | cut -c1-240) / $(grep -m1 'kiln cuda: uploaded' "$W/load_$how.txt")"
  done
fi

if want ncu; then
  # One Nsight Compute pass on the attention kernel at 896 px (where ncu exists): its
  # speed-of-light and memory sections say what bounds it.
  wait
  if command -v ncu > /dev/null; then
    run ncu_attention 150 ncu --kernel-name regex:attn_mma --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis \
      --section Occupancy "$kiln" bench "$models/siglip-so400m-14-896" --backend cuda --dtype bf16 --batch 2 --runs 1
  else
    log "ncu: not on this machine"
  fi
fi

if want tune; then
  # Norm and prefill attention variants (issue 15): each load checks the warp-per-row norm
  # kernels against the block ones on random rows, and each attn_mma variant against the
  # default kernel on random q/k/v of the model's shape (a variant that differs is REJECTED,
  # never timed) and times the rest; every choice lands in $KILN_CUDA_TUNING_OUT with the
  # GEMMs'. The variants' CUBINs come from the build's cache (kernels check), not NVRTC.
  wait
  for cfg in "224 32" "448 8" "896 2"; do
    set -- $cfg
    KILN_CUDA_TUNE=norms,attention KILN_CUDA_VERBOSE=1 run "tune_$1_b$2" 150 "$kiln" bench "$models/siglip-so400m-14-$1" --backend cuda --dtype bf16 --batch "$2" --runs 10
    grep -E "kiln cuda: ((layer|rms)_norm|attention)" "$W/tune_$1_b$2.txt" | tee -a "$W/log.txt"
  done
  KILN_CUDA_TUNE=norms KILN_CUDA_VERBOSE=1 run tune_gemma 120 "$kiln" bench "$models/gemma2-2b" --backend cuda --dtype bf16 --seq-len 1024 --runs 3
  grep -E "kiln cuda: (layer|rms)_norm" "$W/tune_gemma.txt" | tee -a "$W/log.txt"
fi

log "done"
{
  echo "card: $card"
  [ -f "$W/kernels_check.txt" ] && tail -1 "$W/kernels_check.txt"
  [ -f "$W/half.txt" ] && echo "half-precision cases: $(grep -c ' err ' "$W/half.txt") run; failing: $(grep -E 'FAILED|panicked' "$W/half.txt" | head -3 | tr '\n' ' ')"
  [ -f "$W/parity_cuda.txt" ] && echo "parity cuda: $(grep -c 'PARITY OK' "$W/parity_cuda.txt") ok, $(grep -c 'PARITY FAIL' "$W/parity_cuda.txt") failed"
  [ -f "$W/parity_cube.txt" ] && echo "parity cube-cuda: $(grep -c 'PARITY OK' "$W/parity_cube.txt") ok, $(grep -c 'PARITY FAIL' "$W/parity_cube.txt") failed"
  [ -f "$W/fixtures.txt" ] && tail -1 "$W/fixtures.txt"
  for how in pinned pageable; do [ -f "$W/load_$how.txt" ] && echo "load $how: $(grep -m1 'kiln cuda: uploaded' "$W/load_$how.txt")"; done
  cat "$W"/tune_*.txt 2>/dev/null | grep -E "kiln cuda: ((layer|rms)_norm|attention)" | sort -u
  [ -f "$W/tuning.json" ] && echo "tuning table: $(grep -c '"card"' "$W/tuning.json") entries measured (results.tgz: tuning.json)"
  "$py" scripts/device_summary.py "$rows"
} > "$OUT/summary.txt" 2>&1
pack
cat "$OUT/summary.txt"
