# Streaming (block-by-block) quantization on CUDA at full-size FLUX.1-dev shapes (issue 16 item 4): one double
# and one single block at FLUX.1-dev width (hidden 3072, 24 heads, T5 4096, ff 12288), synthetic weights, bf16,
# fused projections, default config (rank 32, GPTQ, 11 α); the blocks live on the CPU (offloaded) and are
# streamed to the GPU, the rest of the model is on the GPU. Calibration: CALLS transformer calls at 1024²
# (4096 image + 512 text tokens).
# Measured: seconds per block split into calibrate (16-bit forward + statistics hooks), quantize (α search, SVD,
# GPTQ of the block's layers) and propagate (quantized forward → next block's inputs); the capture pass; peak
# GPU memory (torch allocator) and peak host RSS; bytes of one call's captured activations. Extrapolated to
# FLUX.1-dev (19 double + 38 single blocks) with the default calibration of `svdq quantize` (20 prompts × 28
# steps = 560 calls): calibrate / propagate scale with the calls, quantize does not; the capture pass is one
# 16-bit FLUX.1-dev step per call (171.6 ms on an H200, shared/FACTS.md).
# Prediction (written before measuring): per double block quantize ≈ 15–30 s (8 layers × 12 decompositions with
# randomized SVD, + GPTQ ≈ 0.2–0.8 s per layer), calibrate ≈ 10 ms per call (the block forward ≈ 3 TFLOP +
# the Hessian updates of about as much), so the extrapolated total is dominated by quantize (≈ 10–15 min) and
# peak GPU ≈ 6–8 GB (block 0.7 GB + Hessians 1.3 GB + one K = 12288 layer's GPTQ scratch ≈ 4 GB).
# Results in $OUT/streaming/streaming.json (rewritten after each block, so a timeout keeps what was measured).
streaming_cuda() {
  mkdir -p "$OUT/streaming"
  $PY - "$OUT/streaming/streaming.json" <<'PYEOF'
import json, resource, sys, time, torch
from diffusers import FluxTransformer2DModel
import svdq
from svdq import streaming
from svdq.models import prepare

path = sys.argv[1]
dev, bf16, CALLS, REAL_CALLS = torch.device("cuda"), torch.bfloat16, 4, 20 * 28
STEP_S = 0.1716  # one 16-bit FLUX.1-dev step at 1024² on an H200, eager (shared/FACTS.md)
res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "calls": CALLS, "blocks": {}}
def save():
    json.dump(res, open(path, "w"), indent=2)
def rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

torch.manual_seed(0)
with torch.device(dev):
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                   attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                   pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
model = model.to(bf16).eval()
prepare(model)
streaming.place_offloaded(model, dev)  # blocks in CPU memory, streamed to the GPU one at a time
blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
assert all(p.device.type == "cpu" for b in blocks for p in b.parameters())
assert model.x_embedder.weight.device.type == "cuda"
# GPTQ Hessians (fp32 K×K per W4A4 layer): what the whole-model path holds at once vs one block's here.
from svdq.quantize import QuantizeConfig, select_linears
from svdq.models import FAMILIES
hess = {}
for n, lin in select_linears(model, QuantizeConfig(exclude=FAMILIES["flux"].exclude)).items():
    kind = "double" if n.startswith("transformer_blocks.") else "single"
    hess[kind] = hess.get(kind, 0) + 4 * lin.in_features ** 2 / 2**30
res["hessians_gb"] = {"double_block": hess["double"], "single_block": hess["single"],
                      "flux_dev_all_layers": 19 * hess["double"] + 38 * hess["single"]}
res["block_gb"] = {n: sum(p.numel() * p.element_size() for p in b.parameters()) / 2**30
                   for n, b in (("double", blocks[0]), ("single", blocks[1]))}
