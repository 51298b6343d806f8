# Issue 12 items 1, 2, 5 (memory a user can measure; docs/models.md "Memory"): sourced by
# benchmarks/device_check.sh after the build. Needs diffusers (scripts/fetch_device_wheels.sh, carry .whl);
# accelerate's two offload modes run only where accelerate imports (else reported as errors in the table).
#   1. the CUDA layout tests: tests/test_memory.py (torch conversion == native repack op, one conversion on
#      arrival, canonical state dict) and tests/test_offload.py (hooks on the CPU, sanity on this image);
#   2. benchmarks/memory_check.py on full-size FLUX.1-dev (synthetic weights, AdaLN W4A16): resident after
#      load (goal <= 6.5 GiB; bf16 22.2 GiB), peak in a 1024² step, 20-step leak check, and per offload mode
#      (group block/leaf with/without streams, accelerate model/sequential) the peak (goal <= 4 GiB with
#      group offloading), step time and weight conversions per step (0 expected).
# Results: $OUT/memory/{pytest.log,memory.json,memory.md}.
memory_tests() {
  mkdir -p "$OUT/memory"
  $PY -m pytest -q -x tests/test_memory.py tests/test_offload.py -p no:cacheprovider >"$OUT/memory/pytest.log" 2>&1
  local rc=$?
  tail -3 "$OUT/memory/pytest.log"
  return $rc
}
export -f memory_tests
stage memory_tests 120 memory_tests
if $PY -c "import diffusers" 2>/dev/null; then
  stage memory_flux_dev 240 $PY benchmarks/memory_check.py --model flux-dev --res 1024 --steps 20 --budget-s 200 \
    --out "$OUT/memory"
else
  log "SKIP memory_flux_dev: diffusers is not importable (run scripts/fetch_device_wheels.sh here, carry .whl)"
fi
