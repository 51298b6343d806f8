// quantize_act.cu — fused activation quantizer + low-rank down projection (docs/numerics.md §4.1).
//
//   x [M, K] bf16/fp16 ──► x̂ = x / λ ─► per (row, 64-group): s_a = amax/7, q = clamp(rint(x̂/s_a), -8, 7)
//                     │                    ─► qact int8 [M, Kp/2] (low nibble = even k), ascales fp32 [M, G]
//                     └──► lora_act[m, :] = (Σ_k x[m, k] · lora_down[k, :]) · lora_scales   fp32 [M, r]
//
// x is read from device memory exactly once (per rank chunk, see below); both results come from the same
// registers / shared-memory tile.
//
// ── Why it is shaped like this ──────────────────────────────────────────────────────────────────────────
// The op was designed as memory-bound. FLUX.1, M = 4608 tokens, K = 3072, r = 32, bf16:
//   read x 28.3 MB + write qact 7.1 MB + ascales 0.9 MB (+ lora_down 0.2 MB, L2-resident)  ≈ 36.3 MB
//   at the measured 4.19 TB/s copy bandwidth (H200, FACTS.md) → 8.7 µs floor; goal ≥ 60 % → ≤ 14.5 µs.
//   K = 12288: 145 MB → 34.6 µs floor, goal ≤ 58 µs.
// MEASURED (H200, 2026-11-26, benchmarks/results/cuda_layers_h200_2026-11-26_{a,b}.md): 57 µs at K = 3072
// (r = 0: 42 µs) and 187 µs at K = 12288 = 23-28 % of that run's 2.7 TB/s D2D copy, 4-6x the floor. It is
// bound by its instructions and their latency, not by memory: the SASS fast path is ~41 instructions per
// element, not ~20 — x/λ ~11 (MUFU.RCP of λ redone for each of the 4 rows), quant_nibble ~20 (each element in
// its own BSSY/BSYNC convergence region, so independent elements are not interleaved). A CTA step costs
// 5.6-7.2 µs whether or not it shares its SM (K-split sweep). Analysis and plan: docs/kernels.md §10.3-10.4.
// Low-rank FLOPs: 2·M·K·r = 0.9 GFLOP at K = 3072 → 1.4 µs of bf16 mma.sync (635 TOPS), hidden under the
// loads if the MMA is issued from shared memory while the next tile's loads are in flight.
// NOW (issue 11, docs/kernels.md §11; SASS budgets below launch_typed): ~25 instructions per element. x/λ is
// y = RN(x·r), e = fma(−y, λ, x), q = fma(e, r, y) with r = RN(1/λ) per column and step (3 instead of ~11),
// proven bit-exact against IEEE division by an exhaustive host test over every bf16×bf16 and fp16×fp16 pair
// (quantize_act_layout.cuh states the claims); rounding is branch-free (magic-constant FADDs, one near-tie test
// per 8 elements); every rare case (exact groups: tiny/huge/NaN/Inf amax; near-ties; unusable λ; K tails)
// runs out of line (__noinline__) with the spec's divisions. NaN/Inf in a group → s_a = NaN, codes 0.
// E4M3 = true writes each code as its float8_e4m3fn byte (svdq::quantize_act_e4m3).
// Predicted (not yet measured): r = 0 41.5 → 20-26 µs, r = 32 57 → 33-40 µs at K = 3072.
//
// ── Work split ─────────────────────────────────────────────────────────────────────────────────────────
// grid = (row_tiles = ceil(M/64), ksplit, rank_chunks), 256 threads (8 warps) per CTA.
// A CTA owns 64 rows × a contiguous run of K-steps (128 columns = 2 groups each) × one rank chunk (RC = 16,
// 32 or 64 ranks).
//
//   step tile (64 rows × 128 cols bf16 = 16 KB), 16-byte chunks, thread t owns chunks t + 256·i, i < 4:
//        col8:  0  1 ... 7 | 8 ... 15            row = t/16 + 16 i,  col8 = t % 16
//   row  0    [ t0 t1 ..t7 | t8 .. t15 ]         8 consecutive lanes = one (row, group): amax via 3 xor-
//   row  1    [ t16 ...    | ...   t31 ]         shuffles; each lane packs its 8 nibbles into one 32-bit
//   ...                                          word → 8 lanes write the group's 32 contiguous bytes.
//
//   Quantization: every thread, from registers, right after the loads (only CTAs with rank chunk 0).
//   Low-rank: the same registers are stored to shared memory (xs, rows padded to 272 B: conflict-free
//   ldmatrix), the lora_down slice [128 k × RC] likewise (ls, rows padded by 16 B), then warp w computes
//   rows 16·(w%4)..+15 × the n-tiles j ≡ w/4 (mod 2) of the chunk with mma.sync m16n8k16 (fp32 acc.),
//   A by ldmatrix.x4, B by ldmatrix.x2.trans. Accumulators: RC/16 n-tiles × 4 fp32 per lane (≤ 16 regs).
//   The next step's global loads are issued before this step's quantize+MMA (register double buffer), so
//   each CTA keeps 4×16 B of x + up to 4×16 B of lora_down per thread in flight.
//
// K-split and determinism: with M = 4608 there are only 72 row tiles for 132 SMs, so K is split (make_plan:
// ≥ 2 CTAs per SM, ≥ 4 steps per CTA). Splits write fp32 partials to a workspace [ksplit, M, r] and a second
// tiny kernel sums them in split order and applies lora_scales — deterministic, no atomics. Without a split
// the first kernel writes lora_act directly.
// Rank chunks: r > 64 runs rank_chunks CTAs per (row tile, split); each re-reads its x tile (from L2 mostly)
// and only chunk 0 quantizes. Large ranks (stacked LoRA) pay extra reads; r ≤ 64 pays none.
//
// Turing (sm_75) has no bf16 / m16n8k16 tensor-core MMA: the same tiles are reduced with fp32 FMAs from
// shared memory (slow but correct; accumulator layout identical, so the epilogue is shared).
//
// Compiled without fast-math: '/' is IEEE div.rn.f32 (the spec requires it).

