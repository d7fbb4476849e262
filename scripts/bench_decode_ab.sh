#!/bin/bash
# Decode ms per token of two kiln binaries, alternating, each on its own generation artifact
# (prompt bucket 16, 8 new tokens) of the same model folder, with each side's steps and kernel
# launches from `kiln inspect --json`.
# usage: scripts/bench_decode_ab.sh BIN_A BIN_B MODEL_DIR RUNS ROUNDS [extra compile flags]
set -euo pipefail
A=$1; B=$2; M=$3; RUNS=$4; ROUNDS=$5; shift 5
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
for side in A B; do
  bin=${!side}
  "$bin" compile "$M" --generate --seq-len 16 --max-new-tokens 8 "$@" -o "$T/$side.kiln" >/dev/null 2>&1
  echo "$side ($bin): $("$B" inspect "$T/$side.kiln" --json | python3 -c 'import json,sys; e=json.load(sys.stdin)["entries"]; print(", ".join("%s %d steps %d launches" % (k, v["steps"], v["launches"]) for k, v in e.items()))')"
done
for r in $(seq "$ROUNDS"); do
  for side in A B; do
    bin=${!side}
    "$bin" bench "$T/$side.kiln" --entry decode --runs "$RUNS" --json 2>/dev/null |
      python3 -c 'import json,sys; d=json.load(sys.stdin); print("round '"$r"' '"$side"': median %.4f ms, min %.4f ms" % (d["median_ms"], d["min_ms"]), end="")'
    echo "  (load $(cut -d' ' -f1 /proc/loadavg))"
  done
done
