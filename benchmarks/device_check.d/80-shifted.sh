# benchmarks/device_check.d/80-shifted.sh — issues 13/16 (shifted unsigned activations, docs/numerics.md §10),
# sourced by benchmarks/device_check.sh.
#   shifted   tests/test_shifted_act.py on the device machine: the CPU kernels' host harness for every ISA its CPU
#             runs (this machine's CPU has AVX-512 VNNI where the build machine has AVX2 only: the vpdpbusd path
#             with unsigned activation codes is checked bit for bit there), and a shifted SVDQLinear on CUDA
#             (reference fallback on canonical weights) vs the CPU reference.
# Results: $OUT/shifted/pytest.txt (the -rA summary lists which ISA levels ran).
shifted() {
  local d=$OUT/shifted
  mkdir -p "$d"
  grep -o -w 'avx512_vnni\|avx512bw\|avx2' /proc/cpuinfo | sort -u >"$d/cpu_flags.txt" 2>/dev/null
  (cd "$ROOT" && $PY -m pytest -q -p no:cacheprovider tests/test_shifted_act.py -k "cpu_kernels or cuda" -rA) \
    >"$d/pytest.txt" 2>&1
}
export -f shifted
stage shifted 90 shifted
