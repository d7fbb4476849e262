#!/usr/bin/env bash
# The Python package's tests (scripts/test.sh runs this after cargo test): a virtualenv in
# .venv/ (git-ignored) with maturin, numpy, pytest, pillow, pyarrow, ray[data], torch and
# safetensors (scripts/device_fixtures.py, which scripts/test.sh runs on the emulated cuda), the
# wheel built by maturin (the dev profile, so it shares cargo test's build of the workspace),
# then pytest over python/tests. The tests run the CLI that cargo test built (target/debug/kiln).
# torch comes from PyPI: its CPU-only index is not reachable from the machines this project
# runs on (the PyPI wheel runs on a CPU; it is larger).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$PWD/.venv"
py=python3
if ! "$py" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null; then
  echo "python3 >= 3.10 is needed for the Python package" >&2
  exit 1
fi
if ! "$py" -c 'import venv, ensurepip' 2>/dev/null; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  echo "installing python3-venv"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-venv
fi
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
# Pinned where a change of version could change results or break the test's use of the API.
want=(maturin==1.16.0 numpy pytest pillow pyarrow "ray[data]==2.60.0" torch safetensors)
if ! "$venv/bin/python" -c 'import maturin, numpy, pytest, PIL, pyarrow, ray.data, torch, safetensors' 2>/dev/null; then
  echo "installing ${want[*]} into .venv"
  "${pip[@]}" "${want[@]}"
fi
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
rm -rf target/wheels
(cd python && VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH" maturin build --profile dev --locked -o ../target/wheels)
"${pip[@]}" --force-reinstall --no-deps target/wheels/kiln-*.whl
cd python
RAY_USAGE_STATS_ENABLED=0 "$venv/bin/python" -m pytest -q -p no:cacheprovider tests