#include "quantize_act.h"
#include "quantize_act_layout.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

// The sm_75 pass compiles the MMA helpers but the FMA fallback does not call them.
#pragma nv_diag_suppress 177

namespace svdq {
namespace cuda {
namespace {

using namespace svdq::qact;

constexpr int kXsStride = kBK + 8;  // elements per xs row: 136 (272 B; 68 words → 8 rows hit distinct banks)

template <typename T>
struct Cvt;
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float lo(uint32_t w) { return __uint_as_float(w << 16); }
  static __device__ __forceinline__ float hi(uint32_t w) { return __uint_as_float(w & 0xFFFF0000u); }
  static __device__ __forceinline__ float one(const void* p, int64_t i) {
    return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p)[i]);
  }
};
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float lo(uint32_t w) {
    return __half2float(__ushort_as_half((unsigned short)(w & 0xFFFFu)));
  }
  static __device__ __forceinline__ float hi(uint32_t w) {
    return __half2float(__ushort_as_half((unsigned short)(w >> 16)));
  }
  static __device__ __forceinline__ float one(const void* p, int64_t i) {
    return __half2float(reinterpret_cast<const __half*>(p)[i]);
  }
};

// mma.sync m16n8k16, fp32 accumulate. A row-major 16×16, B "col" 16×8 (k-major per thread).
template <typename T>
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], const uint32_t b[2]);

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float c[4], const uint32_t a[4], const uint32_t b[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
template <>
__device__ __forceinline__ void mma16816<__half>(float c[4], const uint32_t a[4], const uint32_t b[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
#endif
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t r[2], const void* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(p)));
#endif
}

struct KernelArgs {
  const void* x;
  int64_t M, K, ldx, kp_half, groups;  // groups = Kp/64
  const void* smooth;
  const void* lora_down;
  int r;
  const float* lora_scales;
  int8_t* qact;
  float* ascales;
  float* lora_act;
  float* workspace;
  int steps, steps_per_split, ksplit;
  bool smooth_fp32, x_vec, smooth_vec, ld_vec;
  bool recip_allowed;  // x̂ by the corrected reciprocal (div_by_recip); false: IEEE '/' (fp16 x with fp32 λ)
};

// ---- per-thread register state of one step ----
template <int LPT>
struct StepRegs {
  uint4 x[kChunksPerThread];     // 4 × 8 activations
  float lam[8];                  // λ of this thread's 8 columns
  uint4 ld[LPT > 0 ? LPT : 1];   // lora_down chunks
};

struct F8 {
  float v[8];
};

