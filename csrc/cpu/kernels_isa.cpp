// CPU kernels for quantize_act and w4a4_gemm (docs/numerics.md §4), compiled once per ISA level.
//
// CMakeLists.txt builds this file several times with -DSVDQ_ISA=<name> and that level's -march flags; every
// symbol lives in namespace svdq::cpu::<name>. Nothing here may be an inline function or template shared
// with another translation unit (no std:: containers or algorithms): the linker would merge the copies and
// the base path could end up running AVX-512 code. Hence malloc/free and the tiny helpers below, all in
// this namespace.
//
// The hot loops are written with GCC/Clang vector extensions (vector_size(64): 32 x int16 or 16 x fp32),
// which the compiler lowers to 4 x SSE, 2 x AVX2 or 1 x AVX-512 registers — one source for every level.
//
// quantize_act, per block of 4 rows (x is read from memory once, into an fp32 row buffer):
//   x̂ = x / λ (IEEE division) -> per 64-group amax -> s = amax / 7 -> q = clamp(rne(x̂ / s)) -> pack,
//   lora_act = x · lora_down (fp32 FMAs, 4 rows x 16 ranks register tile) * lora_scales.
//
// w4a4_gemm, tiled 4 rows x 32 columns:
//
//     a_unpacked [Mp, Kp] int16          weight panel (per 32 columns, built per task)
//     row m: q_a[m, 0..Kp)               [G][64 k][32 n] int16   (q_w transposed: 64 bytes per k)
//
//   for each 64-group g:
//     I[4][32] (int16, exact: |I| <= 64 * 8 * 8 = 4096; unsigned codes of spec §10: 64 * 15 * 8 = 7680)
//             += q_a[m, k] (broadcast) * panel[g][k][0..32)
//     acc[4][32] (fp32) += (s_a[m, g] * s_w[n, g]) * float(I)      <- same order as the reference
//   epilogue: y = out_dtype((acc + Σ_j C(lora_act[m, j]) * lora_up[n, j]) + bias[n])
//
// int16 products and sums are exact (|q| <= 8, 64 terms), so int16 lanes (32 per 64 bytes) replace int32
// ones and double the multiply throughput; the per-group fp32 promotion runs once per 64 MACs.
// The AVX-512 level adds a VNNI path (vpdpbusd, 64 u8 x s8 MACs per instruction), see gemm_group_vnni.

#include "cpu/kernels.h"

#include <cstdlib>
#include <cstring>
#include <limits>

#if defined(SVDQ_ISA_avx512) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define SVDQ_VNNI 1  // u8 x s8 dot products with vpdpbusd (see gemm_groups_vnni)
#else
#define SVDQ_VNNI 0
#endif

#ifndef SVDQ_ISA
#error "compile with -DSVDQ_ISA=<namespace>"
#endif

