# benchmarks/device_check.d/82-nunchaku-sdxl.sh — issue 13 (Nunchaku SDXL INT4 files), sourced by
# benchmarks/device_check.sh. Needs diffusers (carried wheels). ≈ 20 s.
#   nunchaku_sdxl  a tiny SDXL UNet (128 wide, bf16) quantized as Nunchaku's SDXL is, written in Nunchaku's layout
#                  (formats/nunchaku_models.export_sdxl) and loaded back on CUDA: same layers, same fusion, same
#                  tensors as the svdq model (bit for bit on the CPU: tests/test_nunchaku_unet.py), so on the same
#                  CUDA backend the UNet outputs should be bit-exact too (deterministic kernels). Records
#                  bit_exact, max |diff|, the relative error and the backend.
# Results: $OUT/nunchaku_sdxl/check.json.
nunchaku_sdxl() {
  mkdir -p "$OUT/nunchaku_sdxl"
  $PY - "$OUT/nunchaku_sdxl/check.json" <<'PYEOF'
import os, sys, tempfile, torch
sys.path.insert(0, os.path.join(os.environ["ROOT"], "benchmarks"))
import device_compare
import diffusers, svdq
from svdq.formats import nunchaku_models
from svdq.testing import tiny
dev = torch.device("cuda")
torch.manual_seed(0)
unet = diffusers.UNet2DConditionModel(**{**tiny.TINY_SDXL_UNET_CONFIG, "block_out_channels": (32, 128),
                                         "transformer_layers_per_block": (1, 1)}).to(torch.bfloat16).eval()
family = svdq.models.prepare(unet)
svdq.quantize(unet, rank=16, exclude=family.exclude + ("*attn2.to_kv*",), progress=False)
path = nunchaku_models.export_sdxl(unet, tempfile.mkdtemp() + "/svdq-int4_r16-sdxl.safetensors")
loaded = svdq.from_pretrained(path, device="cuda")
unet.to(dev)
g = torch.Generator().manual_seed(0)
r = lambda *s: torch.randn(*s, generator=g).to(dev, torch.bfloat16)
inp = dict(sample=r(1, 4, 8, 8), timestep=torch.tensor([500], device=dev), encoder_hidden_states=r(1, 8, 64),
           added_cond_kwargs={"text_embeds": r(1, 32), "time_ids": r(1, 6)}, return_dict=False)
with torch.no_grad():
    a, b = unet(**inp)[0], loaded(**inp)[0]
sys.exit(device_compare.report(a, b, dev, sys.argv[1]))
PYEOF
}
export -f nunchaku_sdxl
stage nunchaku_sdxl 90 nunchaku_sdxl
