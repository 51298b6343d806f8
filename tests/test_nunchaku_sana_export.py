"""SANA both ways (issue 13): svdq checkpoints of 4-bit 1×1 convolutions (`svdq.conv.SVDQConv1x1`, saved as
``<conv>.linear``), `svdq.quantize` of explicitly included 1×1 convolutions, and (below) ``target="nunchaku"`` for
SANA with `svdq.formats.nunchaku_sana.export_sana`, checked against tests/test_nunchaku_sana.py's independent
writer."""

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

import svdq
from svdq.checkpoint import CheckpointError, contents
from svdq.conv import SVDQConv1x1
from svdq.linear import SVDQLinear
from svdq.quantize import QuantizeConfig
from test_nunchaku_sana import BLOCKS, HIDDEN, _inputs, _metadata, _tiny_sana, _write, nunchaku_sana_tensors
from test_nunchaku_sana import quantize_tiny_sana


@pytest.fixture(scope="module")
def nunchaku_quantized():
    """The tiny SANA as tests/test_nunchaku_sana.py quantizes it (attention layers by svdq.quantize, the 1×1
    convolutions by hand) and the Nunchaku file its independent writer makes of it."""
    return quantize_tiny_sana()


def _equal_models(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def test_sana_loaded_from_a_nunchaku_file_saves_and_reloads_bit_exactly(nunchaku_quantized, tmp_path):
    """A SANA loaded from a Nunchaku file → `svdq.save_pretrained` → `svdq.from_pretrained` and diffusers'
    ``SanaTransformer2DModel.from_pretrained``: the 4-bit 1×1 convolutions are stored as their ``<conv>.linear``
    layers and wrapped back around the skeleton's convolutions; every tensor and the output the same bits."""
    import diffusers

    path = _write(nunchaku_sana_tensors(nunchaku_quantized), tmp_path / "sana.safetensors",
                  _metadata(nunchaku_quantized))
    loaded = svdq.from_pretrained(path)
    svdq.save_pretrained(loaded, tmp_path / "svdq")
    with safe_open(str(tmp_path / "svdq" / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        names = {e["name"] for e in json.loads(f.metadata()["quantized_layers"])}
    assert {f"{b}.ff.conv_{c}.linear" for b in BLOCKS for c in ("inverted", "point")} <= names
    with torch.no_grad():
        want = loaded(**_inputs())[0]
    for back in (svdq.from_pretrained(tmp_path / "svdq"),
                 diffusers.SanaTransformer2DModel.from_pretrained(tmp_path / "svdq")):
        _equal_models(back, loaded)
        ff = back.transformer_blocks[1].ff
        assert isinstance(ff.conv_inverted, SVDQConv1x1) and isinstance(ff.conv_inverted.linear, SVDQLinear)
        with torch.no_grad():
            assert torch.equal(back(**_inputs())[0], want)


def test_a_widened_glu_is_refused_by_name(nunchaku_quantized, tmp_path):
    """A block whose Nunchaku GLU padding is live keeps it (256 wide, not the config's 240): a skeleton built from
    the config could not hold it, so saving is refused naming that feed-forward, and nothing is written."""
    tensors = nunchaku_sana_tensors(nunchaku_quantized)
    b = tensors["transformer_blocks.0.ff.depth_conv.bias"].clone()
    b[2 * HIDDEN :] = 0.25
    tensors["transformer_blocks.0.ff.depth_conv.bias"] = b
    loaded = svdq.from_pretrained(_write(tensors, tmp_path / "live.safetensors", _metadata(nunchaku_quantized)))
    with pytest.raises(ValueError, match=r"cannot save transformer_blocks\.0\.ff \(GLUMBConv\).*GLU padding \(256 "
                                         r"channels.*diffusers builds it 240 wide"):
        svdq.save_pretrained(loaded, tmp_path / "out")
    assert not (tmp_path / "out").exists()


class _Convs(nn.Module):
    """A 1×1 convolution between two 3×3 ones (which are no linear layers: never quantized)."""

    def __init__(self, kernel=1):
        super().__init__()
        self.a = nn.Conv2d(4, 128, 3, padding=1)
        self.mid = nn.Conv2d(128, 256, kernel, padding=kernel // 2)
        self.b = nn.Conv2d(256, 4, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.mid(torch.relu(self.a(x)))))


def test_quantize_includes_1x1_convolutions_only_by_explicit_include(tmp_path):
    """A 1×1 convolution is quantized when an include pattern names it (calibrated on its pixels' channels), never
    by default; the 3×3 ones a pattern also matches are left alone; the model saves and reloads bit-exactly, and a
    skeleton whose convolution there is 3×3 is refused naming the layer, left as it was."""
    torch.manual_seed(0)
    model = _Convs().to(torch.bfloat16)
    x = torch.randn(2, 4, 8, 8).to(torch.bfloat16)
    with torch.no_grad():
        dense = model(x)
    default = svdq.quantize(_Convs(), progress=False)
    assert not list(default.svdq_report) and type(default.mid) is nn.Conv2d
    svdq.quantize(model, calibration=lambda m: m(x), rank=16, include=["*"], progress=False)
    assert list(model.svdq_report) == ["mid.linear"] and type(model.a) is nn.Conv2d
    assert isinstance(model.mid, SVDQConv1x1) and isinstance(model.mid.linear, SVDQLinear)
    assert model.mid.linear.smooth.shape == (128,) and not bool((model.mid.linear.smooth == 1).all())
    with torch.no_grad():
        y = model(x)
    err = float((y.float() - dense.float()).norm() / dense.float().norm())
    assert 0 < err < 0.2, err  # 4-bit on a random model: measured 0.086
    svdq.save(model, tmp_path / "m.safetensors")
    back = svdq.load(_Convs().to(torch.bfloat16), tmp_path / "m.safetensors")
    _equal_models(back, model)
    with torch.no_grad():
        assert torch.equal(back(x), y)
    skeleton = _Convs(kernel=3).to(torch.bfloat16)
    with pytest.raises(CheckpointError, match=r"m\.safetensors: the checkpoint stores 'mid\.linear' as a 4-bit 1×1 "
                                              r"convolution: mid: Conv2d\(128, 256, kernel_size=\(3, 3\)"):
        svdq.load(skeleton, tmp_path / "m.safetensors")
    assert type(skeleton.mid) is nn.Conv2d and skeleton.mid.kernel_size == (3, 3)


def test_quantizing_a_1x1_convolution_is_all_or_nothing():
    """A failure after the convolutions were wrapped (a non-finite weight elsewhere) leaves the model's modules as
    they were: the 1×1 convolution is an nn.Conv2d again, with its own weight tensor."""
    torch.manual_seed(0)
    model = _Convs().to(torch.bfloat16)
    model.lin = nn.Linear(8, 8).to(torch.bfloat16)
    with torch.no_grad():
        model.lin.weight[0, 0] = float("nan")
    conv, weight = model.mid, model.mid.weight
    with pytest.raises(ValueError, match=r"layer 'lin' has 1 non-finite"):
        svdq.quantize(model, rank=16, include=["mid", "lin"], progress=False)
    assert model.mid is conv and model.mid.weight is weight and type(model.lin) is nn.Linear
    # a wrapper still holding its 16-bit nn.Linear is no checkpoint layer: refused by name
    model.mid = SVDQConv1x1.wrapping(model.mid, "mid")
    with pytest.raises(ValueError, match=r"cannot save mid \(SVDQConv1x1\) as an svdq checkpoint: its inner layer is "
                                         r"a 16-bit nn\.Linear"):
        contents(model)


def test_tiny_sana_quantized_with_its_ff_convolutions_saves_and_reloads(tmp_path):
    """The tiny SANA quantized by svdq.quantize with its GLUMBConv's 1×1 convolutions included (the depthwise 3×3
    one, also matched, stays 16-bit) runs, saves and reloads computing the same bits."""
    from svdq.models.generic import fuse_groups

    model = _tiny_sana()
    for b in BLOCKS:
        fuse_groups(model, {f"{b}.attn1.to_qkv": tuple(f"{b}.attn1.to_{p}" for p in "qkv")})
    inputs = _inputs()
    with torch.no_grad():
        dense = model(**inputs)[0]
    config = QuantizeConfig(rank=16, include=("*attn1.to_qkv.linear", "*ff.conv_*"), exclude=(), alphas=(0.5,),
                            rounding="nearest")  # GPTQ through a wrapped convolution: the _Convs test
    svdq.quantize(model, calibration=lambda m: m(**inputs), config=config, progress=False)
    assert sorted(model.svdq_report) == sorted(f"{b}.{n}" for b in BLOCKS for n in (
        "attn1.to_qkv.linear", "ff.conv_inverted.linear", "ff.conv_point.linear"))
    assert type(model.transformer_blocks[0].ff.conv_depth) is nn.Conv2d
    with torch.no_grad():
        y = model(**inputs)[0]
    assert float((y.float() - dense.float()).norm() / dense.float().norm()) < 0.05
    svdq.save_pretrained(model, tmp_path / "q")
    back = svdq.from_pretrained(tmp_path / "q")
    _equal_models(back, model)
    with torch.no_grad():
        assert torch.equal(back(**inputs)[0], y)


# ---- target="nunchaku" and export_sana ---------------------------------------------------------------------------


def _header(path):
    """(tensor entries of the safetensors header with their data offsets, metadata, the data bytes): a file's whole
    content. The header's JSON key order is not compared: safetensors writes the metadata from a Rust HashMap, in
    an order that differs between two writes of the same dict."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    return header, header.pop("__metadata__"), raw[8 + n :]


def _writer_file(model, path):
    """The independent writer's file of ``model`` (tests/test_nunchaku_sana.py), its config without svdq's own
    quantization_config (Nunchaku's runtime builds a 16-bit skeleton from the config; `write_checkpoint` drops it)."""
    meta = _metadata(model)
    config = json.loads(meta["config"])
    config.pop("quantization_config", None)
    meta["config"] = json.dumps(config)
    return _write(nunchaku_sana_tensors(model), path, meta)


@pytest.fixture(scope="module")
def sana_for_nunchaku():
    """The tiny SANA quantized with target="nunchaku" (its q/k/v fused first, as svdq fuses them); one smoothing
    exponent and nearest rounding keep it short."""
    from svdq.models.generic import fuse_groups

    model = _tiny_sana()
    for b in BLOCKS:
        fuse_groups(model, {f"{b}.attn1.to_qkv": tuple(f"{b}.attn1.to_{p}" for p in "qkv")})
    inputs = _inputs()
    config = QuantizeConfig(rank=16, alphas=(0.5,), rounding="nearest", target="nunchaku")
    svdq.quantize(model, calibration=lambda m: m(**inputs), config=config, progress=False)
    return model


def test_sana_quantized_for_nunchaku_exports_exactly(sana_for_nunchaku, tmp_path):
    """target="nunchaku" quantizes exactly the layers Nunchaku's SANA file holds 4-bit, all signed; `svdq export
    --format nunchaku` writes the file the independent writer writes from the same model (every tensor byte, the
    header's offsets, the metadata), and `load_sana` reads it back computing the svdq model's output bit for bit."""
    from svdq import cli

    model = sana_for_nunchaku
    layers = ("attn1.to_qkv.linear", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0", "ff.conv_inverted.linear",
              "ff.conv_point.linear")
    assert sorted(model.svdq_report) == sorted(f"{b}.{n}" for b in BLOCKS for n in layers)
    assert all(m.act_shift == 0.0 for m in model.modules() if isinstance(m, SVDQLinear))
    blk = model.transformer_blocks[0]
    assert type(blk.attn2.to_k) is nn.Linear and type(blk.ff.conv_depth) is nn.Conv2d
    with torch.no_grad():
        want = model(**_inputs())[0]
    svdq.save_pretrained(model, tmp_path / "svdq")
    out = tmp_path / "svdq-int4_r16-sana.safetensors"
    assert cli.main(["export", "--format", "nunchaku", str(tmp_path / "svdq"), str(out)]) == 0
    header, meta, data = _header(out)
    w_header, w_meta, w_data = _header(_writer_file(model, tmp_path / "writer.safetensors"))
    assert header == w_header and data == w_data and meta == w_meta
    assert json.loads(meta["config"])["_class_name"] == "SanaTransformer2DModel"
    assert meta["model_class"] == "NunchakuSanaTransformer2DModel"
    assert json.loads(meta["quantization_config"])["rank"] == 16
    back = svdq.from_pretrained(out)
    _equal_models(back, model)
    with torch.no_grad():
        assert torch.equal(back(**_inputs())[0], want)


def test_exporter_permutations_are_checked_by_the_writer(sana_for_nunchaku, tmp_path, monkeypatch):
    """An exporter that skips the q/k/v or the GLU interleave still round-trips through the loader sharing its
    maps, but no longer writes the independent writer's tensors."""
    from safetensors.torch import load_file

    from svdq.formats import nunchaku_sana as ns

    want = load_file(str(_writer_file(sana_for_nunchaku, tmp_path / "w.safetensors")))
    blocks_qkv = lambda d: torch.cat([torch.arange(d.dim), d.dim_pad + torch.arange(2 * d.dim)])  # noqa: E731
    for fn, broken, key in (("_qkv_rows", blocks_qkv, "attn.qkv_proj.qweight"),
                            ("_glu_rows", lambda width: torch.arange(2 * width), "ff.inverted_conv.qweight")):
        monkeypatch.setattr(ns, fn, broken)
        got = load_file(str(ns.export_sana(sana_for_nunchaku, tmp_path / f"{fn}.safetensors")))
        monkeypatch.undo()
        assert not torch.equal(got[f"transformer_blocks.0.{key}"], want[f"transformer_blocks.0.{key}"]), fn


def test_a_loaded_nunchaku_sana_file_exports_back_to_itself(nunchaku_quantized, tmp_path):
    """load_sana then export_sana gives the file's tensors back, also for a block whose live GLU padding the loaded
    model keeps (256 wide)."""
    from safetensors.torch import load_file

    from svdq.formats.nunchaku_sana import export_sana

    tensors = nunchaku_sana_tensors(nunchaku_quantized)
    b = tensors["transformer_blocks.0.ff.depth_conv.bias"].clone()
    b[2 * HIDDEN :] = 0.25
    tensors["transformer_blocks.0.ff.depth_conv.bias"] = b
    src = _write(tensors, tmp_path / "live.safetensors", _metadata(nunchaku_quantized))
    loaded = svdq.from_pretrained(src)
    assert loaded.transformer_blocks[0].ff.conv_point.in_channels == 256
    again = load_file(str(export_sana(loaded, tmp_path / "again.safetensors")))
    want = load_file(str(src))
    assert again.keys() == want.keys()
    for key in want:
        assert again[key].dtype == want[key].dtype and torch.equal(again[key], want[key]), key


def test_sana_exports_refuse_what_the_layout_cannot_hold(sana_for_nunchaku, tmp_path):
    """A non-zero self-attention out bias (Nunchaku never reads one), a model quantized by default (its 1×1
    convolutions 16-bit), and target="nunchaku" before q/k/v are fused: errors naming the layer; nothing written,
    nothing changed."""
    import copy

    from svdq.formats.nunchaku_sana import export_sana

    model = copy.deepcopy(sana_for_nunchaku)
    with torch.no_grad():
        model.transformer_blocks[1].attn1.to_out[0].bias[3] = 0.5
    with pytest.raises(ValueError, match=r"transformer_blocks\.1\.attn1\.to_out\.0 has a non-zero bias; Nunchaku's "
                                         r"SANA runtime builds attn\.out_proj without one"):
        export_sana(model, tmp_path / "a.safetensors")
    plain = _tiny_sana()
    svdq.quantize(plain, rank=16, method="naive", include=["*attn*"], exclude=["*attn2.to_k", "*attn2.to_v"],
                  progress=False)
    with pytest.raises(ValueError, match=r"'transformer_blocks\.0\.attn1\.to_k' is 16-bit in Nunchaku's SANA layout"):
        export_sana(plain, tmp_path / "b.safetensors")
    assert not list(tmp_path.iterdir())
    unfused = _tiny_sana()
    with pytest.raises(ValueError, match=r"no 16-bit linear of SanaTransformer2DModel matches "
                                         r"'transformer_blocks\.\*\.attn1\.to_qkv\.linear'"):
        svdq.quantize(unfused, rank=16, target="nunchaku", progress=False)
    assert type(unfused.transformer_blocks[0].ff.conv_inverted) is nn.Conv2d


def test_streaming_quantizes_the_1x1_convolutions_the_same(sana_for_nunchaku):
    """Block by block (`svdq.streaming`, propagating 16-bit activations) the wrapped 1×1 convolutions are calibrated
    and quantized as in one pass: the same model, every tensor."""
    from svdq.models.generic import fuse_groups

    model = _tiny_sana()
    for b in BLOCKS:
        fuse_groups(model, {f"{b}.attn1.to_qkv": tuple(f"{b}.attn1.to_{p}" for p in "qkv")})
    inputs = _inputs()
    config = QuantizeConfig(rank=16, alphas=(0.5,), rounding="nearest", target="nunchaku")
    svdq.quantize(model, calibration=lambda m: m(**inputs), config=config, progress=False, streaming=True,
                  propagate="16bit")
    assert isinstance(model.transformer_blocks[1].ff.conv_point, SVDQConv1x1)
    _equal_models(model, sana_for_nunchaku)


def test_cli_quantize_target_nunchaku_then_export(tmp_path):
    """`svdq quantize --target nunchaku` on a SANA pipeline (the generic plan fuses q/k/v — and the cross-attention
    k / v, kept 16-bit) then `svdq export --format nunchaku`: the file computes the svdq model's output bit for bit,
    and diffusers' own from_pretrained reloads the directory (its 16-bit fused to_kv too) bit for bit."""
    import diffusers

    from svdq import cli
    from svdq.testing import families

    families.tiny_family_pipeline("sana", 0, torch.bfloat16, transformer=_tiny_sana()).save_pretrained(tmp_path / "p")
    out, file = tmp_path / "nk", tmp_path / "svdq-int4_r16-sana.safetensors"
    assert cli.main(["quantize", "--model", str(tmp_path / "p"), "--out", str(out), "--target", "nunchaku",
                     "--data-free", "--dtype", "bf16", "--rank", "16"]) == 0
    assert cli.main(["export", "--format", "nunchaku", str(out), str(file)]) == 0
    model = svdq.from_pretrained(out)
    assert model.svdq_config.target == "nunchaku"
    assert type(model.transformer_blocks[0].attn2.to_kv.linear) is nn.Linear
    with torch.no_grad():
        want = model(**_inputs())[0]
        for back in (svdq.from_pretrained(file), diffusers.SanaTransformer2DModel.from_pretrained(out)):
            assert torch.equal(back(**_inputs())[0], want)