// Element-wise loads for a K tail or an unaligned x / lora_down (out of line: never on the hot path of an
// aligned model, and keeps the loop's SASS countable).
// λ of columns col..col+7 one by one (K tail or unaligned smooth); 1 beyond K (x is 0 there: x̂ = 0).
template <typename T>
__device__ __noinline__ F8 load_lam_slow(const void* smooth, bool fp32, int64_t col, int64_t K) {
  F8 l;
#pragma unroll
  for (int e = 0; e < 8; ++e)
    l.v[e] = col + e >= K ? 1.0f : fp32 ? reinterpret_cast<const float*>(smooth)[col + e] : Cvt<T>::one(smooth, col + e);
  return l;
}
__device__ __noinline__ uint4 load8_slow(const uint16_t* src, int64_t n) {
  uint32_t w[4] = {0, 0, 0, 0};
#pragma unroll
  for (int e = 0; e < 8; ++e)
    if (e < n) w[e / 2] |= (uint32_t)src[e] << (16 * (e % 2));
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// Per-thread addressing, computed once per CTA (the loop only adds constant strides: no 64-bit index
// products re-done per step and chunk). Chunk i of the thread is row row0 + tid/16 + 16 i, columns col8*8..+7
// of the step.
struct Cursor {
  const uint16_t* x;     // x of chunk 0 at step 0
  int64_t x_rows16;      // 16 rows of x, in elements
  int8_t* q;             // qact word/bytes of chunk 0 at step 0
  int64_t q_rows16;      // 16 rows of qact, in bytes
  float* sa;             // ascales of chunk 0, group 0 of the step's first 64 columns (+ col8/8)
  int64_t sa_rows16;     // 16 rows of ascales, in floats
  unsigned rows_ok;      // bit i: chunk i's row < M
};

template <bool E4M3>
__device__ __forceinline__ Cursor make_cursor(const KernelArgs& a, int64_t row0) {
  const int tid = threadIdx.x;
  const int col8 = tid % kChunksPerRow;
  const int64_t row = row0 + tid / kChunksPerRow;
  Cursor c;
  c.x = reinterpret_cast<const uint16_t*>(a.x) + row * a.ldx + col8 * 8;
  c.x_rows16 = 16 * a.ldx;
  const int64_t qrow = E4M3 ? 2 * a.kp_half : a.kp_half;
  c.q = a.qact + (E4M3 ? qact_e4m3_offset(row, 0, col8, qrow) : qact_word_offset(row, 0, col8, qrow));
  c.q_rows16 = 16 * qrow;
  c.sa = a.ascales + row * a.groups + col8 / 8;
  c.sa_rows16 = 16 * a.groups;
  c.rows_ok = 0;
#pragma unroll
  for (int i = 0; i < kChunksPerThread; ++i) c.rows_ok |= (row + 16 * i < a.M ? 1u : 0u) << i;
  static_assert(kThreads / kChunksPerRow == 16, "chunk i of a thread is 16 rows below chunk i-1");
  return c;
}

template <typename T, int RC>
__device__ __forceinline__ void load_step(StepRegs<RC * kBK / 8 / kThreads>& s, const KernelArgs& a,
                                          const Cursor& cur, int step, int rank0) {
  constexpr int LPT = RC * kBK / 8 / kThreads;
  const int tid = threadIdx.x;
  const int col8 = tid % kChunksPerRow;
  const int64_t col = (int64_t)step * kBK + col8 * 8;
  const bool vec = a.x_vec && col + 8 <= a.K;
  const uint16_t* xs = cur.x + (int64_t)step * kBK;
#pragma unroll
  for (int i = 0; i < kChunksPerThread; ++i) {
    uint4 v = make_uint4(0, 0, 0, 0);
    const uint16_t* src = xs + i * cur.x_rows16;
    if (cur.rows_ok & (1u << i)) {
      if (vec) {
        v = __ldg(reinterpret_cast<const uint4*>(src));
      } else {
        v = load8_slow(src, a.K - col);
      }
    }
    s.x[i] = v;
  }
  // λ for columns col..col+7 (1 beyond K: x is 0 there, so x̂ = 0).
  if (a.smooth_vec && col + 8 <= a.K) {
    if (a.smooth_fp32) {
      const float* lp = reinterpret_cast<const float*>(a.smooth) + col;
      float4 p0 = __ldg(reinterpret_cast<const float4*>(lp));
      float4 p1 = __ldg(reinterpret_cast<const float4*>(lp) + 1);
      s.lam[0] = p0.x; s.lam[1] = p0.y; s.lam[2] = p0.z; s.lam[3] = p0.w;
      s.lam[4] = p1.x; s.lam[5] = p1.y; s.lam[6] = p1.z; s.lam[7] = p1.w;
    } else {
      uint4 v = __ldg(reinterpret_cast<const uint4*>(reinterpret_cast<const uint16_t*>(a.smooth) + col));
      const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s.lam[2 * e] = Cvt<T>::lo(w[e]);
        s.lam[2 * e + 1] = Cvt<T>::hi(w[e]);
      }
    }
  } else {
    const F8 l = load_lam_slow<T>(a.smooth, a.smooth_fp32, col, a.K);
#pragma unroll
    for (int e = 0; e < 8; ++e) s.lam[e] = l.v[e];
  }
  // lora_down slice: rows step*128 .. +127, ranks rank0 .. rank0 + RC - 1, as 16-byte chunks.
  if constexpr (RC > 0) {
    constexpr int kCPR = RC / 8;  // chunks per k-row
#pragma unroll
    for (int i = 0; i < LPT; ++i) {
      const int c = tid + kThreads * i;
      const int64_t k = (int64_t)step * kBK + c / kCPR;
      const int rank = rank0 + (c % kCPR) * 8;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (k < a.K && rank < a.r) {
        const uint16_t* src = reinterpret_cast<const uint16_t*>(a.lora_down) + k * a.r + rank;
        if (a.ld_vec) {
          v = __ldg(reinterpret_cast<const uint4*>(src));
        } else {
          v = load8_slow(src, 8);  // r % 16 == 0: whole chunks
        }
      }
      s.ld[i] = v;
    }
  }
}

