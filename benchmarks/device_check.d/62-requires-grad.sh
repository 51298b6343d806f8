# model.requires_grad_(True) on a quantized model on CUDA (issue 12 regression; tests/test_requires_grad.py runs
# the CPU side). On CUDA the resident tensors are the kernels' layouts (W4A4: int32-viewed fp32 scales; W4A16:
# torch's int4-packed codes and scale/offset pairs), so the FrozenParameter class must survive those
# conversions: after .to("cuda"), a forward, .to("cpu") and back, requires_grad_(True) must leave qweight /
# wscales / wzeros frozen, make smooth / lora_down / lora_up / bias trainable, and a backward must give them
# finite gradients. ~10 s. Results: $OUT/requires_grad/result.json.
requires_grad_cuda() {
  mkdir -p "$OUT/requires_grad"
  $PY - "$OUT/requires_grad/result.json" <<'PYEOF'
import json, sys, torch
from torch import nn
import svdq
from svdq.linear import FrozenParameter, SVDQLinear
from svdq.weight_only import SVDQWeightOnlyLinear

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256), nn.Linear(256, 768)).to(torch.bfloat16)
svdq.quantize(model, include=["0", "2"], weight_only=["3"], progress=False)
res, ok = {}, True
model.to("cuda")
x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
with torch.no_grad():
    model(x)  # W4A16 repacks into the kernel layout on its first CUDA call
model.to("cpu").to("cuda")
layers = {n: m for n, m in model.named_modules() if isinstance(m, (SVDQLinear, SVDQWeightOnlyLinear))}
res["layouts"] = {n: getattr(m, "layout", None) for n, m in layers.items()}
try:
    model.requires_grad_(True)
    res["requires_grad_raised"] = None
except Exception as e:  # the regression
    res["requires_grad_raised"] = repr(e)
    ok = False
frozen = {f"{n}.{leaf}" for n, m in layers.items() for leaf, _ in m.named_parameters(recurse=False)
          if leaf in ("qweight", "wscales", "wzeros")}
params = dict(model.named_parameters())
res["frozen_classes_ok"] = all(type(params[n]) is FrozenParameter for n in frozen)
res["trainable"] = sorted(n for n, p in params.items() if p.requires_grad)
ok &= res["frozen_classes_ok"] and set(res["trainable"]) == set(params) - frozen
out = model(x.requires_grad_(True))
out.float().square().mean().backward()
res["grads_finite"] = {n: bool(p.grad is not None and torch.isfinite(p.grad).all()) for n, p in params.items()
                       if p.requires_grad}
res["frozen_grads_none"] = all(params[n].grad is None for n in frozen)
ok &= all(res["grads_finite"].values()) and res["frozen_grads_none"]
res["ok"] = bool(ok)
json.dump(res, open(sys.argv[1], "w"), indent=1)
print(json.dumps(res, indent=1))
sys.exit(0 if ok else 1)
PYEOF
}
export -f requires_grad_cuda
stage requires_grad_cuda 45 requires_grad_cuda
