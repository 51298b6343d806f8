# benchmarks/device_check.d/70-diffusers-native.sh — issue 14, sourced by benchmarks/device_check.sh.
# diffusers-native svdq on the GPU. Results in $OUT/diffusers_native/:
#   doctor.json   `svdq doctor --json`: build, GPU, which code the build has for it, backend per device/dtype
#   check.json    tiny FLUX in bf16 on CUDA: diffusers save_pretrained -> FluxTransformer2DModel.from_pretrained
#                 (device_map cuda) bit-exact vs the saved model; strided input and M = 0 vs dense; the fused
#                 group under 8 threads bit-exact; an fp32 layer on CUDA raises the "model.to(torch.bfloat16)"
#                 error and runs after converting; pipe-less LoRA through diffusers' model API bit-exact vs
#                 svdq.load_lora
diffusers_native_check() {
  mkdir -p "$OUT/diffusers_native"
  $PY -m svdq doctor --json >"$OUT/diffusers_native/doctor.json"
  echo "doctor rc=$? (1 = problems listed in doctor.json)"
  $PY - "$OUT/diffusers_native/check.json" <<'PYEOF'
import json, sys, tempfile, threading, torch
import svdq
from svdq.testing import tiny
from svdq.linear import SVDQLinear
from diffusers import FluxTransformer2DModel
dev, res = torch.device("cuda"), {}
def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    d = dict(hidden_states=torch.randn(1, 16, 16, generator=g), encoder_hidden_states=torch.randn(1, 8, 64, generator=g),
             pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
             img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3))
    return {k: v.to(dev, torch.bfloat16) if v.is_floating_point() and k not in ("img_ids", "txt_ids") else v.to(dev)
            for k, v in d.items()} | {"return_dict": False}
model = tiny.tiny_flux_transformer(0, dtype=torch.bfloat16)
svdq.models.prepare(model); svdq.quantize(model, progress=False); model.to(dev)
with torch.no_grad():
    y0 = model(**inputs(1))[0]
d = tempfile.mkdtemp()
model.save_pretrained(d)
loaded = FluxTransformer2DModel.from_pretrained(d, device_map="cuda")
with torch.no_grad():
    res["roundtrip_bit_exact"] = bool(torch.equal(loaded(**inputs(1))[0], y0))
res["backend"] = svdq.ops.select_backend(dev).name
lin = torch.nn.Linear(256, 192).to(torch.bfloat16)
q = SVDQLinear.from_linear(lin, rank=32).to(dev)
x = torch.randn(9, 2, 256, device=dev, dtype=torch.bfloat16).transpose(0, 1)
with torch.no_grad():
    res["strided_bit_exact"] = bool(torch.equal(q(x), q(x.contiguous())))
    res["m0_shape"] = list(q(torch.randn(0, 5, 256, device=dev, dtype=torch.bfloat16)).shape)
group = model.single_transformer_blocks[0].to_qkv_mlp
xs = [torch.randn(1, 24, 128, device=dev, dtype=torch.bfloat16, generator=torch.Generator(dev).manual_seed(i)) for i in range(8)]
parts = range(len(group.sizes))
with torch.no_grad():
    want = [[group.part(p, x) for p in parts] for x in xs]
bad = []
def work(i):
    with torch.no_grad():
        for _ in range(50):
            got = [group.part(p, xs[i]) for p in parts]
            if not all(torch.equal(a, b) for a, b in zip(got, want[i])):
                bad.append(i)
ts = [threading.Thread(target=work, args=(i,)) for i in range(8)]
[t.start() for t in ts]; [t.join() for t in ts]
res["threads_bit_exact"] = not bad
q32 = SVDQLinear.from_linear(torch.nn.Linear(256, 64), rank=16).to(dev)
try:
    q32(torch.randn(3, 256, device=dev)); res["fp32_cuda_error"] = None
except ValueError as e:
    res["fp32_cuda_error"] = str(e)
res["fp32_converted_runs"] = list(q32.to(torch.bfloat16)(torch.randn(3, 256, device=dev, dtype=torch.bfloat16)).shape)
lora = {}
g = torch.Generator().manual_seed(3)
for name, m in tiny.tiny_flux_transformer(0).named_modules():
    if type(m) is torch.nn.Linear and name.endswith(("attn.to_q", "attn.to_v", "ff.net.2")):
        lora[f"transformer.{name}.lora_A.weight"] = torch.randn(4, m.in_features, generator=g) * 0.05
        lora[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, 4, generator=g) * 0.05
svdq.load_lora(model, dict(lora), name="a", strength=0.6)
with torch.no_grad():
    ref = model(**inputs(2))[0]
svdq.unload_lora(model, "a")
model.load_lora_adapter(dict(lora), prefix="transformer", adapter_name="a")
model.set_adapters(["a"], [0.6])
with torch.no_grad():
    res["lora_api_bit_exact"] = bool(torch.equal(model(**inputs(2))[0], ref))
model.unload_lora()
with torch.no_grad():
    res["unload_bit_exact"] = bool(torch.equal(model(**inputs(1))[0], y0))
ok = (res["roundtrip_bit_exact"] and res["strided_bit_exact"] and res["m0_shape"] == [0, 5, 192]
      and res["threads_bit_exact"] and res["fp32_cuda_error"] and "bfloat16" in res["fp32_cuda_error"]
      and res["lora_api_bit_exact"] and res["unload_bit_exact"])
res["ok"] = bool(ok)
json.dump(res, open(sys.argv[1], "w"), indent=2)
print(json.dumps(res))
sys.exit(0 if ok else 1)
PYEOF
}
export -f diffusers_native_check
stage diffusers_native 150 diffusers_native_check