// The two rare paths, out of line: the loop body stays the fast path (no convergence region per element, a
// short I-cache footprint) and its SASS can be counted statically (tests/test_sass_budgets.py).
struct Q8 {
  uint32_t packed;
  float sa;
  F8 rv;
};
// Whole group with IEEE divisions (amax outside [2^-80, 2^120], NaN/Inf included). All 8 lanes of the
// group call it together (the condition is a function of the shuffled amax), so gmask is exact.
__device__ __noinline__ Q8 quant_group_exact(F8 xv, F8 lam, unsigned gmask) {
  F8 xh;
  Q8 q;
  float amax = xhat8(xv.v, lam.v, lam.v, false, xh.v);
  amax = amax_nan(amax, __shfl_xor_sync(gmask, amax, 1));
  amax = amax_nan(amax, __shfl_xor_sync(gmask, amax, 2));
  amax = amax_nan(amax, __shfl_xor_sync(gmask, amax, 4));
  q.sa = act_scale(amax);
  q.packed = quant8_ref(xh.v, q.sa, q.rv.v);
  return q;
}
// x̂ with IEEE divisions for a lane whose λ fail recip_ok (zero, subnormal, huge, Inf/NaN) or when the
// reciprocal is not proven for the dtypes (fp16 x with fp32 λ).
__device__ __noinline__ F8 xhat_ieee(F8 xv, F8 lam) {
  F8 xh;
#pragma unroll
  for (int e = 0; e < 8; ++e) xh.v[e] = xv.v[e] / lam.v[e];
  return xh;
}
// IEEE RN(1/λ) of 8 fp32 smoothing factors (rcp16_rn is proven for 16-bit λ only).
__device__ __noinline__ F8 rcp_ieee8(F8 lam) {
  F8 r;
#pragma unroll
  for (int e = 0; e < 8; ++e) r.v[e] = __frcp_rn(lam.v[e]);
  return r;
}
// One lane's 8 elements after a near-tie on the fast path (~1e-5 per element): the spec's divisions.
__device__ __noinline__ Q8 quant_lane_exact(F8 xh, float sa) {
  Q8 q;
  q.sa = sa;
  q.packed = quant8_ref(xh.v, sa, q.rv.v);
  return q;
}

// Quantize this thread's 4 chunks of the step and write qact / ascales. E4M3: qact holds one float8_e4m3fn
// byte per element ([M, Kp], the code as an exact e4m3 value) instead of two nibbles per byte.
//
// Per element on the fast path (SASS budget in tests/test_sass_budgets.py): convert 1, x̂ = x/λ by the
// corrected reciprocal 3, |max| 1, round by the magic constant + near-tie test 5, pack ~1.5. Per 8 elements
// (one lane's share of a (row, group)): 3 SHFL + s_a and RN(1/s_a) + the two rarely-taken exact branches.
// Per step: 8 IEEE reciprocals of λ (shared by the thread's 4 rows).
template <typename T, int LPT, bool E4M3>
__device__ __forceinline__ void quantize_step(const StepRegs<LPT>& s, const KernelArgs& a, const Cursor& cur,
                                              int step) {
  const int tid = threadIdx.x;
  const int col8 = tid % kChunksPerRow;
  const int64_t group = (int64_t)step * kGroupsPerStep + col8 / 8;
  // the 8 lanes of one (row, group) are lanes 8j..8j+7 of the warp (kChunksPerRow = 16, warp = 2 rows)
  const unsigned gmask = 0xFFu << (threadIdx.x & 24);
  float rcp[8];
  bool use_recip = a.recip_allowed;
  if (a.smooth_fp32) {  // uniform; general fp32 λ need the IEEE reciprocal
    F8 la;
#pragma unroll
    for (int e = 0; e < 8; ++e) la.v[e] = s.lam[e];
    const F8 r = rcp_ieee8(la);
#pragma unroll
    for (int e = 0; e < 8; ++e) rcp[e] = r.v[e];
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) rcp[e] = rcp16_rn(s.lam[e]);  // == RN(1/λ) for 16-bit λ (host-proven)
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) use_recip = use_recip && recip_ok(s.lam[e]);
#pragma unroll
  for (int i = 0; i < kChunksPerThread; ++i) {
    const uint32_t w[4] = {s.x[i].x, s.x[i].y, s.x[i].z, s.x[i].w};
    float xv[8], xh[8], rv[8];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      xv[2 * e] = Cvt<T>::lo(w[e]);
      xv[2 * e + 1] = Cvt<T>::hi(w[e]);
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) xh[e] = div_by_recip(xv[e], s.lam[e], rcp[e]);
    if (!use_recip) {  // per lane and step; never for bf16/fp16 models with ordinary smoothing factors
      F8 xa, la;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        xa.v[e] = xv[e];
        la.v[e] = s.lam[e];
      }
      const F8 xi = xhat_ieee(xa, la);
