#!/usr/bin/env bash
# The cube backend on an NVIDIA GPU (CubeCL's CUDA runtime): the parity suite, then SigLIP
# So400m/14 at 224 px b32, 448 px b8 and 896 px b2, kiln against PyTorch in the same run.
#
# Built on a CPU machine (no Rust on the GPU machines), carried over with the repository:
#   cargo build --release --features cube-cuda --bin kiln
#   cargo test --release --features cube-cuda --test parity --no-run   # prints the test binary
#   mkdir -p dist && cp target/release/kiln dist/ && cp <that test binary> dist/parity
# On the GPU machine (CUDA 13 driver, PyTorch + transformers, no internet):
#   scripts/device_cube.sh [dist-folder]          # results under $OUT (default ./device-out)
# CubeCL's CUDA runtime compiles kernels with NVRTC and needs the CUDA headers under
# $CUDA_PATH/include; the script looks in /usr/local/cuda and in the pip `nvidia` wheels.
set -uo pipefail
cd "$(dirname "$0")/.."
dist=${1:-dist}
out=${OUT:-device-out}
mkdir -p "$out"
kiln=$dist/kiln
parity=$dist/parity
py=${PYTHON:-python3}
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$out/log.txt"; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
card=$(head -1 "$out/gpu.txt" | cut -d, -f1)

if [ -z "${CUDA_PATH:-}" ]; then
    for c in /usr/local/cuda $("$py" -c 'import nvidia, os; print(" ".join(os.path.join(p, s) for p in nvidia.__path__ for s in ("cu13", "cuda_runtime", "cuda_nvrtc")))' 2>/dev/null); do
        if [ -f "$c/include/cuda.h" ] || [ -f "$c/include/cuda_runtime.h" ]; then export CUDA_PATH=$c; break; fi
    done
fi
log "card: $card; CUDA_PATH=${CUDA_PATH:-unset}"
site=$("$py" -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null)
nvrtc=$(find $site /usr/local/cuda*/lib64 -maxdepth 5 -name 'libnvrtc.so*' 2>/dev/null | head -1)
[ -n "$nvrtc" ] && export LD_LIBRARY_PATH="$(dirname "$nvrtc"):${LD_LIBRARY_PATH:-}"

# 1. Parity: every op row against the interpreter on the CUDA runtime (and cpu as the control).
log "parity suite on cube-cuda"
KILN_PARITY_BACKENDS=cpu,cube-cuda timeout 900 "$parity" --test-threads 1 > "$out/parity.txt" 2>&1
parity_rc=$?
parity_line=$(grep -E '^test result' "$out/parity.txt" | tail -1)
log "parity rc=$parity_rc: $parity_line"

# 2. SigLIP So400m/14: kiln (cube on CUDA, f32) against PyTorch (f32 and bf16, SDPA) on the same weights.
echo "| resolution | batch | kiln cube-cuda f32 ms | PyTorch f32 ms | PyTorch bf16 ms | kiln/PyTorch f32 |" > "$out/table.md"
echo "|---|---|---|---|---|---|" >> "$out/table.md"
for cfg in "224 32" "448 8" "896 2"; do
    set -- $cfg
    res=$1; batch=$2
    dir=$out/models/siglip-so400m-14-$res
    [ -f "$dir/model.safetensors" ] || "$kiln" synth "siglip-so400m-14-$res" -o "$dir" >> "$out/log.txt" 2>&1
    kj=$(timeout 600 "$kiln" bench "$dir" --backend cube --device cuda --batch "$batch" --runs 10 --json 2>> "$out/log.txt" | tail -1)
    echo "$kj" > "$out/kiln_${res}_b${batch}.json"
    tj=$(timeout 600 "$py" - "$dir" "$batch" <<'PY' 2>> "$out/log.txt" | tail -1
import json, statistics, sys, time, torch
from transformers import SiglipVisionModel
d, b = sys.argv[1], int(sys.argv[2])
res = {}
for name, dt in (("f32", torch.float32), ("bf16", torch.bfloat16)):
    torch.backends.cuda.matmul.allow_tf32 = False
    m = SiglipVisionModel.from_pretrained(d, dtype=dt, attn_implementation="sdpa").cuda().eval()
    s = m.config.image_size
    x = torch.rand(b, 3, s, s, device="cuda", dtype=dt) * 2 - 1
    ts = []
    with torch.inference_mode():
        for i in range(13):
            torch.cuda.synchronize(); t = time.perf_counter()
            m(pixel_values=x)
            torch.cuda.synchronize()
            if i >= 3:
                ts.append((time.perf_counter() - t) * 1e3)
    res[name + "_median_ms"] = statistics.median(ts)
    del m; torch.cuda.empty_cache()
res["torch"] = torch.__version__
print(json.dumps(res))
PY
)
    echo "$tj" > "$out/torch_${res}_b${batch}.json"
    row=$("$py" - "$kj" "$tj" "$res" "$batch" <<'PY'
import json, sys
def get(s):
    try:
        return json.loads(s)
    except Exception:
        return {}
k, t = get(sys.argv[1]), get(sys.argv[2])
km, tf, tb = k.get("median_ms"), t.get("f32_median_ms"), t.get("bf16_median_ms")
f = lambda v: f"{v:.2f}" if isinstance(v, (int, float)) else "failed"
ratio = f"{km / tf:.2f}" if km and tf else "-"
print(f"| {sys.argv[3]} | {sys.argv[4]} | {f(km)} | {f(tf)} | {f(tb)} | {ratio} |")
PY
)
    echo "$row" >> "$out/table.md"
    log "$row"
done

{
    echo "# cube backend on $card, $(date -u +%Y-%m-%d)"
    echo
    echo "parity (cpu + cube-cuda, rc $parity_rc): $parity_line"
    echo
    cat "$out/table.md"
} > "$out/summary.md"
echo
cat "$out/summary.md"
