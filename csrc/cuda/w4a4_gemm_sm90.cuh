// w4a4_gemm_sm90.cuh — the Hopper FP8-wgmma GEMM kernel, templated on the activation format:
//   kW4A8 = false: exact W4A4 (spec §4.2) — per-(token, group) s_a, promotion FMUL + FFMA per accumulator;
//   kW4A8 = true:  W4A8 (spec §8.2)       — per-token s_a in the epilogue, promotion 1 FFMA per accumulator.
// Instantiated once per file: w4a4_gemm_sm90.cu (exact) and w4a4_gemm_sm90_w4a8.cu (W4A8).
//
// Structure (DeepGEMM's): CTA = 384 threads = 2 consumer warpgroups (setmaxnreg 232) + 1 producer warpgroup
// (setmaxnreg 40, one warp works), persistent grid (one CTA per SM, tiles strided by gridDim.x), kStages
// shared-memory stages of one 64-K group each, full/empty mbarriers.
//   producer:  per stage, lane 0 arms full[s] with the byte count and issues two 1-D bulk copies (the
//              prepared weight tile, 8 KiB, and its 128 fp32 s_w); the 32 lanes copy the 128 x 64-byte
//              activation rows (16 x cp.async 16 B each, zero-filled past M, swizzled addresses) and the
//              W4A4 path's 128 s_a, then arrive (noinc) on full[s]. Count = 1 + 32 arrivals + tx bytes.
//   consumers: wait full[s]; fence.proxy.async (the cp.async writes are generic-proxy writes that wgmma,
//              an async-proxy reader, must see); 2 x wgmma m64n128k32 e4m3 (fresh D per group); wait;
//              release the stage (one arrive per warp on empty[s], count 8); promote D into fp32 acc.
// Overlap: ptxas will not keep one warpgroup's wgmma in flight across its own promotion (warning C7514,
// FACTS.md), so a warpgroup's tensor and CUDA-core work alternate; the two consumer warpgroups drift apart
// and fill each other's gaps (tested: tests/test_sass_sm90.py fails on C7514).
// Epilogue per tile: (W4A8: x s_a per token), low-rank up as bf16/fp16 wgmma m64n128k16 with A = lora_up from
// registers and B = C(lora_act) staged in smem (64 ranks per chunk, 128B swizzle), accumulating straight into
// the promoted fp32 accumulators (same fragment layout); + bias; transpose through smem; 16-byte stores.
//
// SASS budget (instructions per warp per 64-group in the consumer main loop, counted by
// tests/test_sass_sm90.py with cuobjdump; FACTS.md predicts 191 (exact SS) and 121 (W4A8) incl. ~60 probe
// overhead):   exact W4A4 <= kSassBudgetW4A4,   W4A8 <= kSassBudgetW4A8   (constants below).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/w4a4_gemm_sm90.h"
#include "cuda/w4a4_gemm_sm90_layout.cuh"
#include "cuda/w4a4_gemm_sm90_wgmma.cuh"

namespace svdq::cuda::sm90 {

// Budgets checked by tests/test_sass_sm90.py (main-loop SASS per warp per group; 64 accumulators/thread):
// 2 (W4A4: FMUL + FFMA) / 1 (W4A8: FFMA) instructions per accumulator = 128 / 64, + 2 QGMMA, mbarrier
// wait/arrive, proxy fence, wgmma fence/commit/wait, scale LDS (W4A4: 8 x LDS.128 + 2; W4A8: 2) and loop
// overhead. nvcc 13.0 (2026-11-30): 199 and 119. Issue time per scheduler per 128x128x64 tile-group:
// 2 warpgroups x 199 = 398 clk (W4A4) and 238 clk (W4A8) against 256 clk of tensor time at the dense peak,
// so W4A4 stays CUDA-core bound (predicted 0.65 of the FP8 peak at best) and W4A8 is tensor-bound.
constexpr int kSassBudgetW4A4 = 200;
constexpr int kSassBudgetW4A8 = 120;

constexpr int kThreads = 384;
constexpr int kConsumerRegs = 232;
constexpr int kProducerRegs = 40;

struct alignas(1024) Smem {
  uint8_t a[kStages][kTileBytes];         // weights, e4m3, 64B-swizzled (bulk copy of a prepared block)
  uint8_t b[kStages][kTileBytes];         // activations, e4m3, 64B-swizzled (cp.async rows)
  float ws[kStages][kTileN];              // s_w of the stage's 128 channels
  float as[kStages][4][kScalePad];        // W4A4: s_a of the stage's 128 tokens (act_scale_slot order)
  alignas(1024) uint16_t lora_b[kTileM * 64];  // C(lora_act), one 64-rank chunk, 128B-swizzled (16 KiB)
  uint16_t out[kTileM * kOutPitch];       // epilogue staging, [token][channel] 16-bit
  uint64_t full[kStages], empty[kStages];
};
// 6 x 17 472 + 16 384 + 34 816 + 96 = 156 KB (+ 1 KB alignment slack) of the 227 KB an sm_90 CTA may use.

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ uint32_t smem_u32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t phase) {
  asm volatile(
      "{\n.reg .pred p;\nWAIT_%=:\nmbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n@!p bra WAIT_%=;\n}\n" ::"r"(
          smem_u32(bar)),
      "r"(phase)
      : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}
// 1-D bulk copy global -> shared, completing `bytes` of tx on the mbarrier (TMA engine, no tensor map).
__device__ __forceinline__ void bulk_g2s(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(smem_u32(dst)),
      "l"(src), "r"(bytes), "r"(smem_u32(bar))
      : "memory");
}
// 16 / 4-byte cp.async with zero fill (src_bytes = 0 reads nothing and writes zeros).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, uint32_t src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src, uint32_t src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(src_bytes) : "memory");
}
// Arrive on the mbarrier when all of this thread's prior cp.async have landed (counted in the init count).
__device__ __forceinline__ void cp_async_arrive_noinc(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
template <int R>
__device__ __forceinline__ void setmaxnreg_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(R)); }
template <int R>
__device__ __forceinline__ void setmaxnreg_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(R)); }
// Named barrier 1 over the 256 consumer threads (the producer never joins it).
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, 256;\n" ::: "memory"); }
// Keep the compiler from moving accumulator reads/writes across wgmma fences.
__device__ __forceinline__ void fence_reg(float& r) { asm volatile("" : "+f"(r)::"memory"); }

