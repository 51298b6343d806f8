"""diffusers' ``nunchaku_lite`` model directories (`svdq.formats.nunchaku_lite`, docs/formats.md).

The exported directories are checked against diffusers' own pieces: its config class parses the compact config,
and its own module-replacement code (``replace_with_nunchaku_linear``, ``SVDQW4A4Linear``, ``AWQW4A16Linear``,
``check_strict_state_dict_match`` from ``diffusers/quantizers/nunchaku/utils.py``, executed from its source
because that module refuses to import without the ``kernels`` package) builds the model diffusers would load
the file into: same keys, shapes and dtypes. Directories written by the independent packers of
tests/test_nunchaku_format.py (written from the layout description, not svdq's packers) load to the same layers.
"""

import ast
import itertools
import json
import math
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import svdq
from svdq.checkpoint import CheckpointError
from svdq.formats import nunchaku as nk
from svdq.formats import nunchaku_lite as nl
from svdq.ops import reference as ref
from svdq.quantize import quantized_layers
from svdq.weight_only import unpack_nibbles, weight_only_layers
from test_nunchaku_format import indep_layer, indep_pack_awq_qweight, to_torch

WEIGHTS = "diffusion_pytorch_model.safetensors"


def diffusers_nunchaku_code() -> dict:
    """diffusers' own replacement code, compiled from its source (the module imports `kernels` at import time,
    which the runtime needs and this check does not)."""
    import diffusers.quantizers.nunchaku as pkg
    from accelerate import init_empty_weights

    src = Path(pkg.__file__).parent / "utils.py"
    wanted = {"SVDQW4A4Linear", "AWQW4A16Linear", "replace_with_nunchaku_linear", "_replace_quantize_targets",
              "_set_submodule", "check_strict_state_dict_match"}
    nodes = [n for n in ast.parse(src.read_text()).body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in wanted]
    assert {n.name for n in nodes} == wanted
    ns = {"__name__": "diffusers_nunchaku_utils", "torch": torch, "nn": nn, "math": math, "itertools": itertools,
          "Any": Any, "nullcontext": nullcontext, "is_accelerate_available": lambda: True,
          "init_empty_weights": init_empty_weights}
    exec(compile(ast.Module(body=nodes, type_ignores=[]), str(src), "exec"), ns)
    return ns


def diffusers_model(directory: Path):
    """(the model diffusers' NunchakuLite loader builds for ``directory`` on the meta device, its parsed config)."""
    import diffusers
    from accelerate import init_empty_weights
    from diffusers.quantizers.auto import DiffusersAutoQuantizer
    from diffusers.quantizers.quantization_config import NunchakuLiteQuantizationConfig

    config = json.loads((directory / "config.json").read_text())
    qc = config.pop("quantization_config")
    parsed = DiffusersAutoQuantizer.from_dict(qc)  # diffusers' own dispatch of config.json's quantization_config
    assert type(parsed) is NunchakuLiteQuantizationConfig
    with init_empty_weights():
        model = getattr(diffusers, config["_class_name"]).from_config({k: v for k, v in config.items() if not k.startswith("_")})
    code = diffusers_nunchaku_code()
    n = code["replace_with_nunchaku_linear"](model, parsed.to_dict(), parsed.compute_dtype)
    assert n == sum(len(qc[s]["targets"]) for s in ("svdq_w4a4", "awq_w4a16") if s in qc)
    return model, parsed, code


def check_against_diffusers(directory: Path) -> dict:
    model, parsed, code = diffusers_model(directory)
    sd = load_file(str(directory / WEIGHTS))
    code["check_strict_state_dict_match"](model, sd)  # diffusers' own strict key check (params + buffers)
    want = model.state_dict()
    for key, t in want.items():
        assert tuple(sd[key].shape) == tuple(t.shape), key
        # int8 / int32 codes as allocated; every float in the compute dtype (the quantized modules allocate
        # it; diffusers' loader casts the others to it)
        assert sd[key].dtype == (parsed.compute_dtype if t.is_floating_point() else t.dtype), (key, sd[key].dtype)
    return sd


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


# ---- a tiny FLUX.1 (fused groups: double-block qkv, single-block qkv + proj_mlp; W4A16 AdaNorm) -------------------


