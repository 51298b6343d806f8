"""The Hopper FP8-wgmma GEMM's weight layout ("cuda-sm90"), in plain torch: prepare and its exact inverse.

Written from the layout's description in csrc/cuda/w4a4_gemm_sm90_layout.cuh (not translated from its
functions; tests/test_sm90_layout.py checks both against each other bit for bit):

- Every INT4 code becomes its float8_e4m3fn byte (exact: all of -8..7 are e4m3 values).
- Channels are padded with zero rows to ``Np`` = N rounded up to 128 (one CTA tile of output channels).
- Bytes are stored as ``[Np/128][G][8 KiB]``: each 8 KiB block is the shared-memory image of one pipeline stage's
  weight tile (channels 128t..128t+127, K group g = 64 bytes per channel row), 64B-swizzled: 16-byte chunk c of
  row r lives at chunk ``c ^ ((r >> 1) & 3)``.
- Scales are fp32 ``[Np/128][G][128]`` (one 512-byte block per stage), zero for padding channels.

The tensors are shaped ``qweight uint8 [Np, Kp]`` and ``wscales fp32 [Np, Kp/64]`` (their bytes in the order
above; the shapes only size them). Because N is rounded up, the inverse needs ``out_features`` (N): padding rows
are zero, and so may a real channel be.

Memory: e4m3 weights take Np·Kp bytes, 2x the canonical int4 (N·Kp/2), i.e. half of bf16; the scales 4 bytes
per group instead of 2. Why e4m3 in memory and not int4 converted in registers: docs/kernels.md §12.1.
"""

from __future__ import annotations

import torch

from .reference import GROUP_SIZE

LAYOUT = "cuda-sm90"
TILE_N = 128  # output channels per CTA tile (the padding unit of N)
SWIZZLE_CHUNKS = 4  # 16-byte chunks per 64-byte row


def padded_n(n: int) -> int:
    """N rounded up to whole 128-channel tiles."""
    return (n + TILE_N - 1) // TILE_N * TILE_N


def unpack_codes(qweight: torch.Tensor) -> torch.Tensor:
    """Canonical packed int8 [N, Kp/2] → INT4 codes int8 [N, Kp] (low nibble = even k, spec §3)."""
    lo = torch.bitwise_right_shift(torch.bitwise_left_shift(qweight, 4), 4)  # arithmetic: sign-extends
    hi = torch.bitwise_right_shift(qweight, 4)
    return torch.stack((lo, hi), dim=-1).reshape(qweight.shape[0], -1)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """INT4 codes int8 [N, Kp] → canonical packed int8 [N, Kp/2] (inverse of `unpack_codes`)."""
    pairs = codes.reshape(codes.shape[0], -1, 2)
    lo = torch.bitwise_and(pairs[..., 0], 0xF)
    hi = torch.bitwise_left_shift(pairs[..., 1], 4)
    return torch.bitwise_or(lo, hi).to(torch.int8)


def _swizzle_index(device: torch.device) -> torch.Tensor:
    """[128, 4] chunk index: entry (r, c) = c ^ ((r >> 1) & 3). An XOR, so the same gather swizzles and unswizzles."""
    r = torch.arange(TILE_N, device=device).unsqueeze(1)
    c = torch.arange(SWIZZLE_CHUNKS, device=device).unsqueeze(0)
    return torch.bitwise_xor(c, torch.bitwise_and(torch.bitwise_right_shift(r, 1), 3))


def _swizzle(tiles: torch.Tensor) -> torch.Tensor:
    """tiles uint8 [T, G, 128, 64] → the same with each row's 16-byte chunks swizzled (or unswizzled)."""
    t, g = tiles.shape[:2]
    chunks = tiles.reshape(t, g, TILE_N, SWIZZLE_CHUNKS, 16)
    idx = _swizzle_index(tiles.device).view(1, 1, TILE_N, SWIZZLE_CHUNKS, 1).expand(t, g, TILE_N, SWIZZLE_CHUNKS, 16)
    return torch.gather(chunks, 3, idx).reshape(t, g, TILE_N, GROUP_SIZE)