template <class T> struct Out16;
template <> struct Out16<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float load(const void* p, int64_t i) {
    return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  }
  static __device__ __forceinline__ uint16_t one(float v) {
    __nv_bfloat16 h = __float2bfloat16_rn(v);
    return *reinterpret_cast<uint16_t*>(&h);
  }
  static __device__ __forceinline__ void hgmma(float (&d)[64], const uint32_t (&a)[4], uint64_t b) { hgmma_bf16_rs_n128(d, a, b, 1); }
};
template <> struct Out16<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float load(const void* p, int64_t i) {
    return __half2float(static_cast<const __half*>(p)[i]);
  }
  static __device__ __forceinline__ uint16_t one(float v) {
    __half h = __float2half_rn(v);
    return *reinterpret_cast<uint16_t*>(&h);
  }
  static __device__ __forceinline__ void hgmma(float (&d)[64], const uint32_t (&a)[4], uint64_t b) { hgmma_f16_rs_n128(d, a, b, 1); }
};
#endif

template <bool kW4A8, class OutT>
__global__ void __launch_bounds__(kThreads, 1) gemm_sm90_kernel(const GemmParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  // Align to 1024 B (swizzle atoms) by pointer arithmetic on the shared array, not through an integer: the
  // compiler then still knows every access is shared memory (LDS, not generic LD).
  Smem& s = *reinterpret_cast<Smem*>(smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u));
  const int wg = threadIdx.x / 128;
  const int t = threadIdx.x % 128;
  const int G = p.K / kGroup;
  const int n_tiles = static_cast<int>(padded_n(p.N) / kTileN);
  const int m_tiles = (p.M + kTileM - 1) / kTileM;
  const int num_tiles = n_tiles * m_tiles;

  if (threadIdx.x == 0) {
    for (int i = 0; i < kStages; ++i) {
      mbar_init(&s.full[i], 1 + 32);  // lane 0's arrive.expect_tx + 32 cp.async noinc arrivals
      mbar_init(&s.empty[i], 8);      // one arrival per consumer warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (wg == 2) {  // ------------------------------------------------------------------------- producer
    setmaxnreg_dec<kProducerRegs>();
    if (t >= 32) return;
    const int lane = t;
    int st = 0, ph = 0;
    for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
      const TileCoord tc = tile_coord(tile, n_tiles);
      const int m0 = tc.m_tile * kTileM;
      for (int g = 0; g < G; ++g) {
        mbar_wait(&s.empty[st], ph ^ 1);
        if (lane == 0) {
          mbar_arrive_expect_tx(&s.full[st], kTileBytes + kTileN * 4);
          const int64_t blk = static_cast<int64_t>(tc.n_tile) * G + g;
          bulk_g2s(s.a[st], p.wq + blk * kTileBytes, kTileBytes, &s.full[st]);
          bulk_g2s(s.ws[st], p.ws + blk * kTileN, kTileN * 4, &s.full[st]);
        }
#pragma unroll
        for (int i = 0; i < 16; ++i) {  // 128 rows x 4 chunks of 16 B
          const int idx = lane + 32 * i, row = idx / 4, chunk = idx % 4;
          const int m = m0 + row;
          const bool ok = m < p.M;
          const uint8_t* src = p.qact + static_cast<int64_t>(ok ? m : 0) * p.K + g * kGroup + chunk * 16;
          cp_async16(s.b[st] + swz64(row, chunk * 16), src, ok ? 16 : 0);
        }
        if constexpr (!kW4A8) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int tk = lane + 32 * i, m = m0 + tk;
            const bool ok = m < p.M;
            cp_async4(&s.as[st][0][0] + act_scale_slot(tk), p.ascales + static_cast<int64_t>(ok ? m : 0) * G + g,
                      ok ? 4 : 0);
          }
        }
        cp_async_arrive_noinc(&s.full[st]);
        if (++st == kStages) { st = 0; ph ^= 1; }
      }
    }
    return;
  }

  // -------------------------------------------------------------------------------------------- consumers
  setmaxnreg_inc<kConsumerRegs>();
  const int warp = t / 32, lane = t % 32, q4 = lane % 4;
  using O = Out16<OutT>;
  int st = 0, ph = 0;
  for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const TileCoord tc = tile_coord(tile, n_tiles);
    const int m0 = tc.m_tile * kTileM, n0 = tc.n_tile * kTileN;
    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.f;
    const int r0 = acc_row(warp, lane, 0);  // this thread's rows r0 and r0 + 8 of the warpgroup's 64

