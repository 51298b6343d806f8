"""Nunchaku SANA INT4 files → diffusers' ``SanaTransformer2DModel`` with every 4-bit layer converted exactly, and
back (`export_sana`, the exact inverse of `load_sana`, for a SANA svdq quantized as Nunchaku's is).

Nunchaku runs SANA's transformer blocks in C++ and reads the file's ``transformer_blocks.*`` tensors under the C++
module names; everything else is diffusers' own model and names. Every fact below was read in the public source
(nunchaku-ai/nunchaku 92e4695; no SANA converter is public — DeepCompressor's ``backend/nunchaku/convert.py`` is
FLUX.1 only — so the layout is what the runtime reads, and padding values are checked, not assumed):

- ``nunchaku/models/transformers/transformer_sana.py`` (``NunchakuSanaTransformer2DModel.from_pretrained``):
  ``transformer_blocks.*`` go to ``QuantizedSanaModel``, the rest into diffusers' model; ``nunchaku/csrc/sana.h``
  builds it from the config's ``num_layers``, ``num_attention_heads``, ``attention_head_dim``,
  ``num_cross_attention_heads``, ``mlp_ratio``.
- ``src/SanaModel.cpp``: per block ``attn`` = ``SanaLinearAttention(dim, bias=false)`` with ``qkv_proj`` (W4A4,
  dim → 3·dim_pad, dim_pad = dim rounded up to 128) and ``out_proj`` (W4A4, dim_pad → dim), optional
  ``pag_to_v``; ``cross_attn`` = ``q_linear`` (W4A4, bias), ``kv_linear`` (16-bit ``GEMM_F16``, rows [k; v]:
  ``MultiHeadCrossAttention::forward`` slices heads 0…h−1 as k, h…2h−1 as v), ``out_proj`` (W4A4, bias);
  ``ff`` = ``SanaGLUMBConv``: ``inverted_conv`` (W4A4, dim → 2·hidden, bias, ``forward_silu``), ``depth_conv``
  (``DWCONV``), ``point_conv`` (W4A4, hidden → dim, no bias, its quantizer called with ``fuse_glu``); hidden =
  round(mlp_ratio·dim) rounded up to 64 (``SanaModel::SanaModel``); ``norm1`` / ``norm2`` LayerNorm(eps 1e-6, no
  affine: no tensors); ``scale_shift_table`` [6, dim]. ``src/Module.h``: a tensor is read only for a registered
  parameter, and a ``GEMM_W4A4`` built with ``bias=false`` registers none — so a bias a file holds for
  ``attn.qkv_proj`` / ``attn.out_proj`` / ``ff.point_conv`` is never read by Nunchaku.
- The q / k / v rows of ``attn.qkv_proj`` (``src/kernels/zgemm/epilogues.cuh``, ``EpilogueLiteLA``, head dim 32,
  128-column output blocks): blocks 0…nb/3−1 are q (ReLU, written out: rows 0…dim_pad−1, dim… padding);
  every later block holds two heads, each 64 rows: ReLU(k_h) (32 rows) then v_h (32 rows) — head h at rows
  dim_pad + 64h…+31 (k) and +32…+63 (v), heads dim/32… padding. `_qkv_rows`.
- The GLU (``src/kernels/zgemm/gemm_base.cuh``, ``load_act_to_fpsum<fuse_glu=true>``): output channel i =
  x[2i] · silu(x[2i+1]) — value i at channel 2i, gate i at 2i+1 of the inverted conv's and the depthwise conv's
  channels (diffusers: [value (hidden); gate (hidden)], ``torch.chunk``). `_glu_rows`.
- ``depth_conv.weight`` [C, 3, 3, 1] (``src/Linear.cpp`` ``DWCONV``; ``src/kernels/dwconv.cu``: CUTLASS NHWC
  filter (K, R, S, C/groups), cross-correlation, padding 1): diffusers' depthwise [C, 1, 3, 3] in the same memory
  order (a reshape).
- Every SANA layer is signed (``GEMM_W4A4::quantize`` sets ``is_unsigned = false``; the GLU path too).

Exactness: each 4-bit layer is `nunchaku.layer_from_nunchaku` (exact) followed by a row permutation (q/k/v
un-interleave, GLU un-interleave) and the removal of padding channels whose values Nunchaku's runtime provably
multiplies by zero: the q padding rows (checked: zero codes and low-rank rows, so ReLU(q) = 0 there and the padded
heads output 0 into ``out_proj``'s padded columns, which are dropped) and the GLU padding channels (checked per
channel: the value or the gate path is zero — zero codes, low-rank rows, bias and depthwise bias — so the GLU
output is 0 into ``point_conv``'s padded columns). A file whose q padding is not inert is refused; a block whose GLU
padding is not inert keeps it (its feed-forward is built hidden_pad wide, computing what Nunchaku computes).
Not expressible in diffusers' model and therefore not loaded: ``attn.pag_to_v`` (checked, then dropped: Nunchaku's
separately quantized v projection for its PAG path; diffusers' PAG processors use ``attn1.to_v``, here rows of the
fused q/k/v layer) and the biases Nunchaku never reads (above: dropped with a warning when non-zero; the model then
computes what Nunchaku computes, which is not the 16-bit SANA's ``attn1.to_out.0`` with its bias).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import CheckpointError
from ..ops import reference as ref
from ..ops.reference import GROUP_SIZE, padded_k
from . import nunchaku as nk

HEAD_DIM = 32  # EpilogueLiteLA::LITELA_HEAD_DIM: the linear-attention epilogue handles 32-channel heads only
GLU_PAD = 64  # SanaModel::SanaModel rounds the GLU width up to a multiple of 64
NORM_EPS = 1e-6  # SanaLinearTransformerBlock's LayerNorms
# 4-bit layers under ``transformer_blocks.i.`` → the diffusers module they become
LAYERS = {
    "attn.qkv_proj": "attn1.to_qkv.linear",  # svdq's fused q/k/v group (`svdq.models.generic.group_name`)
    "attn.out_proj": "attn1.to_out.0",
    "cross_attn.q_linear": "attn2.to_q",
    "cross_attn.out_proj": "attn2.to_out.0",
    "ff.inverted_conv": "ff.conv_inverted",  # an SVDQConv1x1
    "ff.point_conv": "ff.conv_point",  # an SVDQConv1x1
}
OPTIONAL_LAYERS = ("attn.pag_to_v",)  # only built by Nunchaku for PAG layers; checked, not loaded (docstring)
NO_BIAS = ("attn.qkv_proj", "attn.out_proj", "ff.point_conv", "attn.pag_to_v")  # GEMM_W4A4(..., bias=false)
NEEDS_BIAS = ("cross_attn.q_linear", "cross_attn.out_proj", "ff.inverted_conv")
SIXTEEN_BIT = ("scale_shift_table", "cross_attn.kv_linear.weight", "cross_attn.kv_linear.bias",
               "ff.depth_conv.weight", "ff.depth_conv.bias")


@dataclass(frozen=True)
class SanaDims:
    layers: int
    dim: int  # inner dim = heads · 32
    heads: int
    dim_pad: int  # dim rounded up to 128 (SanaLinearAttention::dim_pad)
    hidden: int  # diffusers' GLU width: int(mlp_ratio · dim) (GLUMBConv)
    hidden_pad: int  # Nunchaku's: round(mlp_ratio · dim) rounded up to 64

    def layer_shape(self, layer: str) -> tuple[int, int]:
        """(K, N) of a 4-bit layer as Nunchaku builds it."""
        d, dp, hp = self.dim, self.dim_pad, self.hidden_pad
        return {"attn.qkv_proj": (d, 3 * dp), "attn.out_proj": (dp, d), "attn.pag_to_v": (d, dp),
                "cross_attn.q_linear": (d, d), "cross_attn.out_proj": (d, d), "ff.inverted_conv": (d, 2 * hp),
                "ff.point_conv": (hp, d)}[layer]

    def sixteen_bit_shape(self, key: str) -> tuple[int, ...]:
        d, hp = self.dim, self.hidden_pad
        return {"scale_shift_table": (6, d), "cross_attn.kv_linear.weight": (2 * d, d),
                "cross_attn.kv_linear.bias": (2 * d,), "ff.depth_conv.weight": (2 * hp, 3, 3, 1),
                "ff.depth_conv.bias": (2 * hp,)}[key]


def sana_dims(config: dict, path: Path) -> SanaDims:
    """The widths Nunchaku's runtime builds from ``config`` (diffusers' SanaTransformer2DModel config); a
    CheckpointError naming the field for a config Nunchaku's SANA cannot have run (it would compute another model
    than diffusers builds from the same config)."""
    c = {"num_layers": 20, "num_attention_heads": 70, "attention_head_dim": 32, "num_cross_attention_heads": 20,
         "cross_attention_head_dim": 112, "cross_attention_dim": 2240, "mlp_ratio": 2.5, "attention_bias": False,
         "norm_elementwise_affine": False, "norm_eps": 1e-6, "qk_norm": None} | config  # diffusers' defaults
    heads, head_dim = int(c["num_attention_heads"]), int(c["attention_head_dim"])
    dim = heads * head_dim
    why = None
    if head_dim != HEAD_DIM:
        why = (f"attention_head_dim = {head_dim}: Nunchaku's linear-attention kernel handles {HEAD_DIM}-channel "
               f"heads only")
    elif c["qk_norm"] is not None:
        why = f"qk_norm = {c['qk_norm']!r}: Nunchaku's SANA blocks have no q/k normalization"
    elif c["attention_bias"]:
        why = "attention_bias = true: Nunchaku's SANA self-attention q/k/v have no bias"
    elif c["norm_elementwise_affine"]:
        why = "norm_elementwise_affine = true: Nunchaku's SANA LayerNorms have no weight / bias"
    elif float(c["norm_eps"]) != NORM_EPS:
        why = f"norm_eps = {c['norm_eps']}: Nunchaku's SANA LayerNorms use {NORM_EPS}"
    elif c["cross_attention_dim"] != dim or (
            int(c["num_cross_attention_heads"]) * int(c["cross_attention_head_dim"]) != dim):
        why = (f"cross-attention {c['num_cross_attention_heads']} × {c['cross_attention_head_dim']} on "
               f"{c['cross_attention_dim']} features: Nunchaku's SANA cross-attention is dim × dim ({dim})")
    if why:
        raise CheckpointError(f"{path}: SANA config {why}")
    ratio = float(c["mlp_ratio"])
    hidden = int(ratio * dim)
    # C++ round(): halves away from zero (Python's round() rounds them to even)
    hidden_pad = -(-int(math.floor(ratio * dim + 0.5)) // GLU_PAD) * GLU_PAD
    if hidden_pad < hidden:
        raise CheckpointError(f"{path}: SANA config mlp_ratio = {ratio}: GLU width {hidden} exceeds Nunchaku's "
                              f"{hidden_pad}")
    return SanaDims(int(c["num_layers"]), dim, heads, nk._up(dim, nk.WARP_N), hidden, hidden_pad)


# ---- row / column maps (each a permutation or a selection of stored values) ---------------------------------------


def _qkv_rows(d: SanaDims) -> torch.Tensor:
    """Rows of Nunchaku's qkv_proj, in diffusers' [q; k; v] order (EpilogueLiteLA, see the module docstring)."""
    head = torch.arange(d.heads).view(-1, 1) * 2 * HEAD_DIM + d.dim_pad
    c = torch.arange(HEAD_DIM).view(1, -1)
    return torch.cat([torch.arange(d.dim), (head + c).flatten(), (head + HEAD_DIM + c).flatten()])


def _glu_rows(width: int) -> torch.Tensor:
    """Channels of Nunchaku's inverted / depthwise conv, in diffusers' [value; gate] order for a GLU of
    ``width`` (load_act_to_fpsum<fuse_glu>: value i at 2i, gate i at 2i + 1)."""
    i = torch.arange(width)
    return torch.cat([2 * i, 2 * i + 1])


def _take_rows(t: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """A canonical layer restricted to output rows ``rows`` (in that order): qweight, wscales, lora_up, bias."""
    out = dict(t)
    for key in ("qweight", "wscales", "lora_up", "bias"):
        if key in t:
            out[key] = t[key][rows].contiguous()
    return out


def _keep_inputs(t: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """A canonical layer restricted to its first ``k`` input columns (the rest: padding the caller showed to meet
    zero activations). Codes beyond k become the canonical padding zeros (spec §3); whole groups are kept."""
    codes = ref.unpack_int4(t["qweight"])
    kp = padded_k(k)
    kept = torch.zeros(codes.shape[0], kp, dtype=codes.dtype)
    kept[:, :k] = codes[:, :k]
    out = dict(t)
    out["qweight"] = ref.pack_int4(kept)
    out["wscales"] = t["wscales"][:, : kp // GROUP_SIZE].contiguous()
    out["smooth"] = t["smooth"][:k].contiguous()
    out["lora_down"] = t["lora_down"][:k].contiguous()
    return out


def _zero_rows(t: dict[str, torch.Tensor], rows: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
    """Per row of ``rows``: True where the layer's output is exactly 0 for every input (zero codes, zero low-rank
    row, zero or no bias)."""
    zero = (t["qweight"][rows] == 0).all(dim=1) & (t["lora_up"][rows] == 0).all(dim=1)
    if with_bias and "bias" in t:
        zero &= t["bias"][rows] == 0
    return zero


def _svdq_linear(t: dict[str, torch.Tensor], k: int, n: int):
    from ..linear import SVDQLinear

    layer = SVDQLinear(k, n, t["lora_down"].shape[1], "bias" in t, t["wscales"].dtype)
    layer.load_state_dict(t, strict=True)
    return layer


# ---- the loader ----------------------------------------------------------------------------------------------------


def load_sana(path: str | os.PathLike) -> nn.Module:
    """A Nunchaku SANA INT4 checkpoint as diffusers' `SanaTransformer2DModel` holding svdq layers: the self-attention
    q/k/v as svdq's fused ``attn1.to_qkv`` group, ``to_out.0`` and the cross-attention ``to_q`` / ``to_out.0`` as
    `SVDQLinear`, the GLUMBConv's ``conv_inverted`` / ``conv_point`` as `svdq.conv.SVDQConv1x1`; everything else
    16-bit. Every file tensor is checked and converted (exact permutations, see the module docstring) before the
    model is built on the meta device, so a bad file is a CheckpointError naming the file, the key and what was
    expected, and nothing is half-loaded."""
    import diffusers
    from safetensors import safe_open

    from ..conv import SVDQConv1x1, check_conv1x1
    from ..models.generic import fuse_groups, group_name
    from .nunchaku_models import _set, finish

    path = Path(path)
    _, known = nk.model_config(path, "SANA")
    d = sana_dims(known, path)

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        names = nk.quantized_layer_names(keys)
        blocks = [f"transformer_blocks.{i}" for i in range(d.layers)]
        expected = {f"{b}.{layer}" for b in blocks for layer in LAYERS}
        optional = {f"{b}.{layer}" for b in blocks for layer in OPTIONAL_LAYERS}
        unknown = [n for n in names if n not in expected | optional]
        if unknown:
            raise CheckpointError(f"{path}: quantized layer {unknown[0]!r} is not a layer of a Nunchaku SANA file "
                                  f"with {d.layers} blocks ({', '.join(LAYERS)} under transformer_blocks.i)")
        missing = sorted(expected - set(names))
        if missing:
            raise CheckpointError(f"{path}: incomplete Nunchaku SANA checkpoint: missing quantized layer(s) "
                                  f"{missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
        owned = tuple(n + "." for n in names)
        block_keys = {f"{b}.{s}" for b in blocks for s in SIXTEEN_BIT}
        for key in keys:
            if key.startswith("transformer_blocks.") and not key.startswith(owned) and key not in block_keys:
                raise CheckpointError(f"{path}: unexpected tensor {key!r} in a Nunchaku SANA file's blocks (expected "
                                      f"4-bit layers {', '.join(LAYERS)} and 16-bit {', '.join(SIXTEEN_BIT)})")
        absent = sorted(block_keys - set(keys))
        if absent:
            raise CheckpointError(f"{path}: missing tensor {absent[0]!r} of a Nunchaku SANA block")

        canonical, dtype = {}, None
        for name in sorted(expected | (optional & set(names))):
            layer = name.split(".", 2)[2]
            k, n = d.layer_shape(layer)
            tensors = {key[len(name) + 1 :]: f.get_tensor(key) for key in keys if key.startswith(name + ".")}
            t = nk.layer_from_nunchaku(tensors, k, n, where=f"{path}: {name}")
            if layer in NEEDS_BIAS and "bias" not in t:
                raise CheckpointError(f"{path}: {name}: missing key 'bias' (Nunchaku builds this layer with a bias)")
            if layer in NO_BIAS and "bias" in t:
                if bool(t["bias"].any()):
                    warnings.warn(f"{path}: {name}.bias is not zero, but Nunchaku's SANA runtime builds {layer} "
                                  f"without a bias and never reads it: dropped, so the model computes what Nunchaku "
                                  f"computes",
                                  stacklevel=2)
                del t["bias"]
            canonical[name] = t
            dtype = dtype or t["wscales"].dtype
        sixteen = {}
        for key in sorted(block_keys):
            t = f.get_tensor(key)
            want = d.sixteen_bit_shape(key.split(".", 2)[2])
            if tuple(t.shape) != want or t.dtype != dtype:
                raise CheckpointError(f"{path}: {key}: {t.dtype} {tuple(t.shape)}, expected {dtype} {want}")
            sixteen[key] = t
        rest = {key: f.get_tensor(key) for key in keys if not key.startswith("transformer_blocks.")}

    # Per block: the diffusers form of every tensor (all checks before anything is built).
    modules, widths = {}, {}
    qkv_rows = _qkv_rows(d)
    for b in blocks:
        qkv, out = canonical[f"{b}.attn.qkv_proj"], canonical[f"{b}.attn.out_proj"]
        q_pad = torch.arange(d.dim, d.dim_pad)
        if len(q_pad) and not (bool(_zero_rows(qkv, q_pad).all())
                               and bool((out["smooth"][d.dim : d.dim_pad] != 0).all())):
            raise CheckpointError(
                f"{path}: {b}.attn.qkv_proj: its q padding rows {d.dim}…{d.dim_pad - 1} are not all zero (codes, "
                f"lora_up), or {b}.attn.out_proj's smoothing has zeros there: Nunchaku's runtime would feed those "
                f"padded heads into out_proj, which diffusers' {d.heads}-head attention has no place for"
            )
        modules[f"{b}.attn1.to_qkv.linear"] = _svdq_linear(_take_rows(qkv, qkv_rows), d.dim, 3 * d.dim)
        out = _keep_inputs(out, d.dim)
        out["bias"] = torch.zeros(d.dim, dtype=dtype)  # diffusers' to_out.0 has one; Nunchaku adds none (NO_BIAS)
        modules[f"{b}.attn1.to_out.0"] = _svdq_linear(out, d.dim, d.dim)
        for layer in ("cross_attn.q_linear", "cross_attn.out_proj"):
            modules[f"{b}.{LAYERS[layer]}"] = _svdq_linear(canonical[f"{b}.{layer}"], d.dim, d.dim)
        kv_w, kv_b = sixteen[f"{b}.cross_attn.kv_linear.weight"], sixteen[f"{b}.cross_attn.kv_linear.bias"]
        for i, part in enumerate(("to_k", "to_v")):  # rows [k; v] (MultiHeadCrossAttention::forward)
            rest[f"{b}.attn2.{part}.weight"] = kv_w[i * d.dim : (i + 1) * d.dim].contiguous()
            rest[f"{b}.attn2.{part}.bias"] = kv_b[i * d.dim : (i + 1) * d.dim].contiguous()
        rest[f"{b}.scale_shift_table"] = sixteen[f"{b}.scale_shift_table"]
        inv, point = canonical[f"{b}.ff.inverted_conv"], canonical[f"{b}.ff.point_conv"]
        dw_w, dw_b = sixteen[f"{b}.ff.depth_conv.weight"], sixteen[f"{b}.ff.depth_conv.bias"]
        pad = torch.arange(d.hidden, d.hidden_pad)
        # a padded GLU channel outputs exactly 0 when its value or its gate path is identically 0 (0·silu(g),
        # v·silu(0)); point_conv then reads 0 / smooth there (non-zero smoothing: no NaN)
        value_zero = _zero_rows(inv, 2 * pad) & (dw_b[2 * pad] == 0)
        gate_zero = _zero_rows(inv, 2 * pad + 1) & (dw_b[2 * pad + 1] == 0)
        inert = bool((value_zero | gate_zero).all()) and bool((point["smooth"][d.hidden : d.hidden_pad] != 0).all())
        width = d.hidden if inert else d.hidden_pad
        widths[b] = width
        rows = _glu_rows(width)
        modules[f"{b}.ff.conv_inverted"] = _svdq_linear(_take_rows(inv, rows), d.dim, 2 * width)
        modules[f"{b}.ff.conv_point"] = _svdq_linear(_keep_inputs(point, width), width, d.dim)
        # [C, 3, 3, 1] (CUTLASS NHWC filter) → [C, 1, 3, 3]: the same memory order for one channel per group
        rest[f"{b}.ff.conv_depth.weight"] = dw_w[rows].reshape(2 * width, 1, 3, 3).contiguous()
        rest[f"{b}.ff.conv_depth.bias"] = dw_b[rows].contiguous()

    try:
        with torch.device("meta"):
            model = diffusers.SanaTransformer2DModel.from_config(known).to(dtype)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the config does not build a SanaTransformer2DModel: {e}") from e
    for b in blocks:
        fused, parts = group_name([f"{b}.attn1.to_q", f"{b}.attn1.to_k", f"{b}.attn1.to_v"])
        fuse_groups(model, {fused: parts})
        ff = model.get_submodule(f"{b}.ff")
        for conv in ("conv_inverted", "conv_point"):
            check_conv1x1(getattr(ff, conv), f"{b}.ff.{conv}")
        if widths[b] != d.hidden:  # the GLU padding is not inert here: keep it (Nunchaku computes with it)
            c = 2 * widths[b]
            with torch.device("meta"):
                ff.conv_depth = nn.Conv2d(c, c, 3, 1, 1, groups=c, dtype=dtype)
            # a skeleton built from the config (what svdq.load / from_pretrained fill) has the GLU d.hidden wide
            ff.svdq_checkpoint_unsupported = (
                f"this feed-forward keeps the Nunchaku file's GLU padding ({widths[b]} channels, the padded ones "
                f"not inert), but diffusers builds it {d.hidden} wide from the config, so an svdq checkpoint of it "
                f"could not be loaded; keep the Nunchaku file and load it again instead")
    for name, layer in modules.items():
        _set(model, name, SVDQConv1x1(layer) if name.endswith(("conv_inverted", "conv_point")) else layer)
    return finish(model, rest, path, "SANA")


# ---- the exporter: the exact inverse of `load_sana` ----------------------------------------------------------------

WHAT = "export --format nunchaku"
# svdq's quantized layer of each 4-bit layer (`LAYERS`): a 1×1 convolution's is its inner layer ``<conv>.linear``
QUANTIZED = {layer: f"{target}.linear" if layer.startswith("ff.") else target for layer, target in LAYERS.items()}


def _scatter_rows(t: dict[str, torch.Tensor], rows: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
    """The inverse of `_take_rows`: a canonical layer of ``n`` output rows holding ``t``'s row i at ``rows[i]``; the
    other rows are padding that computes exactly 0 (zero codes and low-rank row, bias 0; scale 1, as DeepCompressor
    pads)."""
    out = dict(t)
    for key, fill in (("qweight", 0), ("wscales", 1), ("lora_up", 0), ("bias", 0)):
        if key in t:
            full = torch.full((n,) + tuple(t[key].shape[1:]), fill, dtype=t[key].dtype)
            full[rows] = t[key]
            out[key] = full
    return out


def _widen_inputs(t: dict[str, torch.Tensor], k: int, k_new: int) -> dict[str, torch.Tensor]:
    """The inverse of `_keep_inputs`: a canonical layer reading ``k_new`` ≥ ``k`` input columns, the new ones inert
    (zero codes and low-rank rows, smoothing 1, scale 1 for whole new groups)."""
    codes = ref.unpack_int4(t["qweight"])
    wide = torch.zeros(codes.shape[0], padded_k(k_new), dtype=codes.dtype)
    wide[:, :k] = codes[:, :k]
    scales = torch.ones(codes.shape[0], padded_k(k_new) // GROUP_SIZE, dtype=t["wscales"].dtype)
    scales[:, : t["wscales"].shape[1]] = t["wscales"]
    out = dict(t)
    out["qweight"] = ref.pack_int4(wide)
    out["wscales"] = scales
    out["smooth"] = torch.cat([t["smooth"], torch.ones(k_new - k, dtype=t["smooth"].dtype)])
    out["lora_down"] = torch.cat([t["lora_down"], t["lora_down"].new_zeros(k_new - k, t["lora_down"].shape[1])])
    return out


def _kv_tensors(model: nn.Module, b: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of Nunchaku's ``cross_attn.kv_linear``: rows [k; v] of the 16-bit ``attn2.to_k`` / ``to_v``,
    separate or fused by svdq (a 16-bit `SharedInputLinear`; its rows split exactly)."""
    from .nunchaku_models import _fused_group

    parts = [f"{b}.attn2.to_k", f"{b}.attn2.to_v"]
    found = _fused_group(model, parts)
    if found is not None:
        name, group = found
        if type(group.linear) is not nn.Linear:
            raise ValueError(f"{WHAT}: {name} ({type(group.linear).__name__}) is quantized; Nunchaku's SANA layout "
                             f"keeps the cross-attention k / v projections 16-bit (kv_linear)")
        owner = name.rpartition(".")[0]
        rows = dict(zip((f"{owner}.{n}" for n in group.names), torch.split(group.linear.weight.detach(),
                                                                           list(group.sizes))))
        bias = None if group.linear.bias is None else dict(zip(
            (f"{owner}.{n}" for n in group.names), torch.split(group.linear.bias.detach(), list(group.sizes))))
        weights = [rows[p] for p in parts]
        biases = None if bias is None else [bias[p] for p in parts]
    else:
        layers = [model.get_submodule(p) for p in parts]
        for p, m in zip(parts, layers):
            if type(m) is not nn.Linear:
                raise ValueError(f"{WHAT}: {p} is a {type(m).__name__}; Nunchaku's SANA layout keeps the "
                                 f"cross-attention k / v projections 16-bit (kv_linear)")
        weights = [m.weight.detach() for m in layers]
        biases = None if any(m.bias is None for m in layers) else [m.bias.detach() for m in layers]
    if biases is None:
        raise ValueError(f"{WHAT}: {b}.attn2.to_k / to_v have no bias; Nunchaku's SANA kv_linear has one")
    return torch.cat(weights).contiguous(), torch.cat(biases).contiguous()


