#!/usr/bin/env bash
# Downloads, into ./.whl (git-ignored), the pure-Python wheels the lent GPU machine lacks for the model
# benchmark (its image has torch, transformers, safetensors, pillow, ... but no diffusers; no network there).
# Run here, then pass carry=[".whl"] to the device tool; benchmarks/device_check.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
  diffusers==0.42.1 peft==0.21.2 importlib_metadata  # zipp, regex, requests, huggingface_hub, pillow, accelerate: already there (peft: diffusers' LoRA API, stage 70-diffusers-native)
ls -la .whl
