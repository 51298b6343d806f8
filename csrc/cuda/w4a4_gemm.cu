// w4a4_gemm.cu — W4A4 GEMM with per-64-group scales and a fused low-rank up-projection epilogue.
// Numerics: docs/numerics.md §4.2. Design (tiles, layouts, pipeline, why): docs/kernels.md.
// Every index below comes from csrc/cuda/mma_layout.cuh, whose functions are tested on the CPU.
//
//   grid  = (ceil(N / 128), ceil(M / 128)), block = 256 threads = 8 warps as 2 (M) x 4 (N), warp tile 64 x 32
//   k-loop: one 64-wide scale group per stage, kStages-deep cp.async pipeline, one __syncthreads per stage
//   per stage and warp: 4 ldmatrix.x4 (A) + 2 ldmatrix.x4 (B), then
//     kInt4: 16 x mma.m16n8k64.s4                  (sm_75: 4 x m8n8k32 each)
//     kInt8: 32 x mma.m16n8k32.s8 on nibbles moved to the high half of each byte (x16, exact)
//   promotion per group: the first mma of a group adds into the magic constant 0x4B400000, so the int32
//   result *is* the float 1.5*2^23 + I; then t = fma(that, s_w, -1.5*2^23*s_w)  (exact constant: s_w has
//   <= 11 significant bits) and acc = fma(t, s_a, acc): 2 FP32 instructions per element per group.
//   epilogue: acc += bf16/fp16(lora_act) . lora_up^T with mma.m16n8k16 (fp32 acc), + bias, cast, store.
#include "w4a4_gemm.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <type_traits>

#include "mma_layout.cuh"

namespace svdq::cuda {
namespace {

using namespace layout;

#ifdef __CUDA_ARCH__
constexpr int kArch = __CUDA_ARCH__;
#else
constexpr int kArch = 0;
#endif

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- global -> shared copies. cp.async (sm_80+) with zero-fill when !pred; sm_75 has no cp.async and
// copies synchronously through registers (the commit/wait calls then do nothing, the barriers still order).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
               "r"(pred ? 16 : 0));
#else
  *reinterpret_cast<uint4*>(smem) = pred ? *reinterpret_cast<const uint4*>(gmem) : make_uint4(0, 0, 0, 0);
#endif
}
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool pred) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
               "r"(pred ? 4 : 0));
#else
  *reinterpret_cast<uint32_t*>(smem) = pred ? *reinterpret_cast<const uint32_t*>(gmem) : 0u;
#endif
}
// The same two copies with a shared-memory address already in the .shared window (the hoisted loader keeps
// it in a register instead of converting a generic pointer every group).
__device__ __forceinline__ void cp_async16_s(uint32_t saddr, const void* gmem, bool pred) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(saddr), "l"(gmem), "r"(pred ? 16 : 0));
#else
  extern __shared__ __align__(128) uint8_t smem[];
  cp_async16(smem + (saddr - smem_u32(smem)), gmem, pred);
#endif
}
__device__ __forceinline__ void cp_async4_s(uint32_t saddr, const void* gmem, bool pred) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(saddr), "l"(gmem), "r"(pred ? 4 : 0));
#else
  extern __shared__ __align__(128) uint8_t smem[];
  cp_async4(smem + (saddr - smem_u32(smem)), gmem, pred);
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// ---- ldmatrix: four 8x16-byte matrices; register q <- matrix q (mapping: mma_layout.cuh §2).
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem)));
}

// ---- integer MMAs. d = a . b + c, all s32.
// m16n8k64 s4; on sm_75 (no m16n8k64) as four m8n8k32: rows gid / gid+8 x k halves 0-31 / 32-63.
__device__ __forceinline__ void mma_s4(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                       const int (&c)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(c[0]), "r"(c[1]), "r"(c[2]),
        "r"(c[3]));
