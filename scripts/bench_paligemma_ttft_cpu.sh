#!/usr/bin/env bash
# Time to first token of PaliGemma 2 3B at 224 px on the CPU: kiln against transformers, on the
# same random full-size weights (`kiln synth paligemma2-3b-224`, bf16 on disk, f32 compute in
# both), the same image and prompt, one after the other in the same run.
#   kiln: `kiln generate --prompt --image --max-new-tokens 1`; its first_token_ms covers reading
#         tokenizer.json, decoding + preprocessing the image, tokenizing, the prefill (SigLIP
#         tower, projector, 256 image + text tokens through Gemma 2) and the argmax; the compile
#         before it is reported apart (compile_ms).
#   transformers: PaliGemmaProcessor(text, image) + generate(max_new_tokens=1), eager attention,
#         float32; the first call after from_pretrained and a second (warm) call are both shown.
# Usage: scripts/bench_paligemma_ttft_cpu.sh [threads]
# Needs /opt/kiln-venv (or KILN_VENV), ~7 GB of disk (removed at the end unless KILN_KEEP=1),
# and ~14 GB of free memory (each side holds the weights as f32 while it runs).
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
venv=${KILN_VENV:-/opt/kiln-venv}
dir=${KILN_BENCH_DIR:-/tmp/kiln-bench}/paligemma2-3b-224
kiln=${KILN_BIN:-./target/release/kiln}
[ -n "${KILN_BIN:-}" ] || cargo build --release --locked --quiet --bin kiln
[ -f "$dir/model.safetensors" ] || "$kiln" synth paligemma2-3b-224 -o "$dir"
# A tokenizer with PaliGemma's layout, the released preprocessor_config.json and a test image.
"$venv/bin/python" scripts/make_paligemma_assets.py "$dir" 224
export RAYON_NUM_THREADS=$threads
echo "load average before: $(cat /proc/loadavg)"
kiln_json=$("$kiln" generate "$dir" --prompt "caption en" --image "$dir/bench.jpg" --max-new-tokens 1 2>&1 >/dev/null | grep '^{')
torch_json=$("$venv/bin/python" - "$dir" "$threads" <<'PY'
import json, sys, time, torch
from PIL import Image
from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor
d, threads = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(threads)
model = PaliGemmaForConditionalGeneration.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
proc = PaliGemmaProcessor.from_pretrained(d)
times = []
for _ in range(2):
    t = time.perf_counter()
    inputs = proc(text="<image>caption en", images=Image.open(f"{d}/bench.jpg"), return_tensors="pt")
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    times.append((time.perf_counter() - t) * 1e3)
print(json.dumps({"first_token_ms": times[0], "warm_first_token_ms": times[1], "prompt_tokens": inputs["input_ids"].shape[1]}))
PY
)
echo "load average after: $(cat /proc/loadavg)"
echo "kiln:         $kiln_json"
echo "transformers: $torch_json"
python3 - "$kiln_json" "$torch_json" <<'PY'
import json, sys
k, t = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"time to first token ({k['prompt_tokens']} prompt tokens): kiln {k['first_token_ms']:.0f} ms "
      f"(compile {k['compile_ms']:.0f} ms apart), transformers {t['first_token_ms']:.0f} ms first call, "
      f"{t['warm_first_token_ms']:.0f} ms warm; transformers/kiln {t['first_token_ms']/k['first_token_ms']:.2f}x first, "
      f"{t['warm_first_token_ms']/k['first_token_ms']:.2f}x warm")
PY
[ "${KILN_KEEP:-0}" = 1 ] || rm -rf "$dir"
