#!/usr/bin/env bash
# Decode milliseconds per token on the tiny Gemma 2 fixture (tests/fixtures/gemma/gemma2_gqa:
# batch 2, prompt 20, vocabulary 300), BEFORE (a kiln whose host downloads the logits and
# chooses each token) against AFTER (the last kernel chooses; the host reads ids and logprobs),
# alternating the two binaries run by run:
#   1. `kiln generate --inputs` greedy and sampled: the JSON line's decode_ms_per_token (wall
#      time of one decode call), and AFTER's host_ms_per_token (the token loop outside the
#      decode entry's Session::run) and decode_run_ms_per_step;
#   2. `kiln bench <gen.kiln> --entry decode --json`: one decode step replayed on synthetic inputs
#      (the median of --runs runs), each side on its own `kiln compile --generate` artifact.
# Usage: BEFORE=/path/to/old/kiln AFTER=target/release/kiln N=5 scripts/bench_decode_select_cpu.sh
set -euo pipefail
BEFORE=${BEFORE:-/work/main/target/release/kiln}
AFTER=${AFTER:-target/release/kiln}
N=${N:-5}
NEW=${NEW:-64}
FIX=tests/fixtures/gemma/gemma2_gqa
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
echo "# $(date -u +%FT%TZ) $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
for side in before after; do
  bin=$BEFORE
  [ "$side" = after ] && bin=$AFTER
  "$bin" compile "$FIX" --generate --seq-len 20 --max-new-tokens "$NEW" --batch 2 -o "$T/$side.kiln" >/dev/null
done
for i in $(seq "$N"); do
  for side in before after; do
    bin=$BEFORE
    [ "$side" = after ] && bin=$AFTER
    for mode in greedy sample; do
      extra=()
      [ "$mode" = sample ] && extra=(--temperature 1.0 --top-k 20 --top-p 0.9 --seed 3)
      line=$("$bin" generate "$FIX" --inputs "$FIX/inputs.safetensors" --out "$T/o.safetensors" --max-new-tokens "$NEW" "${extra[@]}" | grep '^{')
      echo "generate $side $mode $line"
    done
    echo "bench $side $("$bin" bench "$T/$side.kiln" --entry decode --runs 300 --json)"
  done
done
