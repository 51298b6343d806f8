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

SVDQ_HD float fabs_hd(float x) {
#if defined(__CUDA_ARCH__)
  return fabsf(x);  // free |.| operand modifier; the select form below costs 2 instructions
#else
  return x < 0.f ? -x : x;
#endif
}
SVDQ_HD float fmax_hd(float a, float b) {
#if defined(__CUDA_ARCH__)
  return fmaxf(a, b);  // one FMNMX (operands here are never NaN)
#else
  return a > b ? a : b;
#endif
}
SVDQ_HD float fmin_hd(float a, float b) {
#if defined(__CUDA_ARCH__)
  return fminf(a, b);
#else
  return a < b ? a : b;
#endif
}

SVDQ_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// fma with a single rounding (IEEE fma.rn.f32) on host and device.
SVDQ_HD float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return __builtin_fmaf(a, b, c);
#endif
}

// ---- x̂ = x / λ without a division per element ----------------------------------------------------------
//
// r = RN(1/λ) once per column and step (IEEE division, 8 per thread per step instead of 32), then
//   y = RN(x·r),  e = fma(−y, λ, x) (the exact residual),  q = fma(e, r, y)      (Markstein correction)
// 3 FP instructions instead of ~11 (MUFU.RCP + FCHK + 5 FFMA + a convergence region). Usable when λ and r
// are normal (recip_ok). Claims, checked for EVERY pair by the exhaustive host test (all bf16 × bf16 and
// fp16 × fp16 (x, λ); bf16 x × every fp32 λ significand, which with the scale invariance of RN covers every
// fp32 λ in the safe range — csrc/cuda/tests/quantize_act_host.cpp `div-exhaustive`), with Q = RN(x/λ):
//   (A) 2^-100 <= |Q| <= 2^120            ⇒  q == Q bit for bit
//   (B) |Q| < 2^-100                      ⇒  |q| < 2^-99 and q is not NaN         (underflow region)
//   (C) |Q| > 2^120, Q = ±Inf or NaN      ⇒  !(|q| <= 2^120)                      (overflow region)
// The quantizer turns these into bit-exact outputs: a group is recomputed with IEEE divisions ("exact
// group") unless 2^-80 <= amax <= 2^120 (group_needs_exact), and inside such a group (A) covers every
// element that can get a non-zero code while (B)'s elements stay below 2^-99·7/2^-80 < 2^-16 of s: code 0
// either way, far from the 0.5 tie. (A)-(C) also make amax itself exact or the group exact. fp16 x with an
// fp32 λ is not covered by the test (2^33 pairs): the kernel divides with '/' there (recip_allowed).
constexpr float kRecipLo = 1.52587891e-05f;  // 2^-16: with |x̂| >= 2^-80 this keeps |x| >= 2^-96, e normal
constexpr float kRecipHi = 8.50705917e+37f;  // 2^126
SVDQ_HD bool recip_ok(float lam) {
  const float a = fabs_hd(lam);
  return a >= kRecipLo && a < kRecipHi;
}
// RN(1/λ) for a λ with at most 11 significant bits (every bf16 / fp16 value) in the recip_ok range, from an
// approximation r0 within 2 ulp (the device's MUFU.RCP, rcp.approx: <= 1 ulp) and one Newton-Markstein step
// r = fma(r0, fma(−λ, r0, 1), r0): 3 instructions instead of rcp.rn's ~10 with its range-check branch. The
// host test `rcp16` checks every 11-bit significand with r0 = RN(1/λ) ± 0, 1, 2 ulp (scale invariant in that
// range). It is NOT exact for general fp32 λ (103 of 2^23 significands fail), so fp32 smoothing factors
// take the IEEE reciprocal.
SVDQ_HD float rcp16_rn(float lam) {
#if defined(__CUDA_ARCH__)
  float r0;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r0) : "f"(lam));
  return fma_rn(r0, fma_rn(-lam, r0, 1.0f), r0);
#else
  return 1.0f / lam;
#endif
}
SVDQ_HD float rcp16_refine(float lam, float r0) { return fma_rn(r0, fma_rn(-lam, r0, 1.0f), r0); }

