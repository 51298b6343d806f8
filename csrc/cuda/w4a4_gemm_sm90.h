// w4a4_gemm_sm90.h — launcher API of the Hopper (sm_90a) FP8-wgmma GEMMs. No torch: pointers in, cudaError_t out.
//
//   W4A4 exact (spec §4.2):  y = Σ_g s_a[m,g] s_w[n,g] I[m,n,g] + C(lora_act) lora_upᵀ + bias
//                            activations = quantize_act_e4m3's codes (int4 values as e4m3 bytes)
//   W4A8 (spec §8.2):        y = s_a[m] Σ_g s_w[n,g] P[m,n,g] + C(lora_act) lora_upᵀ + bias
//                            activations = quantize_act_fp8's e4m3 codes, one scale per token
// Weights for both: prepare_weight_sm90 (e4m3 bytes, layout in w4a4_gemm_sm90_layout.cuh).
// Design, budgets and status: docs/kernels.md "Hopper".
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace svdq::cuda::sm90 {

struct GemmParams {
  const uint8_t* qact;    // [M, K] e4m3 bytes, row-major; 16-byte aligned, K % 64 == 0
  const float* ascales;   // W4A4: [M, K/64] fp32 row-major; W4A8: [M] fp32
  const uint8_t* wq;      // prepared_weight_bytes(N, K) from prepare_weight_sm90; 128-byte aligned
  const float* ws;        // prepared_wscale_count(N, K) fp32 from prepare_weight_sm90; 128-byte aligned
  const float* lora_act;  // [M, R] fp32 (nullptr when R == 0)
  const void* lora_up;    // [N, R] bf16/fp16 as out (nullptr when R == 0); 4-byte aligned
  const void* bias;       // [N] bf16/fp16 as out, or nullptr
  void* out;              // [M, N] bf16/fp16 row-major; 16-byte aligned
  int M, N, K, R;         // M >= 0, N >= 1, K = Kp > 0 and % 64 == 0, R % 16 == 0 and <= 512
  bool out_bf16;
};

// cudaErrorInvalidValue for bad sizes / pointers, cudaErrorInvalidDeviceFunction when the current device is
// not sm_90 (or the binary has no sm_90a code); otherwise the launch's error. M == 0 launches nothing.
cudaError_t launch_w4a4_gemm_sm90(const GemmParams& p, cudaStream_t stream);
cudaError_t launch_w4a8_gemm_sm90(const GemmParams& p, cudaStream_t stream);

size_t prepared_weight_bytes(int N, int K);   // Np * K   (Np = N rounded up to 128)
size_t prepared_wscale_count(int N, int K);   // Np * K/64

// Canonical qweight int8 [N, K/2] + wscales [N, K/64] (bf16 if scales_bf16 else fp16 bits) -> prepared
// e4m3 weights and fp32 scales (device pointers; outputs sized by the two functions above).
cudaError_t launch_prepare_weight_sm90(const int8_t* qweight, const void* wscales, bool scales_bf16, int N, int K,
                                       uint8_t* wq_out, float* ws_out, cudaStream_t stream);

// W4A8 activations (spec §8.1, csrc/cuda/quantize_act_fp8.cu): x [M, K] and λ [K] (both bf16 if bf16 else
// fp16) -> qact e4m3 bytes [M, Kp] (Kp = K rounded up to 64; padding codes 0), ascales fp32 [M]. Bit-exact to
// svdq.ops.reference.quantize_act_fp8. lora_act is not computed here.
cudaError_t launch_quantize_act_fp8(const void* x, const void* smooth, bool bf16, int M, int K, uint8_t* qact,
                                    float* ascales, cudaStream_t stream);

}  // namespace svdq::cuda::sm90
