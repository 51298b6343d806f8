"""Nunchaku SANA INT4 files load exactly (`svdq.formats.nunchaku_sana`, issue 13); `svdq.conv.SVDQConv1x1`.

The files are written here by an independent packer, from the layout as read in Nunchaku's runtime
(docs/formats.md, "Nunchaku SANA files"; src/SanaModel.cpp, EpilogueLiteLA, load_act_to_fpsum<fuse_glu>, DWCONV):
per-element destination rows written out in loops below (not svdq's `_qkv_rows` / `_glu_rows`), and the per-layer
packing of tests/test_nunchaku_format.py (numpy destination-index arithmetic). The tiny SANA has 3 heads (dim 96:
the q rows padded to 128, one padded k/v head) and a GLU of 240 channels (Nunchaku pads it to 256), so every
padding rule is exercised.
"""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import svdq
from svdq.checkpoint import CheckpointError
from svdq.conv import SVDQConv1x1, check_conv1x1
from svdq.decompose import decompose
from svdq.formats import nunchaku_sana as ns
from svdq.linear import SVDQLinear
from svdq.ops import reference as ref
from svdq.quantize import QuantizeConfig
from test_nunchaku_format import _qc, expected_nunchaku

DIM, HEADS, HIDDEN, HIDDEN_PAD, DIM_PAD = 96, 3, 240, 256, 128
CONFIG = dict(num_attention_heads=HEADS, num_cross_attention_heads=HEADS, cross_attention_head_dim=32,
              cross_attention_dim=DIM, num_layers=2)
BLOCKS = ("transformer_blocks.0", "transformer_blocks.1")
RANK = 16


def _tiny_sana():
    import diffusers

    from svdq.testing import families

    torch.manual_seed(0)
    model = diffusers.SanaTransformer2DModel(**{**families.CONFIGS["sana"], **CONFIG})
    families._scale_init(model, 0)
    families.plant_attention_outliers(model, 0, 4)
    with torch.no_grad():
        for b in BLOCKS:  # Nunchaku's self-attention out_proj has no bias (SanaLinearAttention(dim, false))
            model.get_submodule(b).attn1.to_out[0].bias.zero_()
    return model.to(torch.bfloat16).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g).to(torch.bfloat16)  # noqa: E731
    return dict(hidden_states=r(1, 4, 16, 16), encoder_hidden_states=r(1, 8, 32), timestep=torch.tensor([500]),
                return_dict=False)


def _conv_layer(conv, seed):
    """A 1×1 convolution quantized by svdq (decompose on its [N, K] weight, a random smoothing so that the
    smoothing's channel order is checked too) as the SVDQConv1x1 that replaces it."""
    w = SVDQConv1x1.weight_matrix(conv)
    g = torch.Generator().manual_seed(seed)
    smooth = (torch.rand(w.shape[1], generator=g) + 0.5).to(w.dtype)
    layer = SVDQLinear.from_decomposition(decompose(w, RANK, smooth), conv.bias)
    return SVDQConv1x1.replacing(conv, layer)


@pytest.fixture(scope="module")
def quantized_sana():
    return quantize_tiny_sana()


def quantize_tiny_sana():
    """The tiny SANA quantized by svdq as Nunchaku's SANA is: the fused self-attention q/k/v, its out proj, the
    cross-attention q / out, the GLUMBConv's two 1×1 convolutions; the cross-attention k / v and the depthwise
    convolution 16-bit; all signed. (Also used by benchmarks/device_check.d/84-nunchaku-sana.sh.)"""
    from svdq.models.generic import fuse_groups

    model = _tiny_sana()
    for b in BLOCKS:
        fuse_groups(model, {f"{b}.attn1.to_qkv": tuple(f"{b}.attn1.to_{p}" for p in "qkv")})
    inputs = _inputs()
    # one smoothing exponent (against λ = 1) keeps the calibration short; smoothing is still searched and stored
    config = QuantizeConfig(rank=RANK, include=("*attn1.to_qkv.linear", "*attn1.to_out.0", "*attn2.to_q",
                                                "*attn2.to_out.0"), exclude=(), alphas=(0.5,), rounding="nearest")
    svdq.quantize(model, calibration=lambda m: m(**inputs), config=config, progress=False)
    for i, b in enumerate(BLOCKS):
        ff = model.get_submodule(f"{b}.ff")
        ff.conv_inverted = _conv_layer(ff.conv_inverted, 10 + i)
        ff.conv_point = _conv_layer(ff.conv_point, 20 + i)
    return model


