# benchmarks/device_check.d/20-kernels.sh — issue 11 (quantize_act at memory speed, mma.sync loader, NaN rule,
# e4m3 codes). Sourced by benchmarks/device_check.sh after the memcheck; results in $OUT/kernels/.
#   kernels_check  (≈ 30 s) bit-exactness on the GPU: quantize_act and quantize_act_e4m3 against
#                  svdq.ops.reference (bf16/fp16, 16-bit and fp32 λ, K tails, K-split 0/3, NaN/±Inf rows,
#                  unusable λ), the e4m3 bytes = the INT4 codes, and w4a4_gemm with SVDQ_FORCE_INT4_MMA=0/1:
#                  the two paths bitwise equal to each other, within 1e-3 of the reference, NaN rows NaN.
#   kernels_bench  (≈ 60 s) bench_cuda_layers on two FLUX shapes with the e4m3 and int4-path variants and the
#                  speed-up over the 2026-11-26 H200 run (copy-bandwidth %, low-rank overhead, GEMM µs).
mkdir -p "$OUT/kernels"
cat >/tmp/svdq_kernels_check.py <<'EOF'
import json, os, sys, time
import torch
import svdq  # noqa: F401
from svdq.ops import reference as R

ops = torch.ops.svdq
out_dir = sys.argv[1]
dev = "cuda"
fails, rows = [], []
g = torch.Generator(device=dev).manual_seed(0)


def same(a, b):  # bitwise, NaN == NaN
    if a.dtype in (torch.float32,):
        return torch.equal(a.view(torch.int32), b.view(torch.int32))
    return torch.equal(a, b)


def check(name, ok, **info):
    rows.append({"check": name, "ok": bool(ok), **info})
    if not ok:
        fails.append(name)
        print("FAIL", name, info, flush=True)


t0 = time.time()
for dtype in (torch.bfloat16, torch.float16):
    for m, k, r in ((1, 64, 0), (37, 100, 16), (130, 3072, 32), (4608, 3072, 32), (257, 12288, 64), (5, 200, 80)):
        x = (torch.randn(m, k, device=dev, generator=g) * torch.logspace(-2, 1, k, device=dev)).to(dtype)
        if m > 4:
            x[1, 3] = float("nan"); x[2, k - 1] = float("inf"); x[3, 0] = -float("inf")
        down = (torch.randn(k, r, device=dev, generator=g) * 0.05).to(dtype)
        scales = torch.rand(r, device=dev, generator=g) + 0.5
        for lam_kind in ("16bit", "fp32", "odd"):
            lam = torch.rand(k, device=dev, generator=g) + 0.25
            if lam_kind == "fp32":
                lam = lam * 1.0001  # not 16-bit representable
            elif lam_kind == "odd":
                lam[::7] = 1e-6; lam[1::11] = 0.0; lam[2::13] = 3e4
            lam = lam if lam_kind == "fp32" else lam.to(dtype)
            rq, rs, rl = R.quantize_act(x, lam, down, scales)
            for ks in ("0", "3"):
                os.environ["SVDQ_QACT_KSPLIT"] = ks
                q, s, l = ops.quantize_act(x, lam, down, scales)
                q8, s8, l8 = ops.quantize_act_e4m3(x, lam, down, scales)
                tag = f"qact {str(dtype)[6:]} m={m} k={k} r={r} lam={lam_kind} ksplit={ks}"
                check(tag + " codes", torch.equal(q, rq), mismatches=int((q != rq).sum()))
                check(tag + " scales", same(s, rs), mismatches=int((s.view(torch.int32) != rs.view(torch.int32)).sum()))
                check(tag + " e4m3", torch.equal(q8, R.int4_codes_to_e4m3(rq)) and same(s8, rs))
                fin = torch.isfinite(rl)
                err = float(((l - rl)[fin]).abs().max() / rl[fin].abs().max().clamp_min(1e-30)) if r and fin.any() else 0.0
                check(tag + " lora_act", err < 1e-3 and torch.equal(fin, torch.isfinite(l)), rel_err=err)
            os.environ.pop("SVDQ_QACT_KSPLIT", None)
print(f"quantize_act checks: {time.time() - t0:.1f} s", flush=True)

for dtype in (torch.bfloat16, torch.float16):
    for m, n, k, r in ((4608, 3072, 3072, 32), (150, 200, 192, 48), (1, 13, 64, 0), (130, 128, 64, 32), (37, 136, 12288, 16)):
        x = torch.randn(m, k, device=dev, generator=g).to(dtype)
        if m > 4:
            x[2, 5] = float("nan")
        lam = (torch.rand(k, device=dev, generator=g) + 0.5).to(dtype)
        down = (torch.randn(k, r, device=dev, generator=g) * 0.05).to(dtype)
        up = (torch.randn(n, r, device=dev, generator=g) * 0.1).to(dtype)
        bias = torch.randn(n, device=dev, generator=g).to(dtype)
        qw, ws = R.quantize_weight(torch.randn(n, k, device=dev, generator=g) * 0.05, dtype)
        qa, sa, la = ops.quantize_act(x, lam, down, None)
        pq, ps = ops.prepare_weight(qw, ws)
        ys = {}
        for force in ("0", "1"):
            os.environ["SVDQ_FORCE_INT4_MMA"] = force
            ys[force] = ops.w4a4_gemm(qa, sa, pq, ps, la, up, bias, dtype)
        os.environ.pop("SVDQ_FORCE_INT4_MMA", None)
        yr = R.w4a4_gemm(qa, sa, qw, ws, la, up, bias, dtype).float()
        tag = f"gemm {str(dtype)[6:]} m={m} n={n} k={k} r={r}"
        check(tag + " int4 == int8 path (bitwise)", same(ys["0"].view(torch.int16), ys["1"].view(torch.int16)))
        fin = torch.isfinite(yr)
        for force, y in ys.items():
            y = y.float()
            err = float((y - yr)[fin].abs().max() / yr[fin].abs().max())
            check(tag + f" path={'int4' if force == '1' else 'default'} vs reference", err < 1e-2 and
                  torch.equal(torch.isnan(y), torch.isnan(yr)), rel_err=err)
        if m > 4:
            check(tag + " NaN row", bool(torch.isnan(ys["0"][2]).all()) and bool(torch.isfinite(ys["0"][3]).all()))
json.dump({"fails": fails, "checks": rows, "seconds": round(time.time() - t0, 1)},
          open(os.path.join(out_dir, "check.json"), "w"), indent=1)
print(f"{len(rows)} checks, {len(fails)} failed ({time.time() - t0:.1f} s)")
sys.exit(1 if fails else 0)
EOF
stage kernels_check 120 $PY /tmp/svdq_kernels_check.py "$OUT/kernels"
stage kernels_bench 150 $PY benchmarks/bench_cuda_layers.py --shapes 3072x9216,12288x3072 --iters 20 --warmup 5 \
  --int4-path --compare benchmarks/results/cuda_layers_h200_2026-11-26_b.json --out "$OUT/kernels/bench.json"