#elif defined(__CUDA_ARCH__)
  int t0, t1, t2, t3;
  asm volatile("mma.sync.aligned.m8n8k32.row.col.s32.s4.s4.s32 {%0,%1}, {%2}, {%3}, {%4,%5};\n"
               : "=r"(t0), "=r"(t1) : "r"(a[0]), "r"(b0), "r"(c[0]), "r"(c[1]));
  asm volatile("mma.sync.aligned.m8n8k32.row.col.s32.s4.s4.s32 {%0,%1}, {%2}, {%3}, {%4,%5};\n"
               : "=r"(d[0]), "=r"(d[1]) : "r"(a[2]), "r"(b1), "r"(t0), "r"(t1));
  asm volatile("mma.sync.aligned.m8n8k32.row.col.s32.s4.s4.s32 {%0,%1}, {%2}, {%3}, {%4,%5};\n"
               : "=r"(t2), "=r"(t3) : "r"(a[1]), "r"(b0), "r"(c[2]), "r"(c[3]));
  asm volatile("mma.sync.aligned.m8n8k32.row.col.s32.s4.s4.s32 {%0,%1}, {%2}, {%3}, {%4,%5};\n"
               : "=r"(d[2]), "=r"(d[3]) : "r"(a[3]), "r"(b1), "r"(t2), "r"(t3));
#endif
}
// m16n8k32 s8 (sm_80+).
__device__ __forceinline__ void mma_s8(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                       const int (&c)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(c[0]), "r"(c[1]), "r"(c[2]),
        "r"(c[3]));
#endif
}
// m16n8k16 bf16/fp16 -> f32, d += a . b (sm_80+).
template <typename T>
__device__ __forceinline__ void mma_16bit(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

template <typename T>
__device__ __forceinline__ float to_f32(T v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(v); else return __half2float(v);
}
template <typename T>
__device__ __forceinline__ T from_f32(float v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(v); else return __float2half_rn(v);
}
// Two fp32 -> one 32-bit register of two 16-bit values, x in the low half (= lower k / lower column).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float x, float y) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
    return *reinterpret_cast<uint32_t*>(&h);
  } else {
    __half2 h = __floats2half2_rn(x, y);
    return *reinterpret_cast<uint32_t*>(&h);
  }
}