@pytest.fixture(scope="module")
def svdq_output(quantized_sana):
    with torch.no_grad():
        return quantized_sana(**_inputs())[0]


# ---- the independent writer --------------------------------------------------------------------------------------


def _plain(m, n_rows, order, k_nk):
    """Plain (unpacked) values of svdq layer ``m`` as the Nunchaku layer of ``n_rows`` outputs and ``k_nk`` inputs:
    ``order[j]`` = the svdq row stored at Nunchaku row j (None: padding — zero codes and low-rank row, scale 1,
    bias 0); inputs beyond K zero codes, smoothing 1 and low-rank rows 0."""
    sd = {k: v for k, v in m.state_dict().items()}
    codes, k = ref.unpack_int4(sd["qweight"]).long(), m.in_features
    groups = -(-k_nk // 64)
    plain = {"codes": torch.zeros(n_rows, groups * 64, dtype=torch.long),
             "scales": torch.ones(n_rows, groups, dtype=sd["wscales"].dtype),
             "up": torch.zeros(n_rows, sd["lora_up"].shape[1], dtype=sd["lora_up"].dtype),
             "bias": None if sd.get("bias") is None else torch.zeros(n_rows, dtype=sd["bias"].dtype),
             "smooth": torch.ones(k_nk, dtype=sd["smooth"].dtype),
             "down": torch.zeros(k_nk, sd["lora_down"].shape[1], dtype=sd["lora_down"].dtype)}
    plain["smooth"][:k], plain["down"][:k] = sd["smooth"], sd["lora_down"]
    for j, row in enumerate(order):
        if row is None:
            continue
        plain["codes"][j, : codes.shape[1]] = codes[row]
        plain["scales"][j, : sd["wscales"].shape[1]] = sd["wscales"][row]
        plain["up"][j] = sd["lora_up"][row]
        if plain["bias"] is not None:
            plain["bias"][j] = sd["bias"][row]
    return plain


def qkv_order(swap_kv=False):
    """Nunchaku row j of attn.qkv_proj → diffusers' [q; k; v] row: q at 0…95 (96…127 padding), then per head h
    (0…3, head 3 padding) 32 k rows and 32 v rows. ``swap_kv``: v before k (a broken layout)."""
    order = [None] * (3 * DIM_PAD)
    for c in range(DIM):
        order[c] = c
    for h in range(HEADS):
        for c in range(32):
            k_row, v_row = DIM + 32 * h + c, 2 * DIM + 32 * h + c
            if swap_kv:
                k_row, v_row = v_row, k_row
            order[DIM_PAD + 64 * h + c] = k_row
            order[DIM_PAD + 64 * h + 32 + c] = v_row
    return order


def glu_order(swap=False):
    """Nunchaku channel j of inverted_conv / depth_conv → diffusers' [value; gate] channel: value i at 2i, gate i
    at 2i + 1 (i < 240; 480…511 padding). ``swap``: gate at 2i, value at 2i + 1 (a broken layout)."""
    order = [None] * (2 * HIDDEN_PAD)
    for i in range(HIDDEN):
        order[2 * i], order[2 * i + 1] = (HIDDEN + i, i) if swap else (i, HIDDEN + i)
    return order


def nunchaku_sana_tensors(model, swap_kv=False, swap_glu=False, out_bias=None, live_q_pad=False):
    """A Nunchaku SANA file's tensors for the svdq-quantized tiny SANA (C++ names under the blocks, diffusers names
    elsewhere). ``out_bias``: a bias written for attn.out_proj (Nunchaku never reads one); ``live_q_pad``: codes
    in block 1's q padding rows (a file Nunchaku would compute a 4th head from)."""
    from svdq.quantize import quantized_layers

    q, dtype = quantized_layers(model), torch.bfloat16
    out = {}

    def put(prefix, m, order, k_nk):
        plain = _plain(m, len(order), order, k_nk)
        if live_q_pad and prefix == "transformer_blocks.1.attn.qkv_proj":
            plain["codes"][DIM:DIM_PAD, :DIM] = 1
        out.update({f"{prefix}.{k}": v for k, v in expected_nunchaku(plain, k_nk, dtype).items()})

    for b in BLOCKS:
        put(f"{b}.attn.qkv_proj", q[f"{b}.attn1.to_qkv.linear"], qkv_order(swap_kv), DIM)
        put(f"{b}.attn.out_proj", q[f"{b}.attn1.to_out.0"], list(range(DIM)), DIM_PAD)
        if out_bias is not None:
            out[f"{b}.attn.out_proj.bias"] = torch.cat([out_bias, torch.ones(DIM_PAD - DIM, dtype=dtype)])
        put(f"{b}.cross_attn.q_linear", q[f"{b}.attn2.to_q"], list(range(DIM)), DIM)
        put(f"{b}.cross_attn.out_proj", q[f"{b}.attn2.to_out.0"], list(range(DIM)), DIM)
        put(f"{b}.ff.inverted_conv", q[f"{b}.ff.conv_inverted.linear"], glu_order(swap_glu), DIM)
        put(f"{b}.ff.point_conv", q[f"{b}.ff.conv_point.linear"], list(range(DIM)), HIDDEN_PAD)
        blk = model.get_submodule(b)
        out[f"{b}.scale_shift_table"] = blk.scale_shift_table.detach().clone()
        out[f"{b}.cross_attn.kv_linear.weight"] = torch.cat([blk.attn2.to_k.weight, blk.attn2.to_v.weight]).detach()
        out[f"{b}.cross_attn.kv_linear.bias"] = torch.cat([blk.attn2.to_k.bias, blk.attn2.to_v.bias]).detach()
        dw, db = blk.ff.conv_depth.weight.detach(), blk.ff.conv_depth.bias.detach()
        w = torch.zeros(2 * HIDDEN_PAD, 3, 3, 1, dtype=dtype)
        bias = torch.zeros(2 * HIDDEN_PAD, dtype=dtype)
        for j, c in enumerate(glu_order(swap_glu)):
            if c is not None:
                for r in range(3):
                    for s in range(3):
                        w[j, r, s, 0] = dw[c, 0, r, s]  # CUTLASS NHWC filter (K, R, S, C/groups)
                bias[j] = db[c]
        out[f"{b}.ff.depth_conv.weight"], out[f"{b}.ff.depth_conv.bias"] = w, bias
    for key, v in model.state_dict().items():
        if not key.startswith("transformer_blocks."):
            out[key] = v.detach().contiguous()
    return out


def _metadata(model, **config):
    cfg = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    cfg["_class_name"] = "SanaTransformer2DModel"
    return {"quantization_config": json.dumps(_qc(rank=RANK)), "config": json.dumps(cfg | config, default=list),
            "model_class": "NunchakuSanaTransformer2DModel"}


def _write(tensors, path, meta):
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


@pytest.fixture(scope="module")
def sana_file(quantized_sana, tmp_path_factory):
    path = tmp_path_factory.mktemp("sana") / "svdq-int4_r16-sana-tiny.safetensors"
    return _write(nunchaku_sana_tensors(quantized_sana), path, _metadata(quantized_sana))


# ---- tests -------------------------------------------------------------------------------------------------------


def test_sana_file_loads_every_tensor_exactly_and_computes_the_same(quantized_sana, sana_file, svdq_output, recwarn):
    """svdq canonical → Nunchaku SANA layout (independent writer) → `svdq.from_pretrained`: every tensor of the
    model bit for bit (q/k/v and GLU un-interleaved, paddings stripped, the depthwise filter reshaped) and the same
    transformer output bit for bit."""
    from svdq.models import SharedInputLinear

    loaded = svdq.from_pretrained(sana_file)
    assert type(loaded).__name__ == "SanaTransformer2DModel"
    want, got = quantized_sana.state_dict(), loaded.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    blk = loaded.transformer_blocks[1]
    assert isinstance(blk.attn1.to_qkv, SharedInputLinear) and isinstance(blk.attn1.to_qkv.linear, SVDQLinear)
    assert isinstance(blk.ff.conv_inverted, SVDQConv1x1) and isinstance(blk.ff.conv_point, SVDQConv1x1)
    assert type(blk.attn2.to_k) is nn.Linear and type(blk.ff.conv_depth) is nn.Conv2d
    assert all(m.act_shift == 0.0 for m in loaded.modules() if isinstance(m, SVDQLinear))  # SANA is all signed
    # smoothing was searched (not all λ = 1), so its channel order is checked as well
    assert any(not bool((m.smooth == 1).all()) for n, m in loaded.named_modules()
               if isinstance(m, SVDQLinear) and "attn" in n)
    assert not [w for w in recwarn if "nunchaku" in str(w.message).lower()]
    with torch.no_grad():
        y = loaded(**_inputs())[0]
    assert torch.equal(y, svdq_output)
    assert float(svdq_output.float().std()) > 0.1  # a real output
    # saved as an svdq directory and reloaded: tests/test_nunchaku_sana_export.py


def test_broken_layouts_are_told_apart(quantized_sana, sana_file, svdq_output, tmp_path, monkeypatch):
    """The comparisons above can fail: k and v swapped within each head or a loader that skips the q/k/v
    un-interleave gives a self-attention far from the svdq model's; the GLU's value and gate swapped or a loader
    that skips the GLU un-interleave, an inverted convolution whose channels are not diffusers' — and every one a
    different transformer output."""
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
    meta = _metadata(quantized_sana)
    broken = {}
    for name, kw in (("k/v swapped", dict(swap_kv=True)), ("GLU halves swapped", dict(swap_glu=True))):
        path = _write(nunchaku_sana_tensors(quantized_sana, **kw), tmp_path / f"{len(broken)}.safetensors", meta)
        broken[name] = svdq.from_pretrained(path)
    # loaders that skip a permutation: q/k/v read as [q; k; v] blocks, the GLU read as [value; gate] halves
    monkeypatch.setattr(ns, "_qkv_rows",
                        lambda d: torch.cat([torch.arange(d.dim), d.dim_pad + torch.arange(2 * d.dim)]))
    broken["k/v not un-interleaved"] = svdq.from_pretrained(sana_file)
    monkeypatch.undo()
    monkeypatch.setattr(ns, "_glu_rows", lambda width: torch.arange(2 * width))
    broken["GLU not un-interleaved"] = svdq.from_pretrained(sana_file)
    monkeypatch.undo()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 64, DIM, generator=g).to(torch.bfloat16)
    xc = x.transpose(1, 2).reshape(1, DIM, 8, 8)
    block = quantized_sana.transformer_blocks[0]
    with torch.no_grad():
        attn, inverted = block.attn1(x), block.ff.conv_inverted(xc)
        for name, model in broken.items():
            b = model.transformer_blocks[0]
            # measured: self-attention 1.46 (k/v swapped) / 3.37 (not un-interleaved); inverted conv 1.4 (both
            # GLU variants: its channels permuted); transformer output 0.038 / 0.10 / 0.0010 / 0.0024 (the tiny
            # model's GLU is nearly symmetric in value and gate: x·silu(y) ≈ xy/2 for small activations)
            err = rel(b.attn1(x), attn) if "k/v" in name else rel(b.ff.conv_inverted(xc), inverted)
            assert err > 1.0, (name, err)
            assert not torch.equal(model(**_inputs())[0], svdq_output), name


