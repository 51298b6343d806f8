// repack_weight.cu — canonical qweight [N, K/2] + wscales [N, K/64] (bf16/fp16) -> the W4A4 GEMM's prepared
// layout (csrc/cuda/mma_layout.cuh §4): group-major [G][N][32 B] (N*K/2 bytes, no padding), scales fp32
// [G][N]. Runs once per layer at load time.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "mma_layout.cuh"
#include "w4a4_gemm.h"

namespace svdq::cuda {
namespace {

using namespace layout;

// One thread per 16-byte chunk of one row's k-tile: (n, c) with c in [0, K/32). Reads bytewise so that any
// alignment of the canonical tensor works (a one-time cost).
__global__ void repack_qweight_kernel(const uint8_t* __restrict__ src, int N, int K, int64_t total,
                                      uint8_t* __restrict__ dst) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int64_t chunks = K / 32;
  const int64_t n = idx / chunks, c = idx % chunks;
  alignas(16) uint8_t v[16];
#pragma unroll
  for (int b = 0; b < 16; ++b) v[b] = src[n * (K / 2) + c * 16 + b];
  *reinterpret_cast<uint4*>(dst + prepared_qweight_offset(n, c * 16, N)) = *reinterpret_cast<const uint4*>(v);
}

template <typename S>
__global__ void repack_wscales_kernel(const S* __restrict__ src, int N, int K, int64_t total,
                                      float* __restrict__ dst) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int64_t G = K / kGroup;
  const int64_t n = idx / G, g = idx % G;
  float v;
  if constexpr (std::is_same_v<S, __nv_bfloat16>) v = __bfloat162float(src[n * G + g]);
  else v = __half2float(src[n * G + g]);
  dst[prepared_wscale_offset(n, g, N)] = v;
}

}  // namespace

cudaError_t launch_repack_weight(const int8_t* qweight, const void* wscales, bool scales_bf16, int N, int K,
                                 void* qweight_out, void* wscales_out, cudaStream_t stream) {
  if (N < 1 || K <= 0 || K % kGroup != 0) return cudaErrorInvalidValue;
  if (!qweight || !wscales || !qweight_out || !wscales_out) return cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(qweight_out) % 16 || reinterpret_cast<uintptr_t>(wscales_out) % 4)
    return cudaErrorInvalidValue;
  const int64_t np = N;
  constexpr int kBlock = 256;
  const int64_t total_q = np * (K / 32);
  repack_qweight_kernel<<<unsigned((total_q + kBlock - 1) / kBlock), kBlock, 0, stream>>>(
      reinterpret_cast<const uint8_t*>(qweight), N, K, total_q, reinterpret_cast<uint8_t*>(qweight_out));
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t total_s = np * (K / kGroup);
  const unsigned blocks_s = unsigned((total_s + kBlock - 1) / kBlock);
  if (scales_bf16) {
    repack_wscales_kernel<__nv_bfloat16><<<blocks_s, kBlock, 0, stream>>>(
        reinterpret_cast<const __nv_bfloat16*>(wscales), N, K, total_s, reinterpret_cast<float*>(wscales_out));
  } else {
    repack_wscales_kernel<__half><<<blocks_s, kBlock, 0, stream>>>(
        reinterpret_cast<const __half*>(wscales), N, K, total_s, reinterpret_cast<float*>(wscales_out));
  }
  return cudaGetLastError();
}

}  // namespace svdq::cuda