torch.cuda.synchronize(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
base_gpu = torch.cuda.memory_allocated()
res["gpu_resident_gb_before"] = base_gpu / 2**30
res["host_rss_gb_before"] = rss_gb()

def inputs(i):
    g = torch.Generator(device=dev).manual_seed(i)
    r = lambda *s: torch.randn(*s, generator=g, device=dev).to(bf16)
    return dict(hidden_states=r(1, 4096, 64), encoder_hidden_states=r(1, 512, 4096), pooled_projections=r(1, 768),
                timestep=torch.tensor([0.5], device=dev), guidance=torch.tensor([3.5], device=dev),
                img_ids=torch.zeros(4096, 3, device=dev), txt_ids=torch.zeros(512, 3, device=dev), return_dict=False)
def calibration(m):
    for i in range(CALLS):
        m(**inputs(i))

t = {"start": time.perf_counter()}
names = ["transformer_blocks.0", "single_transformer_blocks.0"]
def timed(what, fn, index_arg):
    def wrapper(*a, **k):
        torch.cuda.synchronize(); t0 = time.perf_counter()
        r = fn(*a, **k)
        torch.cuda.synchronize()
        entry = res["blocks"].setdefault(names[a[index_arg]], {})
        entry[what] = entry.get(what, 0.0) + time.perf_counter() - t0
        entry["peak_gpu_gb_so_far"] = torch.cuda.max_memory_allocated() / 2**30
        save()
        return r
    return wrapper
real_check = streaming._Capture.check_complete
def check_complete(self):
    real_check(self)
    torch.cuda.synchronize()
    res["capture_s"] = time.perf_counter() - t["start"]
    res["captured_mb_per_call"] = sum(v.numel() * v.element_size() for v in self.calls[0] if torch.is_tensor(v)) / 2**20
    save()
streaming._Capture.check_complete = check_complete
streaming._calibrate_block = timed("calibrate_s", streaming._calibrate_block, 5)
streaming._run_block = timed("propagate_s", streaming._run_block, 3)
real_build = streaming.build_layers
def build(layers, *a, **k):
    if not layers:
        return real_build(layers, *a, **k)
    block = ".".join(next(iter(layers)).split(".")[:2])
    torch.cuda.synchronize(); t0 = time.perf_counter()
    r = real_build(layers, *a, **k)
    torch.cuda.synchronize()
    res["blocks"].setdefault(block, {}).update(quantize_s=time.perf_counter() - t0, layers=len(layers))
    save()
    return r
streaming.build_layers = build

svdq.quantize(model, calibration=calibration, streaming=True, device="cuda", progress=False)
torch.cuda.synchronize()
res["total_s"] = time.perf_counter() - t["start"]
res["peak_gpu_gb"] = (torch.cuda.max_memory_allocated() - base_gpu) / 2**30
res["host_rss_peak_gb"] = rss_gb()
ok = all(p.device.type == "cpu" for b in blocks for p in b.parameters())
ok &= len(svdq.quantized_layers(model)) == 8 + 2
model.to(dev)  # the streamed layers run on the GPU
with torch.no_grad():
    y = model(**inputs(99))[0]
    ok &= bool(torch.isfinite(y).all())
    # The last block's outputs feed nothing, so the run skips its propagate pass: time it here (quantized
    # single block on CALLS calls of block-shaped inputs).
    g = torch.Generator(device=dev).manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=g, device=dev).to(bf16)
    rope = model.pos_embed(torch.zeros(4608, 3, device=dev))
    args = dict(hidden_states=r(1, 4096, 3072), encoder_hidden_states=r(1, 512, 3072), temb=r(1, 3072),
                image_rotary_emb=rope)
    blocks[1](**args); torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(CALLS):
        blocks[1](**args)
    torch.cuda.synchronize()
    res["blocks"]["single_transformer_blocks.0"]["propagate_s"] = time.perf_counter() - t0
res["ok"] = ok

# Extrapolation to FLUX.1-dev: 19 double + 38 single blocks, 560 calibration calls.
d = res["blocks"].get("transformer_blocks.0", {})
s = res["blocks"].get("single_transformer_blocks.0", {})
scale = REAL_CALLS / CALLS
per = lambda b: b.get("calibrate_s", 0) * scale + b.get("quantize_s", 0) + b.get("propagate_s", 0) * scale
res["extrapolated"] = {
    "calls": REAL_CALLS,
    "capture_s": REAL_CALLS * STEP_S,
    "double_block_s": per(d), "single_block_s": per(s),
    "quantize_only_s": 19 * d.get("quantize_s", 0) + 38 * s.get("quantize_s", 0),
    "total_s": REAL_CALLS * STEP_S + 19 * per(d) + 38 * per(s),
    "captured_activations_gb": 2 * REAL_CALLS * res.get("captured_mb_per_call", 0) / 1024,
    "note": "the single block's propagate is timed after the run (the last block's is skipped in it)",
}
save()
print(json.dumps(res, indent=1))
print(f"streaming CUDA: {'PASS' if ok else 'FAIL'}; FLUX.1-dev extrapolated ≈ {res['extrapolated']['total_s'] / 60:.1f} min, "
      f"peak GPU {res['peak_gpu_gb']:.1f} GB (+ captured activations ≈ {res['extrapolated']['captured_activations_gb']:.0f} GB at 560 calls)")
sys.exit(0 if ok else 1)
PYEOF
}
export -f streaming_cuda
stage streaming_cuda 120 streaming_cuda
