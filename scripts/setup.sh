#!/usr/bin/env bash
# Creates ./.venv (if missing), installs the pinned dependencies and builds svdq with its native extension
# (C++ CPU kernels; CUDA kernels too when the CUDA toolkit is found — see docs/building.md).
# Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements-dev.txt
start=$(date +%s)
# --no-build-isolation: build against the torch installed above (the extension must match it).
.venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
echo "svdq build: $(( $(date +%s) - start )) s"
.venv/bin/python -c 'import svdq, json; print("svdq build_info:", json.dumps(svdq.build_info())); print("backends:", svdq.ops.available_backends())'
