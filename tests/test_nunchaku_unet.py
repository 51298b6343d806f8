"""Nunchaku SDXL (UNet) INT4 files: load exactly, export, round trip; SANA files go to their own loader (issue 13).

Nunchaku's SDXL layout (nunchaku/models/unets/unet_sdxl.py, read in the public repository; docs/formats.md):
diffusers module paths under every BasicTransformerBlock, C++ tensor names (lora_down / lora_up / smooth /
smooth_orig), quantized layers attn1.to_qkv (rows [q; k; v]), attn1.to_out.0, attn2.to_q, attn2.to_out.0,
ff.net.0.proj and ff.net.2 — all signed —, the cross-attention's to_k / to_v and everything else 16-bit.

The test files are written here from that description with the independent packer of
tests/test_nunchaku_format.py (numpy destination-index arithmetic from the layout description, not svdq's
packers), so a misunderstanding in svdq's converter cannot pass twice.
"""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import svdq
from svdq.checkpoint import CheckpointError
from svdq.formats import nunchaku as nk
from svdq.formats import nunchaku_models as nm
from svdq.linear import SVDQLinear
from svdq.ops import reference as ref
from test_nunchaku_format import _qc, expected_nunchaku

# svdq layer under a BasicTransformerBlock → the Nunchaku file's layer (written out here, not taken from svdq)
SDXL_LAYERS = {
    "attn1.to_qkv.linear": "attn1.to_qkv",
    "attn1.to_out.0": "attn1.to_out.0",
    "attn2.to_q": "attn2.to_q",
    "attn2.to_out.0": "attn2.to_out.0",
    "ff.net.0.proj": "ff.net.0.proj",
    "ff.net.2": "ff.net.2",
}
# width 128 (SDXL's own widths, 640 / 1280, are multiples of 128 too: what Nunchaku's runtime needs)
# one transformer block per attention (4 in all: down, mid, two up), to keep the test short
CONFIG = {"block_out_channels": (32, 128), "transformer_layers_per_block": (1, 1)}


def _blocks(model):
    from diffusers.models.attention import BasicTransformerBlock

    return [n for n, m in model.named_modules() if isinstance(m, BasicTransformerBlock)]


def _tiny_unet(**config):
    import diffusers

    from svdq.testing import tiny

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**{**tiny.TINY_SDXL_UNET_CONFIG, **CONFIG, **config})
    tiny._plant_layernorm_outliers(unet, 0)  # a few heavy input channels, as real SDXL has
    return unet.to(torch.bfloat16).eval()


@pytest.fixture(scope="module")
def quantized_unet():
    """A tiny SDXL UNet quantized by svdq as Nunchaku's SDXL is: the transformer blocks' linears except the
    cross-attention's to_k / to_v (svdq's to_kv), all signed."""
    unet = _tiny_unet()
    family = svdq.models.prepare(unet)
    svdq.quantize(unet, rank=16, exclude=family.exclude + ("*attn2.to_kv*",), progress=False)
    return unet


def _inputs():
    """One UNet call's inputs (an 8×8 latent: bf16 convolutions are slow on a CPU)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(torch.bfloat16)  # noqa: E731
    return dict(sample=r(1, 4, 8, 8), timestep=torch.tensor([500]), encoder_hidden_states=r(1, 8, 64),
                added_cond_kwargs={"text_embeds": r(1, 32), "time_ids": r(1, 6)}, return_dict=False)


@pytest.fixture(scope="module")
def svdq_output(quantized_unet):
    with torch.no_grad():
        return quantized_unet(**_inputs())[0]


def nunchaku_sdxl_tensors(model, swap_geglu=False, base=None):
    """The tensors of a Nunchaku SDXL file for an svdq-quantized SDXL UNet, packed by the independent packer.
    ``swap_geglu``: the GEGLU projection's two halves written in the wrong order (a broken layout); ``base``:
    a file's tensors already packed, of which only the GEGLU layers are packed again."""
    from svdq.quantize import quantized_layers

    q = quantized_layers(model)
    out, owned = dict(base or {}), set()
    for b in _blocks(model):
        for ours, theirs in SDXL_LAYERS.items():
            owned.add(f"{b}.{ours}.")
            if base is not None and theirs != "ff.net.0.proj":
                continue
            m = q[f"{b}.{ours}"]
            sd = m.state_dict()
            plain = {"codes": ref.unpack_int4(sd["qweight"]).long(), "scales": sd["wscales"], "bias": sd.get("bias"),
                     "smooth": sd["smooth"], "down": sd["lora_down"], "up": sd["lora_up"]}
            if swap_geglu and theirs == "ff.net.0.proj":
                half = m.out_features // 2
                for key in ("codes", "scales", "bias", "up"):
                    plain[key] = torch.cat([plain[key][half:], plain[key][:half]])
            out.update({f"{b}.{theirs}.{k}": v for k, v in expected_nunchaku(plain, m.in_features, m.dtype).items()})
    if base is not None:
        return out
    for key, v in model.state_dict().items():
        if key.startswith(tuple(owned)):
            continue
        if ".attn2.to_kv.linear." in key:  # the file keeps the cross-attention's to_k / to_v apart (16-bit)
            k_rows, v_rows = v.chunk(2)
            out[key.replace("to_kv.linear", "to_k")] = k_rows.contiguous()
            out[key.replace("to_kv.linear", "to_v")] = v_rows.contiguous()
            continue
        out[key] = v.contiguous()
    return out


