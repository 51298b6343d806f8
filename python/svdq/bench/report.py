"""Write a benchmark result three ways: JSON (everything), a markdown table, a PNG bar chart (PIL only)."""

from __future__ import annotations

import json
from pathlib import Path

from . import CPU_MODE_NOTE

REQUIRED_ENV = ("device", "driver", "torch", "cuda", "svdq_version", "git_commit", "date")


def write(result: dict, out_dir: Path, stem: str) -> dict[str, Path]:
    """result → out_dir/stem.{json,md,png}; returns the paths."""
    missing = [k for k in REQUIRED_ENV if k not in result.get("env", {})]
    if missing:
        raise ValueError(f"benchmark result lacks environment fields {missing}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    paths["json"].write_text(json.dumps(result, indent=1, default=str) + "\n")
    paths["md"].write_text(markdown(result))
    chart(result, paths["png"])
    return paths


# ---------------------------------------------------------------------------------------------- markdown
def _mib(b) -> str:
    return "–" if b is None else f"{b / 2**20:,.0f}" if b >= 2**24 else f"{b / 2**20:.2f}"


def _header(result: dict) -> list[str]:
    e = result["env"]
    lines = [f"# svdq bench: {result['kind']}", ""]
    if e.get("mode") == "cpu":
        lines += [f"**{CPU_MODE_NOTE}.**", ""]
    lines += [
        f"{e['device']}, driver {e['driver']}, torch {e['torch']} (CUDA {e['cuda']}), svdq {e['svdq_version']}, "
        f"commit {e['git_commit'][:12]}, {e['date']}; host {e['host']['cpu']}, {e['host']['torch_threads']} torch "
        f"threads.",
        "",
    ]
    return lines


def markdown(result: dict) -> str:
    lines = _header(result)
    if result["kind"] == "layers":
        c = result["config"]
        lines += [f"Linear layers, rank {c['rank']}, activations {c['activation_dtype']}; median of {c['repeats']} "
                  f"after {c['warmup']} warm-up ({', '.join(c['timing']) or '–'}).", "",
                  "| layer | M | K→N | variant | ms | TFLOP/s | × baseline | note |", "|---|---|---|---|---|---|---|---|"]
        for r in result["rows"]:
            ms = f"{r['median_ms']:.3f}" if "median_ms" in r else r["status"]
            tf = f"{r['tflops']:.3g}" if "tflops" in r else "–"
            sp = f"{r['speedup_vs_baseline']:.2f}× ({r['baseline']})" if "speedup_vs_baseline" in r else "–"
            lines.append(f"| {r['layer']} | {r['M']} | {r['K']}→{r['N']} | {r['variant']} | {ms} | {tf} | {sp} | "
                         f"{r.get('note', '')} |")
    else:
        c, q = result["config"], result.get("quantization") or {}
        lines += [f"{c['class']} (`{c['model']}`), {result['model']['params'] / 1e9:.3f} B parameters, synthetic weights; "
                  f"one step, batch 1; median of {c['repeats']} after {c['warmup']} warm-up; rank {c['rank']}.", ""]
        if q:
            lines += [f"Quantization (data-free, {q['layers']} layers, on {q['device']}): **{q['seconds']:.1f} s**; "
                      f"the quantized layers' weights {_mib(q['linear_bytes_16bit'])} MiB ({q['dtype']}) → "
                      f"{_mib(q['linear_bytes_svdq'])} MiB ({q['linear_weight_ratio']:.2f}× smaller).", ""]
            if q.get("adaln_layers"):
                lines += [f"Whole model, {q['dtype']} {_mib(q['model_bytes_baseline'])} MiB → svdq with AdaLN 16-bit "
                          f"{_mib(q['model_bytes_svdq_adaln_16bit'])} MiB ({q['model_weight_ratio_adaln_16bit']:.2f}×), "
                          f"with AdaLN W4A16 {_mib(q['model_bytes_svdq_adaln_w4a16'])} MiB "
                          f"({q['model_weight_ratio_adaln_w4a16']:.2f}×); {q['adaln_layers']} AdaLN linears "
                          f"{_mib(q['adaln_bytes_16bit'])} → {_mib(q['adaln_bytes_w4a16'])} MiB. Timed rows: AdaLN "
                          f"{q['adaln']} (`--adaln`).", ""]
            if q.get("resident_after_load_bytes"):
                lines += [f"Measured after quantization ({q['resident_how']}): **{_mib(q['resident_after_load_bytes'])} "
                          f"MiB** resident, {q['resident_over_state_dict']:.3f}× the state dict.", ""]
        lines += ["| variant | backend | mode | res | ms | × 16-bit eager | × same mode | loaded MiB | peak MiB "
                  "| state-dict MiB | GEMM / qact / attn / other | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["rows"]:
            if r.get("status") != "ok":
                lines.append(f"| {r['variant']} | {r.get('backend') or '–'} | {r.get('mode', '–')} | "
                             f"{r.get('res', '–')} | {r['status']} | | | | | | | {r.get('note', '')} |")
                continue
            note = r.get("note", "")
            if r.get("dynamo"):
                dz = r["dynamo"]
                note = (note + "; " if note else "") + (f"{r.get('compile', '')}: {dz['unique_graphs']} graphs, "
                                                        f"{dz['graph_break_resumes']} graph breaks, compile "
                                                        f"{r.get('first_call_s', 0):.0f} s")
            s = r.get("time_split")
            split = (f"{s['gemm']:.0%} / {s['quantize_act']:.0%} / {s['attention']:.0%} / {s['other']:.0%}"
                     if s else "–")
            lines.append(
                f"| {r['variant']} | {r.get('backend') or '–'} | {r['mode']} | {r['res']}² | {r['median_ms']:.1f} | "
                f"{r.get('speedup_vs_baseline', 0):.2f}× | {r.get('speedup_vs_baseline_same_mode', 0):.2f}× | "
                f"{_mib(r.get('loaded_bytes'))} | {_mib(r.get('peak_mem_bytes'))} | {_mib(r['weight_bytes'])} | "
                f"{split} | {note} |")
        if result.get("targets"):
            lines += ["", "Targets (FLUX 1024²): " + "; ".join(
                f"{k}: {v['value']} → {'PASS' if v['pass'] else 'FAIL'}" for k, v in result["targets"].items())]
        lines += ["", "\"× 16-bit eager\" is against the baseline row: bf16 eager on a GPU, fp32 eager in CPU mode. "
                  "Memory is measured, the state dict summed: \"loaded\" = `torch.cuda.memory_allocated()` after the "
                  "variant was set up, before any input (on the CPU: every tensor storage reachable from the model); "
                  "\"peak\" = `torch.cuda.max_memory_allocated()` during one step; \"state-dict\" = parameters + "
                  "buffers of the whole denoiser as saved (layers kept 16-bit included). FP8/NF4/INT4 rows swap layers "
                  "and keep the bf16 originals for the next variant, so their loaded/peak include those."]
    for n in result.get("notes", []):
        lines += ["", f"Note: {n}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- PNG
def _label(result: dict, r: dict) -> str:
    be = f"[{r['backend']}]" if r.get("backend") else ""
    if result["kind"] == "layers":
        return f"M{r['M']} {r['K']}x{r['N']} {r['variant']}"
    return f"{r['variant']}{be} {r['mode']} {r['res']}px"


def chart(result: dict, path: Path) -> None:
    """Horizontal bars: speedup of every measured row against its baseline (1.0 = baseline), ms beside it."""
    from PIL import Image, ImageDraw, ImageFont

    rows = [r for r in result["rows"] if r.get("status") == "ok" and "speedup_vs_baseline" in r]
    font = ImageFont.load_default()
    bar_h, gap, left, right, top = 16, 4, 330, 330, 70
    width = 1100
    height = top + len(rows) * (bar_h + gap) + 40
    img = Image.new("RGB", (width, max(height, 140)), "white")
    d = ImageDraw.Draw(img)
    e = result["env"]
    title = f"svdq bench {result['kind']} - {e['device']} - torch {e['torch']} - commit {e['git_commit'][:10]}"
    d.text((10, 8), title, fill="black", font=font)
    d.text((10, 24), "bar: speedup vs the 16-bit baseline (1.0 = baseline); label: median ms, measured memory "
           "(loaded: allocator after load; peak: max allocated in a step)", fill="black", font=font)
    if e.get("mode") == "cpu":
        d.text((10, 40), CPU_MODE_NOTE.upper(), fill=(200, 0, 0), font=font)
    vmax = max([r["speedup_vs_baseline"] for r in rows] + [1.0]) * 1.05
    scale = (width - left - right) / vmax
    colors = {"bf16": (120, 120, 120), "fp32": (80, 80, 80), "fp8": (230, 150, 30), "nf4": (150, 90, 200),
              "int4": (90, 150, 200)}
    for i, r in enumerate(rows):
        y = top + i * (bar_h + gap)
        d.text((10, y + 2), _label(result, r)[:52], fill="black", font=font)
        w = max(1, int(r["speedup_vs_baseline"] * scale))
        color = colors.get(r["variant"].split("[")[0], (40, 140, 70) if r["variant"].startswith("svdq") else (60, 60, 160))
        d.rectangle([left, y, left + w, y + bar_h], fill=color)
        mem = "".join(f"  {k} {r[key] / 2**30:.2f} GiB" for k, key in (("loaded", "loaded_bytes"),
                                                                       ("peak", "peak_mem_bytes")) if r.get(key))
        d.text((left + w + 6, y + 2), f"{r['speedup_vs_baseline']:.2f}x  {r['median_ms']:.3g} ms{mem}", fill="black",
               font=font)
    x1 = left + int(scale)
    d.line([x1, top - 6, x1, top + len(rows) * (bar_h + gap)], fill=(200, 0, 0), width=1)
    img.save(path)
