#!/usr/bin/env bash
# Cold start on the CPU: load time and time to first token of a kiln artifact loaded the
# ordinary way (map the checkpoint, convert and pack every weight: `--no-prepared`) against its
# prepared weight file (`<artifact>.weights`, mapped and used in place) and against
# transformers (`from_pretrained` + the first forward call), on the same synthesized
# full-size weights (`kiln synth`, bf16 on disk, f32 compute everywhere), one after the other
# in the same run, sides alternated, each repeated.
#   kiln: `kiln bench ART --runs 1 --json`: load_ms (artifact read, weights mapped, prepared or
#         packed), first_run_ms (the first forward after the load: the prompt's logits, i.e. the
#         first token); wall and peak RSS of the whole process from /usr/bin/time (the process
#         also runs the forward a second time, so its wall is above load + first).
#   transformers: from_pretrained(dtype=float32, eager attention) then model(**inputs) once.
#   warm: the files the side reads (checkpoint, or prepared file) are read once with `cat`
#         right before the run (page cache warm); cold: `echo 3 > /proc/sys/vm/drop_caches`
#         before the run (needs root; the script says when it could not drop them). On a
#         virtual machine the host may still cache the disk: a cold read can be fast.
# Usage: scripts/bench_prepared_cpu.sh [models...]   (default: paligemma2-3b-224 gemma2-2b)
#   A model is a `kiln synth` name (synthesized into $KILN_BENCH_DIR/<name> unless there) or
#   the path of an existing checkpoint folder (read in place, never deleted; its artifact and
#   prepared file go to $KILN_BENCH_DIR/<folder name>.kiln[.weights]).
# Env: KILN_BENCH_DIR (default /work/bench-ckpt), KILN_BIN, KILN_PY (python with torch and
# transformers), REPS (default 2), THREADS (default 2), KEEP=1 keeps the files this run made
# (the artifact, its prepared file and a checkpoint it synthesized; never a folder given).
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${THREADS:-2}
root=${KILN_BENCH_DIR:-/work/bench-ckpt}
kiln=${KILN_BIN:-./target/release/kiln}
py=${KILN_PY:-/work/fixvenv/bin/python}
reps=${REPS:-2}
models=${*:-paligemma2-3b-224 gemma2-2b}
export RAYON_NUM_THREADS=$threads OMP_NUM_THREADS=$threads
mkdir -p "$root"
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cpus, threads $threads"

cache_state() { # warm|cold files...
  local how=$1; shift
  if [ "$how" = cold ]; then
    sync
    if ! echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then echo "  (could not drop the page cache: this 'cold' run is warm)"; fi
  else
    cat "$@" >/dev/null
  fi
}