@pytest.fixture(scope="module")
def flux():
    from svdq.testing.tiny import tiny_flux_transformer
    from test_flux_tiny import transformer_inputs

    model = tiny_flux_transformer(0, dtype=torch.bfloat16)
    svdq.models.prepare(model)
    svdq.quantize(model, rank=16, progress=False, weight_only=svdq.models.FAMILIES["flux"].adaln)
    inp = {k: v.to(torch.bfloat16) if k in ("hidden_states", "encoder_hidden_states", "pooled_projections") else v
           for k, v in transformer_inputs().items()}
    with torch.no_grad():
        y = model(**inp)[0]
    return model, inp, y


@pytest.fixture(scope="module")
def flux_dir(flux, tmp_path_factory):
    return nl.export(flux[0], tmp_path_factory.mktemp("lite") / "flux-lite")


def test_export_is_the_directory_diffusers_loader_builds(flux, flux_dir):
    model = flux[0]
    sd = check_against_diffusers(flux_dir)
    qc = json.loads((flux_dir / "config.json").read_text())["quantization_config"]
    assert qc["compute_dtype"] == "bfloat16" and qc["svdq_w4a4"]["rank"] == 16
    w4a4, awq = set(qc["svdq_w4a4"]["targets"]), set(qc["awq_w4a16"]["targets"])
    # svdq's fused groups are split back to diffusers' module paths
    assert {"transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.add_v_proj", "single_transformer_blocks.0.attn.to_k",
            "single_transformer_blocks.1.proj_mlp", "single_transformer_blocks.1.proj_out"} <= w4a4
    assert not any("to_qkv" in t or ".linear." in t for t in w4a4)
    assert awq == {f"transformer_blocks.{i}.{n}" for i in range(2) for n in ("norm1.linear", "norm1_context.linear")} | {
        f"single_transformer_blocks.{i}.norm.linear" for i in range(2)}
    assert len(w4a4) == 2 * 12 + 2 * 5
    # a plain (unfused) layer is a pure permutation of svdq's tensors, Nunchaku's packing under diffusers' names
    layer = quantized_layers(model)["transformer_blocks.0.attn.to_out.0"].state_dict()
    packed = nk.layer_to_nunchaku(layer, 128, 128)
    for theirs, ours in (("qweight", "qweight"), ("wscales", "wscales"), ("smooth_factor", "smooth"),
                         ("proj_down", "lora_down"), ("proj_up", "lora_up"), ("bias", "bias")):
        assert torch.equal(sd[f"transformer_blocks.0.attn.to_out.0.{theirs}"], packed[ours]), theirs
    # unquantized tensors copied under their own names
    assert torch.equal(sd["x_embedder.weight"], model.x_embedder.weight)
    assert torch.equal(sd["transformer_blocks.0.attn.norm_q.weight"], model.transformer_blocks[0].attn.norm_q.weight)