#pragma unroll
      for (int e = 0; e < 8; ++e) xh[e] = xi.v[e];
    }
    float amax = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) amax = amax_nan(amax, xh[e]);
    amax = amax_nan(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
    amax = amax_nan(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
    amax = amax_nan(amax, __shfl_xor_sync(0xffffffffu, amax, 4));
    float sa;
    uint32_t packed;
    if (group_needs_exact(amax)) {  // uniform over the 8 lanes of the group: rare (tiny / huge / NaN / Inf)
      F8 xa, la;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        xa.v[e] = xv[e];
        la.v[e] = s.lam[e];
      }
      const Q8 q = quant_group_exact(xa, la, gmask);
      sa = q.sa;
      packed = q.packed;
#pragma unroll
      for (int e = 0; e < 8; ++e) rv[e] = q.rv.v[e];
    } else {
      sa = act_scale_fast(amax);  // == amax / 7 in this range (host-proven)
      bool near = false;
      packed = quant8_fast(xh, rcp_approx(sa), near, rv);
      if (near) {
        F8 xa;
#pragma unroll
        for (int e = 0; e < 8; ++e) xa.v[e] = xh[e];
        const Q8 q = quant_lane_exact(xa, sa);
        packed = q.packed;
#pragma unroll
        for (int e = 0; e < 8; ++e) rv[e] = q.rv.v[e];
      }
    }
    if ((cur.rows_ok & (1u << i)) && group < a.groups) {
      if constexpr (E4M3) {
        uint32_t b[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
          uint16_t lo, hi;  // cvt packs (first operand → upper byte)
          asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(lo) : "f"(rv[4 * h + 1]), "f"(rv[4 * h]));
          asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(hi) : "f"(rv[4 * h + 3]), "f"(rv[4 * h + 2]));
          b[h] = (uint32_t)lo | ((uint32_t)hi << 16);
#else
          b[h] = e4m3_of_int_float(rv[4 * h]) | e4m3_of_int_float(rv[4 * h + 1]) << 8 |
                 e4m3_of_int_float(rv[4 * h + 2]) << 16 | e4m3_of_int_float(rv[4 * h + 3]) << 24;
#endif
        }
        *reinterpret_cast<uint2*>(cur.q + i * cur.q_rows16 + (int64_t)step * kBK) = make_uint2(b[0], b[1]);
      } else {
        *reinterpret_cast<uint32_t*>(cur.q + i * cur.q_rows16 + (int64_t)step * (kBK / 2)) = packed;
      }
      if (col8 % 8 == 0) cur.sa[i * cur.sa_rows16 + (int64_t)step * kGroupsPerStep] = sa;
    }
  }
}

