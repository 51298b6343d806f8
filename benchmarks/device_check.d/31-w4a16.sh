# W4A16 on CUDA (issue 12 item 3; docs/numerics.md §7): SVDQWeightOnlyLinear on tinygemm
# (torch.ops.aten._weight_int4pack_mm, bf16). Results in $OUT/w4a16/:
#   check.json       correctness: the layer repacks in place (layout cuda_tinygemm), y within the spec §7 kernel
#                    tolerance of x·Ŵᵀ + b in fp64, symmetric and zero-point layers, padded K and N (100 → 24),
#                    FLUX/T5 shapes; state_dict after repacking bit-identical to before (tinygemm tiles →
#                    canonical by the identity trick); moved back to the CPU it runs the CPU kernel; an fp16 input
#                    on a bf16 layer takes the dequantize path; whether tinygemm takes fp16 (information only)
#   bench_cuda.json  benchmarks/bench_w4a16.py --device cuda: kernel vs per-call dequantize vs bf16 F.linear at
#                    M = 1, 16, 512, 4096; `goal` line: FLUX AdaLN 3072 → 18432 at batch 1 ≥ 2.5x the bf16 GEMV
w4a16_cuda_check() {
  mkdir -p "$OUT/w4a16"
  $PY - "$OUT/w4a16/check.json" <<'PYEOF'
import json, sys, torch
from torch import nn
import svdq.weight_only as wo
from svdq.weight_only import SVDQWeightOnlyLinear, CUDA_TINYGEMM, CPU_INT4, CANONICAL
dev = torch.device("cuda")
rel = lambda y, r: float((y.double() - r.double()).norm() / r.double().norm())
results, ok = [], True
for k, n in [(100, 24), (128, 40), (3072, 18432), (4096, 10240), (10240, 4096)]:
    for zp in (False, True):
        g = torch.Generator().manual_seed(k + n)
        lin = nn.Linear(k, n, dtype=torch.bfloat16)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n, k, generator=g) * 0.02 + 0.01)
        layer = SVDQWeightOnlyLinear.from_linear(lin.to(dev), zero_point=zp)
        sd0 = {a: b.clone() for a, b in layer.state_dict().items()}
        x = torch.randn(7, k, generator=g).to(dev, torch.bfloat16)
        with torch.no_grad():
            y = layer(x)
        ref = torch.nn.functional.linear(x.double(), layer.dequantize(torch.float64), layer.bias.double())
        r = {"k": k, "n": n, "zero_point": zp, "layout": layer.layout, "rel_err": rel(y, ref),
             "resident_over_saved": layer.resident_bytes() / layer.weight_bytes()}
        sd1 = layer.state_dict()
        r["state_dict_bit_identical"] = all(torch.equal(sd0[a], sd1[a]) for a in sd0)
        if k * n < 10**7:  # back to the CPU: unpack (on the GPU) and the CPU kernel
            cpu = layer.to("cpu")
            with torch.no_grad():
                yc = cpu(x.cpu())
            r["cpu_after_cuda_layout"], r["cpu_rel_err"] = cpu.layout, rel(yc, ref.cpu())
            layer = cpu.to(dev)
            with torch.no_grad():  # fp16 input on a bf16 layer: the dequantize path, exactly F.linear
                xh = x.half()
                r["fp16_input_exact"] = bool(torch.equal(layer(xh), torch.nn.functional.linear(xh, layer.dequantize(torch.float16), layer.bias.half())))
        good = (r["layout"] == CUDA_TINYGEMM and r["rel_err"] < 1e-2 and r["state_dict_bit_identical"]
                and r.get("cpu_after_cuda_layout", CPU_INT4) == CPU_INT4 and r.get("cpu_rel_err", 0) < 1e-2
                and r.get("fp16_input_exact", True) and r["resident_over_saved"] < 1.07)
        r["ok"] = good
        ok &= good
        results.append(r)
        print(r, flush=True)
try:  # does tinygemm take fp16 in this torch? (the layer uses it for bf16 only)
    u = torch.randint(0, 16, (64, 128), dtype=torch.uint8, device=dev)
    p = wo._cuda_pack(u, 2)
    sz = torch.ones(2, 64, 2, dtype=torch.float16, device=dev)
    torch.ops.aten._weight_int4pack_mm(torch.randn(2, 128, device=dev, dtype=torch.float16), p, 64, sz)
    fp16 = "accepted"
except Exception as e:  # noqa: BLE001
    fp16 = f"refused: {str(e).splitlines()[0][:200]}"
json.dump({"ok": ok, "tinygemm_fp16": fp16, "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0),
           "cases": results}, open(sys.argv[1], "w"), indent=2)
print("W4A16 CUDA check:", "PASS" if ok else "FAIL", "| tinygemm fp16:", fp16)
sys.exit(0 if ok else 1)
PYEOF
}
w4a16_cuda_bench() {
  mkdir -p "$OUT/w4a16"
  $PY benchmarks/bench_w4a16.py --device cuda --repeats 3 --out "$OUT/w4a16/bench_cuda.json" || return $?
  $PY - "$OUT/w4a16/bench_cuda.json" <<'PYEOF'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
r = next(r for r in rows if r["case"] == "flux_adaln_3072x18432" and r["m"] == 1)
print(f"goal: FLUX AdaLN 3072->18432 batch 1: tinygemm op {r['ms_op']*1e3:.1f} us (layer forward "
      f"{r['ms_kernel']*1e3:.1f} us) vs bf16 GEMV {r['ms_dense']*1e3:.1f} us = {r['op_speedup_vs_dense']:.2f}x "
      f"(layer {r['speedup_vs_dense']:.2f}x; goal >= 2.5x): {'PASS' if r['op_speedup_vs_dense'] >= 2.5 else 'FAIL'}")
PYEOF
}
export -f w4a16_cuda_check w4a16_cuda_bench
stage w4a16_cuda_check 45 w4a16_cuda_check
stage w4a16_cuda_bench 75 w4a16_cuda_bench
