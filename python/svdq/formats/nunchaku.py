"""Nunchaku's SVDQuant INT4 checkpoint layout <-> svdq's canonical layout (docs/numerics.md §3, docs/formats.md).

Written from the public packing code — DeepCompressor ``deepcompressor/backend/nunchaku/utils.py``
(``NunchakuWeightPacker``; Nunchaku's ``nunchaku/lora/flux/packer.py`` is the same code), the runtime shapes of
``nunchaku/models/linear.py`` (``SVDQW4A4Linear``) and the metadata written by ``nunchaku/merge_safetensors.py``.
Every layer conversion moves stored values and adds or strips padding; nothing is recomputed, so canonical →
Nunchaku → canonical is bit-exact, and Nunchaku → canonical → Nunchaku is bit-exact except for padding values,
which Nunchaku's kernels never read into a kept output (padding rows are dropped; padded input columns meet
zero activations) and which the export writes as DeepCompressor does (0 for codes and low-rank, 1 for scales,
smoothing and bias). The whole-model export (`export_flux`) recomputes two kinds of bias only (``mlp_fc2``:
`fold_shift_into_bias`; AdaNorm: +1), because Nunchaku's runtime computes those layers differently.

One W4A4 layer (K inputs, N outputs, rank R; ``Np``/``Kn`` = N/K rounded up to 128, ``Rp`` = R to 16):

    key          svdq canonical                 Nunchaku file (C++ names; the V2 Python model renames
                                                lora_down/up → proj_down/up, smooth → smooth_factor)
    qweight      int8 [N, Kp/2] row-major       int8 [Np, Kn/2] in MMA-fragment order (`pack_qweight`)
    wscales      D [N, Kp/64]                   D [Kn/64, Np], memory [128-channel tile][group][128 permuted]
    bias         D [N]                          D [Np], permuted like the scales
    smooth       D [K]                          D [Kn] (+ smooth_orig, same; the runtime ignores it)
    lora_down    D [K, r] (reads raw x)         D [Kn, Rp]: 16×16 tiles of lora_downᵀ, [K/16][R/16]
    lora_up      D [N, r]                       D [Np, Rp]: 16×16 tiles, [N/16][R/16]

What is not a layout question (the numerics the file needs, docs/formats.md): Nunchaku runs FLUX's ``mlp_fc2``
layers on GELU outputs shifted by +0.171875 and quantized unsigned (u4, scale max/15) — svdq's spec §10, so
`svdq_layer` loads them as shifted `SVDQLinear`s (``act_shift``) — and its AdaNorm layers (``norm1.linear``,
``norm.linear``) are AWQ W4A16 with channel interleave and a folded +1, which svdq does not run yet:
`check_layers` names the first such layer of a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from ..checkpoint import CheckpointError
from ..ops import reference as ref
from ..ops.reference import GROUP_SIZE, padded_k

WARP_N = 128  # output channels per tile of Nunchaku's GEMM: N is padded to a multiple
K_STEP = 2 * GROUP_SIZE  # their GEMM reads K two 64-groups at a time (num_k_unrolls = 2): K is padded to 128
LOWRANK_TILE = 16  # the low-rank factors are stored as 16×16 MMA tiles: R is padded to a multiple
SHIFT_GELU = 0.171875  # added to GELU outputs before the unsigned quantizer of mlp_fc2 (their kernel constant)
# Within each 16 output channels the scales / bias / smoothing are stored in this order (lane l of a warp
# loads channels {2l, 2l+1, 2l+8, 2l+9} of its MMA tile: the accumulator fragment it holds).
CHANNEL_ORDER_16 = (0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15)

# qweight of a padded [Np, Kn] code matrix: n = 128·nt + 16·p + 8·a + l, k = 64·kt + 32·b + 8·j + e; memory
# order (nt, kt, p, l, j, a, b, e): lane 4l + j holds rows {l, l + 8} × k-chunks {j, j + 4} as 4 32-bit words
# (the m16n8k64 B fragment), nibble e of a word in bits 4e…4e+3 (little endian: byte e/2, low nibble = even e).
_QW_PERM = (0, 4, 1, 3, 6, 2, 5, 7)
# scales [Np, G]: n = 128·t + 16·i + 8·h + 2·q + r; memory order (t, g, i, q, h, r).
_SC_PERM = (0, 5, 1, 3, 2, 4)
# low-rank tile [16, 16] of a matrix [P, Q]: ρ = 8·a + l, κ = 8·b + 2·j + e; memory order inside a tile
# (l, j, a, b, e). Tiles: down (P = R, Q = K) in order [Q/16][P/16]; up (P = N, Q = R) in order [P/16][Q/16].
_LR_PERM_DOWN = (3, 0, 2, 5, 1, 4, 6)
_LR_PERM_UP = (0, 3, 2, 5, 1, 4, 6)

# Tensors of one W4A4 layer in a Nunchaku file; NVFP4 layers add wtscale / wcscales.
LAYER_KEYS = ("qweight", "wscales", "bias", "smooth", "smooth_orig", "lora_down", "lora_up")
NVFP4_KEYS = ("wtscale", "wcscales")


def _up(x: int, m: int) -> int:
    return -(-x // m) * m


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """int8 [R, C] → uint8 [R, 2C] nibbles, low nibble (even index) first — both layouts' byte convention."""
    b = packed.contiguous().view(torch.uint8)
    return torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2)


def _bytes(nibbles: torch.Tensor) -> torch.Tensor:
    """uint8 [R, 2C] nibbles → int8 [R, C] (inverse of `_nibbles`)."""
    return (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).view(torch.int8)


# ---- qweight -------------------------------------------------------------------------------------------------


