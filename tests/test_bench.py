"""`svdq bench` in CPU mode: both modes run end to end and write JSON / markdown / PNG with the required
fields; GPU-only variants are listed as skipped with a reason; bad arguments give clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from svdq.bench import CPU_MODE_NOTE
from svdq.bench import model as bmodel
from svdq.cli import main

ENV_FIELDS = ("device", "driver", "torch", "cuda", "svdq_version", "git_commit", "date")
FAST = ["--device", "cpu", "--repeats", "2", "--warmup", "0", "--threads", "1"]


def _outputs(tmp_path, stem):
    paths = {ext: tmp_path / f"{stem}.{ext}" for ext in ("json", "md", "png")}
    for p in paths.values():
        assert p.is_file() and p.stat().st_size > 0, p
    from PIL import Image

    with Image.open(paths["png"]) as im:
        assert im.size[0] > 500 and im.size[1] > 100
    return json.loads(paths["json"].read_text()), paths["md"].read_text()


def test_layers_cpu_mode(tmp_path, capsys):
    rc = main(["bench", "--layers", *FAST, "--tokens", "32", "--shapes", "128x192,192x64", "--out", str(tmp_path)])
    assert rc == 0
    res, md = _outputs(tmp_path, "bench_cpu_layers")
    assert res["kind"] == "layers" and res["env"]["mode"] == "cpu"
    for k in ENV_FIELDS:
        assert res["env"][k], k
    assert CPU_MODE_NOTE in res["notes"] and CPU_MODE_NOTE in md and CPU_MODE_NOTE in capsys.readouterr().out
    rows = res["rows"]
    assert {(r["K"], r["N"]) for r in rows} == {(128, 192), (192, 64)}
    variants = {r["variant"] for r in rows}
    be = res["config"]["backends"][0]
    assert {"fp32", "bf16", "fp8", "svdq", "svdq_unfused", "svdq_r0"} <= variants, variants
    for r in rows:
        if r["variant"] == "fp8":
            assert r["status"] == "skipped" and "GPU" in r["note"]
        else:
            assert r["status"] == "ok" and r["median_ms"] > 0 and r["speedup_vs_baseline"] > 0
            assert r["baseline"] == "fp32"
    assert f"backend {be}" in next(r["note"] for r in rows if r["variant"] == "svdq")


def test_model_flux_dev_cpu_mode(tmp_path):
    rc = main(["bench", "--model", "flux-dev", *FAST, "--res", "32,48", "--out", str(tmp_path)])
    assert rc == 0
    res, md = _outputs(tmp_path, "bench_cpu_flux-dev")
    for k in ENV_FIELDS:
        assert res["env"][k], k
    assert res["config"]["class"] == "FluxTransformer2DModel" and res["config"]["compile"] is False
    assert CPU_MODE_NOTE in md
    q = res["quantization"]
    assert q["seconds"] > 0 and q["layers"] > 0 and "data-free" in q["method"]
    rows = res["rows"]
    skipped = {r["variant"]: r["note"] for r in rows if r["status"] == "skipped"}
    assert set(skipped) == {"fp8", "nf4", "int4"}
    assert all(skipped.values())
    ok = [r for r in rows if r["status"] == "ok"]
    assert {(r["variant"], r["backend"]) for r in ok} >= {("fp32", None), ("bf16", None), ("svdq", res["config"]["backends"][0])}
    assert all(r["mode"] == "eager" for r in ok) and {r["res"] for r in ok} == {32, 48}
    for r in ok:
        assert r["median_ms"] > 0 and len(r["times_ms"]) == 2 and r["weight_bytes"] > 0
        assert r["speedup_vs_baseline"] > 0 and r["baseline"] == "fp32 eager"
    svdq_row = next(r for r in ok if r["variant"] == "svdq")
    assert svdq_row["weight_ratio_vs_baseline"] > 1.2  # fp32 model: 4-bit layers + 16-bit rest
    assert "quantization" in md.lower() and "skipped" in md
    # Both AdaLN options' whole-model weight memory (16-bit ran; W4A16 by arithmetic): 2 + 4 blocks' AdaLN.
    assert q["adaln"] == "16bit" and q["adaln_layers"] == 2 * 2 + 4
    assert q["model_bytes_svdq_adaln_16bit"] == svdq_row["weight_bytes"]
    assert q["model_weight_ratio_adaln_w4a16"] > q["model_weight_ratio_adaln_16bit"] > 1.2
    assert "AdaLN W4A16" in md


def test_model_flux_adaln_w4a16_cpu_mode(tmp_path):
    rc = main(["bench", "--model", "flux-dev", *FAST, "--res", "32", "--variants", "fp32,svdq", "--backends", "cpu",
               "--adaln", "w4a16", "--out", str(tmp_path)])
    assert rc == 0
    res, _ = _outputs(tmp_path, "bench_cpu_flux-dev")
    q = res["quantization"]
    svdq_row = next(r for r in res["rows"] if r["variant"] == "svdq" and r["status"] == "ok")
    assert res["config"]["adaln"] == "w4a16" and "AdaLN w4a16" in svdq_row["note"]
    # The measured model (AdaLN W4A16) equals the arithmetic of the 16-bit-AdaLN run minus the AdaLN saving.
    assert q["model_bytes_svdq_adaln_w4a16"] == svdq_row["weight_bytes"]
    assert q["model_bytes_svdq_adaln_16bit"] - svdq_row["weight_bytes"] == q["adaln_bytes_16bit"] - q["adaln_bytes_w4a16"]


@pytest.mark.parametrize("argv", [
    ["bench"],  # neither --layers nor --model
    ["bench", "--layers", "--model", "sdxl"],
    ["bench", "--model", "flux-pro"],
    ["bench", "--layers", "--shapes", "3072by9216"],
    ["bench", "--layers", "--tokens", "a,b"],
])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--model", "flux-dev", "--repeats", "0"], "--repeats"),
    (["--model", "flux-dev", "--res", "500"], "multiples of 16"),
    (["--model", "flux-dev", "--tokens", "64"], "apply to --layers"),
    (["--layers", "--res", "512"], "apply to --model"),
    (["--layers", "--rank", "20"], "--rank"),
    (["--layers", "--adaln", "w4a16"], "apply to --model"),
    (["--layers", "--backends", "tpu"], "not available"),
    (["--model", "sdxl", "--variants", "fp4"], "unknown --variants"),
])
def test_bad_values_one_line_error(tmp_path, capsys, extra, message):
    assert main(["bench", *extra, "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("svdq bench: error:") and message in err
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_device_cuda_without_gpu(tmp_path, capsys):
    assert main(["bench", "--layers", "--device", "cuda", "--out", str(tmp_path)]) == 1
    assert "no CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("name, params_b", [("flux-dev", 11.90), ("flux-schnell", 11.90), ("sdxl", 2.57),
                                             ("pixart-sigma", 0.61)])
def test_full_size_configs_match_published_sizes(name, params_b):
    import diffusers

    spec = bmodel.MODELS[name]
    with torch.device("meta"):
        m = getattr(diffusers, spec.cls)(**spec.config)
    assert sum(p.numel() for p in m.parameters()) / 1e9 == pytest.approx(params_b, abs=0.01)
    names = bmodel.quantized_layer_names(m)
    assert names and not any("norm1.linear" in n or "embed" in n for n in names)


@pytest.mark.parametrize("name", ["sdxl", "pixart-sigma", "flux-schnell"])
def test_cpu_stand_ins_build_and_run(name):
    """The meta-device build path (to_empty + seeded init + buffer recipes) gives a finite forward."""
    spec = bmodel.cpu_spec(name)
    m = bmodel.build_model(spec, torch.device("cpu"), torch.float32)
    assert not any(p.is_meta for p in m.parameters())
    with torch.no_grad():
        out = m(**bmodel.make_inputs(spec, m, 32, torch.device("cpu"), torch.float32), return_dict=False)[0]
    assert torch.isfinite(out).all()


def test_targets_and_speedups():
    rows = [
        {"variant": "bf16", "mode": "eager", "res": 1024, "status": "ok", "median_ms": 171.6, "weight_bytes": 22},
        {"variant": "bf16", "mode": "compiled", "res": 1024, "status": "ok", "median_ms": 127.9, "weight_bytes": 22},
        {"variant": "fp8", "mode": "compiled", "res": 1024, "status": "ok", "median_ms": 102.6, "weight_bytes": 12},
        {"variant": "svdq", "mode": "eager", "res": 1024, "status": "ok", "median_ms": 120.0, "weight_bytes": 6},
        {"variant": "svdq", "mode": "compiled", "res": 1024, "status": "ok", "median_ms": 110.0, "weight_bytes": 6},
    ]
    bmodel._speedups(rows, "bf16")
    assert rows[3]["speedup_vs_baseline"] == pytest.approx(1.43, abs=0.01)
    assert rows[4]["speedup_vs_baseline_same_mode"] == pytest.approx(127.9 / 110.0, abs=1e-3)
    t = bmodel._targets(rows)
    assert t["svdq_eager_speedup_ge_1.3"]["pass"] and t["svdq_weights_le_bf16_over_3.5"]["pass"]
    assert not t["svdq_compiled_le_fp8_compiled_ms"]["pass"]


def test_fp8_and_weight_only_variants_explain_skips():
    assert "GPU" in bmodel._variant_unavailable("fp8", torch.device("cpu"))
    for v in ("nf4", "int4"):
        why = bmodel._variant_unavailable(v, torch.device("cpu"))
        assert why and ("not installed" in why or "GPU only" in why)
    assert bmodel._variant_unavailable("bf16", torch.device("cpu")) is None


@pytest.mark.parametrize("name, cat", [
    ("nvjet_tst_192x192_64x4_1x2_h_bz_coopA_TNT", "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "gemm"),
    ("void w4a4_gemm_kernel<(Mma)1, __nv_bfloat16>(W4A4GemmParams)", "gemm"),
    ("void quantize_act_kernel<64, __nv_bfloat16>(KernelArgs)", "quantize_act"),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>", "attention"),
    ("triton_tem_fused_addmm_3", "gemm"),
    ("triton_poi_fused_add_mul_native_layer_norm_7", "other"),
    ("Memcpy DtoD (Device -> Device)", "other"),
    ("cudaLaunchKernel", None),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
])
def test_kernel_category(name, cat):
    assert bmodel.kernel_category(name) == cat


def test_fp8_swap_runs_and_restores():
    """Dynamic FP8 (torch._scaled_mm also runs on the CPU in this torch) swaps svdq's layer set and puts the
    16-bit layers back; weight bytes drop while swapped."""
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no float8 dtype")
    spec = bmodel.cpu_spec("flux-dev")
    m = bmodel.build_model(spec, torch.device("cpu"), torch.bfloat16)
    names = bmodel.quantized_layer_names(m)
    inp = bmodel.make_inputs(spec, m, 32, torch.device("cpu"), torch.bfloat16)
    w16 = bmodel.weight_bytes(m)
    with torch.no_grad():
        ref = m(**inp, return_dict=False)[0].float()
        try:
            with bmodel.swapped(m, names, bmodel.FP8Linear) as skipped:
                assert not skipped and bmodel.weight_bytes(m) < 0.8 * w16
                y = m(**inp, return_dict=False)[0].float()
        except RuntimeError as e:  # a torch without a CPU _scaled_mm
            pytest.skip(f"torch._scaled_mm not on CPU: {e}")
        assert float((y - ref).norm() / ref.norm()) < 0.15
        assert torch.equal(m(**inp, return_dict=False)[0].float(), ref)
    assert bmodel.weight_bytes(m) == w16