SVDQ_HD float div_by_recip(float x, float lam, float r) {
  const float y = mul_rn(x, r);
  const float e = fma_rn(-y, lam, x);
  return fma_rn(e, r, y);
}

// max(a, |b|) that propagates NaN (a NaN x̂ must reach the group's amax: docs/numerics.md §4.1, non-finite
// input). On sm_80+ one FMNMX.NAN with an |.| operand modifier.
SVDQ_HD float amax_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float d;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(fabsf(b)));
  return d;
#else
  const float ab = fabs_hd(b);
  if (a != a || ab != ab) return a != a ? a : ab;
  return a > ab ? a : ab;
#endif
}

// s_a = amax / 7 (IEEE fp32 division; the kernel is compiled without fast-math so '/' is div.rn.f32).
// A non-finite amax (a NaN or ±Inf x̂ in the group) gives s_a = NaN: the GEMM then turns every output of the
// row into NaN (NaN · anything = NaN), as nn.Linear would (spec §4.1).
SVDQ_HD float act_scale(float amax) { return amax <= 3.40282347e+38f ? amax / 7.0f : __builtin_nanf(""); }

// The same s_a for amax in [2^-80, 2^120] (every group that is not exact) with 3 FP instructions instead of an
// IEEE division: y = RN(amax·RN(1/7)), s = fma(fma(−y, 7, amax), RN(1/7), y). Proven equal to amax / 7 for
// every fp32 significand by the host test (`div7-exhaustive`); nothing under- or overflows in that range, so
// the significand decides (RN is invariant under scaling by powers of two).
constexpr float kRcp7 = 0.142857149f;  // RN(1/7) = 0x3E124925
SVDQ_HD float act_scale_fast(float amax) { return div_by_recip(amax, 7.0f, kRcp7); }

// RN(1/s)-or-close reciprocal for the fast path's t = x̂·inv_s: the near-tie window (4e-6) is 4x wider than
// the error bound with inv_s within 2 ulp of 1/s, so the device's MUFU.RCP (rcp.approx, <= 1 ulp) serves; the
// host uses the IEEE value and the sweep (`nibble-sweep`) also runs with inv_s off by up to ±2 ulp.
SVDQ_HD float rcp_approx(float s) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(s));
  return r;
#else
  return 1.0f / s;
#endif
}

// The INT4 code of xhat in a group with scale s (spec §4.1):
//   q = clamp(round_half_to_even(xhat / s), -8, 7), q = 0 when s == 0 or s is NaN.
// Returned as the low nibble (0..15, two's complement of q).
//
// Fast path, exact: t = xhat * inv_s with inv_s = RN(1/s). |t - xhat/s| <= 2^-23 * |xhat/s| (two roundings)
// and |xhat/s| <= 7 * (1 + 2^-23) because |xhat| <= amax and s = RN(amax/7); so t is within 8.4e-7 of the
// real quotient and RN(xhat/s) within 2.4e-7. Unless t lies within 4e-6 of a half-integer, both round to
// the same integer; |t| < 7.5 so rint(t) ∈ [-7, 7] and no clamp is needed. Otherwise (rare: ties and
// near-ties, ~1e-5 per element) the caller recomputes with quant_nibble_ref. Branch-free: the near-tie test
// is OR-ed into `near`, which the kernel checks once per 8 elements (no convergence region per element).
// `dist` accumulates max |rint(t) - t| (one FMNMX per element); the caller compares it with kNearTie once.
constexpr float kNearTie = 0.5f - 4e-6f;
SVDQ_HD uint32_t nibble_fast(float xhat, float inv_s, float& dist, float& rint_out) {
  const float t = mul_rn(xhat, inv_s);
  const float m = add_rn(t, kMagic);  // bits(m) = 0x4B400000 + rint(t)
  const float r = add_rn(m, -kMagic);
  dist = fmax_hd(dist, fabs_hd(add_rn(r, -t)));
  rint_out = r;
  return float_bits(m) & 0xFu;
}