def export_sana(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write an svdq-quantized SANA ``SanaTransformer2DModel`` as one Nunchaku INT4 file (the layout Nunchaku's
    ``NunchakuSanaTransformer2DModel`` runs and `load_sana` reads), atomically: the exact inverse of `load_sana`.
    Per block the q/k/v group's rows go to Nunchaku's interleaved ``attn.qkv_proj`` (q padded to ``dim_pad``, k / v
    per head, `_qkv_rows`), ``attn1.to_out.0`` reads ``dim_pad`` inputs (the new ones inert), the inverted 1×1
    convolution's [value; gate] rows are interleaved (`_glu_rows`) and padded to Nunchaku's GLU width, the point
    convolution reads that width, the depthwise filter [C, 1, 3, 3] becomes [C, 3, 3, 1] in the same order, the
    16-bit cross-attention k / v are joined into ``kv_linear``; every W4A4 layer packed by
    `nunchaku.layer_to_nunchaku` (its rank zero-padded to the file's one rank). Every tensor is a copy, a
    permutation or inert padding: nothing is recomputed (SANA's Nunchaku layers are all signed).

    Refuses (ValueError naming the layer): another class, a config Nunchaku's SANA cannot run (`sana_dims`), a layer
    of Nunchaku's SANA file that is not W4A4 here (q/k/v must be svdq's fused ``attn1.to_qkv`` group,
    ``svdq.quantize(..., target="nunchaku")`` quantizes exactly these), a quantized layer the file keeps 16-bit,
    shifted activations, act formats other than int4, a non-zero ``attn1.to_out.0`` bias (Nunchaku builds that layer
    without one: the file could not compute what this model computes), and what `nunchaku.exportable_layers`
    refuses (loaded LoRAs, fp32)."""
    from ..conv import SVDQConv1x1
    from ..linear import SVDQLinear

    if type(model).__name__ != "SanaTransformer2DModel":
        raise ValueError(f"{WHAT}: {type(model).__name__} is not a SANA SanaTransformer2DModel")
    qlayers, wo = nk.exportable_layers(model, WHAT)
    if wo:
        raise ValueError(f"{WHAT}: weight-only 4-bit (W4A16) layer {sorted(wo)[0]!r}: Nunchaku's SANA layout has "
                         f"none (its 4-bit layers are W4A4)")
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_") and k != "quantization_config"}
    d = sana_dims(config, WHAT)
    blocks = [f"transformer_blocks.{i}" for i in range(d.layers)]
    ours = {f"{b}.{target}": (b, layer) for b in blocks for layer, target in QUANTIZED.items()}
    extra = sorted(set(qlayers) - set(ours))
    if extra:
        raise ValueError(f"{WHAT}: quantized layer {extra[0]!r} is 16-bit in Nunchaku's SANA layout (its 4-bit "
                         f"layers: {', '.join(QUANTIZED.values())} under transformer_blocks.i)")
    for name, (b, layer) in ours.items():
        m = qlayers.get(name)
        if m is None:
            hint = (" (svdq.quantize(..., target='nunchaku') quantizes SANA's fused q/k/v: fuse attn1.to_q / to_k / "
                    "to_v first, svdq.models.generic.fuse_groups)" if layer == "attn.qkv_proj" else "")
            raise ValueError(f"{WHAT}: {name!r} is not a W4A4 layer; Nunchaku's SANA layout quantizes it "
                             f"({layer}){hint}")
        if m.act_format != "int4":
            raise ValueError(f"{WHAT}: layer {name!r} uses act_format={m.act_format!r}; Nunchaku runs W4A4 (int4)")
    rank = nk.export_rank(qlayers)
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    done = set()
    qkv_rows = _qkv_rows(d)
    for b in blocks:
        def canonical(target: str) -> dict[str, torch.Tensor]:
            name = f"{b}.{target}"
            done.add(name)
            return nk.w4a4_export_tensors(WHAT, name, qlayers[name], rank, False, "")  # signed: "" shifts none

        def put(layer: str, t: dict[str, torch.Tensor]) -> None:
            k, n = d.layer_shape(layer)
            out.update({f"{b}.{layer}.{key}": v.contiguous() for key, v in nk.layer_to_nunchaku(t, k, n).items()})

        qkv = canonical(QUANTIZED["attn.qkv_proj"])
        if (qlayers[f"{b}.attn1.to_qkv.linear"].in_features, qlayers[f"{b}.attn1.to_qkv.linear"].out_features) != (
                d.dim, 3 * d.dim):
            raise ValueError(f"{WHAT}: {b}.attn1.to_qkv.linear is not SANA's q/k/v [{d.dim} -> {3 * d.dim}]")
        if "bias" in qkv and bool(qkv.pop("bias").any()):
            raise ValueError(f"{WHAT}: {b}.attn1.to_qkv.linear has a non-zero bias; Nunchaku's SANA qkv_proj has none")
        put("attn.qkv_proj", _scatter_rows(qkv, qkv_rows, 3 * d.dim_pad))
        o = canonical(QUANTIZED["attn.out_proj"])
        if "bias" in o and bool(o["bias"].any()):
            raise ValueError(f"{WHAT}: {b}.attn1.to_out.0 has a non-zero bias; Nunchaku's SANA runtime builds "
                             f"attn.out_proj without one and never reads it, so the file would compute another model")
        # a zero bias is written as the layer holds it: Nunchaku reads only the tensors it registers, `load_sana`
        # drops it silently
        put("attn.out_proj", _widen_inputs(o, d.dim, d.dim_pad))
        for layer in ("cross_attn.q_linear", "cross_attn.out_proj"):
            t = canonical(QUANTIZED[layer])
            if "bias" not in t:
                raise ValueError(f"{WHAT}: {b}.{LAYERS[layer]} has no bias; Nunchaku's SANA {layer} has one")
            put(layer, t)
        ff = model.get_submodule(f"{b}.ff")
        inverted, point = ff.conv_inverted, ff.conv_point
        if not (isinstance(inverted, SVDQConv1x1) and isinstance(point, SVDQConv1x1)):
            raise ValueError(f"{WHAT}: {b}.ff's 1×1 convolutions are not 4-bit (SVDQConv1x1)")
        width = point.in_channels  # diffusers' GLU width, or Nunchaku's padded one for a model loaded so
        if (inverted.in_channels, inverted.out_channels, point.out_channels) != (d.dim, 2 * width, d.dim) or not (
                d.hidden <= width <= d.hidden_pad) or tuple(ff.conv_depth.weight.shape) != (2 * width, 1, 3, 3):
            raise ValueError(f"{WHAT}: {b}.ff is not SANA's GLUMBConv of width {d.hidden} ({d.hidden_pad} at most)")
        glu = _glu_rows(width)
        t = canonical(QUANTIZED["ff.inverted_conv"])
        if "bias" not in t:
            raise ValueError(f"{WHAT}: {b}.ff.conv_inverted has no bias; Nunchaku's SANA inverted_conv has one")
        put("ff.inverted_conv", _scatter_rows(t, glu, 2 * d.hidden_pad))
        t = canonical(QUANTIZED["ff.point_conv"])
        if "bias" in t:
            raise ValueError(f"{WHAT}: {b}.ff.conv_point has a bias; Nunchaku's SANA point_conv has none")
        put("ff.point_conv", _widen_inputs(t, width, d.hidden_pad))
        dw_w = state[f"{b}.ff.conv_depth.weight"].reshape(2 * width, 3, 3, 1)  # same memory order (load_sana)
        w = torch.zeros((2 * d.hidden_pad, 3, 3, 1), dtype=dw_w.dtype)
        w[glu] = dw_w
        bias = torch.zeros(2 * d.hidden_pad, dtype=dw_w.dtype)
        bias[glu] = state[f"{b}.ff.conv_depth.bias"]
        out[f"{b}.ff.depth_conv.weight"], out[f"{b}.ff.depth_conv.bias"] = w, bias
        out[f"{b}.cross_attn.kv_linear.weight"], out[f"{b}.cross_attn.kv_linear.bias"] = _kv_tensors(model, b)
        out[f"{b}.scale_shift_table"] = state[f"{b}.scale_shift_table"].detach().clone()
    # every other tensor of the blocks is one of the above (SANA's norms have none, `sana_dims`): check, then copy the
    # rest under diffusers' names
    used = {f"{b}.{s}" for b in blocks for s in ("scale_shift_table", "ff.conv_depth.weight", "ff.conv_depth.bias")}
    owned = tuple(f"{n}." for n in done) + tuple(f"{b}.attn2.to_{p}" for b in blocks for p in ("k", "v", "kv"))
    for key, v in state.items():
        if not key.startswith("transformer_blocks."):
            out[key] = v.detach().cpu().contiguous()
        elif key not in used and not key.startswith(owned):
            raise ValueError(f"{WHAT}: tensor {key!r} has no place in Nunchaku's SANA layout")
    dtypes = {t.dtype for t in out.values() if t.is_floating_point()}
    if len(dtypes) != 1:
        raise ValueError(f"{WHAT}: Nunchaku's SANA file holds one 16-bit dtype, this model has "
                         f"{sorted(map(str, dtypes))}")
    return nk.write_checkpoint(out, path, model, "SanaTransformer2DModel", "NunchakuSanaTransformer2DModel", rank)
