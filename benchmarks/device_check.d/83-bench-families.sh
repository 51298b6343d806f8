# benchmarks/device_check.d/83-bench-families.sh — issue 15 item 2 (`svdq bench --model` for the generic family),
# sourced by benchmarks/device_check.sh. Needs diffusers (carried wheels). Not in plan A or B of
# docs/device_check.md (both are full): select it with SVDQ_CHECK_ONLY=env,build,svdq_bench_families.
#   svdq_bench_families  full-size Z-Image-Turbo (6.15 B parameters, 11.5 GiB bf16; synthetic weights) at 512²,
#                        eager only, bf16 / fp8 / svdq: the first GPU run of the generic path — parameters
#                        materialized from meta with the class's own buffers, the layer plan from one traced
#                        forward on the GPU, fp8 swapping the plan's W4A4 linears, data-free quantization of the
#                        fused model, the CUDA backend on it. Expected well under the box: build and trace
#                        seconds, the data-free quantization of 224 layers the longest part (not measured yet).
# Results: $OUT/svdq_bench_families/bench_<device>_z-image-turbo.{json,md,png}.
if $PY -c "import diffusers" 2>/dev/null; then
  stage svdq_bench_families 120 $PY -m svdq bench --model z-image-turbo --res 512 --no-compile --no-profile \
    --variants bf16,fp8,svdq --repeats 3 --warmup 1 --out "$OUT/svdq_bench_families"
else
  log "SKIP svdq_bench_families: diffusers is not importable (run scripts/fetch_device_wheels.sh here, carry .whl)"
fi