def test_export_loads_back_bit_exact(flux, flux_dir):
    """export → svdq.from_pretrained: the same output bit for bit (same backend), every tensor exact."""
    from svdq.linear import SVDQLinear
    from svdq.weight_only import SVDQWeightOnlyLinear

    model, inp, y = flux
    loaded = svdq.from_pretrained(flux_dir)
    assert type(loaded).__name__ == "FluxTransformer2DModel"
    assert not any(t.is_meta for t in itertools.chain(loaded.parameters(), loaded.buffers()))
    with torch.no_grad():
        assert torch.equal(loaded(**inp)[0], y)
    # every quantized tensor: unfused layers equal, fused groups merge back to svdq's layer
    for name, layer in quantized_layers(model).items():
        want = layer.state_dict()
        if name.endswith(".linear"):
            group = model.get_submodule(name[: -len(".linear")])
            owner = name[: -len(".linear")].rpartition(".")[0]
            parts = [loaded.get_submodule(f"{owner}.{label}") for label in group.names]
            assert all(type(p) is SVDQLinear and p.act_shift == 0.0 for p in parts)
            got = nk.merge_rows([p.state_dict() for p in parts])
        else:
            got = loaded.get_submodule(name).state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), name
    for name, layer in weight_only_layers(model).items():
        got = loaded.get_submodule(name)
        assert isinstance(got, SVDQWeightOnlyLinear) and got.zero_point_kind == "float"
        s = layer.state_dict()
        g = got.state_dict()  # canonical (after a forward the layer holds its kernel's layout)
        q = ref.unpack_int4(s["qweight"]).to(torch.int16)
        assert torch.equal(unpack_nibbles(g["qweight"]).to(torch.int16), q + 8)
        assert torch.equal(g["wscales"], s["wscales"]) and torch.equal(g["wzeros"], (-8 * s["wscales"].float()).to(torch.bfloat16))
        assert torch.equal(g["bias"], s["bias"])
        assert torch.equal(got.dequantize(torch.float32), layer.dequantize(torch.float32))
    # lite → svdq → lite: every tensor of the directory again, bit for bit
    again = nl.export(loaded, flux_dir.parent / "again")
    a, b = load_file(str(flux_dir / WEIGHTS)), load_file(str(again / WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # saved as an svdq model directory (its projections unfused, as loaded) it reloads computing the same
    resaved = svdq.from_pretrained(svdq.save_pretrained(loaded, flux_dir.parent / "as-svdq"))
    with torch.no_grad():
        assert torch.equal(resaved(**inp)[0], y)


def _independent_tensors(model, broken=None, only=None) -> dict:
    """The nunchaku_lite tensors of svdq's quantized layers in the first double and single block (``only``: the
    one W4A4 module path; the per-element packers are slow Python loops), packed by the
    independent packers (layout description → destination indices) from their plain values; ``broken``: a
    deliberately wrong packing of the W4A4 targets ("nibbles": swapped nibbles, "channels": the scale
    permutation not applied)."""
    from svdq.models import SharedInputLinear

    f32 = lambda t: t.float().numpy()  # noqa: E731
    tensors = {}
    first = ("transformer_blocks.0.", "single_transformer_blocks.0.")
    for name, layer in quantized_layers(model).items():
        if not name.startswith(first):
            continue
        s = layer.state_dict()
        parent = model.get_submodule(name.rpartition(".")[0])
        if isinstance(parent, SharedInputLinear):
            owner = name[: -len(".linear")].rpartition(".")[0]
            paths, sizes = [f"{owner}.{label}" for label in parent.names], list(parent.sizes)
        else:
            paths, sizes = [name], [layer.out_features]
        codes = ref.unpack_int4(s["qweight"]).long().numpy()
        start = 0
        for path, rows in zip(paths, sizes):
            r = slice(start, start + rows)
            start += rows
            if only not in (None, path):
                continue
            packed = to_torch(indep_layer(codes[r], f32(s["wscales"][r]), f32(s["bias"][r]), f32(s["smooth"]),
                                          f32(s["lora_down"]), f32(s["lora_up"][r]), broken), torch.bfloat16)
            for theirs, ours in (("qweight", "qweight"), ("wscales", "wscales"), ("smooth_factor", "smooth"),
                                 ("proj_down", "lora_down"), ("proj_up", "lora_up"), ("bias", "bias")):
                tensors[f"{path}.{theirs}"] = packed[ours]
    for name, layer in weight_only_layers(model).items() if only is None else ():
        if not name.startswith(first):
            continue
        s = layer.state_dict()
        u = (ref.unpack_int4(s["qweight"]).to(torch.int16) + 8).numpy()  # symmetric q ↦ u = q + 8, zero −8·s
        tensors[f"{name}.qweight"] = torch.from_numpy(indep_pack_awq_qweight(u))
        tensors[f"{name}.wscales"] = s["wscales"].t().contiguous()
        tensors[f"{name}.wzeros"] = (-8 * s["wscales"].float()).to(torch.bfloat16).t().contiguous()
        tensors[f"{name}.bias"] = s["bias"]
    return tensors


def test_independently_packed_directory_loads_to_the_same_layers(flux, flux_dir, tmp_path):
    model, inp, y = flux
    tensors = _independent_tensors(model)
    assert len([k for k in tensors if k.endswith(".qweight")]) == 12 + 5 + 3  # W4A4 double, single; AWQ
    d = _variant(flux_dir, tmp_path / "indep", tensors=lambda sd: sd.update(tensors))  # + svdq's other layers
    check_against_diffusers(d)
    exported = load_file(str(flux_dir / WEIGHTS))
    assert all(torch.equal(t, exported[k]) for k, t in tensors.items())  # the two packers agree bit for bit
    loaded = svdq.from_pretrained(d)
    with torch.no_grad():
        assert torch.equal(loaded(**inp)[0], y)
    # broken packings of one layer load (the shapes are right) but give another layer, far from svdq's
    path = "transformer_blocks.0.attn.to_out.0"
    want = quantized_layers(model)[path]
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for broken, key in (("nibbles", "qweight"), ("channels", "wscales")):
        bad = _independent_tensors(model, broken, only=path)
        got = svdq.from_pretrained(_variant(flux_dir, tmp_path / broken, tensors=lambda sd: sd.update(bad))).get_submodule(path)
        assert not torch.equal(got.state_dict()[key], want.state_dict()[key]), broken
        assert rel(got(x), want(x)) > 0.1, broken


def test_awq_qweight_follows_diffuse_compressors_rule():
    """The AWQ qweight rule as diffuse-compressor states it (backends/nunchaku/layouts.py, code order of
    pack_awq_w4a16_weight): input c of a 64-group goes to int32 word (c // 32)·4 + (c % 8) // 2, nibble
    (c % 32) // 8 + 4·(c % 2); four output rows interleaved per group — written here as a loop over c, equal to
    what the export writes (`nunchaku.pack_awq`, one split)."""
    n, k = 16, 192
    g = k // 64
    u = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(0))
    words = torch.zeros(n, g, 8, dtype=torch.int64)
    for c in range(64):
        words[:, :, (c // 32) * 4 + (c % 8) // 2] |= u.view(n, g, 64)[:, :, c] << (4 * ((c % 32) // 8 + 4 * (c % 2)))
    words = ((words + 2**31) % 2**32 - 2**31).to(torch.int32)  # the 32-bit patterns as int32
    want = words.view(n // 4, 4, g, 8).permute(0, 2, 1, 3).reshape(n // 4, k // 2)
    s = torch.rand(n, g).to(torch.bfloat16)
    assert torch.equal(nk.pack_awq(u.to(torch.uint8), s, s, None, 1, pad_groups=False)["qweight"], want)
    assert not torch.equal(nk.pack_awq(u.to(torch.uint8), s, s, None, 2, pad_groups=False)["qweight"], want)


def test_sharded_directory_and_pipeline_directory_load(flux, flux_dir, tmp_path):
    model, inp, y = flux
    pipe = tmp_path / "pipe"
    d = pipe / "transformer"
    d.mkdir(parents=True)
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    shutil.copy(flux_dir / "config.json", d / "config.json")
    sd = load_file(str(flux_dir / WEIGHTS))
    keys = sorted(sd)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(d / name))
    (d / (WEIGHTS + ".index.json")).write_text(json.dumps({"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    assert nk.find_checkpoint(pipe) == d and nk.find_checkpoint(d / next(iter(shards))) == d
    with torch.no_grad():
        assert torch.equal(svdq.from_pretrained(pipe)(**inp)[0], y)


# ---- errors ---------------------------------------------------------------------------------------------------------


def _variant(src: Path, dst: Path, qc=None, tensors=None) -> Path:
    """A copy of ``src`` with its quantization_config changed by ``qc(dict)`` and its tensors by ``tensors(dict)``."""
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    if qc:
        qc(config["quantization_config"])
    (dst / "config.json").write_text(json.dumps(config))
    if tensors:
        sd = load_file(str(src / WEIGHTS))
        tensors(sd)
        save_file(sd, str(dst / WEIGHTS))
    else:
        shutil.copy(src / WEIGHTS, dst / WEIGHTS)
    return dst


Q = "transformer_blocks.0.attn.to_q"


@pytest.mark.parametrize(
    "qc,tensors,match",
    [
        (lambda q: q["svdq_w4a4"].update(precision="nvfp4", group_size=16), None, r"precision = 'nvfp4': NVFP4 .*Blackwell"),
        (lambda q: q["svdq_w4a4"].update(precision="int8"), None, r"precision = 'int8': unknown precision"),
        (lambda q: q["awq_w4a16"].update(group_size=128), None, r"awq_w4a16\.group_size = 128, expected 64"),
        (lambda q: q["svdq_w4a4"].update(rank=20), None, r"rank = 20, expected a multiple of 16"),
        (lambda q: q.update(compute_dtype="bfloat17"), None, r"compute_dtype = 'bfloat17'"),
        (lambda q: q["awq_w4a16"]["targets"].append(Q), None, rf"'{Q}' is listed twice"),
        (lambda q: q["svdq_w4a4"]["targets"].append("transformer_blocks.7.attn.to_q"), None,
         r"'transformer_blocks\.7\.attn\.to_q' is not a module of FluxTransformer2DModel"),
        (lambda q: q["svdq_w4a4"]["targets"].append("norm_out"), None, r"'norm_out' is a AdaLayerNormContinuous, expected a Linear"),
        (lambda q: q["svdq_w4a4"]["targets"].append("context_embedder"), None, r"context_embedder is \[64 -> 128\].*multiples of 128"),
        (None, lambda sd: sd.pop(f"{Q}.proj_up"), rf"missing key\(s\) \['{Q}\.proj_up'\]"),
        (None, lambda sd: sd.__setitem__(f"{Q}.smooth_factor_orig", sd[f"{Q}.smooth_factor"].clone()), rf"unexpected key\(s\) \['{Q}\.smooth_factor_orig'\]"),
        (None, lambda sd: sd.__setitem__(f"{Q}.proj_down", sd[f"{Q}.proj_down"][:, :8].contiguous()),
         rf"{Q}\.proj_down: torch\.bfloat16 \[128, 8\], expected torch\.bfloat16 \[128, 16\]"),
        (None, lambda sd: sd.__setitem__(f"{Q}.wscales", sd[f"{Q}.wscales"].half()), rf"{Q}\.wscales: torch\.float16 .*compute dtype"),
        (None, lambda sd: sd.__setitem__(f"{Q}.qweight", sd[f"{Q}.qweight"].view(torch.uint8)), rf"{Q}\.qweight: torch\.uint8"),
        (None, lambda sd: sd.__setitem__("x_embedder.weight", sd["x_embedder.weight"][:, :8].contiguous()), r"x_embedder\.weight: shape \[128, 8\]"),
    ],
)
def test_malformed_directories_are_refused_naming_file_key_and_expectation(flux_dir, tmp_path, qc, tensors, match):
    d = _variant(flux_dir, tmp_path / "v", qc, tensors)
    with pytest.raises(CheckpointError, match=match) as e:
        svdq.from_pretrained(d)
    assert str(d) in str(e.value)


def test_truncated_and_non_safetensors_files_are_refused(flux_dir, tmp_path):
    d = _variant(flux_dir, tmp_path / "cut")
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS} is not a readable safetensors file"):
        svdq.from_pretrained(d)
    (d / WEIGHTS).unlink()
    (d / "diffusion_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"neither diffusion_pytorch_model\.safetensors nor .*safetensors only"):
        svdq.from_pretrained(d)
    (d / "config.json").write_text('{"quantization_config": {"quant_method": "nunchaku_lite"}}')
    with pytest.raises(CheckpointError, match="neither 'svdq_w4a4' nor 'awq_w4a16'"):
        svdq.from_pretrained(d)


# ---- export refusals, CLI ---------------------------------------------------------------------------------------------


def test_export_refuses_what_diffusers_loader_cannot_run(flux, tmp_path, monkeypatch):
    from svdq.testing.tiny import tiny_flux_transformer
    from svdq.weight_only import SVDQWeightOnlyLinear

    model = flux[0]
    fc2 = quantized_layers(model)["transformer_blocks.0.ff.net.2"]
    monkeypatch.setattr(fc2, "act_shift", 0.171875)
    with pytest.raises(ValueError, match=r"'transformer_blocks\.0\.ff\.net\.2' has shifted activations.*signed"):
        nl.export(model, tmp_path / "a")
    monkeypatch.setattr(fc2, "act_shift", 0.0)
    monkeypatch.setattr(fc2, "act_format", "fp8")
    with pytest.raises(ValueError, match=r"'transformer_blocks\.0\.ff\.net\.2' runs act_format='fp8'"):
        nl.export(model, tmp_path / "a")
    monkeypatch.setattr(fc2, "act_format", "int4")
    # W4A16 integer zero points: zero = −z·s must be exact in bf16
    torch.manual_seed(0)
    zp = SVDQWeightOnlyLinear.from_linear(nn.Linear(128, 768).to(torch.bfloat16), zero_point=True)
    norm1 = model.transformer_blocks[0].norm1
    kept = norm1.linear  # (monkeypatch cannot swap a submodule: it would delete it on undo)
    norm1.linear = zp
    try:
        with pytest.raises(ValueError, match=r"'transformer_blocks\.0\.norm1\.linear': its integer zero points z·s are not exact"):
            nl.export(model, tmp_path / "a")
    finally:
        norm1.linear = kept
    monkeypatch.undo()
    small = dict(num_layers=1, num_single_layers=1)
    one = ["transformer_blocks.0.attn.to_out.0"]  # one layer is enough to be refused (and quick)
    odd = tiny_flux_transformer(0, dtype=torch.bfloat16, attention_head_dim=24, **small)  # hidden 96
    svdq.quantize(odd, rank=16, progress=False, include=one)
    with pytest.raises(ValueError, match=r"'transformer_blocks\.0\.attn\.to_out\.0'.*is \[96 -> 96\].*multiples of 128"):
        nl.export(odd, tmp_path / "a")
    fp32 = tiny_flux_transformer(0, **small)
    svdq.quantize(fp32, rank=16, progress=False, include=one)
    with pytest.raises(ValueError, match=r"bf16 or fp16 layers, this model has \['torch\.float32'\]"):
        nl.export(fp32, tmp_path / "a")
    with pytest.raises(ValueError, match="not quantized"):
        nl.export(tiny_flux_transformer(0, dtype=torch.bfloat16, **small), tmp_path / "a")
    assert not list(tmp_path.iterdir())  # nothing written by a refused export
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="is not a nunchaku_lite directory"):
        nl.export(model, tmp_path / "other")


def test_export_cli(flux, flux_dir, tmp_path, capsys):
    from svdq.cli import main

    svdq.save_pretrained(flux[0], tmp_path / "q")
    assert main(["export", "--format", "nunchaku-lite", str(tmp_path / "q"), str(tmp_path / "out")]) == 0
    assert "nunchaku_lite directory" in capsys.readouterr().out
    a, b = load_file(str(tmp_path / "out" / WEIGHTS)), load_file(str(flux_dir / WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads((flux_dir / "config.json").read_text())


# ---- a generic family: Qwen-Image (svdq's generic fusion, AdaLN modulation W4A16) --------------------------------------


def test_qwenimage_round_trip_is_bit_exact(tmp_path):
    from svdq.models import generic, prepare
    from svdq.testing import families as tf

    model = tf.tiny_transformer("qwenimage", 0, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    # what QwenImagePipeline passes its transformer for a 64×64 image (8×8 latent patches) and 64 text tokens
    kw = dict(hidden_states=torch.randn(1, 64, 64, generator=g).to(torch.bfloat16),
              encoder_hidden_states=torch.randn(1, 64, 32, generator=g).to(torch.bfloat16),
              timestep=torch.tensor([0.5], dtype=torch.bfloat16), img_shapes=[[(1, 8, 8)]], return_dict=False)
    captured = {"kw": kw}
    generic.analyze(model, lambda m: m(**captured["kw"]))
    family = prepare(model)
    svdq.quantize(model, weight_only=family.adaln, progress=False, rank=16)
    assert "transformer_blocks.0.attn.to_qkv.linear" in quantized_layers(model)  # a fused group to split
    d = nl.export(model, tmp_path / "qwen-lite")
    check_against_diffusers(d)
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    assert {"transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.add_k_proj"} <= set(qc["svdq_w4a4"]["targets"])
    assert "transformer_blocks.1.img_mod.1" in qc["awq_w4a16"]["targets"]
    loaded = svdq.from_pretrained(d)
    assert type(loaded).__name__ == "QwenImageTransformer2DModel"
    with torch.no_grad():
        assert torch.equal(loaded(**captured["kw"])[0], model(**captured["kw"])[0])
    # saved as an svdq model directory it reloads computing the same, W4A16 layers keeping their float offsets
    resaved = svdq.from_pretrained(svdq.save_pretrained(loaded, tmp_path / "as-svdq"))
    assert svdq.weight_only_layers(resaved).keys() == svdq.weight_only_layers(loaded).keys()
    assert all(m.zero_point_kind == "float" for m in svdq.weight_only_layers(resaved).values())
    with torch.no_grad():
        assert torch.equal(resaved(**captured["kw"])[0], model(**captured["kw"])[0])


def test_svdq_generate_runs_a_nunchaku_lite_directory(flux_dir, tmp_path):
    """`svdq generate --quantized <nunchaku_lite directory>`: its denoiser in the base pipeline."""
    from svdq import cli
    from svdq.testing import tiny

    tiny.tiny_flux_full_pipeline(0).save_pretrained(tmp_path / "flux")
    out = tmp_path / "img.png"
    rc = cli.main(["generate", "--model", str(tmp_path / "flux"), "--quantized", str(flux_dir), "--prompt", "a cat",
                   "--steps", "1", "--height", "32", "--width", "32", "--dtype", "bf16", "--out", str(out)])
    assert rc == 0 and out.is_file()
