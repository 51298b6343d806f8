"""One rank of tests/test_parallel.py, launched by torchrun (gloo, CPU): runs the tiny FLUX model under diffusers'
context parallelism and writes what it saw to ``$SVDQ_PARALLEL_OUT/rank<r>.safetensors`` for the test to compare.

Cases: a quantized (fused) model under Ulysses (degree = world) and under ring attention (degree = world), and a
quantized tiny Wan video model under Ulysses, each beside the single-process output computed by every rank itself; calibration of a 16-bit model run under
Ulysses with the statistics merged over the ranks and without (each rank's shard only), with the per-layer
smoothing factors beside single-process ones.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

import svdq
from svdq.models import prepare
from svdq.testing import families
from svdq.testing.tiny import tiny_flux_transformer

IMAGE_TOKENS, TEXT_TOKENS = 32, 8
ALPHAS = (0.3, 0.5, 0.7)  # a short smoothing grid: the test compares choices, and CI time is scarce


DEVICE = os.environ.get("SVDQ_PARALLEL_DEVICE", "cpu")  # "cuda": the GPU check (benchmarks/device_check.d)
DTYPE = torch.float32 if DEVICE == "cpu" else torch.bfloat16  # svdq's CUDA kernels take bf16/fp16


def tiny_model():
    return tiny_flux_transformer(seed=0, dtype=DTYPE).to(DEVICE)


def flux_inputs(model, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    c = model.config
    ids = torch.zeros(IMAGE_TOKENS, 3)
    ids[:, 1] = torch.arange(IMAGE_TOKENS) // 8  # a 4×8 latent grid: rotary positions differ per token
    ids[:, 2] = torch.arange(IMAGE_TOKENS) % 8
    inputs = dict(
        hidden_states=torch.randn(1, IMAGE_TOKENS, c.in_channels, generator=gen),
        encoder_hidden_states=torch.randn(1, TEXT_TOKENS, c.joint_attention_dim, generator=gen),
        pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=gen),
        timestep=torch.tensor([0.5]),
        img_ids=ids,
        txt_ids=torch.zeros(TEXT_TOKENS, 3),
        return_dict=False,
    )
    if c.guidance_embeds:
        inputs["guidance"] = torch.tensor([3.5])
    return {k: v.to(DEVICE, DTYPE) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def wan_video_inputs(model, seed: int) -> dict:
    """2 latent frames of 8×8 (32 tokens after the 1×2×2 patch), 8 text tokens."""
    gen = torch.Generator().manual_seed(seed)
    c = model.config
    inputs = dict(hidden_states=torch.randn(1, c.in_channels, 2, 8, 8, generator=gen),
                  encoder_hidden_states=torch.randn(1, 8, c.text_dim, generator=gen),
                  timestep=torch.tensor([500.0]), return_dict=False)
    return {k: v.to(DEVICE, DTYPE) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def quantized_model():
    model = tiny_model()
    prepare(model)  # fused projections: one W4A4 GEMM per shared input, as svdq ships FLUX.1
    inputs = [flux_inputs(model, s) for s in (1, 2)]
    config = svdq.QuantizeConfig(alphas=ALPHAS)
    svdq.quantize(model, calibration=lambda m: [m(**i) for i in inputs], progress=False, config=config,
                  process_group=None)
    return model


def flatten(result: dict) -> dict[str, torch.Tensor]:
    """{"a": t, "b": {"x": t}} → {"a": t, "b/x": t}, plain contiguous CPU tensors (the parallel outputs are
    functional-collective tensor subclasses: copied out through numpy)."""
    flat = {}
    for key, value in result.items():
        for sub, t in (value.items() if isinstance(value, dict) else [("", value)]):
            flat[f"{key}/{sub}" if sub else key] = torch.from_numpy(t.detach().float().cpu().numpy().copy())
    return flat


def main() -> int:
    out_dir = os.environ["SVDQ_PARALLEL_OUT"]
    if DEVICE == "cuda":  # NCCL needs a GPU per rank; ranks sharing one GPU talk through gloo
        one_gpu_each = torch.cuda.device_count() >= int(os.environ["WORLD_SIZE"])
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
        dist.init_process_group("nccl" if one_gpu_each else "gloo")
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {"world": torch.tensor(world)}
    try:
        with torch.no_grad():
            x = flux_inputs(tiny_model(), seed=7)
            quantized = quantized_model()
            for mode in ("ulysses", "ring"):
                model = copy.deepcopy(quantized)
                result[f"{mode}_single"] = model(**x)[0]
                degrees = {"ulysses": world} if mode == "ulysses" else {"ring": world}
                svdq.parallel.enable_context_parallel(model, **degrees)
                result[f"{mode}_parallel"] = model(**x)[0]

            # A video model: tiny Wan 2.x (frames × height × width tokens), quantized with calibration.
            wan = families.tiny_transformer("wan", seed=0, dtype=DTYPE).to(DEVICE)
            wan_inputs = [wan_video_inputs(wan, s) for s in (1, 2, 7)]
            svdq.quantize(wan, calibration=lambda m: [m(**i) for i in wan_inputs[:2]], progress=False,
                          config=svdq.QuantizeConfig(alphas=ALPHAS), process_group=None)
            result["wan_single"] = wan(**wan_inputs[2])[0]
            svdq.parallel.enable_context_parallel(wan, ulysses=world)
            result["wan_parallel"] = wan(**wan_inputs[2])[0]

        # Calibration under context parallelism: each rank's layers see 1/world of the tokens.
        calib = [flux_inputs(tiny_model(), s) for s in (1, 2)]

        def calibrate(m):
            for i in calib:
                m(**i)

        config = svdq.QuantizeConfig(alphas=ALPHAS)
        single = tiny_model()
        prepare(single)
        svdq.quantize(single, calibration=calibrate, progress=False, process_group=None, config=config)
        sharded = tiny_model()
        prepare(sharded)
        svdq.parallel.enable_context_parallel(sharded, ulysses=world)
        svdq.quantize(sharded, calibration=calibrate, progress=False, config=config)  # "auto": merged over the CP ranks
        unmerged = tiny_model()  # the broken variant: each rank calibrates on its shard only
        prepare(unmerged)
        svdq.parallel.enable_context_parallel(unmerged, ulysses=world)
        svdq.quantize(unmerged, calibration=calibrate, progress=False, process_group=None, config=config)
        for key, m in (("single", single), ("parallel", sharded), ("unmerged", unmerged)):
            result[f"smooth_{key}"] = {n: l.smooth.clone() for n, l in svdq.quantized_layers(m).items()}
        for key, m in (("alpha_single", single), ("alpha_parallel", sharded)):
            result[key] = {n: torch.tensor(r["alpha"]) for n, r in m.svdq_report.items() if r.get("alpha") is not None}
        save_file(flatten(result), os.path.join(out_dir, f"rank{rank}.safetensors"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