// The kernel. T = output / lora_up / bias dtype (__nv_bfloat16 or __half); PATH = MmaPath.
template <typename T, int PATH>
__global__ void __launch_bounds__(kThreads, 1) w4a4_gemm_kernel(const W4A4GemmParams p) {
  // sm_75 has no m16n8k32 s8: the kInt8 kernel is empty there (the launcher refuses it).
  constexpr bool kSupported = !(PATH == int(MmaPath::kInt8) && kArch > 0 && kArch < 800);
  if constexpr (kSupported) {
    extern __shared__ __align__(128) uint8_t smem[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp / kWarpsN, wn = warp % kWarpsN;  // warp tile origin (wm*64, wn*32) in the CTA tile
    const int m0 = blockIdx.y * kBM, n0 = blockIdx.x * kBN;
    const int M = p.M, N = p.N, R = p.R, G = p.K / kGroup;

    // ---- stage loader: each thread moves one 16-byte chunk of A and one of B, plus one scale.
    int ld_row, ld_chunk;
    loader_chunk(tid, &ld_row, &ld_chunk);
    const bool a_ok = m0 + ld_row < M;
    const uint8_t* a_src = reinterpret_cast<const uint8_t*>(p.qact) +
                           int64_t(a_ok ? m0 + ld_row : 0) * (p.K / 2) + ld_chunk * 16;
    const int ld_dst = smem_tile_offset(ld_row, ld_chunk);
    // Prepared B (group-major [G][N][32 B]): rows n0.. of group g are one contiguous run.
    const bool b_ok = n0 + ld_row < N;
    const uint8_t* b_src = reinterpret_cast<const uint8_t*>(p.qweight) +
                           int64_t(b_ok ? n0 + ld_row : 0) * kRowBytes + ld_chunk * 16;
    // Scales: threads 0..127 fetch s_a of row m0+tid, threads 128..255 s_w of column n0+tid-128.
    const int s_idx = tid & (kBM - 1);
    const bool sa_ok = tid < kBM && m0 + s_idx < M;
    const bool sw_ok = tid >= kBM && n0 + s_idx < N;
    const float* sa_src = p.ascales + int64_t(sa_ok ? m0 + s_idx : 0) * G;
    const float* sw_src = reinterpret_cast<const float*>(p.wscales) + (sw_ok ? n0 + s_idx : 0);
    static_assert(kBM == kBN && kBM + kBN == kThreads, "one scale per thread");

    auto load_stage = [&](int slot, int g) {
      uint8_t* st = smem + slot * kStageBytes;
      cp_async16(st + kSmemA + ld_dst, a_src + g * kRowBytes, a_ok);
      cp_async16(st + kSmemB + ld_dst, b_src + int64_t(g) * N * kRowBytes, b_ok);
      if (tid < kBM) cp_async4(st + kSmemSA + s_idx * 4, sa_src + g, sa_ok);
      else cp_async4(st + kSmemSW + s_idx * 4, sw_src + int64_t(g) * N, sw_ok);
    };
    // ---- low-rank loader: ranks [32c, 32c + 32) of lora_act rows m0.. and lora_up rows n0.. (zero-filled
    // past M, N and R).
    float* s_lact = reinterpret_cast<float*>(smem + kSmemLoraAct);
    T* s_lup = reinterpret_cast<T*>(smem + kSmemLoraUp);
    const T* g_lup = reinterpret_cast<const T*>(p.lora_up);
    auto load_lora = [&](int c) {
#pragma unroll
      for (int i = tid; i < kBM * (kLoraChunk / 4); i += kThreads) {
        const int row = i / (kLoraChunk / 4), col = (i % (kLoraChunk / 4)) * 4;
        const bool ok = m0 + row < M && c * kLoraChunk + col < R;
        cp_async16(s_lact + smem_lact_offset_f(row, col),
                   p.lora_act + (ok ? int64_t(m0 + row) * R + c * kLoraChunk + col : 0), ok);
      }
#pragma unroll
      for (int i = tid; i < kBN * (kLoraChunk / 8); i += kThreads) {
        const int row = i / (kLoraChunk / 8), col = (i % (kLoraChunk / 8)) * 8;
        const bool ok = n0 + row < N && c * kLoraChunk + col < R;
        cp_async16(s_lup + smem_lup_offset_h(row, col),
                   g_lup + (ok ? int64_t(n0 + row) * R + c * kLoraChunk + col : 0), ok);
      }
    };

    // ---- prologue: stages 0 .. kStages-2 in flight; the first lora chunk rides with stage 0.
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < G) load_stage(s, s);
      if (s == 0 && R > 0) load_lora(0);
      cp_async_commit();
    }

    float acc[kMT][kNT][4];
#pragma unroll
    for (int i = 0; i < kMT; ++i)
#pragma unroll
      for (int j = 0; j < kNT; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.f;
    // int8 path: both operands are 16 * q and the mma returns 256 * I; its own magic constant (1.5 * 2^15,
    // ulp 2^-8) reads that as 1.5 * 2^15 + I, so neither path multiplies by 1/256 (mma_layout.cuh).
    constexpr int kMagicBits = int(PATH == int(MmaPath::kInt8) ? kMagicI8 : kMagicI);  // = magic_bits(PATH)
    constexpr float kMagicVal = PATH == int(MmaPath::kInt8) ? kMagicF8 : kMagicF;
    const int magic[4] = {kMagicBits, kMagicBits, kMagicBits, kMagicBits};

    // Per-lane fragment source rows/chunks for ldmatrix (constant over the k-loop).
    int a_row, a_chunk, b_row, b_chunk;
    ldsm_a_src(lane, &a_row, &a_chunk);
    ldsm_b_src(lane, &b_row, &b_chunk);

    // Hoisted loader (issue 11): the next stage's global sources and shared destinations live in registers and
    // advance by constant strides, instead of being rebuilt from the kernel parameters every group (the
    // compiler rematerialized 60 address instructions per warp and group when they were derived in the loop).
    const uint8_t* a_next = a_src + (kStages - 1) * kRowBytes;
    const uint8_t* b_next = b_src + int64_t(kStages - 1) * N * kRowBytes;
    const int64_t b_step = int64_t(N) * kRowBytes;
    const bool s_is_a = tid < kBM;
    const float* s_next = s_is_a ? sa_src + (kStages - 1) : sw_src + int64_t(kStages - 1) * N;
    const int s_step = s_is_a ? 1 : N;
    const bool s_ok = s_is_a ? sa_ok : sw_ok;
    const uint32_t smem0 = smem_u32(smem);
    const uint32_t a_dst = smem0 + kSmemA + ld_dst, b_dst = smem0 + kSmemB + ld_dst;
    const uint32_t s_dst = smem0 + (s_is_a ? kSmemSA : kSmemSW) + s_idx * 4;
    uint32_t slot_off = (kStages - 1) * kStageBytes;  // slot of group g + kStages - 1

    for (int g = 0; g < G; ++g) {
      // Stage g has landed once at most kStages-2 newer groups are pending; the barrier also tells every
      // warp that slot (g-1) % kStages is free, so it can be refilled with stage g + kStages - 1 right away.
      cp_async_wait<kStages - 2>();
      __syncthreads();
      if (g + kStages - 1 < G) {
        cp_async16_s(a_dst + slot_off, a_next, a_ok);
        cp_async16_s(b_dst + slot_off, b_next, b_ok);
        cp_async4_s(s_dst + slot_off, s_next, s_ok);
      }
      cp_async_commit();  // always (possibly empty): keeps the wait_group arithmetic uniform
      a_next += kRowBytes;
      b_next += b_step;
      s_next += s_step;
      slot_off = slot_off == (kStages - 1) * kStageBytes ? 0 : slot_off + kStageBytes;
      const uint8_t* st = smem + (g % kStages) * kStageBytes;

      uint32_t a[kMT][4], b[kNT][2];
#pragma unroll
      for (int i = 0; i < kMT; ++i)
        ldsm_x4(a[i], st + kSmemA + smem_tile_offset(wm * kWM + i * 16 + a_row, a_chunk));
#pragma unroll
      for (int jj = 0; jj < kNT / 2; ++jj) {
        uint32_t r[4];
        ldsm_x4(r, st + kSmemB + smem_tile_offset(wn * kWN + jj * 16 + b_row, b_chunk));
        b[2 * jj][0] = r[0];
        b[2 * jj][1] = r[1];
        b[2 * jj + 1][0] = r[2];
        b[2 * jj + 1][1] = r[3];
      }

      int iacc[kMT][kNT][4];
      if constexpr (PATH == int(MmaPath::kInt4)) {
#pragma unroll
        for (int i = 0; i < kMT; ++i)
#pragma unroll
          for (int j = 0; j < kNT; ++j) mma_s4(iacc[i][j], a[i], b[j][0], b[j][1], magic);
      } else {
#pragma unroll
        for (int step = 0; step < 2; ++step) {
          uint32_t b8[kNT][2];
#pragma unroll
          for (int j = 0; j < kNT; ++j)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              int src, hi;
              s8_b_source(step, r, &src, &hi);
              b8[j][r] = hi ? unpack_hi(b[j][src]) : unpack_lo(b[j][src]);
            }
#pragma unroll
          for (int i = 0; i < kMT; ++i) {
            uint32_t a8[4];
#pragma unroll
            for (int r = 0; r < 4; ++r) {
              int src, hi;
              s8_a_source(step, r, &src, &hi);
              a8[r] = hi ? unpack_hi(a[i][src]) : unpack_lo(a[i][src]);
            }
#pragma unroll
            for (int j = 0; j < kNT; ++j) {
              if (step == 0) mma_s8(iacc[i][j], a8, b8[j][0], b8[j][1], magic);
              else mma_s8(iacc[i][j], a8, b8[j][0], b8[j][1], iacc[i][j]);
            }
          }
        }
      }

      // ---- promotion: acc += s_a * (s_w * I), I read through the magic constant (see top of file).
      const float* s_sa = reinterpret_cast<const float*>(st + kSmemSA);
      const float* s_sw = reinterpret_cast<const float*>(st + kSmemSW);
      float sa[kMT][2], sw[kNT][2], swc[kNT][2];
#pragma unroll
      for (int i = 0; i < kMT; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) sa[i][h] = s_sa[wm * kWM + i * 16 + frag_c_m16n8(lane, 2 * h).row];
#pragma unroll
      for (int j = 0; j < kNT; ++j)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          sw[j][c] = s_sw[wn * kWN + j * 8 + frag_c_m16n8(lane, c).col];
          swc[j][c] = -kMagicVal * sw[j][c];
        }
#pragma unroll
      for (int i = 0; i < kMT; ++i)
#pragma unroll
        for (int j = 0; j < kNT; ++j)
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const float t = fmaf(__int_as_float(iacc[i][j][r]), sw[j][r & 1], swc[j][r & 1]);
            acc[i][j][r] = fmaf(t, sa[i][r >> 1], acc[i][j][r]);
          }
    }
    cp_async_wait<0>();
    __syncthreads();

    // ---- low-rank up-projection: acc += T(lora_act) . lora_up^T, 16-bit mma, fp32 accumulate.
    if (R > 0) {
      const int nchunks = (R + kLoraChunk - 1) / kLoraChunk;
      for (int c = 0; c < nchunks; ++c) {
        if (c > 0) {
          __syncthreads();  // everyone is done with chunk c-1
          load_lora(c);
          cp_async_commit();
          cp_async_wait<0>();
          __syncthreads();
        }
        const int ksteps = min(kLoraChunk, R - c * kLoraChunk) / 16;
        for (int ks = 0; ks < ksteps; ++ks) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
          uint32_t bl[kNT][2];
#pragma unroll
          for (int j = 0; j < kNT; ++j)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              const RC e = frag_b_m16n8k16_f16(lane, r, 0);  // (k, n), e = 0 is the low half
              bl[j][r] = *reinterpret_cast<const uint32_t*>(
                  s_lup + smem_lup_offset_h(wn * kWN + j * 8 + e.col, ks * 16 + e.row));
            }
#pragma unroll
          for (int i = 0; i < kMT; ++i) {
            uint32_t al[4];
#pragma unroll
            for (int r = 0; r < 4; ++r) {
              const RC e = frag_a_m16n8k16_f16(lane, r, 0);  // (m, k)
              const float2 v = *reinterpret_cast<const float2*>(
                  s_lact + smem_lact_offset_f(wm * kWM + i * 16 + e.row, ks * 16 + e.col));
              al[r] = pack2<T>(v.x, v.y);  // spec §4.2: C(lora_act), round to the out dtype
            }
#pragma unroll
            for (int j = 0; j < kNT; ++j) mma_16bit<T>(acc[i][j], al, bl[j][0], bl[j][1]);
          }
#else
          // sm_75: no bf16 mma; plain FMAs from shared memory (same rounding of lora_act).
#pragma unroll
          for (int i = 0; i < kMT; ++i)
#pragma unroll
            for (int j = 0; j < kNT; ++j)
#pragma unroll
              for (int r = 0; r < 4; ++r) {
                const RC e = frag_c_m16n8(lane, r);
                const int row = wm * kWM + i * 16 + e.row, col = wn * kWN + j * 8 + e.col;
                float s = 0.f;
                for (int k = ks * 16; k < ks * 16 + 16; ++k)
                  s = fmaf(to_f32(from_f32<T>(s_lact[smem_lact_offset_f(row, k)])),
                           to_f32(s_lup[smem_lup_offset_h(col, k)]), s);
                acc[i][j][r] += s;
              }
#endif
        }
      }
    }

    // ---- bias, cast, store. Each lane owns column pairs (2*tig, 2*tig+1) of rows gid and gid + 8.
    T* out = reinterpret_cast<T*>(p.out);
    const T* bias = reinterpret_cast<const T*>(p.bias);
    const bool pair_store = (N & 1) == 0;