kiln_side() { # name art cache extra-flags...
  local name=$1 art=$2 cache=$3; shift 3
  if [ "${1:-}" = --no-prepared ]; then cache_state "$cache" "$dir"/*.safetensors; else cache_state "$cache" "$art.weights"; fi
  local j
  j=$(/usr/bin/time -f '%e %M' -o "$root/time.txt" "$kiln" bench "$art" --runs 1 --json "$@" 2>"$root/err.txt" | grep '^{')
  read -r wall rss <"$root/time.txt"
  local how
  how=$( (grep -o '^load: [a-z]*\|checksums verified in [0-9]* ms' "$root/err.txt" || true) | paste -sd' ')
  python3 - "$j" "$wall" "$rss" "$name" "$cache" "$how" <<'PY'
import json, sys
j, wall, rss, name, cache, how = json.loads(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:]
print(f"  {name:<22} {cache:<5} load {j['load_ms']:8.0f} ms  first token {j['first_run_ms']:8.0f} ms  "
      f"load+first {j['load_ms'] + j['first_run_ms']:8.0f} ms  process wall {wall:6.1f} s  peak RSS {rss / 1048576:5.2f} GiB  ({how})")
PY
}

torch_side() { # dir cache seq
  local dir=$1 cache=$2 seq=$3
  cache_state "$cache" "$dir"/*.safetensors
  local j
  j=$(/usr/bin/time -f '%e %M' -o "$root/time.txt" "$py" - "$dir" "$threads" "$seq" 2>"$root/err.txt" <<'PY' | grep '^{'
import json, sys, time
t0 = time.perf_counter()
import torch
import transformers
d, threads, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
cfg = json.load(open(f"{d}/config.json"))
t1 = time.perf_counter()
if cfg.get("model_type") == "paligemma":
    model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    img = model.config.image_token_id
    n_img = model.config.text_config.num_image_tokens if hasattr(model.config.text_config, "num_image_tokens") else 256
    ids = torch.tensor([[img] * 256 + [2] + [(i * 31) % 97 + 2 for i in range(seq - 257)]])
    res = model.config.vision_config.image_size
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.rand(1, 3, res, res) * 2 - 1)
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.tensor([[2] + [(i * 31) % 97 + 2 for i in range(seq - 1)]])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
t2 = time.perf_counter()
with torch.no_grad():
    model(**inputs)
t3 = time.perf_counter()
print(json.dumps({"import_ms": (t1 - t0) * 1e3, "load_ms": (t2 - t1) * 1e3, "first_run_ms": (t3 - t2) * 1e3}))
PY
  ) || { grep -v 'Loading weights' "$root/err.txt"; return 1; }
  read -r wall rss <"$root/time.txt"
  python3 - "$j" "$wall" "$rss" "$cache" <<'PY'
import json, sys
j, wall, rss, cache = json.loads(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
print(f"  {'transformers':<22} {cache:<5} load {j['load_ms']:8.0f} ms  first token {j['first_run_ms']:8.0f} ms  "
      f"load+first {j['load_ms'] + j['first_run_ms']:8.0f} ms  process wall {wall:6.1f} s  peak RSS {rss / 1048576:5.2f} GiB  "
      f"(import torch+transformers {j['import_ms']:.0f} ms apart)")
PY
}

for m in $models; do
  made=0
  if [ -d "$m" ]; then
    dir=$(cd "$m" && pwd)
    name=$(basename "$dir")
  else
    dir=$root/$m
    name=$m
    if [ ! -f "$dir/config.json" ]; then
      "$kiln" synth "$m" -o "$dir" >/dev/null
      made=1
    fi
  fi
  case $name in
    paligemma*) seq=264 ;; # 256 image tokens + 8 text tokens
    *) seq=64 ;;
  esac
  art=$root/$name.kiln
  echo "== $name: $dir (--seq-len $seq), df: $(df -h --output=avail "$root" | tail -1 | xargs) free"
  /usr/bin/time -f '  compile + prepared file: %e s, peak RSS %M KiB' "$kiln" compile "$dir" --seq-len "$seq" -o "$art" | grep -E '^(compiled|prepared)' | sed 's/^/  /'
  echo "  sizes: checkpoint $(du -sh "$dir" | cut -f1), prepared file $(du -h "$art.weights" | cut -f1)"
  for r in $(seq 1 "$reps"); do
    echo " rep $r (load average $(cut -d' ' -f1-3 /proc/loadavg))"
    for cache in warm cold; do
      # Alternate which side goes first in each repetition.
      if [ $((r % 2)) = 1 ]; then
        kiln_side "kiln (today: pack)" "$art" "$cache" --no-prepared
        kiln_side "kiln (prepared)" "$art" "$cache"
      else
        kiln_side "kiln (prepared)" "$art" "$cache"
        kiln_side "kiln (today: pack)" "$art" "$cache" --no-prepared
      fi
      torch_side "$dir" "$cache" "$seq"
    done
  done
  if [ "${KEEP:-0}" != 1 ]; then
    rm -f "$art" "$art.weights"
    if [ $made = 1 ]; then rm -rf "$dir"; fi
  fi
done
rm -f "$root/time.txt" "$root/err.txt"
