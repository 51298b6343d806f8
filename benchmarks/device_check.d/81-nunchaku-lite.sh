# benchmarks/device_check.d/81-nunchaku-lite.sh — issue 13 (diffusers nunchaku_lite directories), sourced by
# benchmarks/device_check.sh. Needs diffusers (carried wheels). ≈ 20 s.
#   nunchaku_lite  a tiny FLUX.1 (bf16, W4A16 AdaNorm) exported as a nunchaku_lite directory and loaded back
#                  (svdq/formats/nunchaku_lite.py) runs on CUDA: output bit-exact vs the svdq model on CUDA?
#                  On the CPU it is (tests/test_nunchaku_lite.py); on CUDA the loaded model runs the split
#                  projections (to_q / to_k / to_v, single-block q/k/v + proj_mlp) as separate GEMMs where the
#                  svdq model runs one fused GEMM, and the AdaNorm layers as float-offset W4A16 (tinygemm offset
#                  8·s − 8·s = 0, the symmetric layer's), so equality needs per-output sums independent of N.
#                  Records max |diff| and the relative error either way.
# Results: $OUT/nunchaku_lite/check.json.
nunchaku_lite() {
  mkdir -p "$OUT/nunchaku_lite"
  $PY - "$OUT/nunchaku_lite/check.json" <<'PYEOF'
import os, sys, tempfile, torch
sys.path.insert(0, os.path.join(os.environ["ROOT"], "benchmarks"))
import device_compare
import svdq
from svdq.formats import nunchaku_lite
from svdq.testing import tiny
dev = torch.device("cuda")
inp = device_compare.tiny_flux_inputs(dev)
model = tiny.tiny_flux_transformer(0, dtype=torch.bfloat16)
svdq.models.prepare(model)
svdq.quantize(model, rank=16, progress=False, weight_only=svdq.models.FAMILIES["flux"].adaln)
d = nunchaku_lite.export(model, tempfile.mkdtemp() + "/lite")
loaded = svdq.from_pretrained(d, device="cuda")
model.to(dev)
with torch.no_grad():
    a, b = model(**inp, return_dict=False)[0], loaded(**inp, return_dict=False)[0]
sys.exit(device_compare.report(a, b, dev, sys.argv[1]))
PYEOF
}
export -f nunchaku_lite
stage nunchaku_lite 90 nunchaku_lite