// Main kernel. RC = ranks per CTA (0: no low-rank branch).
template <typename T, int RC, bool E4M3>
__global__ void __launch_bounds__(kThreads, RC == 64 ? 1 : 2) quantize_act_kernel(const KernelArgs a) {
  constexpr int LPT = RC * kBK / 8 / kThreads;
  constexpr int kLsStride = RC + 8;  // elements per ls row (16 B padding)
  constexpr int NTW = RC / 16;       // n-tiles per warp (warps 0-3 take even n-tiles, 4-7 odd)
  static_assert(RC == 0 || RC == 16 || RC == 32 || RC == 64, "rank chunk");
  static_assert(RC == 0 || RC * kBK / 8 % kThreads == 0, "lora_down tile must split evenly");

  __shared__ __align__(16) uint16_t xs[RC > 0 ? kBM * kXsStride : 8];
  __shared__ __align__(16) uint16_t ls[RC > 0 ? kBK * kLsStride : 8];

  const int64_t row0 = (int64_t)blockIdx.x * kBM;
  const int split = blockIdx.y;
  const int rank0 = blockIdx.z * (RC > 0 ? RC : 0);
  const bool do_quant = blockIdx.z == 0;
  const int step_begin = split * a.steps_per_split;
  const int step_end = min(a.steps, step_begin + a.steps_per_split);
  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;

  float acc[NTW > 0 ? NTW : 1][4];
#pragma unroll
  for (int j = 0; j < (NTW > 0 ? NTW : 1); ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;

  const Cursor cs = make_cursor<E4M3>(a, row0);
  StepRegs<LPT> cur, nxt;
  if (step_begin < step_end) load_step<T, RC>(cur, a, cs, step_begin, rank0);

  for (int step = step_begin; step < step_end; ++step) {
    if (step + 1 < step_end) load_step<T, RC>(nxt, a, cs, step + 1, rank0);  // in flight during this step
    if (do_quant) quantize_step<T, LPT, E4M3>(cur, a, cs, step);
    if constexpr (RC > 0) {
      // registers → shared memory
#pragma unroll
      for (int i = 0; i < kChunksPerThread; ++i)
        *reinterpret_cast<uint4*>(&xs[chunk_row(tid, i) * kXsStride + chunk_col8(tid, i) * 8]) = cur.x[i];
#pragma unroll
      for (int i = 0; i < LPT; ++i) {
        const int c = tid + kThreads * i;
        *reinterpret_cast<uint4*>(&ls[(c / (RC / 8)) * kLsStride + (c % (RC / 8)) * 8]) = cur.ld[i];
      }
      __syncthreads();
      const int mrow = (warp % 4) * 16;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#pragma unroll
      for (int kk = 0; kk < kBK / 16; ++kk) {
        uint32_t af[4];
        ldmatrix_x4(af, &xs[(mrow + lane % 16) * kXsStride + kk * 16 + (lane / 16) * 8]);
#pragma unroll
        for (int j = 0; j < NTW; ++j) {
          const int nt = 2 * j + warp / 4;
          uint32_t bf[2];
          ldmatrix_x2_trans(bf, &ls[(kk * 16 + lane % 16) * kLsStride + nt * 8]);
          mma16816<T>(acc[j], af, bf);
        }
      }
#else
      // sm_75: fp32 FMAs with the MMA's accumulator layout (c0: row g, col 2c; c1: col 2c+1; c2/c3: row g+8).
      {
        const int g = lane / 4, c = lane % 4;
#pragma unroll 1
        for (int k = 0; k < kBK; ++k) {
          const float x0 = Cvt<T>::one(xs, (mrow + g) * kXsStride + k);
          const float x1 = Cvt<T>::one(xs, (mrow + g + 8) * kXsStride + k);
#pragma unroll
          for (int j = 0; j < NTW; ++j) {
            const int n = (2 * j + warp / 4) * 8 + 2 * c;
            const float b0 = Cvt<T>::one(ls, k * kLsStride + n);
            const float b1 = Cvt<T>::one(ls, k * kLsStride + n + 1);
            acc[j][0] = fmaf(x0, b0, acc[j][0]);
            acc[j][1] = fmaf(x0, b1, acc[j][1]);
            acc[j][2] = fmaf(x1, b0, acc[j][2]);
            acc[j][3] = fmaf(x1, b1, acc[j][3]);
          }
        }
      }
#endif
      __syncthreads();  // xs / ls are rewritten next step
    }
    if (step + 1 < step_end) cur = nxt;
  }

  if constexpr (RC > 0) {
    // Epilogue: lanes hold rows mrow+g, mrow+g+8 and ranks 2c, 2c+1 of each of their n-tiles.
    const int g = lane / 4, c = lane % 4;
    const int64_t mrow = row0 + (warp % 4) * 16;
#pragma unroll
    for (int j = 0; j < NTW; ++j) {
      const int rank = rank0 + (2 * j + warp / 4) * 8 + 2 * c;
      if (rank >= a.r) continue;  // r % 16 == 0, so rank + 1 < r too
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t row = mrow + g + 8 * h;
        if (row >= a.M) continue;
        float v0 = acc[j][2 * h], v1 = acc[j][2 * h + 1];
        if (a.ksplit == 1) {
          if (a.lora_scales) {
            v0 *= a.lora_scales[rank];
            v1 *= a.lora_scales[rank + 1];
          }
          *reinterpret_cast<float2*>(a.lora_act + row * a.r + rank) = make_float2(v0, v1);
        } else {
          *reinterpret_cast<float2*>(a.workspace + ((int64_t)split * a.M + row) * a.r + rank) =
              make_float2(v0, v1);
        }
      }
    }
  }
}

