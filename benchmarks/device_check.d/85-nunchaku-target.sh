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
import json, sys, tempfile, torch
import svdq
from svdq.formats import nunchaku as nk
from svdq.testing import tiny
dev, res = torch.device("cuda"), {}
g = torch.Generator().manual_seed(1)
inp = dict(hidden_states=torch.randn(1, 16, 16, generator=g), encoder_hidden_states=torch.randn(1, 8, 64, generator=g),
           pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
           img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3))
inp = {k: v.to(dev, torch.bfloat16) if k not in ("img_ids", "txt_ids", "timestep") else v.to(dev) for k, v in inp.items()}
model = tiny.tiny_flux_transformer(0, dtype=torch.bfloat16)
svdq.models.prepare(model)
model.to(dev)
svdq.quantize(model, rank=16, progress=False, target="nunchaku", rounding="nearest",
              calibration=lambda m: m(**inp, return_dict=False))
path = nk.export_flux(model, tempfile.mkdtemp() + "/svdq-int4_r16-tiny.safetensors")
loaded = svdq.from_pretrained(path, device="cuda")
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
export -f nunchaku_target
stage nunchaku_target 90 nunchaku_target
