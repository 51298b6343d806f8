#!/usr/bin/env bash
# The wheel runs on a torch other than the one it was built with (docs/building.md, "One build for every torch"):
# builds `pip wheel` from this checkout with .venv's torch (reusing scripts/setup.sh's CMake tree, so it only
# relinks), installs it into a fresh venv (build/wheel-venv) with torch $SVDQ_WHEEL_TORCH (default 2.13.0, a
# CPU build: a different version *and* no CUDA), the other pins of requirements-dev.txt as constraints, and
# runs scripts/wheel_smoke.py there, outside the checkout. CI runs it after the tests (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OTHER_TORCH=${SVDQ_WHEEL_TORCH:-2.13.0}
start=$(date +%s)
rm -rf build/wheel-check && mkdir -p build/wheel-check
.venv/bin/python -m pip wheel -q --no-build-isolation --no-deps -w build/wheel-check .
wheel=$(ls build/wheel-check/svdq-*.whl)
echo "wheel: $wheel ($(( $(date +%s) - start )) s)"
grep -v -E '^\s*(#|$|torch==)' requirements-dev.txt > build/wheel-check/constraints.txt
rm -rf build/wheel-venv
"${PYTHON:-python3}" -m venv build/wheel-venv
build/wheel-venv/bin/python -m pip install -q --upgrade pip
build/wheel-venv/bin/python -m pip install -q -c build/wheel-check/constraints.txt "torch==$OTHER_TORCH" \
  "$wheel" transformers sentencepiece protobuf
echo "venv with torch $OTHER_TORCH: $(( $(date +%s) - start )) s"
(cd /tmp && "$ROOT/build/wheel-venv/bin/python" "$ROOT/scripts/wheel_smoke.py" --expect-torch "${OTHER_TORCH%.*}")
echo "wheel check: $(( $(date +%s) - start )) s"
