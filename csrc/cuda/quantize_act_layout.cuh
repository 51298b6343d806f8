// quantize_act_layout.cuh — element-level arithmetic and index maps of the activation quantizer.
//
// Everything here is `SVDQ_HD` (host + device) and free of CUDA-only intrinsics, so that
// tests/test_cuda_quantize_layout.py can compile it with plain g++ and check it against the spec
// (docs/numerics.md §4.1) on a machine without a GPU. The kernel (quantize_act.cu) uses exactly these
// functions; nothing numerically relevant lives only in the kernel.
//
// No torch headers, no CUDA runtime headers.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define SVDQ_HD __host__ __device__ __forceinline__
#else
#define SVDQ_HD inline
#endif

namespace svdq {
namespace qact {

constexpr int kGroup = 64;  // GROUP_SIZE of the spec
constexpr int kQMax = 7;
constexpr int kQMin = -8;

// 1.5 * 2^23. For |t| <= 2^22, fl(t + kMagic) rounds t to an integer with round-half-to-even (the FPU's
// rounding mode), and the float's low mantissa bits then hold that integer in two's complement:
//   bits(t + kMagic) = 0x4B400000 + rint(t)
// so `bits & 0xF` is already the INT4 nibble. One FADD replaces cvt.rni + and.
constexpr float kMagic = 12582912.0f;

// Bit pattern of a float without <cstring> / intrinsics (the union pun is what nvcc and g++ both accept).
SVDQ_HD uint32_t float_bits(float f) {
  union {
    float f;
    uint32_t u;
  } v;
  v.f = f;
  return v.u;
}

// a * b rounded once; on the device __fmul_rn keeps nvcc from contracting it into an FMA with a later add.
SVDQ_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

SVDQ_HD float fabs_hd(float x) { return x < 0.f ? -x : x; }
SVDQ_HD float fmax_hd(float a, float b) { return a > b ? a : b; }
SVDQ_HD float fmin_hd(float a, float b) { return a < b ? a : b; }

// s_a = amax / 7 (IEEE fp32 division; the kernel is compiled without fast-math so '/' is div.rn.f32).
SVDQ_HD float act_scale(float amax) { return amax / 7.0f; }

// The INT4 code of xhat in a group with scale s (spec §4.1):
//   q = clamp(round_half_to_even(xhat / s), -8, 7), q = 0 when s == 0.
// Returned as the low nibble (0..15, two's complement of q).
//
// Fast path, exact: t = xhat * inv_s with inv_s = RN(1/s). |t - xhat/s| <= 2^-23 * |xhat/s| (two roundings)
// and |xhat/s| <= 7 * (1 + 2^-23) because |xhat| <= amax and s = RN(amax/7); so t is within 8.4e-7 of the
// real quotient and RN(xhat/s) within 2.4e-7. Unless t lies within 4e-6 of a half-integer, both round to
// the same integer, and the clamp (integer bounds) commutes with the rounding. Otherwise (rare: ties and
// near-ties) the exact IEEE quotient is computed. `exact_group` is set by the caller when inv_s is not a
// normal float (s < 2^-126 or s == 0 handled separately), which makes the whole group take the exact path.
SVDQ_HD uint32_t quant_nibble(float xhat, float s, float inv_s, bool exact_group) {
  float t = mul_rn(xhat, inv_s);
  float tc = fmin_hd(fmax_hd(t, -8.0f), 7.0f);
  float r = (tc + kMagic) - kMagic;  // rint(tc), round-half-even
  float d = fabs_hd(r - tc);         // exact (Sterbenz-like: r and tc are within 0.5)
  if (exact_group || (d > 0.5f - 4e-6f && fabs_hd(t) < 8.5f)) {
    if (s == 0.f) return 0u;
    float q = xhat / s;  // IEEE division, the spec's definition
    q = fmin_hd(fmax_hd(q, -8.0f), 7.0f);
    return float_bits(q + kMagic) & 0xFu;
  }
  return float_bits(tc + kMagic) & 0xFu;
}

// Reference formulation of the same, used by the host test only (division every time).
SVDQ_HD uint32_t quant_nibble_ref(float xhat, float s) {
  if (s == 0.f) return 0u;
  float q = xhat / s;
  q = fmin_hd(fmax_hd(q, -8.0f), 7.0f);
  // rint by the magic constant (round-half-even in the default rounding mode)
  return float_bits(q + kMagic) & 0xFu;
}

// Whether a group with scale s must take the exact path for every element (inv_s would be inf/subnormal).
SVDQ_HD bool group_needs_exact(float s) { return !(s >= 1.1754944e-38f) || !(s <= 1.0e37f); }

// Pack 8 nibbles (element 0 = lowest k) into one uint32 = 4 canonical bytes (low nibble = even k):
// byte j = nib[2j] | nib[2j+1] << 4, and the little-endian word puts byte 0 lowest, so element i sits at
// bits 4i..4i+3.
SVDQ_HD uint32_t pack8(const uint32_t nib[8]) {
  uint32_t w = 0;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int i = 0; i < 8; ++i) w |= (nib[i] & 0xFu) << (4 * i);
  return w;
}

// ---- Tile geometry shared by the kernel and the launcher ------------------------------------------------
//
// One CTA = kThreads threads, a tile of kBM rows (tokens) × kBK columns (kGroupsPerStep groups) per step.
// Thread t handles 16-byte chunks id = t + kThreads * i (i < kChunksPerThread) of the tile, chunk id ->
// (row = id / kChunksPerRow, chunk-in-row = id % kChunksPerRow); 8 consecutive threads own one row-group.
constexpr int kThreads = 256;
constexpr int kBM = 64;
constexpr int kGroupsPerStep = 2;
constexpr int kBK = kGroup * kGroupsPerStep;           // 128 columns per step
constexpr int kChunksPerRow = kBK / 8;                 // 16 chunks of 8 bf16 per tile row
constexpr int kChunksPerThread = kBM * kChunksPerRow / kThreads;  // 4
static_assert(kBM * kChunksPerRow % kThreads == 0, "tile must split evenly over the CTA");

SVDQ_HD int chunk_row(int tid, int i) { return (tid + kThreads * i) / kChunksPerRow; }
SVDQ_HD int chunk_col8(int tid, int i) { return (tid + kThreads * i) % kChunksPerRow; }

// Byte offset of the packed word (4 bytes = 8 nibbles) that chunk (row, col8) of step `step` writes in qact
// [M, Kp/2] (row stride Kp/2 bytes).
SVDQ_HD int64_t qact_word_offset(int64_t row, int step, int col8, int64_t kp_half) {
  return row * kp_half + (int64_t)step * (kBK / 2) + col8 * 4;
}

// Split plan: how many K-splits the grid uses. Each CTA walks `steps_per_split` steps of kBK columns. The
// splits are reduced by a second kernel in fixed order (deterministic), so splitting is used only when the
// row tiles alone do not fill the GPU.
struct QuantPlan {
  int row_tiles;        // ceil(M / kBM)
  int steps;            // ceil(Kp / kBK)
  int ksplit;           // number of K-splits (>= 1)
  int steps_per_split;  // ceil(steps / ksplit)
  int rank_chunk;       // ranks per CTA (16, 32 or 64); 0 when r == 0
  int rank_chunks;      // ceil(r / rank_chunk)
};

// slots = CTAs resident at once on the whole GPU (SMs × CTAs per SM); ksplit_override > 0 forces ksplit
// (benchmark sweeps). Otherwise: the ksplit in 1..16 (≥ kMinStepsPerSplit steps each) that fills the last
// wave best, smaller on ties; no split when the row tiles alone make ≥ 4 waves.
constexpr int kMinStepsPerSplit = 3;

SVDQ_HD QuantPlan make_plan(int64_t M, int64_t K, int r, int slots, int ksplit_override = 0) {
  QuantPlan p;
  int64_t kp = (K + kGroup - 1) / kGroup * kGroup;
  p.row_tiles = (int)((M + kBM - 1) / kBM);
  p.steps = (int)((kp + kBK - 1) / kBK);
  p.rank_chunk = r == 0 ? 0 : (r <= 16 ? 16 : (r <= 32 ? 32 : 64));
  p.rank_chunks = r == 0 ? 1 : (r + p.rank_chunk - 1) / p.rank_chunk;
  if (slots < 1) slots = 1;
  const int64_t base = (int64_t)p.row_tiles * p.rank_chunks;
  int best = 1;
  if (ksplit_override > 0) {
    best = ksplit_override;
  } else if (base < 4 * (int64_t)slots) {
    double best_eff = -1.0;
    for (int ks = 1; ks <= 16; ++ks) {
      int spl = (p.steps + ks - 1) / ks;
      if (ks > 1 && spl < kMinStepsPerSplit) break;
      int eff_ks = (p.steps + spl - 1) / spl;
      if (eff_ks != ks) continue;  // would leave empty splits; the smaller ks covers it
      int64_t blocks = base * ks;
      int64_t waves = (blocks + slots - 1) / slots;
      // fraction of the resident slots busy, averaged over the waves; tiny grids (< 1 wave) count as is
      double eff = (double)blocks / (double)(waves * slots);
      if (eff > best_eff + 0.02) {
        best_eff = eff;
        best = ks;
      }
    }
  }
  if (best < 1) best = 1;
  if (best > p.steps) best = p.steps > 0 ? p.steps : 1;
  p.steps_per_split = (p.steps + best - 1) / best;
  p.ksplit = (p.steps + p.steps_per_split - 1) / p.steps_per_split;  // drop empty splits
  if (p.ksplit < 1) p.ksplit = 1;
  return p;
}

}  // namespace qact
}  // namespace svdq
