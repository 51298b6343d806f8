// quantize_act_fp8.cu — W4A8 activations (spec §8.1): x [M, K] (bf16/fp16) -> qact e4m3 bytes [M, Kp] and one
// fp32 scale per token. One CTA (256 threads) per row: pass 1 reduces amax of x̂ = x / λ (IEEE division,
// __fdiv_rn, as the spec); pass 2 recomputes x̂ (the row is L1/L2-resident: K <= 12288 x 2 B) and writes
// float_to_e4m3_rne(x̂ / s) (w4a4_gemm_sm90_layout.cuh, host-tested bit for bit). Bit-exact to the reference.
// lora_act (x · lora_down) is not fused here: the binding (ops_cuda.cpp, quantize_act_fp8_cuda) takes it from
// quantize_act.cu's kernel (docs/kernels.md §12.4); fusing it here would save a second read of x.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/w4a4_gemm_sm90.h"
#include "cuda/w4a4_gemm_sm90_layout.cuh"

namespace svdq::cuda::sm90 {
namespace {

template <class T> __device__ __forceinline__ float f32(T v);
template <> __device__ __forceinline__ float f32(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float f32(__half v) { return __half2float(v); }

template <class T>
__global__ void __launch_bounds__(256) quantize_act_fp8_kernel(const T* __restrict__ x, const T* __restrict__ smooth,
                                                               int K, int Kp, uint8_t* __restrict__ qact,
                                                               float* __restrict__ ascales) {
  const int64_t m = blockIdx.x;
  const T* row = x + m * K;
  float amax = 0.f;
  for (int k = threadIdx.x; k < K; k += 256) amax = fmaxf(amax, fabsf(__fdiv_rn(f32(row[k]), f32(smooth[k]))));
#pragma unroll
  for (int o = 16; o; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  __shared__ float warp_max[8];
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = amax;
  __syncthreads();
  amax = warp_max[0];
#pragma unroll
  for (int w = 1; w < 8; ++w) amax = fmaxf(amax, warp_max[w]);
  const float s = __fdiv_rn(amax, 448.0f);
  if (threadIdx.x == 0) ascales[m] = s;
  uint8_t* out = qact + m * Kp;
  for (int k = threadIdx.x; k < Kp; k += 256) {
    uint8_t code = 0;
    if (k < K && s != 0.f) {
      const float v = __fdiv_rn(__fdiv_rn(f32(row[k]), f32(smooth[k])), s);
      code = float_to_e4m3_rne(fminf(fmaxf(v, -448.0f), 448.0f));
    }
    out[k] = code;
  }
}

}  // namespace

cudaError_t launch_quantize_act_fp8(const void* x, const void* smooth, bool bf16, int M, int K, uint8_t* qact,
                                    float* ascales, cudaStream_t stream) {
  if (M < 0 || K < 1 || !x || !smooth || !qact || !ascales) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  const int Kp = (K + kGroup - 1) / kGroup * kGroup;
  if (bf16)
    quantize_act_fp8_kernel<<<M, 256, 0, stream>>>(static_cast<const __nv_bfloat16*>(x),
                                                   static_cast<const __nv_bfloat16*>(smooth), K, Kp, qact, ascales);
  else
    quantize_act_fp8_kernel<<<M, 256, 0, stream>>>(static_cast<const __half*>(x), static_cast<const __half*>(smooth),
                                                   K, Kp, qact, ascales);
  return cudaGetLastError();
}

}  // namespace svdq::cuda::sm90