#pragma unroll 1
    for (int g = 0; g < G; ++g) {
      float d[64];
      mbar_wait(&s.full[st], ph);
      fence_proxy_async();
      const float sw0 = s.ws[st][wg * 64 + r0], sw1 = s.ws[st][wg * 64 + r0 + 8];
      float sa[32];
      if constexpr (!kW4A8) {
#pragma unroll
        for (int j = 0; j < 32; j += 4) {
          const float4 v = *reinterpret_cast<const float4*>(&s.as[st][q4][j]);
          sa[j] = v.x; sa[j + 1] = v.y; sa[j + 2] = v.z; sa[j + 3] = v.w;
        }
      }
      const uint64_t adesc = smem_desc(smem_u32(s.a[st] + wg * 64 * 64), 512, 2);
      const uint64_t bdesc = smem_desc(smem_u32(s.b[st]), 512, 2);
      wg_fence();
      qgmma_e4m3_ss_n128(d, adesc, bdesc, 0);          // k 0..31: D = A·B (fresh group)
      qgmma_e4m3_ss_n128(d, adesc + 2, bdesc + 2, 1);  // k 32..63: start address + 32 bytes
      wg_commit();
#pragma unroll
      for (int i = 0; i < 64; ++i) fence_reg(d[i]);
      wg_wait0();
#pragma unroll
      for (int i = 0; i < 64; ++i) fence_reg(d[i]);
      __syncwarp();  // every lane's scale loads are ordered before lane 0's release of the stage
      if (lane == 0) mbar_arrive(&s.empty[st]);
      if (++st == kStages) { st = 0; ph ^= 1; }
#pragma unroll
      for (int i = 0; i < 64; ++i) {
        const float sw = ((i / 2) % 2) ? sw1 : sw0;
        if constexpr (kW4A8) {
          acc[i] = fmaf(d[i], sw, acc[i]);                     // 1 FFMA: s_a waits for the epilogue
        } else {
          acc[i] = fmaf(d[i] * sa[acc_scale_j(i)], sw, acc[i]);  // FMUL + FFMA: (I·s_a)·s_w, §4.3 tolerance
        }
      }
    }

    // ---- epilogue: W4A8 token scales ---------------------------------------------------------------------
    if constexpr (kW4A8) {
#pragma unroll
      for (int i = 0; i < 64; i += 2) {
        const int m = m0 + acc_col(lane, i);
        const float a0 = m < p.M ? p.ascales[m] : 0.f, a1 = m + 1 < p.M ? p.ascales[m + 1] : 0.f;
        acc[i] *= a0;
        acc[i + 1] *= a1;
      }
    }
    // ---- low-rank up: acc += lora_up[n, :] · C(lora_act[m, :]) --------------------------------------------
    for (int c0 = 0; c0 < p.R; c0 += 64) {
      const int kc = min(64, p.R - c0);
      consumers_sync();  // the previous chunk's wgmma (both warpgroups) have finished reading lora_b
      for (int idx = threadIdx.x; idx < kTileM * (kc / 2); idx += 256) {
        const int tok = idx / (kc / 2), pr = idx % (kc / 2), m = m0 + tok;
        float lo = 0.f, hi = 0.f;
        if (m < p.M) {
          const float2 v = *reinterpret_cast<const float2*>(p.lora_act + static_cast<int64_t>(m) * p.R + c0 + 2 * pr);
          lo = v.x; hi = v.y;
        }
        *reinterpret_cast<uint32_t*>(reinterpret_cast<uint8_t*>(s.lora_b) + swz128(tok, 4 * pr)) = O::pack(lo, hi);
      }
      fence_proxy_async();  // generic-proxy stores -> wgmma (async proxy) reads
      consumers_sync();
      // A fragments of all (up to 4) k16 steps first: registers an in-flight wgmma reads are never rewritten.
      const int nk = kc / 16;
      uint32_t a[4][4];
#pragma unroll
      for (int k16 = 0; k16 < 4; ++k16) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int n = n0 + wg * 64 + lora_a_row(warp, lane, r);
          const int k = c0 + 16 * k16 + lora_a_k(lane, r);
          a[k16][r] = (k16 < nk && n < p.N) ? *reinterpret_cast<const uint32_t*>(
                                                   static_cast<const uint16_t*>(p.lora_up) + static_cast<int64_t>(n) * p.R + k)
                                             : 0u;
        }
      }
