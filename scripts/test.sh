#!/usr/bin/env bash
# Runs every test of the workspace on a fresh machine. It installs what the tests need first
# (a C compiler and valgrind for the C ABI's tests, lavapipe, Mesa's software Vulkan driver,
# for the cube backend's tests on a machine without a GPU, from apt on Debian/Ubuntu; and
# libnvrtc from the nvidia-cuda-nvrtc wheel, so every CUDA kernel is compiled for sm_90a with
# no GPU), then prints one closing line with the totals. The tests build with the `cuda`
# feature (one build: the cuda backend's code is compiled, its driver-free tests run, and its
# GPU tests run again on the host emulator, KILN_CUDA_EMULATE=1). Then the
# Python package's tests (scripts/test_python.sh: a .venv with maturin, numpy, pytest, torch and
# ray[data], the wheel, pytest over python/tests); the closing line counts both.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null; then
  echo "cargo is missing: install Rust (rustup) first" >&2
  exit 1
fi
missing=()
command -v cc >/dev/null || missing+=(build-essential)
command -v valgrind >/dev/null || missing+=(valgrind)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  echo "installing ${missing[*]} (capi/tests need a C compiler and valgrind)"
  $sudo apt-get update -q
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi
# The cube backend's tests run CubeCL's wgpu runtime; with no GPU, on lavapipe. They fail
# loudly when no adapter exists, so install it here rather than let them fail.
if ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; then
  echo "installing lavapipe (mesa-vulkan-drivers) for the cube backend's tests"
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq mesa-vulkan-drivers
fi
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
# NVRTC for the CUDA kernels' compile checks (FACTS.md: the wheel needs no GPU). Installed
# into .nvrtc/ (git-ignored), once.
nvrtc_dir="$PWD/.nvrtc"
if [ ! -e "$nvrtc_dir/nvidia/cu13/lib/libnvrtc.so.13" ]; then
  if ! python3 -m pip --version >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    echo "installing python3-pip (for the nvidia-cuda-nvrtc wheel)"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-pip
  fi
  echo "installing nvidia-cuda-nvrtc==13.0.88 into $nvrtc_dir"
  python3 -m pip install -q --disable-pip-version-check --target "$nvrtc_dir" nvidia-cuda-nvrtc==13.0.88
fi
export LD_LIBRARY_PATH="$nvrtc_dir/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Tests that compile CUDA kernels fail (not skip) when libnvrtc is missing, and those that run
# them on the CPU (the host emulator, docs/cuda-host-emulator.md) when no C++ compiler is.
export KILN_REQUIRE_NVRTC=1 KILN_REQUIRE_CXX=1
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --all-targets --locked --features kiln/cuda --no-fail-fast 2>&1 | tee "$log" || status=$?
# The cuda backend's GPU tests once more, on the CPU: with KILN_CUDA_EMULATE=1 a cuda load runs
# its program through the host emulator (its kernels built by the C++ compiler), so the cuda rows
# of the op parity table and the half-precision kernel tests run here too (same build:
# `--workspace` keeps the features of the run above, so nothing is compiled again).
echo "== cuda tests on the host emulator (KILN_CUDA_EMULATE=1)"
KILN_CUDA_EMULATE=1 cargo test --workspace --locked --features kiln/cuda --test parity --test cuda_device --no-fail-fast 2>&1 | tee -a "$log" || status=$?
# The test run built the CLI with the same features (for the integration tests): use it
# rather than `cargo run`, which would build every dependency again in the dev profile.
echo "== kiln kernels check --arch sm_90a"
./target/debug/kiln kernels check --arch sm_90a || status=$?
passed=$(awk '/^test result:/ { for (i = 1; i < NF; i++) if ($(i+1) ~ /^passed/) s += $i } END { print s + 0 }' "$log")
failed=$(awk '/^test result:/ { for (i = 1; i < NF; i++) if ($(i+1) ~ /^failed/) s += $i } END { print s + 0 }' "$log")
# The Python package (python/): a virtualenv in .venv/ (git-ignored) with what its tests need,
# the wheel built by maturin, then pytest (python/tests, which also run the CLI built above).
echo "== python: scripts/test_python.sh"
pylog=$(mktemp)
bash scripts/test_python.sh 2>&1 | tee "$pylog" || status=$?
py_passed=$(grep -Eo '[0-9]+ passed' "$pylog" | tail -1 | grep -Eo '[0-9]+' || true)
py_failed=$(grep -Eo '[0-9]+ (failed|error)' "$pylog" | tail -1 | grep -Eo '^[0-9]+' || true)
if [ -z "$py_passed$py_failed" ]; then
  py_failed=1  # pytest never reported: the install or the build failed
  status=1
fi
rm -f "$pylog"
passed=$((passed + ${py_passed:-0}))
failed=$((failed + ${py_failed:-0}))
# The GPU machine's fixture check (scripts/device_cuda.sh's `fixtures` section: every SigLIP,
# Gemma and PaliGemma fixture through `kiln run` / `kiln generate --backend cuda` against the
# PyTorch references) on the emulated cuda backend, with the venv's torch: one test.
echo "== device fixtures on the emulated cuda (scripts/device_fixtures.py, KILN_CUDA_EMULATE=1)"
fixdir=$(mktemp -d)
if KILN_CUDA_EMULATE=1 "$PWD/.venv/bin/python" scripts/device_fixtures.py "$PWD/target/debug/kiln" "$fixdir/none" "$fixdir" | tail -3; then
  passed=$((passed + 1))
else
  failed=$((failed + 1))
  status=1
fi
rm -rf "$fixdir"
echo "tests: ${passed:-0} passed, ${failed:-0} failed"
exit $status
