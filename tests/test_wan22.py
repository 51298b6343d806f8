"""Wan 2.2 A14B: two denoisers (`transformer` for high noise, `transformer_2` for low noise), both quantized.

A tiny WanPipeline with two tiny Wan transformers of different seeds and ``boundary_ratio`` 0.875: with 4 steps
the scheduler's timesteps are 999, 900 (>= 875: `transformer`) and 750, 500 (`transformer_2`).

1. Library: `svdq.calibrate_pipeline(..., component=...)` calibrates each expert on its own timesteps only,
   every layer of both gets calibration statistics, the W4A4 video is close to the 16-bit one (>= 30 dB) and
   naive W4A4 of both experts is >= 3 dB worse; `save_pretrained(transformer_2=)` → `load_quantized_denoisers`
   is bit-exact; an interrupted save leaves no directory (or the previous one) behind.
2. Errors: a component that never runs (too few steps) in the plan's trace and in the calibration, an unknown
   component, a calibration given the other expert.
3. CLI: `svdq quantize` writes OUT/transformer_2/, `svdq generate` (.gif) and `svdq eval` run both quantized
   experts; a quantized directory and base pipeline that disagree on transformer_2 are refused, as are
   --streaming and a stale transformer_2/ in --out.
"""

import copy
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import svdq
from svdq import cli
from svdq.checkpoint import CheckpointError
from svdq.linear import SVDQLinear
from svdq.models import denoiser_components, family_of, generic, pipeline_model, prepare
from svdq.pretrained import load_pipeline, load_quantized_denoisers
from svdq.testing import families as tf

STEPS = 4
BOUNDARY = 0.875  # × 1000 training timesteps: 999, 900 → transformer; 750, 500 → transformer_2
PROMPT = "a red fox sitting in the snow"
CALIB_PROMPTS = ["a lighthouse in a storm, watercolor"]
CALL = tf.call_kwargs("wan")
MIN_PSNR_DB = 30.0
EXPERTS = ("transformer", "transformer_2")


def wan22_pipeline(transformer=None, transformer_2=None):
    """The tiny two-expert Wan 2.2 pipeline (its second expert has another seed: different weights)."""
    import diffusers

    base = tf.tiny_family_pipeline("wan", seed=0, transformer=transformer)
    t2 = transformer_2 if transformer_2 is not None else tf.tiny_transformer("wan", seed=1)
    return diffusers.WanPipeline(**{**base.components, "transformer_2": t2}, boundary_ratio=BOUNDARY)


def generate(pipe, seed: int = 1) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(seed), output_type="np",
               num_inference_steps=STEPS, **CALL)
    return np.asarray(out.frames[0])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def record_timesteps(model, seen: list):
    return model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(float(kw["timestep"][0])), with_kwargs=True)


