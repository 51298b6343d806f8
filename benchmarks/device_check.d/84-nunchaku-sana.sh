# benchmarks/device_check.d/84-nunchaku-sana.sh — issue 13 (Nunchaku SANA INT4 files), sourced by
# benchmarks/device_check.sh. Needs diffusers (carried wheels) and pytest. ≈ 30 s.
#   nunchaku_sana  the tiny 3-head SANA of tests/test_nunchaku_sana.py (bf16; q / GLU paddings), quantized by svdq,
#                  written in Nunchaku's SANA layout by that test's independent writer and loaded back
#                  (svdq.formats.nunchaku_sana): the same tensors as the svdq model (bit for bit on the CPU), so on
#                  the same CUDA backend the transformer outputs should be bit-exact too — this runs the 4-bit 1×1
#                  convolutions (SVDQConv1x1: an SVDQLinear on channels-last views) through the CUDA kernels.
#                  Records bit_exact, max |diff|, the relative error, the backend and the CUDA-vs-CPU error.
# Results: $OUT/nunchaku_sana/check.json.
nunchaku_sana() {
  mkdir -p "$OUT/nunchaku_sana"
  $PY - "$OUT/nunchaku_sana/check.json" <<'PYEOF'
import os, pathlib, sys, tempfile, torch
sys.path.insert(0, os.path.join(os.environ["ROOT"], "benchmarks"))
import device_compare
sys.path.insert(0, os.path.join(os.environ["ROOT"], "tests"))
import svdq
import test_nunchaku_sana as t
dev = torch.device("cuda")
model = t.quantize_tiny_sana()
path = t._write(t.nunchaku_sana_tensors(model), pathlib.Path(tempfile.mkdtemp()) / "sana.safetensors", t._metadata(model))
loaded = svdq.from_pretrained(path, device="cuda")
inp = t._inputs()
with torch.no_grad():
    cpu = model(**inp)[0]
    model.to(dev)
    cuda_inp = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in inp.items()}
    a, b = model(**cuda_inp)[0], loaded(**cuda_inp)[0]
sys.exit(device_compare.report(a, b, dev, sys.argv[1],
                             cuda_vs_cpu_rel_err=float((a.float().cpu() - cpu.float()).norm() / cpu.float().norm())))
PYEOF
}
export -f nunchaku_sana
stage nunchaku_sana 90 nunchaku_sana
