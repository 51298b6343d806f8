# benchmarks/device_check.d/50-reliability.sh — issue 18, sourced by benchmarks/device_check.sh after the memcheck.
#   grads     tests/test_reliability.py on the GPU: SVDQLinear's backward on the cuda backend (bf16) vs the
#             straight-through-estimator reference, bad inputs (int / fp64 / bool / 0-dim) a clear error on cuda
#   checksum  benchmarks/checksum_cost.py: CRC-32 cost at FLUX.1-dev sizes on the device machine's cores
# Results: $OUT/reliability/ (pytest log, checksum.json).
reliability() {
  local d=$OUT/reliability
  mkdir -p "$d"
  (cd "$ROOT" && $PY -m pytest -q -p no:cacheprovider tests/test_reliability.py -k "cuda" -rA) >"$d/grads.txt" 2>&1
  local rc=$?
  $PY "$ROOT/benchmarks/checksum_cost.py" >"$d/checksum.json" 2>"$d/checksum.err"
  return $rc
}
export -f reliability
stage reliability 150 reliability