#pragma unroll
      for (int i = 0; i < 64; ++i) fence_reg(acc[i]);
      wg_fence();
#pragma unroll
      for (int k16 = 0; k16 < 4; ++k16) {
        if (k16 < nk) O::hgmma(acc, a[k16], smem_desc(smem_u32(s.lora_b) + 32 * k16, 1024, 1));
      }
      wg_commit();
#pragma unroll
      for (int i = 0; i < 64; ++i) fence_reg(acc[i]);
      wg_wait0();
#pragma unroll
      for (int i = 0; i < 64; ++i) fence_reg(acc[i]);
    }
    // ---- bias, transpose through smem, 16-byte stores ------------------------------------------------------
    const int nA = n0 + wg * 64 + r0, nB = nA + 8;
    const float b0 = (p.bias && nA < p.N) ? O::load(p.bias, nA) : 0.f;
    const float b1 = (p.bias && nB < p.N) ? O::load(p.bias, nB) : 0.f;
#pragma unroll
    for (int i = 0; i < 64; ++i) {
      const int ch = wg * 64 + acc_row(warp, lane, i);
      s.out[out_stage_index(acc_col(lane, i), ch)] = O::one(acc[i] + (((i / 2) % 2) ? b1 : b0));
    }
    consumers_sync();
    for (int idx = threadIdx.x; idx < kTileM * (kTileN / 8); idx += 256) {
      const int tok = idx / (kTileN / 8), c8 = (idx % (kTileN / 8)) * 8;
      const int m = m0 + tok, n = n0 + c8;
      if (m >= p.M || n >= p.N) continue;
      const uint16_t* src = &s.out[out_stage_index(tok, c8)];
      uint16_t* dst = static_cast<uint16_t*>(p.out) + static_cast<int64_t>(m) * p.N + n;
      if (n + 8 <= p.N && (p.N % 8) == 0) {
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
      } else {
        for (int j = 0; j < 8 && n + j < p.N; ++j) dst[j] = src[j];
      }
    }
    consumers_sync();  // s.out is free for the next tile
  }
#endif
}

// Launch plumbing of both formats; each .cu instantiates its own (one kernel per file).
inline bool aligned(const void* ptr, size_t a) { return reinterpret_cast<uintptr_t>(ptr) % a == 0; }

template <bool kW4A8>
inline cudaError_t launch_gemm_sm90(const GemmParams& p, cudaStream_t stream) {
  if (p.M < 0 || p.N < 1 || p.K <= 0 || p.K % kGroup || p.R < 0 || p.R % 16 || p.R > 512) return cudaErrorInvalidValue;
  if (!p.qact || !p.ascales || !p.wq || !p.ws || !p.out || (p.R && (!p.lora_act || !p.lora_up)))
    return cudaErrorInvalidValue;
  if (!aligned(p.qact, 16) || !aligned(p.wq, 128) || !aligned(p.ws, 128) || !aligned(p.out, 16) ||
      (p.R && (!aligned(p.lora_act, 8) || !aligned(p.lora_up, 4))))
    return cudaErrorInvalidValue;
  if (p.M == 0) return cudaSuccess;
  int dev = 0, major = 0, minor = 0, sms = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (e != cudaSuccess) return e;
  if (major != 9 || minor != 0) return cudaErrorInvalidDeviceFunction;
  const size_t smem = sizeof(Smem) + 1024;  // + slack to align the struct to 1024 B (swizzle atoms)
  auto kernel = p.out_bf16 ? gemm_sm90_kernel<kW4A8, __nv_bfloat16> : gemm_sm90_kernel<kW4A8, __half>;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (e != cudaSuccess) return e;
  const int64_t tiles = (padded_n(p.N) / kTileN) * ((p.M + kTileM - 1) / kTileM);
  const int grid = static_cast<int>(tiles < sms ? tiles : sms);
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace svdq::cuda::sm90