def test_attention_out_bias_nunchaku_never_reads_is_dropped_with_a_warning(quantized_sana, svdq_output, tmp_path):
    """A bias for attn.out_proj (a DeepCompressor-style writer stores one for every layer): Nunchaku builds that
    layer without bias and never reads it, so the model that computes what Nunchaku computes drops it — with a
    warning naming the key when it is not zero; a zero one is silent."""
    meta = _metadata(quantized_sana)
    zero = _write(nunchaku_sana_tensors(quantized_sana, out_bias=torch.zeros(DIM, dtype=torch.bfloat16)),
                  tmp_path / "zero.safetensors", meta)
    nonzero = _write(nunchaku_sana_tensors(quantized_sana, out_bias=torch.full((DIM,), 0.5, dtype=torch.bfloat16)),
                     tmp_path / "nonzero.safetensors", meta)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = svdq.from_pretrained(zero)
    with pytest.warns(UserWarning, match=r"transformer_blocks\.0\.attn\.out_proj\.bias is not zero.*never reads it"):
        b = svdq.from_pretrained(nonzero)
    with torch.no_grad():
        assert torch.equal(a(**_inputs())[0], svdq_output) and torch.equal(b(**_inputs())[0], svdq_output)


def test_padding_that_is_not_inert(quantized_sana, sana_file, svdq_output, tmp_path):
    """Padding Nunchaku's runtime would compute with: q padding rows with codes are refused (diffusers' 3-head
    attention has no place for a 4th head); a GLU padding channel whose value and gate are both live is kept — that
    block's feed-forward is built 256 wide, holding the file's channels."""
    meta = _metadata(quantized_sana)
    good = load_file(str(sana_file))
    path = _write(nunchaku_sana_tensors(quantized_sana, live_q_pad=True), tmp_path / "qpad.safetensors", meta)
    with pytest.raises(CheckpointError, match=r"qpad\.safetensors: transformer_blocks\.1\.attn\.qkv_proj: its q "
                                              r"padding rows 96…127 are not all zero"):
        svdq.from_pretrained(path)
    live = dict(good)
    for key in ("transformer_blocks.0.ff.depth_conv.bias",):
        b = live[key].clone()
        b[2 * HIDDEN :] = 0.25  # value and gate of every padded channel: non-zero
        live[key] = b
    loaded = svdq.from_pretrained(_write(live, tmp_path / "live.safetensors", meta))
    ff0, ff1 = loaded.transformer_blocks[0].ff, loaded.transformer_blocks[1].ff
    assert ff0.conv_inverted.out_channels == 2 * HIDDEN_PAD and ff0.conv_point.in_channels == HIDDEN_PAD
    assert ff0.conv_depth.weight.shape == (2 * HIDDEN_PAD, 1, 3, 3)
    assert torch.equal(ff0.conv_depth.bias[HIDDEN:HIDDEN_PAD], torch.full((16,), 0.25, dtype=torch.bfloat16))
    assert ff1.conv_inverted.out_channels == 2 * HIDDEN  # block 1's padding is still inert: stripped
    with torch.no_grad():
        y = loaded(**_inputs())[0]
    assert torch.isfinite(y).all() and not torch.equal(y, svdq_output)