def _metadata(model, rank=16, **config):
    cfg = {k: v for k, v in dict(model.config).items() if not k.startswith("_")} | {"_class_name": "UNet2DConditionModel"}
    return {"quantization_config": json.dumps(_qc(rank=rank)), "config": json.dumps(cfg | config, default=list),
            "model_class": "NunchakuSDXLUNet2DConditionModel"}


def _write(tensors, path, meta):
    save_file({k: v.clone() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


@pytest.fixture(scope="module")
def sdxl_file(quantized_unet, tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl") / "svdq-int4_r16-sdxl.safetensors"
    return _write(nunchaku_sdxl_tensors(quantized_unet), path, _metadata(quantized_unet))


def test_sdxl_file_loads_every_tensor_exactly_and_computes_the_same(quantized_unet, sdxl_file, svdq_output):
    """canonical → Nunchaku SDXL layout (independent packer) → canonical: every tensor of the model bit for
    bit, and the same output bit for bit (SDXL's Nunchaku layers are all signed: nothing changes numerics)."""
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    from svdq.models import SharedInputLinear

    loaded = svdq.from_pretrained(sdxl_file)
    assert type(loaded).__name__ == "UNet2DConditionModel"
    want, got = quantized_unet.state_dict(), loaded.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    block = loaded.get_submodule(_blocks(loaded)[0])
    assert isinstance(block.attn1.to_qkv, SharedInputLinear) and isinstance(block.attn1.to_qkv.linear, SVDQLinear)
    assert isinstance(block.attn2.to_q, SVDQLinear) and type(block.attn2.to_kv.linear) is torch.nn.Linear
    assert all(m.act_shift == 0.0 for m in loaded.modules() if isinstance(m, SVDQLinear))
    assert isinstance(block.attn1.processor, FusedAttnProcessor2_0) and isinstance(block.attn2.processor, FusedAttnProcessor2_0)
    assert sum(isinstance(m, SVDQLinear) for m in loaded.modules()) == 6 * len(_blocks(loaded)) == 24
    with torch.no_grad():
        y_nk = loaded(**_inputs())[0]
    assert torch.equal(y_nk, svdq_output)
    assert float(svdq_output.float().std()) > 0.1  # a real output, not zeros
    # saved as an svdq model directory it reloads computing the same; svdq.json says where it came from
    saved = svdq.save_pretrained(loaded, sdxl_file.parent / "as-svdq")
    resaved = svdq.from_pretrained(saved)
    with torch.no_grad():
        assert torch.equal(resaved(**_inputs())[0], svdq_output)
    assert str(sdxl_file) in json.loads((saved / "svdq.json").read_text())["converted_from"]
    assert resaved.svdq_config.rank == 16 and resaved.svdq_config.include == tuple(svdq.quantized_layers(loaded))


def test_broken_layouts_are_told_apart(quantized_unet, sdxl_file, svdq_output, tmp_path, monkeypatch):
    """The comparisons above can fail: the GEGLU halves in the other order, or ff.net.2 read as a shifted
    (unsigned, δ = 0.171875) layer as FLUX's / Qwen-Image's fc2 are, give a feed-forward far from the svdq
    model's (farther than svdq's own 4-bit error) and a different UNet output."""
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
    block = _blocks(quantized_unet)[0]
    x = torch.randn(1, 64, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    y = svdq_output
    with torch.no_grad():
        ff = quantized_unet.get_submodule(block).ff(x)
    swapped = nunchaku_sdxl_tensors(quantized_unet, swap_geglu=True, base=load_file(str(sdxl_file)))
    broken = {"swapped": svdq.from_pretrained(_write(swapped, tmp_path / "swapped.safetensors", _metadata(quantized_unet)))}
    monkeypatch.setitem(nm.SDXL.layers, "ff.net.2", ("shifted", None))
    broken["shifted"] = svdq.from_pretrained(sdxl_file)
    for name, model in broken.items():
        with torch.no_grad():
            err_ff, err = rel(model.get_submodule(block).ff(x), ff), rel(model(**_inputs())[0], y)
        # measured: feed-forward 0.80 (swapped) / 0.93 (shifted: the stored bias does not cancel a shift), where
        # svdq's own 4-bit error on this input is 0.25; UNet output 0.11 / 0.14 (the ResNets carry much of it)
        assert err_ff > 0.5 and err > 0.05, (name, err_ff, err)


def test_export_sdxl_is_the_independent_layout_and_loads_back(quantized_unet, sdxl_file, tmp_path):
    """`export_sdxl` writes exactly the file the independent packer writes (every key and byte, the metadata
    Nunchaku's loader reads), so the export round-trips bit for bit as well."""
    path = nm.export_sdxl(quantized_unet, tmp_path / "svdq-int4_r16-sdxl.safetensors")
    assert nk.is_nunchaku_file(path)
    exported, independent = load_file(str(path)), load_file(str(sdxl_file))
    assert exported.keys() == independent.keys()
    for key in independent:
        assert exported[key].dtype == independent[key].dtype, key
        assert torch.equal(exported[key].view(torch.uint8) if exported[key].dtype == torch.int8 else exported[key],
                           independent[key].view(torch.uint8) if independent[key].dtype == torch.int8 else independent[key]), key
    # C++ tensor names, as the published file has them (Nunchaku renames them when it loads)
    assert any(k.endswith(".attn1.to_qkv.lora_down") for k in exported) and not any("proj_down" in k for k in exported)
    assert not any(k.endswith("attn1.to_qkv.bias") for k in exported)  # diffusers' q/k/v have no bias: neither has it
    meta = nk.read_metadata(path)
    assert meta["config"]["_class_name"] == "UNet2DConditionModel" and meta["quantization_config"]["rank"] == 16
    assert meta["model_class"] == "NunchakuSDXLUNet2DConditionModel"
    assert "quantization_config" not in meta["config"]
    loaded = svdq.from_pretrained(path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in quantized_unet.state_dict().items())
    # Nunchaku → svdq → Nunchaku: the loaded model exports the same bytes again (no padding here to differ)
    again = load_file(str(nm.export_sdxl(loaded, tmp_path / "again.safetensors")))
    assert again.keys() == independent.keys() and all(torch.equal(again[k], independent[k]) for k in independent)


def test_zero_biases_on_bias_free_layers_load_and_change_nothing(quantized_unet, sdxl_file, svdq_output, tmp_path):
    """DeepCompressor's converter writes a bias for every W4A4 layer (zeros where the linear has none):
    attn1.to_qkv / attn2.to_q with a zero bias load and compute the same, bit for bit."""
    tensors = load_file(str(sdxl_file))
    with safe_open(str(sdxl_file), framework="pt") as f:
        meta = f.metadata()
    for b in _blocks(quantized_unet):
        for layer, n in (("attn1.to_qkv", 384), ("attn2.to_q", 128)):
            assert f"{b}.{layer}.bias" not in tensors
            tensors[f"{b}.{layer}.bias"] = torch.zeros(n, dtype=torch.bfloat16)
    loaded = svdq.from_pretrained(_write(tensors, tmp_path / "biased.safetensors", meta))
    assert loaded.get_submodule(_blocks(loaded)[0]).attn2.to_q.bias is not None
    with torch.no_grad():
        assert torch.equal(loaded(**_inputs())[0], svdq_output)


def test_export_sdxl_refuses_what_the_layout_cannot_express(quantized_unet, tmp_path):
    out = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="not an SDXL UNet2DConditionModel"):
        nm.export_sdxl(torch.nn.Linear(2, 2), out)
    with pytest.raises(ValueError, match="not quantized"):
        nm.export_sdxl(_tiny_unet(), out)
    # svdq's default SDXL quantization also quantizes the cross-attention to_kv, which Nunchaku keeps 16-bit
    unet = copy.deepcopy(quantized_unet)
    svdq.quantize(unet, rank=16, include=["*attn2.to_kv*"], progress=False)
    with pytest.raises(ValueError, match=r"attn2\.to_kv\.linear' is 16-bit in Nunchaku's SDXL layout .*exclude="):
        nm.export_sdxl(unet, out)
    # a layer Nunchaku quantizes left 16-bit
    unet = copy.deepcopy(quantized_unet)
    block = unet.get_submodule(_blocks(unet)[1])
    block.attn2.to_q = torch.nn.Linear(128, 128, bias=False, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=rf"'{_blocks(unet)[1]}\.attn2\.to_q' is not a W4A4 layer"):
        nm.export_sdxl(unet, out)
    # shifted activations (Nunchaku's SDXL runs every layer signed)
    unet = copy.deepcopy(quantized_unet)
    fc2 = unet.get_submodule(_blocks(unet)[0]).ff.net[2]
    fc2.act_shift = nk.SHIFT_GELU
    with pytest.raises(ValueError, match=r"ff\.net\.2' has shifted activations"):
        nm.export_sdxl(unet, out)
    # widths Nunchaku's kernels cannot run (the default tiny UNet is 64 wide)
    unet = _tiny_unet(block_out_channels=(32, 64))
    svdq.models.prepare(unet)
    svdq.quantize(unet, rank=16, include=["*attn2.to_q"], progress=False)
    with pytest.raises(ValueError, match=r"is \[64 -> 64\]; Nunchaku's layers need K and N multiples of 128"):
        nm.export_sdxl(unet, out)
    assert not list(tmp_path.iterdir())  # nothing written by a refused export


def _drop(tensors, prefix):
    return {k: v for k, v in tensors.items() if not k.startswith(prefix)}


def test_malformed_sdxl_files_are_clear_errors(quantized_unet, sdxl_file, tmp_path):
    """Missing layers or tensors, wrong shapes, a config that does not match, another model's layers: a
    CheckpointError naming the file, the key and what was expected (the model is built on the meta device and
    returned only when complete: nothing is half-loaded)."""
    good = load_file(str(sdxl_file))
    with safe_open(str(sdxl_file), framework="pt") as f:
        meta = f.metadata()
    b = _blocks(quantized_unet)[-1]
    cases = [
        (_drop(good, f"{b}.ff.net.2."),
         rf"incomplete Nunchaku SDXL checkpoint: missing quantized layer\(s\) \['{b}\.ff\.net\.2'\] \(1 in all\)"),
        (good | {"transformer_blocks.0.qkv_proj.qweight": good[f"{b}.attn2.to_q.qweight"]},
         r"quantized layer 'transformer_blocks\.0\.qkv_proj' is not a layer of a Nunchaku SDXL file"),
        (good | {f"{b}.attn2.to_q.qweight": good[f"{b}.attn2.to_q.qweight"][:64]},
         rf"{b}\.attn2\.to_q\.qweight: torch\.int8 \(64, 64\), expected torch\.int8 \(128, 64\)"),
        (good | {f"{b}.attn1.to_out.0.lora_up": good[f"{b}.attn1.to_out.0.lora_up"].half()},
         rf"{b}\.attn1\.to_out\.0\.lora_up: torch\.float16"),
        (_drop(good, f"{b}.attn2.to_v.weight"),
         rf"missing tensor '{b}\.attn2\.to_v\.weight' \(a SDXL file holds .*to_k\.weight' and .*to_v\.weight' together\)"),
        (good | {"conv_in.weight": good["conv_in.weight"][:, :2]},
         r"tensor 'conv_in\.weight' has shape \(32, 2, 3, 3\), expected \(32, 4, 3, 3\)"),
        (_drop(good, "conv_out.bias"), r"missing tensor\(s\) \['conv_out\.bias'\]"),
        (good | {"extra.weight": torch.ones(1)}, r"unexpected tensor\(s\) \['extra\.weight'\]"),
    ]
    for i, (tensors, match) in enumerate(cases):
        path = _write(tensors, tmp_path / f"bad{i}.safetensors", meta)
        with pytest.raises(CheckpointError, match=match) as e:
            svdq.from_pretrained(path)
        assert str(path) in str(e.value), e.value
    # the config of a wider model than the tensors: the first layer whose tensors do not fit is named
    wide = _write(good, tmp_path / "wide.safetensors", _metadata(quantized_unet, block_out_channels=[32, 256]))
    with pytest.raises(CheckpointError, match=r"wide\.safetensors: down_blocks\.1\.attentions\.0\.transformer_blocks\.0\."
                                              r"attn1\.to_qkv\.wscales: torch\.bfloat16 \(2, 384\), expected "
                                              r"torch\.bfloat16 \(4, 768\)"):
        svdq.from_pretrained(wide)


def test_sana_files_go_to_the_sana_loader(tmp_path):
    """A Nunchaku SANA file (C++ names, 4-bit 1×1 convolutions) is no longer refused: `svdq.from_pretrained` hands
    it to `svdq.formats.nunchaku_sana.load_sana` (tests/test_nunchaku_sana.py loads one exactly), which checks the
    layer list from the header first — here three of a block's six 4-bit layers, named as missing."""
    layer = nk.layer_to_nunchaku(
        {"qweight": torch.zeros(128, 64, dtype=torch.int8), "wscales": torch.ones(128, 2, dtype=torch.bfloat16),
         "smooth": torch.ones(128, dtype=torch.bfloat16), "lora_down": torch.zeros(128, 16, dtype=torch.bfloat16),
         "lora_up": torch.zeros(128, 16, dtype=torch.bfloat16)}, 128, 128)
    tensors = {f"transformer_blocks.0.{name}.{k}": v for name in ("attn.qkv_proj", "ff.inverted_conv", "ff.point_conv")
               for k, v in layer.items()}
    meta = {"quantization_config": json.dumps(_qc()), "model_class": "NunchakuSanaTransformer2DModel",
            "config": json.dumps({"_class_name": "SanaTransformer2DModel", "num_layers": 1})}
    path = _write(tensors, tmp_path / "svdq-int4_r32-sana1.6b.safetensors", meta)
    with pytest.raises(CheckpointError, match=r"incomplete Nunchaku SANA checkpoint: missing quantized layer\(s\) "
                                              r"\['transformer_blocks\.0\.attn\.out_proj', 'transformer_blocks\.0\."
                                              r"cross_attn\.out_proj', 'transformer_blocks\.0\.cross_attn\.q_linear'\]") as e:
        svdq.from_pretrained(path)
    assert str(path) in str(e.value)


def test_svdq_generate_runs_a_nunchaku_sdxl_file(quantized_unet, sdxl_file, tmp_path):
    """`svdq generate --quantized <Nunchaku SDXL file>`: the file's UNet in the base SDXL pipeline."""
    from svdq import cli
    from svdq.testing import tiny

    tiny.tiny_sdxl_pipeline(0, torch.bfloat16, unet=_tiny_unet()).save_pretrained(tmp_path / "sdxl")
    out = tmp_path / "img.png"
    rc = cli.main(["generate", "--model", str(tmp_path / "sdxl"), "--quantized", str(sdxl_file), "--prompt", "a cat",
                   "--steps", "1", "--height", "32", "--width", "32", "--dtype", "bf16", "--out", str(out)])
    assert rc == 0 and out.is_file()


def test_export_cli_writes_sdxl(quantized_unet, sdxl_file, tmp_path):
    """`svdq export --format nunchaku <svdq SDXL dir> <file>` writes the same file as `export_sdxl`."""
    from svdq.cli import main

    svdq.save_pretrained(quantized_unet, tmp_path / "q")
    out = tmp_path / "svdq-int4_r16-sdxl.safetensors"
    assert main(["export", "--format", "nunchaku", str(tmp_path / "q"), str(out)]) == 0
    written, independent = load_file(str(out)), load_file(str(sdxl_file))
    assert written.keys() == independent.keys() and all(torch.equal(written[k], independent[k]) for k in independent)