def test_both_experts_quantized_with_their_own_timesteps(tmp_path, monkeypatch):
    pipe = wan22_pipeline()
    assert denoiser_components(pipe) == list(EXPERTS)
    reference = generate(pipe)

    # naive W4A4 of both experts (planned and fused as svdquant's; no smoothing, no low-rank), same pipeline
    originals = {c: pipeline_model(pipe, c) for c in EXPERTS}
    for c in EXPERTS:
        setattr(pipe, c, copy.deepcopy(originals[c]))
        generic.analyze_pipeline(pipe, CALIB_PROMPTS[0], component=c, num_inference_steps=STEPS, **CALL)
        family = prepare(pipeline_model(pipe, c))
        svdq.quantize(pipeline_model(pipe, c), method="naive", exclude=family.exclude, progress=False)
    naive_psnr = psnr(generate(pipe), reference)
    for c in EXPERTS:
        setattr(pipe, c, originals[c])

    seen = {c: [] for c in EXPERTS}
    for c in EXPERTS:
        model = pipeline_model(pipe, c)
        calibration = svdq.calibrate_pipeline(pipe, CALIB_PROMPTS, num_inference_steps=STEPS, progress=False,
                                              component=c, **CALL)
        assert model._svdq_plan.groups  # its own plan, from its own first forward (below the boundary for t_2)
        # nearest rounding: GPTQ is covered elsewhere (tests/test_gptq.py) and would triple this test's time
        config = svdq.QuantizeConfig(alphas=(0.3, 0.5, 0.7), exclude=family_of(model).exclude, rounding="nearest")
        handle = record_timesteps(model, seen[c])  # the forwards svdq.quantize records statistics from
        try:
            svdq.quantize(model, calibration=calibration, config=config, progress=False)
        finally:
            handle.remove()
        assert set(model.svdq_report) == model._svdq_plan.quantized_names()
        assert all(r["rel_error"] is not None for r in model.svdq_report.values())  # every layer calibrated
    # each expert's calibration ran (both CFG branches of) its own timesteps, and only those
    assert sorted(set(seen["transformer"])) == [900.0, 999.0] and len(seen["transformer"]) == 4
    assert sorted(set(seen["transformer_2"])) == [500.0, 750.0] and len(seen["transformer_2"]) == 4
    t1, t2 = (pipeline_model(pipe, c) for c in EXPERTS)
    assert t1._svdq_plan is not t2._svdq_plan

    quantized = generate(pipe)
    q_psnr = psnr(quantized, reference)
    print(f"wan 2.2: W4A4 {q_psnr:.1f} dB, naive W4A4 {naive_psnr:.1f} dB")
    assert q_psnr >= MIN_PSNR_DB
    assert naive_psnr <= q_psnr - 3.0

    # save both experts in one directory → reload: bit-exact, each expert's own weights
    out = svdq.save_pretrained(t1, tmp_path / "q", base="tiny", transformer_2=t2)
    assert json.loads((out / "transformer_2" / "svdq.json").read_text())["class_name"] == "WanTransformer3DModel"
    loaded = load_quantized_denoisers(out, list(EXPERTS))
    for c, model in loaded.items():
        original = pipeline_model(pipe, c).state_dict()
        state = model.state_dict()
        assert state.keys() == original.keys()
        assert all(torch.equal(state[k], original[k]) for k in state)
    fresh = type(pipe)(**{**pipe.components, **loaded}, boundary_ratio=BOUNDARY)
    assert np.array_equal(generate(fresh), quantized)

    # all or nothing: the second expert's save failing (Ctrl-C) leaves the previous directory as it was, and no
    # temporary directory; without a previous one, nothing
    import svdq.pretrained as pretrained

    real_save, calls = pretrained.save, []

    def interrupted(model, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_save(model, path, *a, **k)

    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    monkeypatch.setattr(pretrained, "save", interrupted)
    for target in (out, tmp_path / "new"):
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            svdq.save_pretrained(t1, target, base="other", transformer_2=t2)
    monkeypatch.setattr(pretrained, "save", real_save)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_component_errors():
    pipe = wan22_pipeline()
    with pytest.raises(ValueError, match="has no denoiser component 'transformer_3'"):
        pipeline_model(pipe, "transformer_3")
    # one step (t = 999) never reaches the low-noise expert: the plan's trace says so
    with pytest.raises(ValueError, match=r"transformer_2 never ran .*num_inference_steps=1 \(boundary_ratio=0.875"):
        svdq.calibrate_pipeline(pipe, CALIB_PROMPTS, num_inference_steps=1, progress=False, component="transformer_2",
                                **CALL)
    t2 = pipe.transformer_2
    assert not hasattr(t2, "_svdq_plan")
    # planned with enough steps, calibrated with too few: the calibration says so and nothing is quantized
    svdq.calibrate_pipeline(pipe, CALIB_PROMPTS, num_inference_steps=STEPS, progress=False, component="transformer_2",
                            **CALL)
    short = svdq.calibrate_pipeline(pipe, CALIB_PROMPTS, num_inference_steps=1, progress=False,
                                    component="transformer_2", **CALL)
    with pytest.raises(ValueError, match="transformer_2 never ran"):
        svdq.quantize(t2, calibration=short, progress=False)
    assert not any(isinstance(m, SVDQLinear) for m in t2.modules())
    # a calibration built for one expert refuses the other
    with pytest.raises(ValueError, match="quantize that module"):
        short(pipe.transformer)


FRAMES = CALL["num_frames"]
CLI_CALL = ["--steps", str(STEPS), "--height", str(CALL["height"]), "--width", str(CALL["width"]),
            "--num-frames", str(FRAMES), "--max-sequence-length", str(CALL["max_sequence_length"])]


@pytest.fixture(scope="module")
def wan22_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan22-cli")
    wan22_pipeline().save_pretrained(root / "wan22")
    (root / "prompts.txt").write_text(CALIB_PROMPTS[0] + "\n")
    rc = cli.main(["quantize", "--model", str(root / "wan22"), "--out", str(root / "q"),
                   "--calib-prompts", str(root / "prompts.txt"), "--rank", "16", "--rounding", "nearest", *CLI_CALL])
    assert rc == 0
    return root


def test_cli_quantize_generate_eval(wan22_dirs, capsys):
    root = wan22_dirs
    for d in (root / "q", root / "q" / "transformer_2"):  # each an svdq model directory
        assert {"config.json", "diffusion_pytorch_model.safetensors", "svdq.json"} <= {p.name for p in d.iterdir()}
    pipe = load_pipeline(root / "wan22", root / "q")
    assert pipe.config.boundary_ratio == BOUNDARY
    for c in EXPERTS:  # both experts are the svdq models, not the 16-bit ones from disk
        assert svdq.quantized_layers(pipeline_model(pipe, c)), c
    first, second = (pipeline_model(pipe, c).blocks[0].ffn.net[2] for c in EXPERTS)
    assert isinstance(first, SVDQLinear) and not torch.equal(first.qweight, second.qweight)  # each its own weights

    gif = root / "fox.gif"
    assert cli.main(["generate", "--model", str(root / "wan22"), "--quantized", str(root / "q"),
                     "--prompt", "a red fox", "--out", str(gif), *CLI_CALL]) == 0
    assert "W4A4 (svdq)" in capsys.readouterr().out
    assert Image.open(gif).n_frames == FRAMES

    assert cli.main(["eval", "--model", str(root / "wan22"), "--quantized", str(root / "q"),
                     "--prompts", str(root / "prompts.txt"), "--out", str(root / "eval"), *CLI_CALL]) == 0
    report = json.loads((root / "eval" / "report.json").read_text())
    # finite: the quantized experts ran (identical videos give inf); high: close to 16-bit
    assert 25 < report["mean_psnr_db"] < 200


def test_cli_refuses_mismatched_experts(wan22_dirs, tmp_path, capsys):
    root = wan22_dirs
    tf.tiny_family_pipeline("wan").save_pretrained(tmp_path / "wan21")  # one denoiser (Wan 2.1)
    with pytest.raises(CheckpointError, match="holds a quantized transformer_2/ .* has no transformer_2"):
        load_pipeline(tmp_path / "wan21", root / "q")
    one = tmp_path / "q-one"
    shutil.copytree(root / "q", one)
    shutil.rmtree(one / "transformer_2")
    with pytest.raises(CheckpointError, match="has a transformer_2 .* holds no quantized transformer_2/"):
        load_pipeline(root / "wan22", one)
    assert cli.main(["eval", "--model", str(root / "wan22"), "--quantized", str(one),
                     "--prompts", str(root / "prompts.txt"), "--out", str(tmp_path / "eval"), *CLI_CALL]) == 1
    assert "holds no quantized transformer_2/" in capsys.readouterr().err

    assert cli.main(["quantize", "--model", str(root / "wan22"), "--out", str(tmp_path / "s"), "--streaming",
                     "--calib-prompts", str(root / "prompts.txt"), *CLI_CALL]) == 1
    assert "--streaming: WanPipeline has two denoisers (transformer, transformer_2)" in capsys.readouterr().err
    stale = tmp_path / "stale"
    shutil.copytree(root / "q", stale)  # a one-denoiser pipeline into a directory holding a transformer_2/
    assert cli.main(["quantize", "--model", str(tmp_path / "wan21"), "--out", str(stale), "--data-free",
                     *CLI_CALL]) == 1
    assert "holds a transformer_2/ from an earlier two-expert save" in capsys.readouterr().err