// lora_act[m, j] = (Σ_s partial[s, m, j]) · scale[j], splits summed in order (deterministic).
__global__ void __launch_bounds__(256) reduce_splits_kernel(const float* __restrict__ ws, int ksplit, int64_t mr,
                                                            int r, const float* __restrict__ scales,
                                                            float* __restrict__ out) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= mr) return;
  float s = 0.f;
  for (int k = 0; k < ksplit; ++k) s += ws[(int64_t)k * mr + i];
  if (scales) s *= scales[i % r];
  out[i] = s;
}

// CTAs of quantize_act_kernel resident at once on the current device (SMs × occupancy), cached per device
// and rank chunk (occupancy differs by RC through registers / shared memory).
template <typename T, int RC>
int occupancy_per_sm() {
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, quantize_act_kernel<T, RC, false>, kThreads, 0) != cudaSuccess ||
      n < 1) {
    (void)cudaGetLastError();
    n = 1;
  }
  return n;
}

int resident_slots(int rank_chunk) {
  static int cached[64][4] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return 264;
  }
  const int idx = rank_chunk == 0 ? 0 : rank_chunk == 16 ? 1 : rank_chunk == 32 ? 2 : 3;
  if (dev >= 0 && dev < 64 && cached[dev][idx] > 0) return cached[dev][idx];
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0) {
    (void)cudaGetLastError();
    sms = 132;
  }
  // bf16 and fp16 instantiations have identical resources; ask the bf16 one.
#if defined(SVDQ_SASS_BUDGET_BUILD)
  int occ = idx == 0 ? occupancy_per_sm<__nv_bfloat16, 0>() : occupancy_per_sm<__nv_bfloat16, 32>();
#else
  int occ = idx == 0 ? occupancy_per_sm<__nv_bfloat16, 0>()
          : idx == 1 ? occupancy_per_sm<__nv_bfloat16, 16>()
          : idx == 2 ? occupancy_per_sm<__nv_bfloat16, 32>()
                     : occupancy_per_sm<__nv_bfloat16, 64>();
#endif
  const int slots = sms * occ;
  if (dev >= 0 && dev < 64) cached[dev][idx] = slots;
  return slots;
}

QuantPlan plan_for(int64_t M, int64_t K, int r, int ksplit_override) {
  const int rc = r == 0 ? 0 : (r <= 16 ? 16 : (r <= 32 ? 32 : 64));
  return make_plan(M, K, r, resident_slots(rc), ksplit_override);
}

// SASS budgets (tests/test_sass_budgets.py compiles this file for the arch and counts the hot step loop of the
// kernel: the loop body minus the out-of-line rare paths, divided by the 32 elements a thread quantizes per
// step). Format: SASS-BUDGET sm_<arch> <mangled-name substring> <per-element|per-warp-group> <max>.
// Measured when set (nvcc 13.0, 2026-11-30): 24.75 / 27.9 / 24.3. Where they go (r = 0, per element): x/λ 3
// (corrected reciprocal), convert 1, |max| 1, round + near-tie 5, pack ~2, per-8-lane-group work ~2 (3 SHFL +
// max, s_a by the 3-op /7, MUFU.RCP, 2 range checks, near test, store), per-step loads + 8 reciprocals of λ
// + their range checks ~8 (64-bit addressing recomputed per step). The old kernel: ~41 (docs/kernels.md §10.3).
// SASS-BUDGET sm_90 quantize_act_kernelI13__nv_bfloat16Li0ELb0E per-element 26.0
// SASS-BUDGET sm_90 quantize_act_kernelI13__nv_bfloat16Li32ELb0E per-element 29.5
// SASS-BUDGET sm_90 quantize_act_kernelI13__nv_bfloat16Li0ELb1E per-element 26.0
// (r = 32 adds per element ~3: the xs/ls shared-memory stores, 16 HMMA + 24 LDSM per step, 2 barriers.)
//
// SVDQ_SASS_BUDGET_BUILD (the budget test only): instantiate just the budgeted kernels, so that the test
// compiles one architecture in seconds instead of all 16 instantiations.
template <typename T, bool E4M3>
cudaError_t launch_typed(const KernelArgs& a, const QuantPlan& p, cudaStream_t stream) {
#if defined(SVDQ_SASS_BUDGET_BUILD)
  if constexpr (!std::is_same<T, __nv_bfloat16>::value) {
    return cudaErrorInvalidValue;
  } else {
    dim3 grid(p.row_tiles, p.ksplit, p.rank_chunks);
    if (p.rank_chunk == 0) quantize_act_kernel<T, 0, E4M3><<<grid, kThreads, 0, stream>>>(a);
    else quantize_act_kernel<T, 32, false><<<grid, kThreads, 0, stream>>>(a);
    return cudaGetLastError();
  }
#else
  dim3 grid(p.row_tiles, p.ksplit, p.rank_chunks);
  switch (p.rank_chunk) {
    case 0: quantize_act_kernel<T, 0, E4M3><<<grid, kThreads, 0, stream>>>(a); break;
    case 16: quantize_act_kernel<T, 16, E4M3><<<grid, kThreads, 0, stream>>>(a); break;
    case 32: quantize_act_kernel<T, 32, E4M3><<<grid, kThreads, 0, stream>>>(a); break;
    case 64: quantize_act_kernel<T, 64, E4M3><<<grid, kThreads, 0, stream>>>(a); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
#endif
}

}  // namespace

