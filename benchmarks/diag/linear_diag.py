"""Diagnose CUDA vs reference differences on an SVDQLinear built from a default-init nn.Linear."""
import os
import torch
import svdq
from svdq.ops import reference as ref

def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))

torch.manual_seed(0)
for (k, n, scale) in ((3072, 640, 1.0), (3072, 640, 30.0), (256, 128, 1.0)):
    lin = torch.nn.Linear(k, n, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.mul_(scale)
    layer = svdq.SVDQLinear.from_linear(lin, rank=32).cuda()
    x = torch.randn(154, k, dtype=torch.bfloat16, device="cuda")
    qa, sa, la = torch.ops.svdq.quantize_act(x, layer.smooth, layer.lora_down, layer.lora_scales)
    rqa, rsa, rla = ref.quantize_act(x, layer.smooth, layer.lora_down, layer.lora_scales)
    print(f"K={k} N={n} wscale×{scale}: qact equal {torch.equal(qa, rqa)} ascales equal {torch.equal(sa, rsa)} lora_act rel {rel(la, rla):.2e}")
    qw, ws = layer.canonical_weights()  # the layer holds the CUDA layout after .cuda() (one copy)
    pq, ps = torch.ops.svdq.prepare_weight(qw, ws)
    print("   wscales range", float(ws.float().abs().min()), float(ws.float().abs().max()), "prepared", ps.dtype, float(ps.abs().max()))
    for force in ("0", "1"):
        os.environ["SVDQ_FORCE_INT4_MMA"] = force
        for use_lora, use_bias in ((False, False), (True, False), (True, True)):
            r = 32 if use_lora else 0
            la_ = la[:, :r].contiguous(); up = layer.lora_up[:, :r].contiguous()
            b = layer.bias if use_bias else None
            y = torch.ops.svdq.w4a4_gemm(qa, sa, pq, ps, la_, up, b, torch.bfloat16)
            yr = ref.w4a4_gemm(rqa, rsa, qw, ws, rla[:, :r], up, b, torch.float32)
            print(f"   int4={force} lora={use_lora} bias={use_bias}: rel {rel(y, yr):.2e}  max abs {float((y.float()-yr).abs().max()):.3e} |y| {float(yr.abs().mean()):.3e}")
    os.environ["SVDQ_FORCE_INT4_MMA"] = "0"
    y = layer(x)
    with svdq.ops.use_backend("reference"):
        yr = layer(x)
    print("   SVDQLinear cuda vs reference rel", rel(y, yr))