def pack_qweight(qweight: torch.Tensor, in_features: int) -> torch.Tensor:
    """Canonical int8 [N, Kp/2] → Nunchaku int8 [Np, Kn/2] (rows and columns zero-padded to 128)."""
    n = qweight.shape[0]
    kp = padded_k(in_features)
    if qweight.dtype != torch.int8 or tuple(qweight.shape) != (n, kp // 2):
        raise ValueError(f"qweight must be int8 [N, {kp // 2}] for K={in_features}, got {qweight.dtype} {tuple(qweight.shape)}")
    np_, kn = _up(n, WARP_N), _up(in_features, K_STEP)
    codes = torch.zeros(np_, kn, dtype=torch.uint8, device=qweight.device)
    codes[:n, :kp] = _nibbles(qweight)
    tiled = codes.view(np_ // WARP_N, 8, 2, 8, kn // GROUP_SIZE, 2, 4, 8).permute(_QW_PERM)
    return _bytes(tiled.reshape(np_, kn))


def unpack_qweight(packed: torch.Tensor, out_features: int, in_features: int, where: str = "qweight") -> torch.Tensor:
    """Nunchaku int8 [Np, Kn/2] → canonical int8 [N, Kp/2]. Codes in the canonical padding columns K…Kp−1 must
    be 0 (spec §3); codes beyond (rows ≥ N, columns ≥ Kp) are Nunchaku's padding and dropped."""
    np_, kn = _up(out_features, WARP_N), _up(in_features, K_STEP)
    _expect(packed, (np_, kn // 2), torch.int8, where)
    memory = _nibbles(packed).view(np_ // WARP_N, kn // GROUP_SIZE, 8, 8, 4, 2, 2, 8)
    codes = memory.permute(_inverse(_QW_PERM)).reshape(np_, kn)
    kp = padded_k(in_features)
    if kp > in_features and bool(codes[:out_features, in_features:kp].any()):
        raise CheckpointError(
            f"{where}: non-zero codes in the padding columns {in_features}…{kp - 1} (K={in_features}); a valid file "
            f"has zeros there (wrong in_features, or a corrupt / differently packed tensor)"
        )
    return _bytes(codes[:out_features, :kp].contiguous())


# ---- per-channel tensors: wscales [N, G], bias / smooth [N] ------------------------------------------------------


def pack_channels(t: torch.Tensor, fill: float = 1.0) -> torch.Tensor:
    """Canonical scales [N, G] → Nunchaku [Gp, Np] (G padded to even, N to 128, with ``fill``), or a per-channel
    vector [N] → [Np]. Padding is 1 as in DeepCompressor (a smoothing divisor of 0 would make NaN)."""
    vector = t.dim() == 1
    m = t.view(-1, 1) if vector else t
    n, g = m.shape
    np_, gp = _up(n, WARP_N), (g if vector else _up(g, K_STEP // GROUP_SIZE))
    full = torch.full((np_, gp), fill, dtype=t.dtype, device=t.device)
    full[:n, :g] = m
    out = full.view(np_ // WARP_N, 8, 2, 4, 2, gp).permute(_SC_PERM).contiguous()
    return out.view(np_) if vector else out.view(gp, np_)


def unpack_channels(t: torch.Tensor, n: int, groups: int | None = None) -> torch.Tensor:
    """Inverse of `pack_channels`: [Gp, Np] → [N, groups], or [Np] → [N] when ``groups`` is None."""
    np_ = _up(n, WARP_N)
    gp = 1 if groups is None else t.shape[0]
    tiled = t.contiguous().view(np_ // WARP_N, gp, 8, 4, 2, 2).permute(_inverse(_SC_PERM)).reshape(np_, gp)
    return tiled[:n, 0].contiguous() if groups is None else tiled[:n, :groups].contiguous()


# ---- low-rank factors ------------------------------------------------------------------------------------------


def _pack_tiles(m: torch.Tensor, rows: int, cols: int, perm: tuple[int, ...]) -> torch.Tensor:
    """Matrix m [P, Q] zero-padded to [rows, cols] → memory order ``perm`` of its 16×16 fragments."""
    full = torch.zeros(rows, cols, dtype=m.dtype, device=m.device)
    full[: m.shape[0], : m.shape[1]] = m
    return full.view(rows // 16, 2, 8, cols // 16, 2, 4, 2).permute(perm).reshape(-1)


def _unpack_tiles(flat: torch.Tensor, rows: int, cols: int, perm: tuple[int, ...]) -> torch.Tensor:
    shape = (rows // 16, 2, 8, cols // 16, 2, 4, 2)
    memory = flat.contiguous().view(tuple(shape[p] for p in perm))
    return memory.permute(_inverse(perm)).reshape(rows, cols)


def pack_lora_down(lora_down: torch.Tensor) -> torch.Tensor:
    """Canonical lora_down [K, r] (the down projection transposed) → Nunchaku [Kn, Rp]: the tiles of the
    [R, K] down matrix in order [K/16][R/16]."""
    k, r = lora_down.shape
    kn, rp = _up(k, WARP_N), _up(r, LOWRANK_TILE)
    return _pack_tiles(lora_down.t(), rp, kn, _LR_PERM_DOWN).view(kn, rp)


def unpack_lora_down(t: torch.Tensor, in_features: int) -> torch.Tensor:
    """Nunchaku [Kn, Rp] → canonical [K, Rp] (the rank keeps its padding: zero columns are legal, spec §3)."""
    kn, rp = t.shape
    return _unpack_tiles(t, rp, kn, _LR_PERM_DOWN).t()[:in_features].contiguous()


def pack_lora_up(lora_up: torch.Tensor) -> torch.Tensor:
    """Canonical lora_up [N, r] → Nunchaku [Np, Rp]: tiles in order [N/16][R/16]."""
    n, r = lora_up.shape
    np_, rp = _up(n, WARP_N), _up(r, LOWRANK_TILE)
    return _pack_tiles(lora_up, np_, rp, _LR_PERM_UP).view(np_, rp)


def unpack_lora_up(t: torch.Tensor, out_features: int) -> torch.Tensor:
    np_, rp = t.shape
    return _unpack_tiles(t, np_, rp, _LR_PERM_UP)[:out_features].contiguous()


# ---- one layer ---------------------------------------------------------------------------------------------------


def layer_to_nunchaku(tensors: dict[str, torch.Tensor], in_features: int, out_features: int) -> dict[str, torch.Tensor]:
    """An svdq W4A4 layer's canonical tensors (``qweight, wscales, smooth, lora_down, lora_up[, bias]``) →
    the tensors of one Nunchaku INT4 layer (C++ key names; ``smooth_orig`` = ``smooth``, as DeepCompressor
    writes it when smoothing is not fused into the weights). Exact: only moves values and pads."""
    n, k = out_features, in_features
    missing = [key for key in ("qweight", "wscales", "smooth", "lora_down", "lora_up") if key not in tensors]
    if missing:
        raise ValueError(f"layer_to_nunchaku: missing canonical tensor(s) {missing}")
    if tensors["lora_down"].shape[0] != k or tensors["lora_up"].shape[0] != n:
        raise ValueError(
            f"layer_to_nunchaku: lora_down {tuple(tensors['lora_down'].shape)} / lora_up "
            f"{tuple(tensors['lora_up'].shape)} do not match K={k}, N={n}"
        )
    smooth = pack_channels(tensors["smooth"])
    out = {
        "qweight": pack_qweight(tensors["qweight"], k),
        "wscales": pack_channels(tensors["wscales"]),
        "smooth": smooth,
        "smooth_orig": smooth.clone(),
        "lora_down": pack_lora_down(tensors["lora_down"]),
        "lora_up": pack_lora_up(tensors["lora_up"]),
    }
    if tensors.get("bias") is not None:
        out["bias"] = pack_channels(tensors["bias"])
    return out


def layer_from_nunchaku(
    tensors: dict[str, torch.Tensor], in_features: int, out_features: int, where: str = "layer"
) -> dict[str, torch.Tensor]:
    """The tensors of one Nunchaku INT4 W4A4 layer (C++ or V2 Python key names) → svdq canonical tensors.

    Checks every key, shape and dtype first (CheckpointError naming ``where`` — "file: layer" — the key and what
    was expected); NVFP4 layers (fp8 ``wscales``, ``wtscale`` / ``wcscales``) are refused by name."""
    t = {_CANONICAL_NAMES.get(key, key): v for key, v in tensors.items()}
    nvfp4 = [key for key in NVFP4_KEYS if key in t]
    if nvfp4 or ("wscales" in t and t["wscales"].dtype == torch.float8_e4m3fn):
        raise CheckpointError(f"{where}: {nvfp4 or ['wscales (float8_e4m3fn)']}: {NVFP4_MESSAGE}")
    unknown = sorted(t.keys() - set(LAYER_KEYS))
    if unknown:
        raise CheckpointError(f"{where}: unexpected tensor(s) {unknown} in a Nunchaku INT4 W4A4 layer ({', '.join(LAYER_KEYS)})")
    n, k = out_features, in_features
    np_, kn = _up(n, WARP_N), _up(k, K_STEP)
    for key in ("qweight", "wscales", "smooth", "lora_down", "lora_up"):
        if key not in t:
            raise CheckpointError(f"{where}: missing key {key!r} of a Nunchaku W4A4 layer [{k} -> {n}]")
    dtype = t["wscales"].dtype
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise CheckpointError(f"{where}.wscales: dtype {dtype}, expected bfloat16 or float16 (Nunchaku INT4)")
    _expect(t["wscales"], (kn // GROUP_SIZE, np_), dtype, f"{where}.wscales")
    _expect(t["smooth"], (kn,), dtype, f"{where}.smooth")
    if "smooth_orig" in t:
        _expect(t["smooth_orig"], (kn,), dtype, f"{where}.smooth_orig")
    if "bias" in t:
        _expect(t["bias"], (np_,), dtype, f"{where}.bias")
    down, up = t["lora_down"], t["lora_up"]
    rp = down.shape[1] if down.dim() == 2 else -1
    if rp < 0 or rp % LOWRANK_TILE:
        raise CheckpointError(
            f"{where}.lora_down: shape {tuple(down.shape)}, expected [{kn}, R] with R a multiple of {LOWRANK_TILE}"
        )
    _expect(down, (kn, rp), dtype, f"{where}.lora_down")
    _expect(up, (np_, rp), dtype, f"{where}.lora_up")
    out = {
        "qweight": unpack_qweight(t["qweight"], n, k, f"{where}.qweight"),
        "wscales": unpack_channels(t["wscales"], n, padded_k(k) // GROUP_SIZE),
        # smoothing is per input channel but packed like the output channels (DeepCompressor's pack_scale)
        "smooth": unpack_channels(t["smooth"], k),
        "lora_down": unpack_lora_down(down, k),
        "lora_up": unpack_lora_up(up, n),
    }
    if "bias" in t:
        out["bias"] = unpack_channels(t["bias"], n)
    return out


# The V2 Python model's names for the same tensors (nunchaku/models/transformers/transformer_flux_v2.py).
_CANONICAL_NAMES = {"proj_down": "lora_down", "proj_up": "lora_up", "smooth_factor": "smooth", "smooth_factor_orig": "smooth_orig"}


def _expect(t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, where: str) -> None:
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise CheckpointError(f"{where}: {t.dtype} {tuple(t.shape)}, expected {dtype} {tuple(shape)}")



# ---- splitting and merging canonical layers (svdq's fused projections vs Nunchaku's separate layers) -------------


def split_rows(t: dict[str, torch.Tensor], sizes: list[int]) -> list[dict[str, torch.Tensor]]:
    """A canonical layer whose outputs are several projections (svdq's fused ``to_qkv_mlp``) → one layer per
    part (Nunchaku's single-block ``qkv_proj`` and ``mlp_fc1``). Exact: rows of qweight / wscales / lora_up /
    bias are split; smooth and lora_down (both per input) are shared — each part computes the same numbers."""
    n = t["qweight"].shape[0]
    if sum(sizes) != n or min(sizes) < 1:
        raise ValueError(f"split_rows: sizes {sizes} do not add up to the layer's {n} outputs")
    parts = [dict() for _ in sizes]
    for key in ("qweight", "wscales", "lora_up", "bias"):
        if t.get(key) is not None:
            for part, chunk in zip(parts, torch.split(t[key], sizes)):
                part[key] = chunk.contiguous()
    for part in parts:
        part["smooth"], part["lora_down"] = t["smooth"].clone(), t["lora_down"].clone()
    return parts


def merge_rows(parts: list[dict[str, torch.Tensor]], where: str = "layers") -> dict[str, torch.Tensor]:
    """Inverse of `split_rows`: exact only when every part has the same smoothing and low-rank down (a file
    exported by svdq); two independently quantized layers (Nunchaku's own files) are refused, naming ``where``."""
    first = parts[0]
    for part in parts[1:]:
        for key in ("smooth", "lora_down"):
            if part[key].shape != first[key].shape or not torch.equal(part[key], first[key]):
                raise CheckpointError(
                    f"{where}: the layers have different {key}: they cannot share one svdq layer exactly (each has its "
                    f"own smoothing / low-rank branch)"
                )
    if len({"bias" in p and p["bias"] is not None for p in parts}) != 1:
        raise CheckpointError(f"{where}: some layers have a bias and some not")
    out = {key: torch.cat([p[key] for p in parts]) for key in ("qweight", "wscales", "lora_up")}
    out["smooth"], out["lora_down"] = first["smooth"].clone(), first["lora_down"].clone()
    if first.get("bias") is not None:
        out["bias"] = torch.cat([p["bias"] for p in parts])
    return out


def split_columns(t: dict[str, torch.Tensor], in_features: int, at: int) -> tuple[dict, dict]:
    """A canonical layer → two layers on input columns [0, at) and [at, K) whose outputs add up to it in real
    arithmetic (Nunchaku's single-block ``out_proj`` + ``mlp_fc2`` for diffusers' ``proj_out``). ``at`` must be
    a multiple of 64 (a group boundary: the codes and scales split without requantizing). The bias goes to the
    first layer, zeros to the second; lora_up is shared. Each part's values are exactly the original's, but
    the sum of two rounded outputs is not the one layer's rounding."""
    if at % GROUP_SIZE or not 0 < at < in_features:
        raise ValueError(f"split_columns: split point {at} must be a multiple of {GROUP_SIZE} inside (0, {in_features})")
    qw, ws = t["qweight"], t["wscales"]
    a = {"qweight": qw[:, : at // 2], "wscales": ws[:, : at // GROUP_SIZE], "smooth": t["smooth"][:at],
         "lora_down": t["lora_down"][:at], "lora_up": t["lora_up"].clone()}
    b = {"qweight": qw[:, at // 2 :], "wscales": ws[:, at // GROUP_SIZE :], "smooth": t["smooth"][at:],
         "lora_down": t["lora_down"][at:], "lora_up": t["lora_up"].clone()}
    if t.get("bias") is not None:
        a["bias"], b["bias"] = t["bias"].clone(), torch.zeros_like(t["bias"])
    return {k: v.contiguous() for k, v in a.items()}, {k: v.contiguous() for k, v in b.items()}


def merge_columns(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], at: int, where: str = "layers") -> dict:
    """Inverse of `split_columns`: exact when both layers share lora_up and the second has a zero bias (a file
    exported by svdq); otherwise CheckpointError naming ``where`` (Nunchaku's own files need a module that adds
    two layers' outputs)."""
    if at % GROUP_SIZE or a["qweight"].shape[1] * 2 != at:
        raise CheckpointError(f"{where}: first layer has {a['qweight'].shape[1] * 2} input columns, expected {at}")
    if not torch.equal(a["lora_up"], b["lora_up"]):
        raise CheckpointError(f"{where}: the two layers have different lora_up: not one svdq layer split in two")
    if b.get("bias") is not None and bool(b["bias"].any()):
        raise CheckpointError(f"{where}: the second layer has a non-zero bias: the sum of two biases is not exact")
    out = {key: torch.cat([a[key], b[key]], dim=1 if key in ("qweight", "wscales") else 0)
           for key in ("qweight", "wscales", "smooth", "lora_down")}
    out["lora_up"] = a["lora_up"].clone()
    if a.get("bias") is not None:
        out["bias"] = a["bias"].clone()
    return out

# ---- files -------------------------------------------------------------------------------------------------------

NVFP4_MESSAGE = (
    "this is an NVFP4 (fp4_e2m1_all, group 16, fp8 e4m3 scales) SVDQuant checkpoint; svdq runs INT4 (int4, group 64) "
    "files only. NVFP4 files run in Nunchaku on Blackwell RTX GPUs (sm_120); use the svdq-int4_* file of the model"
)


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a Nunchaku checkpoint, with ``quantization_config`` / ``config`` parsed and checked:
    method "svdquant", INT4 weights and activations, group size 64, an integer rank. CheckpointError naming the
    file and the field otherwise (NVFP4 by name)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Nunchaku checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # truncated header, not safetensors at all
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from e
    if "quantization_config" not in meta:
        raise CheckpointError(f"{path}: no 'quantization_config' in the safetensors metadata: not a Nunchaku checkpoint")
    parsed = {}
    for field in ("quantization_config", "config"):
        if field in meta:
            try:
                parsed[field] = json.loads(meta[field])
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{path}: metadata field {field!r} is not valid JSON ({e})") from e
    qc = parsed["quantization_config"]
    if not isinstance(qc, dict) or qc.get("method") != "svdquant":
        raise CheckpointError(
            f"{path}: metadata quantization_config.method = {qc.get('method') if isinstance(qc, dict) else qc!r}, "
            f"expected 'svdquant'"
        )
    for part in ("weight", "activation"):
        spec = qc.get(part)
        if not isinstance(spec, dict):
            raise CheckpointError(f"{path}: metadata quantization_config.{part} missing (expected an object)")
        if spec.get("dtype") == "fp4_e2m1_all":
            raise CheckpointError(f"{path}: quantization_config.{part}.dtype = 'fp4_e2m1_all': {NVFP4_MESSAGE}")
        if spec.get("dtype") != "int4":
            raise CheckpointError(
                f"{path}: quantization_config.{part}.dtype = {spec.get('dtype')!r}: unknown precision; svdq reads "
                f"Nunchaku 'int4' files (and names 'fp4_e2m1_all')"
            )
        if spec.get("group_size") != GROUP_SIZE:
            raise CheckpointError(
                f"{path}: quantization_config.{part}.group_size = {spec.get('group_size')!r}, expected {GROUP_SIZE} for int4"
            )
    rank = qc.get("rank", 32)
    if not isinstance(rank, int) or rank < 0 or rank % LOWRANK_TILE:
        raise CheckpointError(f"{path}: quantization_config.rank = {rank!r}, expected a multiple of {LOWRANK_TILE}")
    meta.update(parsed)
    return meta


def model_config(path: str | os.PathLike, label: str) -> tuple[dict, dict]:
    """(the checked metadata, the diffusers model config without its ``_`` keys) of a Nunchaku file;
    CheckpointError naming the file when the metadata has no config to build the ``label`` model from."""
    meta = read_metadata(path)
    config = meta.get("config") if isinstance(meta.get("config"), dict) else None
    if not config:
        raise CheckpointError(f"{path}: no {label} 'config' in the metadata: cannot build the model")
    return meta, {k: v for k, v in config.items() if not k.startswith("_")}


def is_nunchaku_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is a safetensors file whose metadata says Nunchaku SVDQuant (any precision): the
    caller then uses `read_metadata` for the checked contents. Header only; never raises for a readable path."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        qc = json.loads(meta.get("quantization_config", "null"))
    except Exception:  # noqa: BLE001 — not safetensors / not JSON: not a Nunchaku file
        return False
    return isinstance(qc, dict) and qc.get("method") == "svdquant" and meta.get("format") != "svdq"


# FLUX.1 (FluxTransformer2DModel) layer names in Nunchaku files (C++ names, nunchaku/models/transformers/
# transformer_flux_v2.py convert_flux_state_dict) → what each needs. "w4a4": a layer svdq converts exactly;
# "shifted": W4A4 on shifted unsigned activations; "awq": AdaNorm AWQ W4A16.
FLUX_DOUBLE_LAYERS = {
    "qkv_proj": ("w4a4", "attn.to_qkv"),
    "qkv_proj_context": ("w4a4", "attn.to_added_qkv"),
    "out_proj": ("w4a4", "attn.to_out.0"),
    "out_proj_context": ("w4a4", "attn.to_add_out"),
    "mlp_fc1": ("w4a4", "ff.net.0.proj"),
    "mlp_context_fc1": ("w4a4", "ff_context.net.0.proj"),
    "mlp_fc2": ("shifted", "ff.net.2"),
    "mlp_context_fc2": ("shifted", "ff_context.net.2"),
    "norm1.linear": ("awq", "norm1.linear"),
    "norm1_context.linear": ("awq", "norm1_context.linear"),
}
FLUX_SINGLE_LAYERS = {
    "qkv_proj": ("w4a4", "attn.to_q/k/v (fused)"),
    "mlp_fc1": ("w4a4", "proj_mlp"),
    "out_proj": ("w4a4", "proj_out[:, :inner_dim]"),
    "mlp_fc2": ("shifted", "proj_out[:, inner_dim:]"),
    "norm.linear": ("awq", "norm.linear"),
}
# Layer kinds svdq cannot run exactly yet (kind → what it needs); empty since AdaNorm loads (`adanorm_layer`).
_NEEDS: dict[str, str] = {}
# Modulation chunks of diffusers' AdaLayerNormZero (6: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp,
# gate_mlp) / AdaLayerNormZeroSingle (3: shift, scale, gate) whose bias Nunchaku's files carry +1 in (their
# runtime computes x·scale + shift; diffusers computes x·(1 + scale) + shift).
ADANORM_SCALE_CHUNKS = {6: (1, 4), 3: (1,)}


def quantized_layer_names(keys) -> list[str]:
    """Layer prefixes of a Nunchaku state dict's keys: those with a ``qweight``."""
    return sorted(key[: -len(".qweight")] for key in keys if key.endswith(".qweight"))


def classify_flux_layer(name: str) -> tuple[str, str]:
    """(kind, diffusers/svdq name) of a quantized layer of a Nunchaku FLUX.1 file: kind "w4a4" / "shifted" /
    "awq"; CheckpointError for a name that is not a FLUX.1 Nunchaku layer."""
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[1].isdigit():
        table = {"transformer_blocks": FLUX_DOUBLE_LAYERS, "single_transformer_blocks": FLUX_SINGLE_LAYERS}.get(parts[0])
        if table is not None and parts[2] in table:
            kind, target = table[parts[2]]
            return kind, f"{parts[0]}.{parts[1]}.{target}"
    raise CheckpointError(f"quantized layer {name!r} is not a layer of a Nunchaku FLUX.1 file")


def check_layers(path: str | os.PathLike) -> list[tuple[str, str, str]]:
    """Read a Nunchaku FLUX.1 INT4 file's metadata and tensor names (header only) and list its quantized
    layers as (nunchaku name, kind, diffusers name). CheckpointError naming the file and the first layer whose
    numerics svdq cannot run exactly yet (AWQ AdaNorm; shifted-unsigned mlp_fc2 layers run as spec §10), or a
    model that is not FLUX.1."""
    from safetensors import safe_open

    path = Path(path)
    meta = read_metadata(path)
    class_name = (meta.get("config") or {}).get("_class_name") if isinstance(meta.get("config"), dict) else None
    if class_name not in (None, "FluxTransformer2DModel"):
        from .nunchaku_models import LOADABLE

        raise CheckpointError(f"{path}: a Nunchaku checkpoint of {class_name}; svdq loads {LOADABLE} files so far")
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    layers = []
    for name in quantized_layer_names(keys):
        try:
            kind, target = classify_flux_layer(name)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        layers.append((name, kind, target))
    for name, kind, target in layers:
        if kind in _NEEDS:
            raise CheckpointError(f"{path}: layer {name!r} ({target}) needs {_NEEDS[kind]}")
    return layers


def act_shift_of(kind: str) -> float:
    """The activation shift (spec §10) Nunchaku's INT4 runtime applies to a layer of this kind: `SHIFT_GELU`
    for "shifted" (``mlp_fc2``, ``mlp_context_fc2``), 0 (signed) for "w4a4"."""
    if kind not in ("w4a4", "shifted"):
        raise ValueError(f"act_shift_of: {kind!r} is not a W4A4 layer kind")
    return SHIFT_GELU if kind == "shifted" else 0.0


def svdq_layer(
    tensors: dict[str, torch.Tensor], in_features: int, out_features: int, act_shift: float = 0.0,
    where: str = "layer",
):
    """One Nunchaku INT4 W4A4 layer's tensors → an `SVDQLinear` holding them exactly (`layer_from_nunchaku`).
    ``act_shift``: `act_shift_of` the layer's kind — `SHIFT_GELU` for ``mlp_fc2`` layers, whose stored bias
    already cancels the shift (DeepCompressor's, spec §10.3), so it is kept as is. A layer without a bias
    gets none; a shifted one needs its bias (CheckpointError naming ``where`` otherwise)."""
    from ..linear import SVDQLinear

    t = layer_from_nunchaku(tensors, in_features, out_features, where)
    if act_shift and "bias" not in t:
        raise CheckpointError(f"{where}: a shifted (mlp_fc2) layer without 'bias': the shift's correction lives there")
    layer = SVDQLinear(in_features, out_features, t["lora_down"].shape[1], "bias" in t, t["wscales"].dtype,
                       act_shift=act_shift)
    layer.load_state_dict(t | ({"act_shift": torch.tensor([act_shift])} if act_shift else {}), strict=True)
    return layer


def adanorm_layer(
    tensors: dict[str, torch.Tensor], in_features: int, out_features: int, splits: int, where: str = "layer"
):
    """One Nunchaku AdaNorm AWQ W4A16 layer (``norm1.linear`` / ``norm1_context.linear``: ``splits`` 6;
    ``norm.linear``: 3) → an `SVDQWeightOnlyLinear` with float zero offsets (spec §7.2) for diffusers'
    AdaLayerNormZero(Single): codes, scales and offsets exact (`unpack_awq`: de-interleaved rows), and the bias
    with the +1 of the scale chunks taken out — D(b − 1) computed from fp32, the one value that is not a copy
    (exact when b − 1 fits D's mantissa, e.g. every b in [0.5, 2); otherwise one rounding, ≤ 2^-9 relative in
    bf16). CheckpointError naming ``where`` for a layer without a bias (the +1 lives there) or bad tensors."""
    from ..weight_only import SVDQWeightOnlyLinear, pack_nibbles

    if splits not in ADANORM_SCALE_CHUNKS:
        raise ValueError(f"adanorm_layer: splits must be 6 (double block) or 3 (single block), got {splits}")
    if "bias" not in tensors:
        raise CheckpointError(f"{where}: an AdaNorm layer without 'bias': Nunchaku stores the scale chunks' +1 there")
    t = unpack_awq(tensors, in_features, out_features, splits, where)
    n, dtype = out_features, t["scales"].dtype
    if not bool(torch.isfinite(t["scales"]).all() and torch.isfinite(t["zeros"]).all()):
        raise CheckpointError(f"{where}: non-finite wscales / wzeros")
    bias = t["bias"].to(torch.float32)
    chunk = n // splits
    for c in ADANORM_SCALE_CHUNKS[splits]:
        bias[c * chunk : (c + 1) * chunk] -= 1.0
    layer = SVDQWeightOnlyLinear(in_features, n, True, dtype, zero_point="float")
    layer.load_state_dict(
        {"qweight": pack_nibbles(t["codes"]), "wscales": t["scales"], "wzeros": t["zeros"], "bias": bias.to(dtype)},
        strict=True,
    )
    return layer


def flux_layer_names(num_layers: int, num_single_layers: int) -> list[str]:
    """Every quantized layer a complete Nunchaku FLUX.1 file holds for a model of this depth."""
    names = [f"transformer_blocks.{i}.{n}" for i in range(num_layers) for n in FLUX_DOUBLE_LAYERS]
    return names + [f"single_transformer_blocks.{i}.{n}" for i in range(num_single_layers) for n in FLUX_SINGLE_LAYERS]


def find_checkpoint(path: str | os.PathLike) -> Path | None:
    """The Nunchaku checkpoint ``path`` names: the file itself, or the one Nunchaku ``.safetensors`` file of a
    directory that is not an svdq model directory, or a diffusers ``nunchaku_lite`` model directory (also found
    as a pipeline's ``transformer/`` or from its weights file: `nunchaku_lite.find_directory`); None when it is
    none of these (an svdq directory, a hub id, …)."""
    from .nunchaku_lite import find_directory

    lite = find_directory(path)
    if lite is not None:
        return lite
    path = Path(path)
    if path.is_file():
        return path if is_nunchaku_file(path) else None
    if not path.is_dir():
        return None
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        config = {}
    method = ((config or {}).get("quantization_config") or {}).get("quant_method") if isinstance(config, dict) else None
    if method is not None:  # svdquant (svdq's own) or another quantizer: not ours to claim
        return None
    found = sorted(p for p in path.glob("*.safetensors") if is_nunchaku_file(p))
    if len(found) > 1:
        raise CheckpointError(f"{path} holds {len(found)} Nunchaku checkpoints ({', '.join(p.name for p in found)}); pass one file")
    return found[0] if found else None


def from_pretrained(path: str | os.PathLike):
    """Load a Nunchaku FLUX.1 INT4 checkpoint as an svdq model (`svdq.from_pretrained` calls this for a
    Nunchaku file or directory): diffusers' `FluxTransformer2DModel` with every quantized layer converted exactly
    (`svdq.formats.nunchaku_flux.load_flux`, which says how Nunchaku's model differs from svdq's). Checked from
    the header before anything is built (metadata, model class, every layer's kind, completeness); built on the
    meta device and filled from the file, so nothing is half-loaded. A directory (`find_checkpoint` returns
    one for diffusers' ``nunchaku_lite`` packaging) goes to `svdq.formats.nunchaku_lite.load`."""
    if Path(path).is_dir():
        from .nunchaku_lite import load as load_lite

        return load_lite(path)
    meta = read_metadata(path)
    class_name = (meta.get("config") or {}).get("_class_name") if isinstance(meta.get("config"), dict) else None
    from .nunchaku_models import LAYOUTS, load

    if class_name in LAYOUTS:  # Qwen-Image, Z-Image, SDXL: diffusers module paths
        return load(path, LAYOUTS[class_name])
    if class_name == "SanaTransformer2DModel":  # C++ names, linear attention, 4-bit 1×1 convolutions
        from .nunchaku_sana import load_sana

        return load_sana(path)
    from .nunchaku_flux import load_flux

    return load_flux(path)  # FLUX.1, and the error naming the class for anything else


# ---- AdaNorm AWQ W4A16 layers (layout only) ------------------------------------------------------------------------
#
# Nunchaku's AWQW4A16Linear (nunchaku/models/linear.py; packed by DeepCompressor backend/tinychat/utils.py and
# backend/nunchaku/utils.py convert_to_nunchaku_w4x16_linear_weight): w = u·s + zero with unsigned codes u in
# 0…15 and a *floating* per-group zero (DeepCompressor writes zero = −D(7·s)) — svdq's float-offset W4A16
# layers (spec §7.2: `adanorm_layer` loads them exactly; svdq's integer zero points z, w = (u − z)·s, equal it
# only where zero == −z·s exactly, not the case for most bf16 scales).

AWQ_GROUP_PAD = 16  # DeepCompressor pads the group count to 16 (8 nibbles per int32 × 2 packs at group 64)


def pack_awq(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias: torch.Tensor | None, splits: int = 1,
    pad_groups: bool = True,
) -> dict:
    """Plain AWQ tensors → Nunchaku's AdaNorm layer: codes uint8 [N, K] (0…15), scales / zeros D [N, K/64],
    bias D [N] (the file's bias: the +1 of the scale chunks is the caller's, it is not a permutation) →
    ``qweight`` int32 [N/4, K/2], ``wscales`` / ``wzeros`` D [Gp, N] (Gp = K/64 rounded up to 16, zero-padded,
    as DeepCompressor writes; ``pad_groups=False``: K/64, what Nunchaku's runtime module allocates),
    ``bias`` D [N]. ``splits`` (6 double-block norm1, 3 single-block norm): output channel c of modulation
    chunk t goes to row c·splits + t."""
    n, k = codes.shape
    g = k // GROUP_SIZE
    if k % GROUP_SIZE or n % 4 or n % splits:
        raise ValueError(f"pack_awq: N={n} must be a multiple of 4 and of splits={splits}, K={k} of {GROUP_SIZE}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise ValueError("pack_awq: codes must be 0…15")

    def interleave(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(splits, n // splits, *t.shape[1:]).transpose(0, 1).reshape(t.shape)

    u = interleave(codes.to(torch.int32))
    # within 32 inputs: int16 i holds inputs i, 8+i, 16+i, 24+i in its 4 nibbles (TinyChat's dequant order)
    c = u.view(n, k // 32, 4, 8)
    words = c[:, :, 0] | (c[:, :, 1] << 4) | (c[:, :, 2] << 8) | (c[:, :, 3] << 12)  # [N, K/32, 8]
    # four output rows interleaved per 64 inputs: [N/4, K/64, 4 rows, 16 int16]
    words = words.reshape(n // 4, 4, g, 16).permute(0, 2, 1, 3).reshape(n // 4, k)
    # 16-bit patterns as signed int16 (explicitly: an out-of-range integer cast is not defined), two per int32
    qweight = (words - ((words >> 15) & 1) * 65536).to(torch.int16).view(torch.int32)
    gp = _up(g, AWQ_GROUP_PAD) if pad_groups else g
    out = {"qweight": qweight}
    for key, t in (("wscales", scales), ("wzeros", zeros)):
        full = torch.zeros(gp, n, dtype=t.dtype, device=t.device)
        full[:g] = interleave(t).t()
        out[key] = full
    if bias is not None:
        out["bias"] = interleave(bias)
    return out


def unpack_awq(tensors: dict, in_features: int, out_features: int, splits: int = 1, where: str = "layer") -> dict:
    """Inverse of `pack_awq`: Nunchaku AdaNorm tensors → codes uint8 [N, K], scales / zeros D [N, K/64],
    bias D [N] (as stored: the +1 of the scale chunks still in it). CheckpointError naming ``where`` and the key
    for a wrong shape / dtype or a missing key."""
    n, k = out_features, in_features
    if k % GROUP_SIZE or n % 4 or n % splits:
        raise CheckpointError(f"{where}: AWQ layer [{k} -> {n}]: K must be a multiple of 64, N of 4 and of {splits}")
    g, gp = k // GROUP_SIZE, _up(k // GROUP_SIZE, AWQ_GROUP_PAD)
    for key in ("qweight", "wscales", "wzeros"):
        if key not in tensors:
            raise CheckpointError(f"{where}: missing key {key!r} of a Nunchaku AWQ W4A16 layer [{k} -> {n}]")
    _expect(tensors["qweight"], (n // 4, k // 2), torch.int32, f"{where}.qweight")
    dtype = tensors["wscales"].dtype
    if not dtype.is_floating_point:
        raise CheckpointError(f"{where}.wscales: dtype {dtype}, expected bfloat16 or float16")
    for key in ("wscales", "wzeros"):
        t = tensors[key]
        # Nunchaku's own module allocates K/64 groups; DeepCompressor's files pad them to 16
        if t.shape[0] not in (g, gp):
            raise CheckpointError(f"{where}.{key}: {t.dtype} {tuple(t.shape)}, expected {dtype} ({gp}, {n}) or ({g}, {n})")
        _expect(t, (t.shape[0], n), dtype, f"{where}.{key}")
    if "bias" in tensors:
        _expect(tensors["bias"], (n,), dtype, f"{where}.bias")

    def deinterleave(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(n // splits, splits, *t.shape[1:]).transpose(0, 1).reshape(t.shape)

    words = tensors["qweight"].contiguous().view(torch.int16).view(n // 4, g, 4, 16).permute(0, 2, 1, 3)
    words = words.reshape(n, k // 32, 8).to(torch.int32) & 0xFFFF
    c = torch.stack([(words >> (4 * m)) & 0xF for m in range(4)], dim=2)  # [N, K/32, 4, 8]
    out = {
        "codes": deinterleave(c.reshape(n, k).to(torch.uint8)),
        "scales": deinterleave(tensors["wscales"][:g].t().contiguous()),
        "zeros": deinterleave(tensors["wzeros"][:g].t().contiguous()),
    }
    if "bias" in tensors:
        out["bias"] = deinterleave(tensors["bias"])
    return out


# ---- export: an svdq-quantized FLUX.1 model → one Nunchaku INT4 file ----------------------------------------------

# svdq layer (under the block) → Nunchaku layer, W4A4, double blocks. The single blocks are split (below).
_EXPORT_DOUBLE = {
    # svdq's fused groups are `SharedInputLinear`s holding the layer as `.linear` (svdq.models)
    "attn.to_qkv.linear": "qkv_proj", "attn.to_added_qkv.linear": "qkv_proj_context", "attn.to_out.0": "out_proj",
    "attn.to_add_out": "out_proj_context", "ff.net.0.proj": "mlp_fc1", "ff_context.net.0.proj": "mlp_context_fc1",
    "ff.net.2": "mlp_fc2", "ff_context.net.2": "mlp_context_fc2",
}
_EXPORT_ADANORM = {"norm1.linear": ("norm1.linear", 6), "norm1_context.linear": ("norm1_context.linear", 6)}
_EXPORT_ADANORM_SINGLE = {"norm.linear": ("norm.linear", 3)}
# attention RMSNorm weights sit under the block in Nunchaku's files, under `attn` in diffusers
_EXPORT_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")
_SHIFTED = ("mlp_fc2", "mlp_context_fc2")


def fold_shift_into_bias(t: dict[str, torch.Tensor], in_features: int) -> torch.Tensor:
    """The bias a Nunchaku runtime needs for a layer svdq quantized for signed activations when it runs the
    layer on shifted ones (``mlp_fc2``): b − δ·Σ_k Ŵ[n, k]/λ_k (fp64, rounded once to D) — spec §10.3's
    `shift_bias`, which a layer svdq quantized shifted already stores. Exact in real arithmetic only for a signed
    layer — the one value of an export that is not a copy (docs/formats.md)."""
    if t["smooth"].shape[0] != in_features:
        raise ValueError(f"fold_shift_into_bias: smooth has {t['smooth'].shape[0]} entries, expected K={in_features}")
    return ref.shift_bias(t.get("bias"), t["qweight"], t["wscales"], t["smooth"], SHIFT_GELU)


def _adanorm_tensors(layer, name: str, splits: int) -> dict[str, torch.Tensor]:
    """An svdq W4A16 AdaNorm layer → Nunchaku AWQ tensors. Symmetric codes q map to u = q + 8 with zero −8·s
    (exact: a power of two); integer zero points z to zero D(−z·s), refused where that rounds. The +1 of the
    scale chunks is added to the bias (D(b + 1): rounded, docs/formats.md)."""
    t = {k: v.detach().cpu() for k, v in layer.state_dict().items()}
    n, k = layer.out_features, layer.in_features
    if k % GROUP_SIZE:
        raise ValueError(f"{name}: in_features {k} is not a multiple of {GROUP_SIZE}: Nunchaku's AWQ layer cannot hold it")
    nib = _nibbles(t["qweight"])[:, :k].to(torch.int16)
    s = t["wscales"]
    if layer.zero_point_kind == "float":  # loaded from an AWQ file (spec §7.2): the offsets are Nunchaku's zeros
        codes, zero = nib.to(torch.uint8), t["wzeros"][:, : k // GROUP_SIZE]
    elif layer.zero_point:
        z = t["wzeros"].to(torch.float32)
        zero = (-z * s.float()).to(s.dtype)
        if not torch.equal(zero.float(), -z * s.float()):
            raise ValueError(
                f"{name}: zero points z·s are not exact in {s.dtype} for some groups; Nunchaku stores float zeros "
                f"(w = u·s + zero): re-quantize the AdaNorm layers symmetric (svdq quantize --adaln w4a16)"
            )
        codes = nib.to(torch.uint8)
    else:
        codes = ((nib + 8) & 0xF).to(torch.uint8)  # signed nibble q (two's complement) → u = q + 8
        zero = (s.float() * -8).to(s.dtype)
    bias = t["bias"].double() if t.get("bias") is not None else torch.zeros(n, dtype=torch.float64)
    chunk = n // splits
    for c in ADANORM_SCALE_CHUNKS[splits]:
        bias[c * chunk : (c + 1) * chunk] += 1
    # unpadded groups: the shape Nunchaku's AWQW4A16Linear allocates and loads strictly (FLUX.1's K/64 = 48 is
    # a multiple of 16 anyway, so DeepCompressor's padding changes nothing there)
    return pack_awq(codes, s, zero, bias.to(s.dtype), splits, pad_groups=False)


def export_rank(qlayers: dict) -> int:
    """The one rank a Nunchaku file declares (``quantization_config.rank``; its runtime builds every W4A4 layer
    with it): the largest of ``qlayers``' ranks rounded up to 16. Each layer's factors are zero-padded to it."""
    return _up(max(m.rank for m in qlayers.values()), LOWRANK_TILE)


def w4a4_export_tensors(what: str, name: str, layer, rank: int, shifted: bool, shifts: str) -> dict[str, torch.Tensor]:
    """The canonical tensors (``layer_to_nunchaku``'s input) a Nunchaku file holds for the svdq W4A4 layer
    ``name``, its low-rank factors zero-padded to ``rank`` (exact). ``shifted``: Nunchaku's runtime runs this
    layer on shifted unsigned activations (an ``mlp_fc2``): a layer svdq quantized shifted by `SHIFT_GELU` is
    copied as is (exact; its bias already cancels the shift), a signed one gets `fold_shift_into_bias` (not
    exact). ValueError naming the layer for anything else: not an `SVDQLinear`, shifted where the runtime does
    not shift or by another δ (``shifts`` says which layers it shifts, "" for none)."""
    from ..linear import SVDQLinear

    if not isinstance(layer, SVDQLinear):
        raise ValueError(f"{what}: {name!r} is not a W4A4 layer (quantize the whole model with svdq)")
    if layer.act_shift and not (shifted and layer.act_shift == SHIFT_GELU):
        runtime = f"shifts only {shifts}, by {SHIFT_GELU}" if shifts else "runs every layer of this model on signed activations"
        raise ValueError(
            f"{what}: layer {name!r} has shifted activations (act_shift={layer.act_shift}); Nunchaku's runtime {runtime}"
        )
    t = {k: v.detach().cpu() for k, v in layer.state_dict().items() if k not in ("lora_scales", "act_shift")}
    pad = rank - t["lora_down"].shape[1]  # zero columns: exact
    t["lora_down"] = torch.nn.functional.pad(t["lora_down"], (0, pad))
    t["lora_up"] = torch.nn.functional.pad(t["lora_up"], (0, pad))
    if shifted and not layer.act_shift:
        # a signed svdq layer: fold the shift Nunchaku applies into its bias (a shifted one stores it)
        t["bias"] = fold_shift_into_bias(t, layer.in_features)
    return t


def adanorm_export_tensors(what: str, name: str, layer, splits: int) -> dict[str, torch.Tensor]:
    """The Nunchaku AWQ tensors of the AdaNorm layer ``name`` (the model's module, `_adanorm_tensors`);
    ValueError naming it when svdq did not quantize it weight-only 4-bit."""
    from ..linear import SVDQLinear
    from ..weight_only import SVDQWeightOnlyLinear

    if not isinstance(layer, SVDQWeightOnlyLinear):
        raise ValueError(
            f"{what}: AdaNorm layer {name!r} is {'W4A4' if isinstance(layer, SVDQLinear) else '16-bit'}; Nunchaku's "
            f"format stores it 4-bit weight-only (AWQ W4A16): quantize with --adaln w4a16 "
            f"(svdq.quantize(..., weight_only=family.adaln))"
        )
    return _adanorm_tensors(layer, name, splits)


def export_flux(model, path: str | os.PathLike) -> Path:
    """Write an svdq-quantized FLUX.1 ``FluxTransformer2DModel`` as one Nunchaku INT4 checkpoint (C++ key names,
    metadata ``config`` / ``quantization_config`` / ``model_class``), atomically. Every W4A4 tensor is a
    permutation of svdq's (`layer_to_nunchaku`); not copies: the ``mlp_fc2`` biases (`fold_shift_into_bias`)
    and the AdaNorm scale-chunk biases (+1). Refuses (ValueError naming the layer) what the format cannot
    express: other model classes, fp32, W4A8, loaded LoRA adapters, K or N not a multiple of 128, AdaNorm
    layers that are not 4-bit weight-only (quantize with ``--adaln w4a16``), shifted layers other than the
    double blocks' ``mlp_fc2`` / ``mlp_context_fc2``."""
    from ..models import SharedInputLinear
    from ..models.split_input import SplitInputLinear

    if type(model).__name__ != "FluxTransformer2DModel":
        raise ValueError(f"export --format nunchaku: {type(model).__name__} is not a FLUX.1 FluxTransformer2DModel")
    what = "export --format nunchaku"
    qlayers, wo = exportable_layers(model, what)
    for name, m in qlayers.items():
        check_exportable_layer(what, name, m)
    rank = export_rank(qlayers)
    shifts = "the double blocks' mlp_fc2 / mlp_context_fc2"

    def canonical(name: str, shifted: bool = False) -> dict[str, torch.Tensor]:
        return w4a4_export_tensors(what, name, qlayers.get(name), rank, shifted, shifts)

    def adanorm(name: str, splits: int) -> dict[str, torch.Tensor]:
        return adanorm_export_tensors(what, name, model.get_submodule(name), splits)

    out: dict[str, torch.Tensor] = {}
    done: set[str] = set()

    def put(prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        out.update({f"{prefix}.{k}": v.contiguous() for k, v in tensors.items()})

    inner = model.config.num_attention_heads * model.config.attention_head_dim
    for i in range(len(model.transformer_blocks)):
        b = f"transformer_blocks.{i}"
        for ours, theirs in _EXPORT_DOUBLE.items():
            t = canonical(f"{b}.{ours}", shifted=theirs in _SHIFTED)
            k, n = qlayers[f"{b}.{ours}"].in_features, qlayers[f"{b}.{ours}"].out_features
            put(f"{b}.{theirs}", layer_to_nunchaku(t, k, n))
            done.add(f"{b}.{ours}")
        for ours, (theirs, splits) in _EXPORT_ADANORM.items():
            put(f"{b}.{theirs}", adanorm(f"{b}.{ours}", splits))
            done.add(f"{b}.{ours}")
    for i in range(len(model.single_transformer_blocks)):
        b = f"single_transformer_blocks.{i}"
        block = model.single_transformer_blocks[i]
        if f"{b}.to_qkv_mlp.linear" in qlayers or not isinstance(getattr(block.attn, "to_qkv", None), SharedInputLinear):
            fused = canonical(f"{b}.to_qkv_mlp.linear")  # svdq's fusion: one layer, split by rows (exact)
            qkv, mlp = split_rows(fused, [3 * inner, qlayers[f"{b}.to_qkv_mlp.linear"].out_features - 3 * inner])
            done.add(f"{b}.to_qkv_mlp.linear")
        else:  # loaded from a Nunchaku file: its two layers as they are
            qkv, mlp = canonical(f"{b}.attn.to_qkv.linear"), canonical(f"{b}.proj_mlp")
            done.update({f"{b}.attn.to_qkv.linear", f"{b}.proj_mlp"})
        put(f"{b}.qkv_proj", layer_to_nunchaku(qkv, inner, 3 * inner))
        put(f"{b}.mlp_fc1", layer_to_nunchaku(mlp, inner, mlp["qweight"].shape[0]))
        n = block.proj_out.out_features
        k = block.proj_out.in_features
        if isinstance(block.proj_out, SplitInputLinear):
            # quantized in Nunchaku's form (svdq.quantize(target="nunchaku")) or loaded from its file: the two
            # layers as they are (exact)
            if block.proj_out.sizes != [inner, k - inner]:
                raise ValueError(f"{what}: {b}.proj_out is split into input columns {block.proj_out.sizes}; Nunchaku's "
                                 f"layout has [{inner}, {k - inner}] (attention, MLP)")
            attn_part = canonical(f"{b}.proj_out.parts.0")
            mlp_part = canonical(f"{b}.proj_out.parts.1", shifted=True)
            done.update({f"{b}.proj_out.parts.0", f"{b}.proj_out.parts.1"})
        else:
            attn_part, mlp_part = split_columns(canonical(f"{b}.proj_out"), k, inner)
            mlp_part["bias"] = fold_shift_into_bias(mlp_part, k - inner)
        put(f"{b}.out_proj", layer_to_nunchaku(attn_part, inner, n))
        put(f"{b}.mlp_fc2", layer_to_nunchaku(mlp_part, k - inner, n))
        for ours, (theirs, splits) in _EXPORT_ADANORM_SINGLE.items():
            put(f"{b}.{theirs}", adanorm(f"{b}.{ours}", splits))
        done.update({f"{b}.proj_out", f"{b}.norm.linear"})
    leftover = sorted((set(qlayers) | set(wo)) - done)
    if leftover:
        raise ValueError(f"export --format nunchaku: quantized layer(s) {leftover[:5]} have no place in Nunchaku's FLUX.1 layout")
    owned = tuple(f"{name}." for name in done)
    for key, v in model.state_dict().items():
        if key.startswith(owned):
            continue
        parts = key.split(".")
        if len(parts) == 5 and parts[2] == "attn" and parts[3] in _EXPORT_NORMS:
            key = ".".join(parts[:2] + parts[3:])  # transformer_blocks.i.attn.norm_q.weight → ….i.norm_q.weight
        out[key] = v.detach().cpu().contiguous()
    return write_checkpoint(out, path, model, "FluxTransformer2DModel", "NunchakuFluxTransformer2dModel", rank)


def exportable_layers(model, what: str) -> tuple[dict, dict]:
    """(W4A4 layers, W4A16 layers) of ``model`` after the model-level checks every Nunchaku file export shares
    (ValueError): no loaded LoRA adapter, some W4A4 layers, one 16-bit dtype. Each layout then checks which
    layers it quantizes, and every W4A4 layer with `check_exportable_layer`."""
    from ..lora import list_loras
    from ..quantize import quantized_layers
    from ..weight_only import weight_only_layers

    if list_loras(model):
        raise ValueError(f"{what}: unload the LoRA adapters first (svdq.unload_lora)")
    qlayers, wo = quantized_layers(model), weight_only_layers(model)
    if not qlayers:
        raise ValueError(f"{what}: the model is not quantized (svdq.quantize it first)")
    dtypes = {m.dtype for m in qlayers.values()}
    if dtypes - {torch.bfloat16, torch.float16} or len(dtypes) != 1:
        raise ValueError(f"{what}: Nunchaku runs bf16 or fp16 models, this one is {sorted(map(str, dtypes))}")
    return qlayers, wo


def check_exportable_layer(what: str, name: str, m) -> None:
    """ValueError naming the W4A4 layer when Nunchaku's runtime cannot run it: activations other than int4, K or
    N not a multiple of 128 (its kernels' tiles; the file's shapes are the padded ones)."""
    if m.act_format != "int4":
        raise ValueError(f"{what}: layer {name!r} uses act_format={m.act_format!r}; Nunchaku runs W4A4 (int4)")
    if m.in_features % K_STEP or m.out_features % WARP_N:
        raise ValueError(f"{what}: layer {name!r} is [{m.in_features} -> {m.out_features}]; Nunchaku's layers "
                         f"need K and N multiples of 128")


def write_checkpoint(
    tensors: dict, path, model, class_name: str, model_class: str, rank: int, extra: dict | None = None
) -> Path:
    """One Nunchaku INT4 file at ``path``, written atomically (a crash leaves the old file or the new one): the
    tensors, and the metadata Nunchaku reads — diffusers' config of ``model`` as ``class_name`` without svdq's
    own quantization_config (their runtime builds a 16-bit skeleton from it), ``model_class`` (their class's
    name) and the INT4 / group-64 / ``rank`` quantization_config, with ``extra`` fields added (Z-Image's
    ``skip_refiners``)."""
    from safetensors.torch import save_file

    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_") and k != "quantization_config"}
    config["_class_name"] = class_name
    spec = {"dtype": "int4", "scale_dtype": None, "group_size": GROUP_SIZE}
    meta = {
        "config": json.dumps(config, default=list),
        "model_class": model_class,
        "quantization_config": json.dumps(
            {"method": "svdquant", "weight": spec, "activation": dict(spec), "rank": rank} | (extra or {})
        ),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
