// w4a4_gemm_sm90_layout.cuh — layouts of the Hopper (sm_90a) FP8-wgmma GEMMs, as plain functions that the
// device code and the host tests (csrc/cuda/tests/test_sm90_layout.cpp) share. No CUDA intrinsics here.
//
// Orientation ("swapped", as CUTLASS's mixed-input sm90 GEMMs): wgmma's M side (64 rows per consumer
// warpgroup) is the *output channel* n, its N side (128) is the *token* m; the accumulator tile of one CTA is
// D[128 channels][128 tokens]. Both operands are e4m3 in shared memory (wgmma "SS"):
//   A = weights, pre-converted at load time from int4 to e4m3 (exact: every int4 value is an e4m3 value),
//   B = activations, e4m3 bytes from quantize_act_e4m3 (W4A4 codes, exact) or quantize_act_fp8 (W4A8).
// Why weights as e4m3 in memory (2x the int4 bytes) rather than int4 converted in registers: the register
// conversion that costs 3 instructions per 8 values (sign-magnitude nibbles, FACTS.md) cannot encode q = -8,
// which GPTQ rounding (svdq.gptq, the default) does produce; the PRMT LUT that can costs ~50 more SASS per
// warp per group. SS needs no conversion at all (FACTS.md: 191 vs 194 SASS per warp per group, i.e. the same
// issue time), so it is the first kernel; the probe (benchmarks/device_check.d/pre-hopper-probe.sh) measures
// both consumer loops so the int4-in-memory variant can be argued from numbers.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SM90_HD __host__ __device__ __forceinline__
#else
#define SM90_HD inline
#endif

