// w4a4_gemm_sm90_w4a8.cu — the W4A8 Hopper GEMM (spec §8.2): the kernel of w4a4_gemm_sm90.cuh with
// per-token FP8 activations (1 FFMA per accumulator per group, s_a applied in the epilogue). Same prepared
// weights as the exact path (w4a4_gemm_sm90.cu). Design: docs/kernels.md "Hopper".
#include "cuda/w4a4_gemm_sm90.cuh"

namespace svdq::cuda::sm90 {

cudaError_t launch_w4a8_gemm_sm90(const GemmParams& p, cudaStream_t stream) { return launch_gemm_sm90<true>(p, stream); }

}  // namespace svdq::cuda::sm90