def check_canonical(op: str, qweight: torch.Tensor, wscales: torch.Tensor) -> tuple[int, int]:
    """(N, Kp) of canonical 16-bit-scaled weights, or a ValueError naming what is wrong."""
    if qweight.dim() != 2 or qweight.dtype != torch.int8 or qweight.shape[1] == 0 or \
            qweight.shape[1] % (GROUP_SIZE // 2):
        raise ValueError(f"{op}: qweight must be int8 [N, Kp/2] with Kp a positive multiple of 64, got "
                         f"{qweight.dtype} {tuple(qweight.shape)}")
    n, kp = qweight.shape[0], qweight.shape[1] * 2
    if n < 1:
        raise ValueError(f"{op}: qweight {tuple(qweight.shape)} has no output channels")
    if tuple(wscales.shape) != (n, kp // GROUP_SIZE) or wscales.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"{op}: wscales must be bfloat16/float16 [N, Kp/64] = [{n}, {kp // GROUP_SIZE}] for the "
                         f"sm90 layout, got {wscales.dtype} {tuple(wscales.shape)}")
    if wscales.device != qweight.device:
        raise ValueError(f"{op}: qweight is on {qweight.device} but wscales on {wscales.device}")
    return n, kp


def prepare(qweight: torch.Tensor, wscales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical qweight int8 [N, Kp/2] / wscales bf16|fp16 [N, Kp/64] → (uint8 [Np, Kp], fp32 [Np, Kp/64]) in the
    sm90 layout, on the inputs' device; the same bytes as the CUDA op ``svdq::prepare_weight_sm90``."""
    n, kp = check_canonical("svdq sm90 prepare", qweight, wscales)
    g, np_ = kp // GROUP_SIZE, padded_n(n)
    codes = unpack_codes(qweight)
    e4m3 = codes.to(torch.float32).to(torch.float8_e4m3fn).view(torch.uint8)  # exact; 0 -> 0x00
    e4m3 = torch.nn.functional.pad(e4m3, (0, 0, 0, np_ - n))  # zero channels up to whole tiles
    tiles = e4m3.reshape(np_ // TILE_N, TILE_N, g, GROUP_SIZE).permute(0, 2, 1, 3)  # [T, G, 128, 64]
    wq = _swizzle(tiles.contiguous()).reshape(np_, kp)
    s = torch.nn.functional.pad(wscales.to(torch.float32), (0, 0, 0, np_ - n))
    ws = s.reshape(np_ // TILE_N, TILE_N, g).permute(0, 2, 1).contiguous().reshape(np_, g)
    return wq, ws


def unprepare(wq: torch.Tensor, ws: torch.Tensor, dtype: torch.dtype, out_features: int | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The sm90 layout → canonical (qweight int8 [N, Kp/2], wscales ``dtype`` [N, Kp/64]), bit for bit (the fp32
    scales came from ``dtype``). ``out_features`` = N (the layout pads N to a multiple of 128)."""
    if out_features is None:
        raise ValueError("svdq sm90 unprepare: out_features (N) is required: the sm90 layout pads N to a multiple "
                         "of 128 and zero padding rows cannot be told from zero channels")
    if wq.dim() != 2 or wq.dtype != torch.uint8 or wq.shape[0] % TILE_N or wq.shape[1] == 0 or \
            wq.shape[1] % GROUP_SIZE:
        raise ValueError(f"svdq sm90 unprepare: qweight must be uint8 [Np, Kp] (Np, Kp multiples of 128, 64) in the "
                         f"sm90 layout, got {wq.dtype} {tuple(wq.shape)}")
    np_, kp = wq.shape
    g = kp // GROUP_SIZE
    if tuple(ws.shape) != (np_, g) or ws.dtype != torch.float32:
        raise ValueError(f"svdq sm90 unprepare: wscales must be float32 [Np, Kp/64] = [{np_}, {g}], got "
                         f"{ws.dtype} {tuple(ws.shape)}")
    n = int(out_features)
    if padded_n(n) != np_:
        raise ValueError(f"svdq sm90 unprepare: out_features={n} pads to {padded_n(n)} channels, but qweight "
                         f"{tuple(wq.shape)} holds {np_}")
    tiles = _swizzle(wq.reshape(np_ // TILE_N, g, TILE_N, GROUP_SIZE))  # [T, G, 128, 64], unswizzled
    e4m3 = tiles.permute(0, 2, 1, 3).reshape(np_, kp)[:n]
    codes = e4m3.view(torch.float8_e4m3fn).to(torch.float32)
    if not bool(((codes == codes.round()) & (codes >= -8) & (codes <= 7)).all()):
        raise ValueError("svdq sm90 unprepare: qweight holds e4m3 bytes that are not INT4 codes (-8..7); not "
                         "weights in the sm90 layout")
    qweight = pack_codes(codes.to(torch.int8))
    wscales = ws.reshape(np_ // TILE_N, g, TILE_N).permute(0, 2, 1).reshape(np_, g)[:n].to(dtype).contiguous()
    return qweight, wscales
