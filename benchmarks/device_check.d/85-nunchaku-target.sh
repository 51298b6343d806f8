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