#pragma unroll
    for (int i = 0; i < kMT; ++i)
#pragma unroll
      for (int j = 0; j < kNT; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const RC e = frag_c_m16n8(lane, 2 * h);
          const int row = m0 + wm * kWM + i * 16 + e.row, col = n0 + wn * kWN + j * 8 + e.col;
          if (row >= M || col >= N) continue;
          float v0 = acc[i][j][2 * h], v1 = acc[i][j][2 * h + 1];
          const bool has1 = col + 1 < N;
          if (bias != nullptr) {
            v0 += to_f32(bias[col]);
            if (has1) v1 += to_f32(bias[col + 1]);
          }
          T* o = out + int64_t(row) * N + col;
          if (pair_store) {  // N even: col even -> 4-byte aligned
            *reinterpret_cast<uint32_t*>(o) = pack2<T>(v0, v1);
          } else {
            o[0] = from_f32<T>(v0);
            if (has1) o[1] = from_f32<T>(v1);
          }
        }
  }
}

// SASS budgets of the k-loop, per warp and 64-group (tests/test_sass_budgets.py: the loop holding the IMMAs,
// statically counted from the cubin; format as in quantize_act.cu). Measured when set (nvcc 13.0,
// 2026-11-30): int8/sm_90 310 (was 357 before the hoisted loader and the int8 magic constant), int4/sm_89 219
// (was 252). Where they go (int8): 32 IMMA + 6 LDSM + 72 unpack (48 LOP3 `& 0xf0f0f0f0` + 24 shifts) +
// 128 promotion FFMA + 8 FMUL (−magic·s_w) + 15 scale LDS + ~45 loader / loop / barrier; int4: no unpack,
// 16 IMMA. The promotion (2 FFMA per accumulator) is the floor of this design: ~175 / ~150.
// SASS-BUDGET sm_90 w4a4_gemm_kernelI13__nv_bfloat16Li1E per-warp-group 320
// SASS-BUDGET sm_89 w4a4_gemm_kernelI13__nv_bfloat16Li0E per-warp-group 228