// Reference formulation (the spec's: division every time, clamp). Also the kernel's rare exact path.
SVDQ_HD float quant_value_ref(float xhat, float s) {
  if (s == 0.f || s != s) return 0.f;
  float q = xhat / s;
  q = fmin_hd(fmax_hd(q, -8.0f), 7.0f);
  return add_rn(add_rn(q, kMagic), -kMagic);  // rint, round-half-even
}
SVDQ_HD uint32_t quant_nibble_ref(float xhat, float s) {
  return float_bits(add_rn(quant_value_ref(xhat, s), kMagic)) & 0xFu;
}

// Kept for the host sweep: the old per-element formulation (fast path + per-element fallback).
SVDQ_HD uint32_t quant_nibble(float xhat, float s, float inv_s, bool exact_group) {
  float dist = 0.f, r;
  const uint32_t n = nibble_fast(xhat, inv_s, dist, r);
  return (exact_group || dist > kNearTie) ? quant_nibble_ref(xhat, s) : n;
}

// Whether a group must be recomputed with IEEE divisions for every element (see div_by_recip: amax outside
// [2^-80, 2^120], NaN included; inv_s is then also guaranteed normal on the fast path).
constexpr float kExactLo = 8.67361738e-19f;  // 2^-60
constexpr float kExactHi = 1.32922800e+36f;  // 2^120
SVDQ_HD bool group_needs_exact(float amax) { return !(amax >= kExactLo && amax <= kExactHi); }

// float8_e4m3fn byte of an integer-valued float v with |v| <= 8 (exact; the Hopper FP8 path's operand).
// bits(v) = sign | (e+127) << 23 | m << 20 (3 mantissa bits suffice for |v| <= 8) and e4m3 has bias 7:
// byte = sign >> 24 | ((bits >> 20) & 0x7FF) - (120 << 3), and 0 for v == 0. The kernel uses the hardware
// cvt.rn.satfinite.e4m3x2.f32 on sm_89+ (exact for these values); the host test checks both.
SVDQ_HD uint32_t e4m3_of_int_float(float v) {
  const uint32_t b = float_bits(v);
  const uint32_t mag = b & 0x7FFFFFFFu;
  return mag == 0 ? 0u : (((b >> 24) & 0x80u) | (((mag >> 20) - (120u << 3)) & 0x7Fu));
}

// ---- one thread's 8 consecutive elements of one (row, group) — the kernel's code, also run by the host test
//
// Phase 1: x̂ for the 8 elements (div_by_recip, or '/' when !use_recip) and their NaN-propagating |max|.
SVDQ_HD float xhat8(const float x[8], const float lam[8], const float rcp[8], bool use_recip, float xh[8]) {
  float amax = 0.f;
  for (int e = 0; e < 8; ++e) {
    xh[e] = use_recip ? div_by_recip(x[e], lam[e], rcp[e]) : x[e] / lam[e];
    amax = amax_nan(amax, xh[e]);
  }
  return amax;
}
// Phase 2 (after the 8 lanes' amax are combined), fast path: nibbles packed into one word (element i at
// bits 4i..4i+3), rint values in rv (for the e4m3 output), `near` set when any element needs the exact path.
SVDQ_HD uint32_t quant8_fast(const float xh[8], float inv_s, bool& near, float rv[8]) {
  uint32_t w = 0;
  float dist = 0.f;
  for (int e = 0; e < 8; ++e) w |= nibble_fast(xh[e], inv_s, dist, rv[e]) << (4 * e);
  near = dist > kNearTie;
  return w;
}
// Exact path (spec formulation) for the same 8 elements.
SVDQ_HD uint32_t quant8_ref(const float xh[8], float s, float rv[8]) {
  uint32_t w = 0;
  for (int e = 0; e < 8; ++e) {
    rv[e] = quant_value_ref(xh[e], s);
    w |= (float_bits(add_rn(rv[e], kMagic)) & 0xFu) << (4 * e);
  }
  return w;
}

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

// Byte offset of the 8 e4m3 bytes of chunk (row, col8) of step `step` in the e4m3 qact [M, Kp].
SVDQ_HD int64_t qact_e4m3_offset(int64_t row, int step, int col8, int64_t kp) {
  return row * kp + (int64_t)step * kBK + col8 * 8;
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
