// w4a4_gemm.h — launcher API of the W4A4 GEMM (numerics.md §4.2) and its weight repack. No torch here:
// pointers and ints in, cudaError_t out; csrc/cuda/ops_cuda.cpp turns codes into messages.
//
//   y[M, N] = out_dtype( Σ_g s_a[m,g] s_w[n,g] I[m,n,g]  +  C(lora_act)[M,R] · lora_up[N,R]ᵀ  +  bias[N] )
//
// Design, layouts and measured/predicted numbers: docs/kernels.md.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace svdq::cuda {

// Which tensor-core instruction does the integer part.
//   kInt4: native mma.sync s4 (m16n8k64; m8n8k32 on sm_75). The right choice on sm_75–sm_89 and sm_120.
//          It also runs on sm_90 but emulated, ~26x slower (FACTS.md) — useful only to cross-check.
//   kInt8: int4 unpacked to int8 in registers (one/two logic ops per register) + mma.sync m16n8k32 s8.
//          The sm_90 path; valid on any sm_80+ GPU. Not available on sm_75 (returns cudaErrorInvalidValue).
enum class MmaPath { kInt4 = 0, kInt8 = 1 };

struct W4A4GemmParams {
  const int8_t* qact;     // [M, K/2] int8, canonical packing (low nibble = even k); 16-byte aligned
  const float* ascales;   // [M, K/64] fp32, row-major contiguous
  const void* qweight;    // prepared_qweight_bytes(N, K) bytes from launch_repack_weight; 16-byte aligned
  const void* wscales;    // prepared_wscales_bytes(N, K) bytes (fp32) from launch_repack_weight; 4-byte aligned
  const float* lora_act;  // [M, R] fp32, 16-byte aligned; may be nullptr when R == 0
  const void* lora_up;    // [N, R] bf16/fp16 (same dtype as out), 16-byte aligned; nullptr when R == 0
  const void* bias;       // [N] bf16/fp16 (same dtype as out) or nullptr
  void* out;              // [M, N] bf16/fp16 row-major contiguous; 4-byte aligned
  int M;                  // >= 0 (M == 0: nothing is launched)
  int N;                  // >= 1, any value (B, s_w, lora_up, bias reads and the stores are predicated)
  int K;                  // Kp: > 0 and a multiple of 64
  int R;                  // lora rank: 0 <= R <= 512, R % 16 == 0
  bool out_bf16;          // true: bf16 out / lora_up / bias; false: fp16
  MmaPath path;
};

// Runs the GEMM on `stream`. Errors (nothing launched): cudaErrorInvalidValue for a bad size, a null pointer
// that is needed, a misaligned pointer, or kInt8 on a GPU below sm_80; otherwise the launch's error.
cudaError_t launch_w4a4_gemm(const W4A4GemmParams& p, cudaStream_t stream);

// Sizes of the prepared buffers: exactly the canonical sizes, no padding, so the binding can keep the shapes
// qweight int8 [N, K/2] and wscales fp32 [N, K/64] (contents permuted: group-major, see mma_layout.cuh §4).
size_t prepared_qweight_bytes(int N, int K);   // = N * K/2
size_t prepared_wscales_bytes(int N, int K);   // = N * K/64 * sizeof(float)

// Canonical qweight [N, K/2] int8 + wscales [N, K/64] (bf16 if scales_bf16 else fp16) -> prepared layout
// (csrc/cuda/mma_layout.cuh §4): qweight group-major [K/64][N][32 B], wscales fp32 [K/64][N].
// qweight_out (16-byte aligned) / wscales_out (4-byte aligned) must hold prepared_*_bytes(N, K) bytes.
// Errors: cudaErrorInvalidValue for N < 1, K not a positive multiple of 64, or null pointers.
cudaError_t launch_repack_weight(const int8_t* qweight, const void* wscales, bool scales_bf16, int N, int K,
                                 void* qweight_out, void* wscales_out, cudaStream_t stream);

}  // namespace svdq::cuda