namespace svdq::cpu::SVDQ_ISA {
namespace {

// Native vector width of this ISA level. Vector-extension types wider than the hardware's registers get
// split late by GCC and their accumulators end up on the stack (measured: base/avx2 GEMM 8x slower), so
// every hot loop uses native-width vectors or plain loops the compiler vectorizes itself.
#if defined(SVDQ_ISA_avx512)
constexpr int kVB = 64;
#elif defined(SVDQ_ISA_avx2)
constexpr int kVB = 32;
#else
constexpr int kVB = 16;
#endif
typedef int16_t vi16 __attribute__((vector_size(kVB)));
typedef float vf __attribute__((vector_size(kVB)));
// Unaligned views for loads and stores: memcpy into an *array* of vectors went through the stack (GCC 12).
typedef int16_t vi16_u __attribute__((vector_size(kVB), aligned(2), may_alias));
typedef float vf_u __attribute__((vector_size(kVB), aligned(4), may_alias));
inline vf loadu(const float* p) { return *reinterpret_cast<const vf_u*>(p); }
inline vi16 loadu(const int16_t* p) { return *reinterpret_cast<const vi16_u*>(p); }
inline void storeu(float* p, vf v) { *reinterpret_cast<vf_u*>(p) = v; }
inline void storeu(int16_t* p, vi16 v) { *reinterpret_cast<vi16_u*>(p) = v; }
constexpr int kI16 = kVB / 2;  // int16 lanes per vector
constexpr int kF32 = kVB / 4;  // fp32 lanes per vector

constexpr int kRB = kRowTile;   // 4
constexpr int kNB = kColTile;   // 32
constexpr int kJB = 16;         // ranks per lora_down register tile

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

void* alloc64(size_t bytes) {
  size_t n = (bytes + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, n ? n : 64);
  return p;
}

inline float f32_from_bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float bf16_to_f32(uint16_t h) { return f32_from_bits(uint32_t(h) << 16); }

// Round to nearest even; NaN stays NaN (quiet) — as c10::BFloat16.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  if (em >= 0x7c00u) return f32_from_bits(sign | 0x7f800000u | ((em & 0x3ffu) << 13));  // Inf / NaN
  if (em >= 0x0400u) return f32_from_bits(sign | ((em << 13) + ((127u - 15u) << 23)));  // normal
  return f32_from_bits(sign | f32_bits(float(em) * 5.9604644775390625e-08f));           // subnormal: em * 2^-24
}

// fp32 -> fp16, round to nearest even, overflow to Inf, subnormals, NaN stays NaN (as c10::Half).
// Integer-only on purpose: a float formulation (scale by 2^112, add a bias) breaks when the compiler
// contracts it into an FMA, and contraction stays on for the hot loops.
inline uint16_t f32_to_f16(float f) {
  uint32_t x = f32_bits(f);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) return sign | 0x7e00u;               // NaN
  if (x >= 0x477ff000u) return sign | 0x7c00u;              // >= 65520 rounds to Inf (and Inf)
  if (x >= 0x38800000u) {                                   // normal half (>= 2^-14)
    uint32_t r = x - 0x38000000u;                           // rebias the exponent 127 -> 15
    r += 0xfffu + ((r >> 13) & 1u);                         // round to nearest even on bit 13
    return uint16_t(sign | (r >> 13));
  }
  if (x <= 0x33000000u) return sign;                        // <= 2^-25 rounds to (signed) zero
  const uint32_t e = x >> 23, mant = (x & 0x7fffffu) | 0x800000u;
  const uint32_t s = 126u - e;                              // 14..24: half subnormal = mant >> s, rounded
  uint32_t r = mant >> s;
  const uint32_t rem = mant & ((1u << s) - 1u), half = 1u << (s - 1u);
  r += (rem > half || (rem == half && (r & 1u))) ? 1u : 0u;
  return uint16_t(sign | r);
}

// C(·) of spec §4.2: round to the output dtype and back.
inline float round_to(DType d, float v) {
  switch (d) {
    case DType::bf16: return bf16_to_f32(f32_to_bf16(v));
    case DType::f16: return f16_to_f32(f32_to_f16(v));
    default: return v;
  }
}

// x row (any dtype) -> fp32, zero-padded to Kp.
void load_row(const void* x, DType d, int64_t K, int64_t Kp, float* out) {
  if (d == DType::f32) {
    std::memcpy(out, x, sizeof(float) * K);
  } else if (d == DType::bf16) {
    const uint16_t* h = static_cast<const uint16_t*>(x);
    for (int64_t k = 0; k < K; ++k) out[k] = bf16_to_f32(h[k]);
  } else {
    const uint16_t* h = static_cast<const uint16_t*>(x);
    for (int64_t k = 0; k < K; ++k) out[k] = f16_to_f32(h[k]);
  }
  for (int64_t k = K; k < Kp; ++k) out[k] = 0.0f;
}

