# GPTQ rounding of the residual on CUDA (issue 16 item 1): time per layer at FLUX.1-dev shapes and the
# extrapolated extra quantize time for the whole FLUX.1-dev (19 double + 38 single blocks, fused projections).
# Prediction (written before measuring): the column loop is K steps of ~6 small kernels (~10 µs each) → ~0.2 s
# at K = 3072, ~0.8 s at K = 12288/15360; Cholesky/inverse of H < 0.2 s; so ≈ 2–3 min extra for the model.
# The low-rank refit after GPTQ (svdq.gptq.refit_low_rank, timed inside decompose): one more Cholesky of H,
# (Ŵ − Q)·C (N·K² flops) and a randomized rank-32 SVD — predicted +0.05–0.2 s per layer, ≈ +0.5 min for the model.
# Results in $OUT/gptq/timing.json: per shape seconds for decompose (nearest) and decompose (gptq), the
# output-error ratio gptq/nearest on held-out rows (must be < 1), the codes/scales format checks, and the total.
gptq_cuda_timing() {
  mkdir -p "$OUT/gptq"
  $PY - "$OUT/gptq/timing.json" <<'PYEOF'
import json, sys, time, torch
from svdq.decompose import decompose, fake_quant_forward, smoothing_factors
from svdq.ops import reference as R
dev = torch.device("cuda")
def sync_time(f):
    torch.cuda.synchronize(); t = time.perf_counter(); r = f(); torch.cuda.synchronize()
    return r, time.perf_counter() - t
shapes = {"qkv": (9216, 3072), "out": (3072, 3072), "ff_up": (12288, 3072), "ff_down": (3072, 12288),
          "single_qkv_mlp": (21504, 3072), "single_proj_out": (3072, 15360)}
rows, ok, res = 8192, True, {}  # ≥ K rows for the Hessian, as a real calibration has (20 prompts × 4096 tokens × steps)
for name, (n, k) in shapes.items():
    g = torch.Generator(device=dev).manual_seed(n + k)
    w = (torch.randn(n, k, generator=g, device=dev) * 0.02).to(torch.bfloat16)
    mix = torch.randn(256, k, generator=g, device=dev) / 16
    x = torch.randn(2 * rows, 256, generator=g, device=dev) @ mix + 0.1 * torch.randn(2 * rows, k, generator=g, device=dev)
    x[:, :8] *= 30
    cx, tx = x[:rows], x[rows:].to(torch.bfloat16)
    xtx = cx.T @ cx
    lam = smoothing_factors(cx.abs().amax(0), w, 0.5)
    decompose(w[:64, :128], 16, lam[:128], xtx=xtx[:128, :128])  # warm-up (CUDA context, kernels)
    near, t_near = sync_time(lambda: decompose(w, 32, lam))
    gq, t_gptq = sync_time(lambda: decompose(w, 32, lam, xtx=xtx))
    ref = tx.float() @ w.float().T
    err = lambda d: float((fake_quant_forward(tx, d) - ref).norm() / ref.norm())
    codes = R.unpack_int4(gq.qweight)
    fmt = (gq.qweight.shape == near.qweight.shape and gq.wscales.dtype == torch.bfloat16
           and int(codes.min()) >= -8 and int(codes.max()) <= 7)
    r = {"n": n, "k": k, "s_nearest": round(t_near, 3), "s_gptq": round(t_gptq, 3),
         "err_nearest": err(near), "err_gptq": err(gq), "format_ok": fmt}
    r["err_ratio"] = r["err_gptq"] / r["err_nearest"]
    ok &= fmt and r["err_ratio"] < 1
    res[name] = r
    print(name, r, flush=True)
    del x, cx, tx, xtx, w, gq, near
    torch.cuda.empty_cache()
extra = lambda key: res[key]["s_gptq"]
total = 19 * 2 * (extra("qkv") + extra("out") + extra("ff_up") + extra("ff_down")) + 38 * (extra("single_qkv_mlp") + extra("single_proj_out"))
out = {"ok": ok, "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "shapes": res,
       "flux_dev_gptq_decompose_seconds_total": round(total, 1),
       "note": "per-layer decompose at the chosen α only (the α search itself is unchanged by GPTQ)"}
json.dump(out, open(sys.argv[1], "w"), indent=2)
print(f"GPTQ CUDA: {'PASS' if ok else 'FAIL'}; FLUX.1-dev GPTQ decompose total ≈ {total:.0f} s")
sys.exit(0 if ok else 1)
PYEOF
}
export -f gptq_cuda_timing
stage gptq_cuda_timing 60 gptq_cuda_timing
