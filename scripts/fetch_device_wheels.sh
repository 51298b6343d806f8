#!/usr/bin/env bash
# Fills ./.whl (git-ignored) with what the lent GPU machine lacks: the pure-Python wheels for the model benchmark
# (its image has torch, transformers, safetensors, pillow, ... but no diffusers; no network there), and svdq's
# own wheel built from this checkout for sm_90 (stable ABI: it loads into the machine's torch 2.11 as it is, so
# the device script skips its ~5-minute compile). Run here after scripts/setup.sh, then pass carry=[".whl"] to
# the device tool; benchmarks/device_check.sh installs / uses them.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
  diffusers==0.42.1 peft==0.21.2 importlib_metadata  # zipp, regex, requests, huggingface_hub, pillow, accelerate: already there (peft: diffusers' LoRA API, stage 70-diffusers-native)
rm -f .whl/svdq-*.whl
# Its own CMake tree (archs 90 only), so that scripts/setup.sh's tree keeps every shipped arch.
SVDQ_CUDA_ARCHS=90 SVDQ_BUILD_DIR=build/cmake-device .venv/bin/python -m pip wheel -q --no-build-isolation --no-deps \
  -w .whl .
ls -la .whl