// One row of spec §4.1: smoothing, per-group absmax, scale, round-half-even, clamp, pack.
// `smooth` is padded to Kp with ones (padding columns give 0 / 1 = 0, as in the reference).
// shift > 0 (spec §10.1): x̂ = (x + shift) / λ on the K real columns (padding stays 0), scale amax / 15,
// codes clamped to 0..15 and packed as unsigned nibbles.
void quantize_row(const float* xr, const float* smooth, int64_t G, int64_t K, float shift, int8_t* qout,
                  float* sout) {
  const bool shifted = shift != 0.0f;
  const float qmax = shifted ? 15.0f : 7.0f;
  const int32_t qlo = shifted ? 0 : -8, qhi = shifted ? 15 : 7;
  for (int64_t g = 0; g < G; ++g) {
    float xh[kGroup];
    uint32_t amax_bits = 0;  // max of |x̂| on the bit patterns: monotone for non-NaN, vectorizes as int max
    for (int k = 0; k < kGroup; ++k) {
      const int64_t kk = g * kGroup + k;
      // padding columns (kk >= K) hold x = 0 and must stay x̂ = 0 when shifted, not shift / 1
      const float xv = (shifted && kk < K) ? xr[kk] + shift : xr[kk];
      xh[k] = xv / smooth[kk];
      const uint32_t b = f32_bits(xh[k]) & 0x7fffffffu;
      amax_bits = b > amax_bits ? b : amax_bits;
    }
    // A NaN or ±Inf x̂ (bits >= 0x7F800000 sort above every finite |x̂|) makes the group's scale NaN and its
    // codes 0: every output of the row is then NaN in the GEMM (spec §4.1, non-finite input).
    const bool finite = amax_bits < 0x7f800000u;
    const float s = finite ? f32_from_bits(amax_bits) / qmax : std::numeric_limits<float>::quiet_NaN();
    sout[g] = s;
    uint8_t* out = reinterpret_cast<uint8_t*>(qout) + g * (kGroup / 2);
    if (s == 0.0f || !finite) {
      std::memset(out, 0, kGroup / 2);
      continue;
    }
    int32_t q[kGroup];
    for (int k = 0; k < kGroup; ++k) {
      // |x̂ / s| <= 15 (+1 ulp), far below 2^22: adding and subtracting 1.5 * 2^23 rounds to an integer in
      // the current (round-to-nearest-even) mode — exactly torch.round.
      float v = xh[k] / s;
      v = (v + 12582912.0f) - 12582912.0f;
      int32_t qi = int32_t(v);
      qi = qi < qlo ? qlo : qi;
      qi = qi > qhi ? qhi : qi;
      q[k] = qi;
    }
    for (int j = 0; j < kGroup / 2; ++j) out[j] = uint8_t((q[2 * j] & 0xf) | ((q[2 * j + 1] & 0xf) << 4));
  }
}

}  // namespace

