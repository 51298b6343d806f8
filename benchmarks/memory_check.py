"""GPU memory of a quantized FLUX.1 transformer, measured (issue 12 items 1, 2, 5): run by
benchmarks/device_check.d/30-memory.sh on a CUDA machine.

Full-size architecture, synthetic weights (svdq.bench.model), quantized data-free in place with AdaLN W4A16:
  1. resident after load: torch.cuda.memory_allocated() (bf16 model before, svdq model after), beside the
     state-dict bytes `svdq.save` would write;
  2. one step at --res: max_memory_allocated() during it;
  3. leak check: memory_allocated() after each of --steps steps (must not grow);
  4. offloading, each on a fresh CPU copy of the quantized model (its layers keep the CUDA layout on the CPU):
     diffusers group offloading (block / leaf level, with / without CUDA streams), accelerate model offload and
     sequential offload (when accelerate is installed): peak during a step, step time, svdq.linear.LAYOUT_STATS
     per step (weight conversions: 0 expected except accelerate's sequential offload — one transient per layer,
     docs/models.md), memory left after the step.
Results: OUT/memory.json (rewritten after every part, so a timeout keeps what ran) and OUT/memory.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

GIB = 2**30


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="flux-dev")
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--budget-s", type=float, default=200.0, help="skip the remaining offload modes after this")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dry-run-cpu", action="store_true",
                    help="exercise the script on the CPU stand-in model (memory figures read 0): for CI-less checks")
    args = ap.parse_args(argv)
    if args.dry_run_cpu:
        _fake_cuda()
    elif not torch.cuda.is_available():
        print("memory_check: no CUDA GPU", file=sys.stderr)
        return 2

    import svdq
    from svdq.bench import model as bm
    from svdq.linear import LAYOUT_STATS

    t_start = time.perf_counter()
    dev = torch.device("cpu" if args.dry_run_cpu else "cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"model": args.model, "res": args.res, "rank": args.rank, "adaln": "w4a16",
                    "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "offload": {}}

    def save():
        (args.out / "memory.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "memory.md").write_text(markdown(result))

    def sync_alloc() -> int:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated(dev)

    spec = bm.cpu_spec(args.model) if args.dry_run_cpu else bm.MODELS[args.model]
    base = sync_alloc()
    model = bm.build_model(spec, dev, torch.bfloat16, 0)
    result["bf16_resident_bytes"] = sync_alloc() - base
    result["bf16_state_dict_bytes"] = bm.weight_bytes(model)
    patterns = bm.adaln_bytes(model, torch.bfloat16)["patterns"]
    t0 = time.perf_counter()
    svdq.models.prepare(model)
    svdq.quantize(model, calibration=None, rank=args.rank, progress=False, weight_only=patterns)
    result["quantize_s"] = round(time.perf_counter() - t0, 1)
    result["svdq_resident_after_load_bytes"] = sync_alloc() - base
    result["svdq_state_dict_bytes"] = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    layouts = {}
    for m in model.modules():
        if hasattr(m, "layout") and hasattr(m, "qweight"):
            layouts[m.layout] = layouts.get(m.layout, 0) + 1
    result["layer_layouts"] = layouts
    save()

    inputs = bm.make_inputs(spec, model, args.res, dev, torch.bfloat16)
    with torch.no_grad():
        model(**inputs, return_dict=False)  # warm-up (kernels, workspaces)
        before = sync_alloc()
        torch.cuda.reset_peak_memory_stats(dev)
        stats = dict(LAYOUT_STATS)
        t0 = time.perf_counter()
        model(**inputs, return_dict=False)
        torch.cuda.synchronize()
        result["step_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
        result["step_peak_bytes"] = torch.cuda.max_memory_allocated(dev) - base
        result["step_conversions"] = {k: LAYOUT_STATS[k] - stats[k] for k in stats}
        after = []
        for _ in range(args.steps):
            model(**inputs, return_dict=False)
            after.append(sync_alloc() - base)
    result["leak_check"] = {"steps": args.steps, "allocated_before": before - base, "allocated_after_each": after,
                            "grew_bytes": max(after) - (before - base), "pass": max(after) <= before - base}
    save()

    cpu_model = model.to("cpu")  # layers keep the CUDA layout on the CPU (svdq.linear: `_settle`)
    del model
    torch.cuda.empty_cache()
    inputs = {k: v for k, v in inputs.items()}
    modes = [("group block_level", dict(offload_type="block_level", num_blocks_per_group=1, use_stream=False)),
             ("group block_level stream", dict(offload_type="block_level", num_blocks_per_group=1, use_stream=True)),
             ("group leaf_level", dict(offload_type="leaf_level", use_stream=False)),
             ("group leaf_level stream", dict(offload_type="leaf_level", use_stream=True)),
             ("accelerate model offload", None), ("accelerate sequential offload", None)]
    for name, kw in modes:
        if time.perf_counter() - t_start > args.budget_s:
            result["offload"][name] = {"status": "skipped", "note": f"budget {args.budget_s:.0f} s spent"}
            continue
        try:
            result["offload"][name] = offload_run(name, kw, cpu_model, inputs, dev, base, LAYOUT_STATS)
        except Exception as e:  # noqa: BLE001  (one mode failing must not lose the others)
            result["offload"][name] = {"status": "error", "note": f"{type(e).__name__}: {str(e)[:300]}"}
        torch.cuda.empty_cache()
        save()
        print(name, result["offload"][name], flush=True)
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    save()
    print(markdown(result))
    return 0


def _fake_cuda() -> None:
    """--dry-run-cpu: the allocator queries answer 0, device names say so; everything else runs for real."""
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        setattr(torch.cuda, name, lambda *a, **k: None)
    torch.cuda.memory_allocated = lambda *a, **k: 0
    torch.cuda.max_memory_allocated = lambda *a, **k: 0
    torch.cuda.get_device_name = lambda *a, **k: "CPU dry run (no memory figures)"


def offload_run(name, kw, cpu_model, inputs, dev, base, stats) -> dict:
    m = copy.deepcopy(cpu_model)
    hook = None
    if kw is not None:
        from diffusers.hooks import apply_group_offloading

        if dev.type == "cpu":
            kw = {**kw, "use_stream": False}  # streams need an accelerator
        apply_group_offloading(m, onload_device=dev, offload_device=torch.device("cpu"), **kw)
    elif name == "accelerate model offload":
        from accelerate import cpu_offload_with_hook

        m, hook = cpu_offload_with_hook(m, execution_device=dev)
    else:
        from accelerate import cpu_offload

        cpu_offload(m, execution_device=dev, offload_buffers=False)
    with torch.no_grad():
        m(**inputs, return_dict=False)  # first step: onload paths, pinned copies
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        s0 = dict(stats)
        t0 = time.perf_counter()
        m(**inputs, return_dict=False)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
    out = {"status": "ok", "step_ms": round(ms, 1), "peak_bytes": torch.cuda.max_memory_allocated(dev) - base,
           "conversions_per_step": {k: stats[k] - s0[k] for k in s0}}
    if hook is not None:
        hook.offload()
    del m
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    out["allocated_after_bytes"] = torch.cuda.memory_allocated(dev) - base
    return out


def markdown(r: dict) -> str:
    g = lambda b: "–" if b is None else f"{b / GIB:.2f}"  # noqa: E731
    lines = [f"# svdq memory check: {r['model']} at {r['res']}², {r.get('device')}", "",
             f"bf16: {g(r.get('bf16_resident_bytes'))} GiB resident (state dict {g(r.get('bf16_state_dict_bytes'))} GiB)",
             f"svdq (rank {r['rank']}, AdaLN {r['adaln']}): **{g(r.get('svdq_resident_after_load_bytes'))} GiB "
             f"resident after load** (state dict {g(r.get('svdq_state_dict_bytes'))} GiB); layouts "
             f"{r.get('layer_layouts')}; quantize {r.get('quantize_s')} s"]
    if "step_peak_bytes" in r:
        lines += [f"one step: peak {g(r['step_peak_bytes'])} GiB, {r['step_ms']} ms, conversions "
                  f"{r['step_conversions']}"]
    if "leak_check" in r:
        lc = r["leak_check"]
        lines += [f"leak check over {lc['steps']} steps: grew {lc['grew_bytes']} bytes → "
                  f"{'PASS' if lc['pass'] else 'FAIL'}"]
    if r.get("offload"):
        lines += ["", "| offload mode | step ms | peak GiB | conversions per step | left after (bytes) | note |",
                  "|---|---|---|---|---|---|"]
        for name, o in r["offload"].items():
            if o.get("status") != "ok":
                lines.append(f"| {name} | {o.get('status')} | | | | {o.get('note', '')} |")
            else:
                lines.append(f"| {name} | {o['step_ms']} | {g(o['peak_bytes'])} | {o['conversions_per_step']} | "
                             f"{o['allocated_after_bytes']} | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