size_t quantize_act_workspace_bytes(int64_t M, int64_t K, int r, int ksplit_override) {
  if (M <= 0 || K <= 0 || r <= 0) return 0;
  const QuantPlan p = plan_for(M, K, r, ksplit_override);
  return p.ksplit > 1 ? (size_t)p.ksplit * (size_t)M * (size_t)r * sizeof(float) : 0;
}

cudaError_t launch_quantize_act(const QuantizeActParams& p, cudaStream_t stream) {
  if (p.M < 0 || p.K < 1 || p.ldx < p.K || p.r < 0 || p.r % 16 != 0 || p.r > 512) return cudaErrorInvalidValue;
  if (!p.x && p.M > 0) return cudaErrorInvalidValue;
  if (!p.smooth || (p.r > 0 && (!p.lora_down || !p.lora_act))) return cudaErrorInvalidValue;
  if (p.M == 0) return cudaSuccess;
  if (!p.qact || !p.ascales) return cudaErrorInvalidValue;
  // Grid limits: y (ksplit ≤ 16) and z (≤ 32 rank chunks) are small; x ≤ 2^31 - 1 row tiles.
  if ((p.M + kBM - 1) / kBM > 0x7fffffffLL) return cudaErrorInvalidValue;

  const QuantPlan plan = plan_for(p.M, p.K, p.r, p.ksplit_override);
  if (plan.ksplit > 1 && p.r > 0 && !p.workspace) return cudaErrorInvalidValue;

  KernelArgs a;
  a.x = p.x;
  a.M = p.M;
  a.K = p.K;
  a.ldx = p.ldx;
  const int64_t kp = (p.K + kGroup - 1) / kGroup * kGroup;
  a.kp_half = kp / 2;
  a.groups = kp / kGroup;
  a.smooth = p.smooth;
  a.lora_down = p.lora_down;
  a.r = p.r;
  a.lora_scales = p.lora_scales;
  a.qact = p.qact;
  a.ascales = p.ascales;
  a.lora_act = p.lora_act;
  a.workspace = p.workspace;
  a.steps = plan.steps;
  a.steps_per_split = plan.steps_per_split;
  a.ksplit = p.r > 0 ? plan.ksplit : 1;
  a.smooth_fp32 = p.smooth_fp32;
  // The corrected-reciprocal division is proven for bf16 x with any λ and fp16 x with fp16 λ (host test).
  a.recip_allowed = !(p.smooth_fp32 && p.dtype == ActDtype::kFP16);
  a.x_vec = (reinterpret_cast<uintptr_t>(p.x) % 16 == 0) && (p.ldx % 8 == 0);
  a.smooth_vec = reinterpret_cast<uintptr_t>(p.smooth) % 16 == 0;
  a.ld_vec = p.r > 0 && reinterpret_cast<uintptr_t>(p.lora_down) % 16 == 0;

  QuantPlan lp = plan;
  if (p.r == 0) {
    lp.rank_chunk = 0;
    lp.rank_chunks = 1;
  }
  const bool bf = p.dtype == ActDtype::kBF16;
  cudaError_t err = p.e4m3 ? (bf ? launch_typed<__nv_bfloat16, true>(a, lp, stream)
                                 : launch_typed<__half, true>(a, lp, stream))
                           : (bf ? launch_typed<__nv_bfloat16, false>(a, lp, stream)
                                 : launch_typed<__half, false>(a, lp, stream));
  if (err != cudaSuccess) return err;
  if (p.r > 0 && a.ksplit > 1) {
    const int64_t mr = p.M * p.r;
    const int64_t blocks = (mr + 255) / 256;
    reduce_splits_kernel<<<(unsigned)blocks, 256, 0, stream>>>(p.workspace, a.ksplit, mr, p.r, p.lora_scales,
                                                               p.lora_act);
    err = cudaGetLastError();
  }
  return err;
}

}  // namespace cuda
}  // namespace svdq