void quantize_act_rows(const QuantizeActParams& p, int64_t m0, int64_t m1) {
  const int64_t K = p.K, G = p.G, Kp = G * kGroup, r = p.r;
  const int64_t rp = (r + kJB - 1) / kJB * kJB;  // lora_down is [K, rp], zero columns beyond r
  const size_t xsize = p.xdtype == DType::f32 ? 4 : 2;
  float* xf = static_cast<float*>(alloc64(sizeof(float) * kRB * Kp));
  float* smooth = static_cast<float*>(alloc64(sizeof(float) * Kp));
  std::memcpy(smooth, p.smooth, sizeof(float) * K);
  for (int64_t k = K; k < Kp; ++k) smooth[k] = 1.0f;

  for (int64_t mb = m0; mb < m1; mb += kRB) {
    const int64_t nb = imin(kRB, m1 - mb);
    for (int64_t i = 0; i < nb; ++i) {
      const char* xrow = static_cast<const char*>(p.x) + (mb + i) * K * xsize;
      load_row(xrow, p.xdtype, K, Kp, xf + i * Kp);
      quantize_row(xf + i * Kp, smooth, G, K, p.act_shift, p.qact + (mb + i) * (Kp / 2), p.ascales + (mb + i) * G);
    }
    for (int64_t i = nb; i < kRB; ++i) std::memset(xf + i * Kp, 0, sizeof(float) * Kp);

    // lora_act[m, j] = Σ_k x[m, k] * lora_down[k, j]: 4 rows x 16 ranks of fp32 accumulators.
    for (int64_t j0 = 0; j0 < rp; j0 += kJB) {
      constexpr int kNV = kJB / kF32;  // vectors per row of the 4 x 16 accumulator tile
      vf acc[kRB][kNV] = {};
      for (int64_t k = 0; k < K; ++k) {
        vf w[kNV];
        for (int v = 0; v < kNV; ++v) w[v] = loadu(p.lora_down + k * rp + j0 + v * kF32);
        for (int i = 0; i < kRB; ++i) {
          const float xv = xf[i * Kp + k];
          for (int v = 0; v < kNV; ++v) acc[i][v] += xv * w[v];
        }
      }
      for (int64_t i = 0; i < nb; ++i) {
        float a[kJB];
        for (int v = 0; v < kNV; ++v) storeu(a + v * kF32, acc[i][v]);
        float* out = p.lora_act + (mb + i) * r;
        for (int64_t j = j0; j < imin(j0 + kJB, r); ++j) out[j] = p.lora_scales ? a[j - j0] * p.lora_scales[j] : a[j - j0];
      }
    }
  }
  std::free(xf);
  std::free(smooth);
}

void gemm_prepare_rows(const GemmParams& p, int64_t m0, int64_t m1) {
  const int64_t G = p.G, Kp = G * kGroup;
  for (int64_t m = m0; m < m1; ++m) {
#if SVDQ_VNNI
    // VNNI layout: row m is Kp bytes q_a + 8 in [0, 15] (vpdpbusd's unsigned operand); padding rows are 8
    // (q_a = 0), so that the column-sum correction below stays exact for them too. Unsigned codes (spec
    // §10.2) are vpdpbusd's operand as they are: the offset is 0 (gemm_groups_vnni skips the correction)
    // and padding rows are 0.
    uint8_t* a = reinterpret_cast<uint8_t*>(p.a_unpacked) + m * Kp;
    const uint8_t flip = p.act_unsigned ? 0 : 8;
    if (m >= p.M) {
      std::memset(a, flip, Kp);
      continue;
    }
    const uint8_t* q = reinterpret_cast<const uint8_t*>(p.qact) + m * (Kp / 2);
    for (int64_t j = 0; j < Kp / 2; ++j) {
      a[2 * j] = uint8_t((q[j] & 0xf) ^ flip);  // nibble v encodes (v ^ 8) - 8, so q + 8 = v ^ 8
      a[2 * j + 1] = uint8_t((q[j] >> 4) ^ flip);
    }
#else
    int16_t* a = p.a_unpacked + m * Kp;
    if (m >= p.M) {
      std::memset(a, 0, sizeof(int16_t) * Kp);
      continue;
    }
    const uint8_t* q = reinterpret_cast<const uint8_t*>(p.qact) + m * (Kp / 2);
    if (p.act_unsigned) {
      // unsigned codes 0..15 (spec §10.2): zero-extend; |I| <= 64 * 15 * 8 = 7680 stays exact in int16
      for (int64_t j = 0; j < Kp / 2; ++j) {
        a[2 * j] = int16_t(q[j] & 0xf);
        a[2 * j + 1] = int16_t(q[j] >> 4);
      }
    } else {
      for (int64_t j = 0; j < Kp / 2; ++j) {
        // sign-extend each nibble: (v ^ 8) - 8
        a[2 * j] = int16_t(((q[j] & 0xf) ^ 8) - 8);
        a[2 * j + 1] = int16_t(((q[j] >> 4) ^ 8) - 8);
      }
    }
#endif
    for (int64_t j = 0; j < p.r; ++j) p.lora_act_c[m * p.r + j] = round_to(p.ydtype, p.lora_act[m * p.r + j]);
  }
}

