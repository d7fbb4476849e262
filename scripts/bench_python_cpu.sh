#!/usr/bin/env bash
# kiln's Python package on the CPU (scripts/bench_python.py): SigLIP B/16 (random weights from
# `kiln synth`) at a reduced resolution, images/s through Ray Data with 1 and 2 actors against
# single-process Session.run on the same images, and the Python call overhead per run on the
# tiny SigLIP fixture against `kiln bench` of the same artifact. Release builds of the wheel
# and of the CLI; the virtualenv is scripts/test_python.sh's.
#   scripts/bench_python_cpu.sh [images] [repeats] [resolution]
set -euo pipefail
cd "$(dirname "$0")/.."
images=${1:-256}
repeats=${2:-3}
resolution=${3:-112}
out=bench-out/python
mkdir -p "$out"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
[ -x .venv/bin/python ] || bash scripts/test_python.sh
(cd python && VIRTUAL_ENV="$PWD/../.venv" PATH="$PWD/../.venv/bin:$PATH" maturin build --release --locked -o ../target/wheels-release)
.venv/bin/python -m pip install -q --disable-pip-version-check --force-reinstall --no-deps target/wheels-release/kiln-*.whl
cargo build --release --locked --features cuda --bin kiln
[ -d "$out/siglip-b16-224" ] || ./target/release/kiln synth siglip-b16-224 -o "$out/siglip-b16-224"
grep -m1 'model name' /proc/cpuinfo
echo "cores: $(nproc)"
RAY_USAGE_STATS_ENABLED=0 .venv/bin/python scripts/bench_python.py --model "$out/siglip-b16-224" --resolution "$resolution" \
  --images "$images" --repeats "$repeats" --tiny tests/fixtures/siglip/vision_map --kiln target/release/kiln --tmp "$out"
