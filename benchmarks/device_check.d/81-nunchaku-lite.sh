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
import json, sys, tempfile, torch
import svdq
from svdq.formats import nunchaku_lite
from svdq.testing import tiny
dev, res = torch.device("cuda"), {}
g = torch.Generator().manual_seed(1)
inp = dict(hidden_states=torch.randn(1, 16, 16, generator=g), encoder_hidden_states=torch.randn(1, 8, 64, generator=g),
           pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
           img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3))
inp = {k: v.to(dev, torch.bfloat16) if k not in ("img_ids", "txt_ids", "timestep") else v.to(dev) for k, v in inp.items()}
model = tiny.tiny_flux_transformer(0, dtype=torch.bfloat16)
svdq.models.prepare(model)
svdq.quantize(model, rank=16, progress=False, weight_only=svdq.models.FAMILIES["flux"].adaln)
d = nunchaku_lite.export(model, tempfile.mkdtemp() + "/lite")
loaded = svdq.from_pretrained(d, device="cuda")
model.to(dev)
with torch.no_grad():
    a, b = model(**inp, return_dict=False)[0], loaded(**inp, return_dict=False)[0]
res["backend"] = svdq.ops.select_backend(dev).name
res["bit_exact"] = bool(torch.equal(a, b))
res["max_abs_diff"] = float((a.float() - b.float()).abs().max())
res["rel_err"] = float((a.float() - b.float()).norm() / a.float().norm())
json.dump(res, open(sys.argv[1], "w"), indent=1)
print(res)
sys.exit(0 if res["rel_err"] < 1e-2 else 1)
PYEOF
}
export -f nunchaku_lite
stage nunchaku_lite 90 nunchaku_lite