def _drop(tensors, prefix):
    return {k: v for k, v in tensors.items() if not k.startswith(prefix)}


def test_malformed_sana_files_are_clear_errors(quantized_sana, sana_file, tmp_path):
    """Missing or unknown layers and tensors, wrong shapes and dtypes, configs Nunchaku's SANA cannot have run:
    CheckpointErrors naming the file, the key and what was expected, raised before anything is built."""
    good = load_file(str(sana_file))
    with safe_open(str(sana_file), framework="pt") as f:
        meta = f.metadata()
    b = "transformer_blocks.1"
    cases = [
        (_drop(good, f"{b}.ff.point_conv."),
         rf"incomplete Nunchaku SANA checkpoint: missing quantized layer\(s\) \['{b}\.ff\.point_conv'\]"),
        (good | {f"{b}.ff.mlp_fc1.qweight": good[f"{b}.ff.point_conv.qweight"]},
         rf"quantized layer '{b}\.ff\.mlp_fc1' is not a layer of a Nunchaku SANA file"),
        (good | {"transformer_blocks.2.attn.out_proj.qweight": good[f"{b}.attn.out_proj.qweight"]},
         r"'transformer_blocks\.2\.attn\.out_proj' is not a layer of a Nunchaku SANA file with 2 blocks"),
        (good | {f"{b}.attn.qkv_proj.qweight": good[f"{b}.attn.qkv_proj.qweight"][:256]},
         rf"{b}\.attn\.qkv_proj\.qweight: torch\.int8 \(256, 64\), expected torch\.int8 \(384, 64\)"),
        (good | {f"{b}.ff.inverted_conv.lora_up": good[f"{b}.ff.inverted_conv.lora_up"].half()},
         rf"{b}\.ff\.inverted_conv\.lora_up: torch\.float16"),
        (_drop(good, f"{b}.ff.inverted_conv.bias"), rf"{b}\.ff\.inverted_conv: missing key 'bias'"),
        (_drop(good, f"{b}.ff.depth_conv.bias"), rf"missing tensor '{b}\.ff\.depth_conv\.bias'"),
        (good | {f"{b}.ff.depth_conv.weight": good[f"{b}.ff.depth_conv.weight"].reshape(512, 1, 3, 3)},
         rf"{b}\.ff\.depth_conv\.weight: torch\.bfloat16 \(512, 1, 3, 3\), expected torch\.bfloat16 \(512, 3, 3, 1\)"),
        (good | {f"{b}.norm1.weight": torch.ones(DIM, dtype=torch.bfloat16)},
         rf"unexpected tensor '{b}\.norm1\.weight' in a Nunchaku SANA file's blocks"),
        (_drop(good, "proj_out.bias"), r"missing tensor\(s\) \['proj_out\.bias'\]"),
    ]
    for i, (tensors, match) in enumerate(cases):
        path = _write(tensors, tmp_path / f"bad{i}.safetensors", meta)
        with pytest.raises(CheckpointError, match=match) as e:
            svdq.from_pretrained(path)
        assert str(path) in str(e.value), e.value
    for config, match in (({"attention_head_dim": 64, "num_attention_heads": 2}, r"attention_head_dim = 64"),
                          ({"qk_norm": "rms_norm_across_heads"}, r"qk_norm = 'rms_norm_across_heads'"),
                          ({"norm_eps": 1e-5}, r"norm_eps = 1e-05"),
                          ({"num_attention_heads": 4}, r"cross-attention 3 × 32 on 96 features")):
        path = _write(good, tmp_path / "cfg.safetensors", _metadata(quantized_sana, **config))
        with pytest.raises(CheckpointError, match=rf"cfg\.safetensors: SANA config {match}"):
            svdq.from_pretrained(path)