namespace {

// Per 32-column block of the output: everything the row tiles read, built once per task.
struct Panel {
  int16_t* w;     // [G][64][32]  q_w transposed, zero for columns >= N
                  // VNNI: int8 [G][16 k-quads][32 n][4 k] (128 bytes per quad: two zmm of 16 columns)
  int32_t* wsum;  // VNNI: [G][32] Σ_k q_w in the group (corrects the +8 offset of the activations)
  float* sw;      // [G][32]      s_w
  float* lu;      // [r][32]      lora_up transposed
  float bias[kNB];
};

void build_panel(const GemmParams& p, int64_t n0, Panel& pan) {
  const int64_t G = p.G, Kp = G * kGroup, nn = imin(kNB, p.N - n0);
  std::memset(pan.w, 0, sizeof(int16_t) * Kp * kNB);
  std::memset(pan.sw, 0, sizeof(float) * G * kNB);
  std::memset(pan.lu, 0, sizeof(float) * (p.r ? p.r : 1) * kNB);
#if SVDQ_VNNI
  std::memset(pan.wsum, 0, sizeof(int32_t) * G * kNB);
  int8_t* w8 = reinterpret_cast<int8_t*>(pan.w);
#endif
  for (int64_t c = 0; c < nn; ++c) {
    const uint8_t* q = reinterpret_cast<const uint8_t*>(p.qweight) + (n0 + c) * (Kp / 2);
    for (int64_t j = 0; j < Kp / 2; ++j) {
      const int lo = ((q[j] & 0xf) ^ 8) - 8, hi = ((q[j] >> 4) ^ 8) - 8;
#if SVDQ_VNNI
      const int64_t k = 2 * j;  // k and k + 1 share a quad (k even)
      int8_t* dst = w8 + (k / 4) * (kNB * 4) + c * 4 + (k % 4);
      dst[0] = int8_t(lo);
      dst[1] = int8_t(hi);
      pan.wsum[(k / kGroup) * kNB + c] += lo + hi;
#else
      pan.w[(2 * j) * kNB + c] = int16_t(lo);
      pan.w[(2 * j + 1) * kNB + c] = int16_t(hi);
#endif
    }
    for (int64_t g = 0; g < G; ++g) pan.sw[g * kNB + c] = p.wscales[(n0 + c) * G + g];
    for (int64_t j = 0; j < p.r; ++j) pan.lu[j * kNB + c] = p.lora_up[(n0 + c) * p.r + j];
  }
  for (int c = 0; c < kNB; ++c) pan.bias[c] = (p.bias && c < nn) ? p.bias[n0 + c] : 0.0f;
}

// I[i][0..32) = Σ_k a_i[k] * w[k][0..32) for one 64-group, exact in int16. Columns in chunks of at most
// two vectors so that 4 rows x 2 accumulators + 2 weight vectors fit the registers (SSE: two chunks).
inline void group_dot(const int16_t* a, int64_t lda, const int16_t* w, int16_t (&I)[kRB][kNB]) {
  constexpr int kChunk = kNB < 2 * kI16 ? kNB : 2 * kI16;
  constexpr int kNV = kChunk / kI16;
  for (int n0 = 0; n0 < kNB; n0 += kChunk) {
    vi16 c[kRB][kNV] = {};
    for (int k = 0; k < kGroup; ++k) {
      vi16 wk[kNV];
      for (int v = 0; v < kNV; ++v) wk[v] = loadu(w + k * kNB + n0 + v * kI16);
      for (int i = 0; i < kRB; ++i) {
        const int16_t av = a[i * lda + k];
        for (int v = 0; v < kNV; ++v) c[i][v] += av * wk[v];
      }
    }
    for (int i = 0; i < kRB; ++i)
      for (int v = 0; v < kNV; ++v) storeu(&I[i][n0 + v * kI16], c[i][v]);
  }
}

#if SVDQ_VNNI
// acc[i][0..32) += Σ_g (s_a[m+i, g] s_w[n, g]) · I[i][n, g] for a 4-row tile, I from vpdpbusd:
//   Σ_k (q_a + 8) · q_w  =  I + 8 Σ_k q_w   ->   I = dot - 8 · wsum   (exact in int32)
// Per k-quad: 2 weight loads (32 columns x 4 k), 4 broadcasts (4 rows x 4 k as one int32), 8 vpdpbusd.
inline void gemm_groups_vnni(const GemmParams& p, const Panel& pan, int64_t m, float (&acc)[kRB][kNB]) {
  const int64_t G = p.G, Kp = G * kGroup;
  const uint8_t* a = reinterpret_cast<const uint8_t*>(p.a_unpacked) + m * Kp;
  const int8_t* w8 = reinterpret_cast<const int8_t*>(pan.w);
  __m512 f[kRB][2];
  for (int i = 0; i < kRB; ++i) f[i][0] = f[i][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i c[kRB][2];
    for (int i = 0; i < kRB; ++i) c[i][0] = c[i][1] = _mm512_setzero_si512();
    const int8_t* wg = w8 + g * (kGroup / 4) * (kNB * 4);
    const uint8_t* ag = a + g * kGroup;
    for (int kq = 0; kq < kGroup / 4; ++kq) {
      const __m512i w0 = _mm512_loadu_si512(wg + kq * (kNB * 4));
      const __m512i w1 = _mm512_loadu_si512(wg + kq * (kNB * 4) + 64);
      for (int i = 0; i < kRB; ++i) {
        int32_t quad;
        std::memcpy(&quad, ag + i * Kp + kq * 4, 4);
        const __m512i av = _mm512_set1_epi32(quad);
        c[i][0] = _mm512_dpbusd_epi32(c[i][0], av, w0);
        c[i][1] = _mm512_dpbusd_epi32(c[i][1], av, w1);
      }
    }
    // signed codes were stored as q + 8: subtract 8 · Σ q_w; unsigned codes (spec §10.2) as they are
    const __m512i corr0 = p.act_unsigned ? _mm512_setzero_si512()
                                         : _mm512_slli_epi32(_mm512_loadu_si512(pan.wsum + g * kNB), 3);
    const __m512i corr1 = p.act_unsigned ? _mm512_setzero_si512()
                                         : _mm512_slli_epi32(_mm512_loadu_si512(pan.wsum + g * kNB + 16), 3);
    const __m512 sw0 = _mm512_loadu_ps(pan.sw + g * kNB), sw1 = _mm512_loadu_ps(pan.sw + g * kNB + 16);
    for (int i = 0; i < kRB; ++i) {
      const __m512 sa = _mm512_set1_ps((m + i < p.M) ? p.ascales[(m + i) * G + g] : 0.0f);
      const __m512 i0 = _mm512_cvtepi32_ps(_mm512_sub_epi32(c[i][0], corr0));
      const __m512 i1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(c[i][1], corr1));
      f[i][0] = _mm512_fmadd_ps(_mm512_mul_ps(sa, sw0), i0, f[i][0]);
      f[i][1] = _mm512_fmadd_ps(_mm512_mul_ps(sa, sw1), i1, f[i][1]);
    }
  }
  for (int i = 0; i < kRB; ++i) {
    _mm512_storeu_ps(acc[i], f[i][0]);
    _mm512_storeu_ps(acc[i] + 16, f[i][1]);
  }
}
#endif

