# benchmarks/device_check.d/pre-hopper-probe.sh — issue 10, sourced by benchmarks/device_check.sh before the build.
# Hopper probes (sm_90 only; other GPUs: skipped, ok): compiles benchmarks/probes/hopper_probe_main.cu for
# sm_90a and runs
#   exact  e4m3 wgmma group sums vs exact sums, bit for bit (±8·±8 extremes |I| = 4096, random, cancelling;
#          W4A8 wide-exponent activations: the accumulator's worst error in fp32 ulps) — through the GEMM's own
#          smem layout and descriptors, so it also checks those on hardware;
#   tops   the design study's consumer-loop probes (int8 / e4m3 SS / e4m3 RS sign-magnitude / W4A8 e4m3 /
#          W4A8 int8), no global memory, two consumer warpgroups;
# and counts the GEMMs' main-loop SASS (benchmarks/probes/sass_loops.py). Results: $OUT/hopper_probe/.
hopper_probe() {
  local d=$OUT/hopper_probe cuda=${CUDA_HOME:-/usr/local/cuda}
  mkdir -p "$d"
  local cc
  cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
  if [ "$cc" != "9.0" ]; then echo "hopper_probe: compute capability '$cc' is not 9.0: skipped"; return 0; fi
  "$cuda/bin/nvcc" -O3 -std=c++17 -I"$ROOT/csrc" -I"$ROOT/benchmarks/probes" -gencode=arch=compute_90a,code=sm_90a \
    -Xptxas -v -o "$d/probe" "$ROOT/benchmarks/probes/hopper_probe_main.cu" >"$d/build.log" 2>&1 ||
    { tail -30 "$d/build.log"; return 1; }
  local rc=0
  timeout 60 "$d/probe" exact >"$d/exact.json" || rc=1
  timeout 60 "$d/probe" tops >"$d/tops.json" || rc=1
  cat "$d/exact.json" "$d/tops.json"
  # SASS per warp per group of the GEMMs' main loops (the budget next to the kernel); cuobjdump: the
  # toolkit's, else the triton wheel's
  local f cuobj=$cuda/bin/cuobjdump
  [ -x "$cuobj" ] || cuobj=$(command -v cuobjdump || $PY -c "import triton, os; print(os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin/cuobjdump'))" 2>/dev/null)
  for f in w4a4_gemm_sm90 w4a4_gemm_sm90_w4a8; do  # both compiles at once
    "$cuda/bin/nvcc" -O3 -std=c++17 -lineinfo -I"$ROOT/csrc" -gencode=arch=compute_90a,code=sm_90a -cubin \
      -Xptxas -v -o "$d/$f.cubin" "$ROOT/csrc/cuda/$f.cu" >"$d/$f.ptxas.log" 2>&1 &
  done
  wait
  for f in w4a4_gemm_sm90 w4a4_gemm_sm90_w4a8; do
    [ -f "$d/$f.cubin" ] || rc=1
    "$cuobj" --dump-sass "$d/$f.cubin" >"$d/$f.sass" 2>&1 &&
      $PY "$ROOT/benchmarks/probes/sass_loops.py" "$d/$f.sass" --json >"$d/$f.sass_loops.json"
    rm -f "$d/$f.cubin" "$d/$f.sass"
  done
  cat "$d"/*.sass_loops.json | grep -E '"instructions"|gemm_sm90_kernel' || true
  rm -f "$d/probe"
  return $rc
}
export -f hopper_probe
stage hopper_probe 100 hopper_probe