def test_svdq_generate_runs_a_nunchaku_sana_file(sana_file, tmp_path):
    """`svdq generate --quantized <Nunchaku SANA file>`: the file's transformer in the base SANA pipeline (the 4-bit
    1×1 convolutions inside diffusers' GLUMBConv, SanaPipeline's DC-AE and text encoder around them)."""
    from svdq import cli
    from svdq.testing import families

    pipe = families.tiny_family_pipeline("sana", 0, torch.bfloat16, transformer=_tiny_sana())
    pipe.save_pretrained(tmp_path / "sana")
    out = tmp_path / "img.png"
    rc = cli.main(["generate", "--model", str(tmp_path / "sana"), "--quantized", str(sana_file), "--prompt", "a cat",
                   "--steps", "1", "--height", "32", "--width", "32", "--dtype", "bf16", "--out", str(out)])
    assert rc == 0 and out.is_file()


def test_svdq_conv1x1_is_the_linear_layer_per_pixel():
    """SVDQConv1x1 computes its SVDQLinear on every pixel's channels (bit for bit); convolutions that are not
    per-pixel linear layers are refused by name."""
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 32, 1).to(torch.bfloat16)
    m = _conv_layer(conv, 0)
    x = torch.randn(2, 64, 5, 3).to(torch.bfloat16)
    with torch.no_grad():
        y = m(x)
        want = m.linear(x.permute(0, 2, 3, 1).reshape(-1, 64)).reshape(2, 5, 3, 32).permute(0, 3, 1, 2)
        dense = conv(x)
    assert y.shape == (2, 32, 5, 3) and torch.equal(y, want)
    assert float((y.float() - dense.float()).norm() / dense.float().norm()) < 0.2  # it is that convolution, 4-bit
    for bad, what in ((nn.Conv2d(64, 32, 3), r"kernel_size=\(3, 3\)"),
                      (nn.Conv2d(64, 32, 1, stride=2), r"stride=\(2, 2\)"),
                      (nn.Conv2d(64, 32, 1, groups=2), r"groups=2"),
                      (nn.Conv2d(64, 32, 1, padding=1), r"padding=\(1, 1\)")):
        with pytest.raises(ValueError, match=rf"ff\.x: Conv2d\(64, 32, {what}\) is not a per-pixel linear layer"):
            check_conv1x1(bad, "ff.x")
    with pytest.raises(ValueError, match=r"cannot take an SVDQLinear \[64 -> 32\]"):
        SVDQConv1x1.replacing(nn.Conv2d(32, 64, 1), m.linear, "ff.x")
    with pytest.raises(ValueError, match=r"expects \[B, 64, H, W\] inputs, got \(2, 64, 5\)"):
        m(x[..., 0])
    assert copy.deepcopy(m).linear is not m.linear