void store_row(const GemmParams& p, int64_t m, int64_t n0, int64_t nn, const float* v) {
  if (p.ydtype == DType::f32) {
    std::memcpy(static_cast<float*>(p.y) + m * p.N + n0, v, sizeof(float) * nn);
  } else if (p.ydtype == DType::bf16) {
    uint16_t* y = static_cast<uint16_t*>(p.y) + m * p.N + n0;
    for (int64_t c = 0; c < nn; ++c) y[c] = f32_to_bf16(v[c]);
  } else {
    uint16_t* y = static_cast<uint16_t*>(p.y) + m * p.N + n0;
    for (int64_t c = 0; c < nn; ++c) y[c] = f32_to_f16(v[c]);
  }
}

}  // namespace

void gemm_tasks(const GemmParams& p, int64_t t0, int64_t t1) {
  const int64_t G = p.G, Kp = G * kGroup, Mp = padded_rows(p.M);
  const int64_t tiles_m = Mp / kRB;
  const int64_t tiles_per_chunk = (tiles_m + p.n_tasks_m - 1) / p.n_tasks_m;
  Panel pan;
  pan.w = static_cast<int16_t*>(alloc64(sizeof(int16_t) * Kp * kNB));
  pan.wsum = static_cast<int32_t*>(alloc64(sizeof(int32_t) * G * kNB));
  pan.sw = static_cast<float*>(alloc64(sizeof(float) * G * kNB));
  pan.lu = static_cast<float*>(alloc64(sizeof(float) * (p.r ? p.r : 1) * kNB));
  int64_t panel_n = -1;

  for (int64_t t = t0; t < t1; ++t) {
    const int64_t nblk = t / p.n_tasks_m, mchunk = t % p.n_tasks_m;
    const int64_t n0 = nblk * kNB, nn = imin(kNB, p.N - n0);
    if (panel_n != n0) {  // consecutive tasks of one thread usually share the column block
      build_panel(p, n0, pan);
      panel_n = n0;
    }
    const int64_t tile_end = imin(tiles_m, (mchunk + 1) * tiles_per_chunk);
    for (int64_t tile = mchunk * tiles_per_chunk; tile < tile_end; ++tile) {
      const int64_t m = tile * kRB;
      alignas(64) float acc[kRB][kNB];
#if SVDQ_VNNI
      gemm_groups_vnni(p, pan, m, acc);
#else
      const int16_t* a = p.a_unpacked + m * Kp;
      for (int i = 0; i < kRB; ++i)
        for (int n = 0; n < kNB; ++n) acc[i][n] = 0.0f;
      for (int64_t g = 0; g < G; ++g) {
        alignas(64) int16_t I[kRB][kNB];
        group_dot(a + g * kGroup, Kp, pan.w + g * kGroup * kNB, I);
        const float* sw = pan.sw + g * kNB;
        for (int i = 0; i < kRB; ++i) {
          const float sa = (m + i < p.M) ? p.ascales[(m + i) * G + g] : 0.0f;
          for (int n = 0; n < kNB; ++n) acc[i][n] += (sa * sw[n]) * float(I[i][n]);
        }
      }
#endif
      // epilogue: low-rank up (C(lora_act) · lora_upᵀ), bias, cast
      alignas(64) float lr[kRB][kNB] = {};
      for (int64_t j = 0; j < p.r; ++j) {
        const float* u = pan.lu + j * kNB;
        for (int i = 0; i < kRB; ++i) {
          const float la = (m + i < p.M) ? p.lora_act_c[(m + i) * p.r + j] : 0.0f;
          for (int n = 0; n < kNB; ++n) lr[i][n] += la * u[n];
        }
      }
      for (int i = 0; i < kRB && m + i < p.M; ++i) {
        float row[kNB];
        for (int n = 0; n < kNB; ++n) row[n] = (acc[i][n] + lr[i][n]) + pan.bias[n];
        store_row(p, m + i, n0, nn, row);
      }
    }
  }
  std::free(pan.w);
  std::free(pan.wsum);
  std::free(pan.sw);
  std::free(pan.lu);
}

}  // namespace svdq::cpu::SVDQ_ISA