namespace svdq::cuda::sm90 {

constexpr int kGroup = 64;         // K per scale group = one pipeline stage = 64 e4m3 bytes per row
constexpr int kTileN = 128;        // output channels per CTA (2 consumer warpgroups x wgmma M = 64)
constexpr int kTileM = 128;        // tokens per CTA (wgmma N = 128)
constexpr int kStages = 6;         // smem pipeline depth (17.1 KB per stage, see Smem in w4a4_gemm_sm90.cuh)
constexpr int kTileBytes = 128 * kGroup;  // one 128-row x 64-byte e4m3 tile = 8 KiB
constexpr int kScalePad = 36;      // per-stage activation-scale rows: 32 values + 4 pad (LDS.128, no conflicts)

// ---- 64-byte swizzle (wgmma / TMA "SWIZZLE_64B") ----------------------------------------------------------
// A K-major tile whose rows are exactly 64 bytes (one group). The hardware pattern repeats every 8 rows
// (512 B): the 16-byte chunk c of row r is stored at chunk c ^ ((r >> 1) & 3). The descriptor then has
// layout type 2 (64B), stride between 8-row groups SBO = 512 B, and the second k32 step starts 32 bytes in.
SM90_HD int swz64(int row, int byte_in_row) {
  const int chunk = (byte_in_row >> 4) ^ ((row >> 1) & 3);
  return row * 64 + chunk * 16 + (byte_in_row & 15);
}

// ---- 128-byte swizzle, for the low-rank B tile (bf16/fp16, 64 ranks = 128 bytes per token row) ------------
// chunk c of row r at c ^ (r & 7); atom 8 rows x 128 B = 1024 B; descriptor layout type 1, SBO = 1024 B.
SM90_HD int swz128(int row, int byte_in_row) {
  const int chunk = (byte_in_row >> 4) ^ (row & 7);
  return row * 128 + chunk * 16 + (byte_in_row & 15);
}

// ---- int4 code -> e4m3 byte (exact) ---------------------------------------------------------------------
// q in [-8, 7]: |q| = 1.mmm x 2^e with e = floor(log2 |q|), stored with exponent bias 7. 0 -> 0x00.
SM90_HD uint8_t int4_to_e4m3(int q) {
  const int m = q < 0 ? -q : q;
  if (m == 0) return 0;
  const int e = m >= 8 ? 3 : m >= 4 ? 2 : m >= 2 ? 1 : 0;
  const int mant = ((m << 3) >> e) & 7;  // the 3 bits after the leading one
  return static_cast<uint8_t>((q < 0 ? 0x80 : 0) | ((e + 7) << 3) | mant);
}

// ---- fp32 -> e4m3fn, round to nearest even, saturating at ±448 (quantize_act_fp8, spec §8.1) ---------------
// Written out (no cvt intrinsic) so the host test checks the exact function the kernel runs. Expects
// |v| <= 448 (the quantizer divides by amax/448); larger finite values saturate to ±448; NaN is undefined.
SM90_HD float sm90_rintf(float v) {
#if defined(__CUDA_ARCH__)
  return rintf(v);
#else
  return __builtin_rintf(v);  // default rounding mode: to nearest, ties to even
#endif
}
SM90_HD uint8_t float_to_e4m3_rne(float v) {
  uint32_t bits;
  __builtin_memcpy(&bits, &v, 4);
  const uint8_t sign = static_cast<uint8_t>((bits >> 24) & 0x80);
  const float a = v < 0 ? -v : v;
  if (a >= 448.0f) return sign | 0x7E;
  if (a < 0.015625f) {  // below 2^-6: e4m3 subnormals m * 2^-9, m in 0..7 (m = 8 is the smallest normal)
    const int m = static_cast<int>(sm90_rintf(a * 512.0f));  // exact scaling, then RNE
    return sign | static_cast<uint8_t>(m);                   // m = 8 encodes as 0x08 = 2^-6: still right
  }
  const int e = static_cast<int>((bits >> 23) & 0xFF) - 127;  // -6 .. 8
  const uint32_t frac = bits & 0x7FFFFF;
  uint32_t m = frac >> 20;  // keep 3 mantissa bits, round the other 20 to nearest even
  const uint32_t rem = frac & 0xFFFFF;
  if (rem > 0x80000 || (rem == 0x80000 && (m & 1))) ++m;
  int ee = e + 7;
  if (m == 8) { m = 0; ++ee; }  // carry into the exponent (a < 448 keeps ee <= 15 with m <= 6)
  return sign | static_cast<uint8_t>((ee << 3) | m);
}

// ---- prepared weights (prepare_weight_sm90, once at load time) -------------------------------------------
// e4m3 bytes [Np/128][G][8 KiB], each 8 KiB block the exact smem image of one stage's A tile (channels
// 128t .. 128t+127, group g, 64B-swizzled), so the producer fetches it with one 1-D bulk copy (no tensor
// map). Np = N rounded up to 128; padding channels are zero (their stores are skipped).
SM90_HD int64_t padded_n(int64_t N) { return (N + kTileN - 1) / kTileN * kTileN; }
SM90_HD int64_t prepared_weight_offset(int64_t n, int64_t k, int64_t G) {
  return ((n / kTileN) * G + k / kGroup) * kTileBytes + swz64(static_cast<int>(n % kTileN), static_cast<int>(k % kGroup));
}
// fp32 s_w [Np/128][G][128]: one 512-byte block per stage, next to its weight block's index.
SM90_HD int64_t prepared_wscale_index(int64_t n, int64_t g, int64_t G) {
  return ((n / kTileN) * G + g) * kTileN + n % kTileN;
}

// ---- accumulator fragment of wgmma m64nNk* (f32 D), per thread of a warpgroup -----------------------------
// Thread t = 32 w + l of the warpgroup holds, for i in [0, N/2): row 16 w + l/4 + 8 ((i/2) % 2) of the 64,
// column 8 (i/4) + 2 (l % 4) + (i % 2). Rows are channels, columns tokens (swapped orientation).
SM90_HD int acc_row(int warp, int lane, int i) { return 16 * warp + lane / 4 + 8 * ((i / 2) % 2); }
SM90_HD int acc_col(int lane, int i) { return 8 * (i / 4) + 2 * (lane % 4) + (i % 2); }

// ---- per-stage activation scales (W4A4 path): [4][kScalePad] floats --------------------------------------
// A thread with lane%4 = q needs the 32 tokens acc_col(lane, i) = 8 j' + 2 q + {0,1}; they are stored
// contiguously in row q (slot (tk/8)*2 + tk%2) so it reads them with 8 LDS.128.
SM90_HD int act_scale_slot(int token) { return ((token % 8) / 2) * kScalePad + (token / 8) * 2 + token % 2; }
// The j-th of a thread's 32 scales (j = (i/4)*2 + i%2 for accumulator i) is token acc_col(lane, i).
SM90_HD int acc_scale_j(int i) { return (i / 4) * 2 + (i % 2); }

// ---- low-rank A fragment (wgmma m64k16 16-bit A from registers) ------------------------------------------
// Register r (0..3) of lane l in warp w holds 2 consecutive k: row 16 w + l/4 + 8 (r % 2),
// k = 2 (l % 4) + 8 (r / 2) (and k + 1).
SM90_HD int lora_a_row(int warp, int lane, int r) { return 16 * warp + lane / 4 + 8 * (r % 2); }
SM90_HD int lora_a_k(int lane, int r) { return 2 * (lane % 4) + 8 * (r / 2); }

// ---- shared-memory matrix descriptor (wgmma) -------------------------------------------------------------
// bits 0-13: start address >> 4; 16-29: leading byte offset >> 4 (unused for swizzled K-major: 1);
// 32-45: stride byte offset >> 4 (between 8-row groups); 62-63: layout (1 = 128B, 2 = 64B swizzle).
SM90_HD uint64_t smem_desc(uint32_t smem_addr, uint32_t sbo_bytes, uint32_t layout) {
  return static_cast<uint64_t>((smem_addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(1) << 16) |
         (static_cast<uint64_t>(sbo_bytes >> 4) << 32) | (static_cast<uint64_t>(layout) << 62);
}

// ---- persistent schedule --------------------------------------------------------------------------------
// Tile t -> (channel tile, token tile) with channels fastest: CTAs running together share token rows (the
// activations stay in L2) and sweep the weights (<= 38 MB e4m3 for FLUX.1's largest layer: L2-resident too).
struct TileCoord { int n_tile, m_tile; };
SM90_HD TileCoord tile_coord(int tile, int n_tiles) { return TileCoord{tile % n_tiles, tile / n_tiles}; }

// ---- epilogue staging: out tile [128 tokens][128 + 8 channels] 16-bit (row pad: 16 B, no bank conflicts) --
constexpr int kOutPitch = kTileN + 8;
SM90_HD int out_stage_index(int token, int channel) { return token * kOutPitch + channel; }

}  // namespace svdq::cuda::sm90