// The instantiations, all of them: {bf16, fp16} x {kInt4, kInt8}. R == 0 is a run-time branch.
using KernelFn = void (*)(const W4A4GemmParams);
KernelFn select_kernel(bool bf16, MmaPath path) {
  if (bf16) {
    return path == MmaPath::kInt4 ? w4a4_gemm_kernel<__nv_bfloat16, 0> : w4a4_gemm_kernel<__nv_bfloat16, 1>;
  }
  return path == MmaPath::kInt4 ? w4a4_gemm_kernel<__half, 0> : w4a4_gemm_kernel<__half, 1>;
}

bool aligned(const void* ptr, uintptr_t a) { return (reinterpret_cast<uintptr_t>(ptr) % a) == 0; }

}  // namespace

size_t prepared_qweight_bytes(int N, int K) { return static_cast<size_t>(N) * static_cast<size_t>(K / 2); }
size_t prepared_wscales_bytes(int N, int K) {
  return static_cast<size_t>(N) * static_cast<size_t>(K / layout::kGroup) * sizeof(float);
}

cudaError_t launch_w4a4_gemm(const W4A4GemmParams& p, cudaStream_t stream) {
  if (p.M < 0 || p.N < 1 || p.K <= 0 || p.K % layout::kGroup != 0 || p.R < 0 || p.R > 512 || p.R % 16 != 0)
    return cudaErrorInvalidValue;
  if (p.path != MmaPath::kInt4 && p.path != MmaPath::kInt8) return cudaErrorInvalidValue;
  if (p.M == 0) return cudaSuccess;
  if (!p.qact || !p.ascales || !p.qweight || !p.wscales || !p.out) return cudaErrorInvalidValue;
  if (p.R > 0 && (!p.lora_act || !p.lora_up)) return cudaErrorInvalidValue;
  // 16-byte cp.async sources; 4-byte ascales and paired stores; 2-byte bias.
  if (!aligned(p.qact, 16) || !aligned(p.qweight, 16) || !aligned(p.wscales, 4) || !aligned(p.ascales, 4) ||
      !aligned(p.out, 4) || (p.bias && !aligned(p.bias, 2)))
    return cudaErrorInvalidValue;
  if (p.R > 0 && (!aligned(p.lora_act, 16) || !aligned(p.lora_up, 16))) return cudaErrorInvalidValue;
  const int64_t m_tiles = (int64_t(p.M) + layout::kBM - 1) / layout::kBM;
  const int64_t n_tiles = (int64_t(p.N) + layout::kBN - 1) / layout::kBN;
  if (m_tiles > 65535) return cudaErrorInvalidValue;

  int dev = 0, major = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (err != cudaSuccess) return err;
  if (p.path == MmaPath::kInt8 && major < 8) return cudaErrorInvalidValue;

  KernelFn fn = select_kernel(p.out_bf16, p.path);
  // > 48 KiB of dynamic shared memory must be opted into, once per kernel and device. Idempotent, so a race
  // between host threads only repeats the call.
  static std::atomic<uint64_t> configured[4];
  const int kidx = (p.out_bf16 ? 2 : 0) + (p.path == MmaPath::kInt8 ? 1 : 0);
  const uint64_t bit = uint64_t(1) << (dev & 63);
  if (dev >= 64 || !(configured[kidx].load(std::memory_order_relaxed) & bit)) {
    err = cudaFuncSetAttribute(reinterpret_cast<const void*>(fn), cudaFuncAttributeMaxDynamicSharedMemorySize,
                               layout::kSmemBytes);
    if (err != cudaSuccess) return err;
    if (dev < 64) configured[kidx].fetch_or(bit, std::memory_order_relaxed);
  }
  const dim3 grid(static_cast<unsigned>(n_tiles), static_cast<unsigned>(m_tiles));
  fn<<<grid, layout::kThreads, layout::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace svdq::cuda
