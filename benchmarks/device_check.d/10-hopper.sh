# benchmarks/device_check.d/10-hopper.sh — issue 10, sourced by benchmarks/device_check.sh after the memcheck.
# The Hopper FP8-wgmma GEMMs (csrc/cuda/w4a4_gemm_sm90*.cu), standalone (benchmarks/probes/sm90_gemm_check.cu).
# The ops bound to them (backend "cuda-sm90") are checked by the other stages: tests/test_cuda_sm90.py in
# `pytest`, the memcheck case, and the layer rows svdq_r32 / svdq_w4a8_r32 / svdq_mma_r32 in `bench`.
# sm_90 only; other GPUs: skipped, ok.
#   quant     quantize_act_fp8 (W4A8 activations) bit for bit vs the spec -> quant.json
#   check     exact W4A4 and W4A8 x bf16/fp16, odd M, N % 128 != 0, r in {0,16,32,64,256}, vs a double
#             reference of spec §4.2 / §8.2 (rel <= 1e-3 and the §4.3 element bound) -> check.json
#   memcheck  compute-sanitizer on one small case of each format -> memcheck.txt
#   bench     M = 4608, the four FLUX.1 shapes, r = 32: GEMM-only ms vs cuBLAS bf16 -> bench.json
#             (layer-JSON schema: shapes[].ms / tflops / speedup_vs_bf16; rows svdq_sm90_gemm_r32 (exact),
#             svdq_w4a8_gemm_r32; quantize_act not included)
# Results: $OUT/hopper_gemm/.
hopper_gemm() {
  local d=$OUT/hopper_gemm cuda=${CUDA_HOME:-/usr/local/cuda}
  mkdir -p "$d"
  local cc
  cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
  if [ "$cc" != "9.0" ]; then echo "hopper_gemm: compute capability '$cc' is not 9.0: skipped"; return 0; fi
  # cuBLAS (bf16 baseline): the toolkit's, else the one in torch's nvidia wheels
  local inc="" lib="-lcublas"
  if [ ! -f "$cuda/include/cublas_v2.h" ]; then
    local nv
    nv=$($PY -c "import nvidia, os; print(list(nvidia.__path__)[0])" 2>/dev/null)
    local sub
    for sub in cu13 cu12 cublas; do
      if [ -f "$nv/$sub/include/cublas_v2.h" ]; then
        inc="-I$nv/$sub/include"
        lib="-L$nv/$sub/lib -l:$(cd "$nv/$sub/lib" && ls libcublas.so.* | head -1) -Xlinker -rpath=$nv/$sub/lib"
        break
      fi
    done
  fi
  # shellcheck disable=SC2086
  "$cuda/bin/nvcc" -O3 -std=c++17 -I"$ROOT/csrc" $inc -gencode=arch=compute_90a,code=sm_90a -o "$d/gemm_check" \
    "$ROOT/benchmarks/probes/sm90_gemm_check.cu" "$ROOT/csrc/cuda/w4a4_gemm_sm90.cu" \
    "$ROOT/csrc/cuda/w4a4_gemm_sm90_w4a8.cu" "$ROOT/csrc/cuda/quantize_act_fp8.cu" $lib >"$d/build.log" 2>&1 || { tail -30 "$d/build.log"; return 1; }
  local rc=0
  timeout 60 "$d/gemm_check" quant >"$d/quant.json" || rc=1
  cat "$d/quant.json"
  timeout 60 "$d/gemm_check" check >"$d/check.json" || rc=1
  tail -c 3000 "$d/check.json"
  local cs
  cs=$(command -v compute-sanitizer || echo "$cuda/bin/compute-sanitizer")
  timeout 90 "$cs" --tool memcheck --error-exitcode 9 --print-limit 20 "$d/gemm_check" memcheck >"$d/memcheck.txt" 2>&1 || rc=1
  tail -5 "$d/memcheck.txt"
  timeout 60 "$d/gemm_check" bench >"$d/bench.json" || rc=1
  cat "$d/bench.json"
  rm -f "$d/gemm_check"
  return $rc
}
export -f hopper_gemm
stage hopper_gemm 150 hopper_gemm
