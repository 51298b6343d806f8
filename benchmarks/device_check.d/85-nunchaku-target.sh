# benchmarks/device_check.d/85-nunchaku-target.sh — issue 13 (quantizing in Nunchaku's form: an exact export),
# sourced by benchmarks/device_check.sh. Needs diffusers (carried wheels). ≈ 30 s.
#   nunchaku_target  a tiny FLUX.1 quantized with target="nunchaku" (shifted mlp_fc2 layers, split single-block
#                    proj_out, W4A16 AdaNorm with exact + 1), exported with export_flux and loaded back, both run
#                    on CUDA: bit-exact? On the CPU it is (tests/test_nunchaku_target.py). On CUDA the shifted
#                    layers run the reference ops (no §10 CUDA kernel) in both models; the loaded model runs the
#                    single blocks' q/k/v and proj_mlp as two GEMMs where the svdq model runs one fused GEMM, so
#                    equality needs per-output sums independent of N. Records max |diff| and the relative error.
# Results: $OUT/nunchaku_target/check.json.
nunchaku_target() {
  mkdir -p "$OUT/nunchaku_target"
  $PY - "$OUT/nunchaku_target/check.json" <<'PYEOF'
import os, sys, tempfile, torch
sys.path.insert(0, os.path.join(os.environ["ROOT"], "benchmarks"))
import device_compare
import svdq
from svdq.formats import nunchaku as nk
from svdq.testing import tiny
dev = torch.device("cuda")
inp = device_compare.tiny_flux_inputs(dev)
model = tiny.tiny_flux_transformer(0, dtype=torch.bfloat16)
svdq.models.prepare(model)
model.to(dev)
svdq.quantize(model, rank=16, progress=False, target="nunchaku", rounding="nearest",
              calibration=lambda m: m(**inp, return_dict=False))
path = nk.export_flux(model, tempfile.mkdtemp() + "/svdq-int4_r16-tiny.safetensors")
loaded = svdq.from_pretrained(path, device="cuda")
with torch.no_grad():
    a, b = model(**inp, return_dict=False)[0], loaded(**inp, return_dict=False)[0]
sys.exit(device_compare.report(a, b, dev, sys.argv[1]))
PYEOF
}
export -f nunchaku_target
stage nunchaku_target 90 nunchaku_target

# shifted_speed  docs/kernels.md §13's prediction: a FLUX.1 fc2-shaped layer (M 4608, K 12288, N 3072, rank 32)
#                shifted (the reference ops: no CUDA kernel for numerics §10) against the same layer signed (the
#                CUDA kernels), ms per call. Predicted ≈ 5–10 ms vs ≈ 0.3 ms. Results: $OUT/shifted_speed/result.json.
#                (SVDQ_STAGE_DEVICE=cpu SVDQ_STAGE_SHAPE=64,512,256 dry-run the script here, untimed.)
shifted_speed() {
  mkdir -p "$OUT/shifted_speed"
  $PY - "$OUT/shifted_speed/result.json" <<'PYEOF'
import json, os, sys, torch
import svdq
from svdq.bench.cuda_timing import TIMING, time_fn
from svdq.linear import SVDQLinear
dev = torch.device(os.environ.get("SVDQ_STAGE_DEVICE", "cuda"))
m, k, n = (int(v) for v in os.environ.get("SVDQ_STAGE_SHAPE", "4608,12288,3072").split(","))
res = {"shape": {"M": m, "K": k, "N": n, "rank": 32}, "backend": svdq.ops.select_backend(dev).name}
torch.manual_seed(0)
lin = torch.nn.Linear(k, n, dtype=torch.bfloat16, device=dev)
x = torch.nn.functional.gelu(torch.randn(m, k, device=dev), approximate="tanh").to(torch.bfloat16)
for name, shift in (("signed", 0.0), ("shifted", 0.171875)):
    layer = SVDQLinear.from_linear(lin, rank=32, act_shift=shift)
    with torch.no_grad():
        res[name + "_ms"] = time_fn(lambda: layer(x), warmup=1, iters=3) if dev.type == "cuda" else None
        res[name + "_timing"] = TIMING["method"] if dev.type == "cuda" else "not timed (cpu)"
        layer(x)
    del layer
if res["signed_ms"]:
    res["ratio"] = res["shifted_ms"] / res["signed_ms"]
json.dump(res, open(sys.argv[1], "w"), indent=1)
print(res)
PYEOF
}
export -f shifted_speed
stage shifted_speed 90 shifted_speed
