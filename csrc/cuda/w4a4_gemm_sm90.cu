// w4a4_gemm_sm90.cu — the exact W4A4 Hopper GEMM (spec §4.2 on e4m3 operands), its weight preparation and
// the launch plumbing shared with w4a4_gemm_sm90_w4a8.cu. Kernel: w4a4_gemm_sm90.cuh. Design: docs/kernels.md
// "Hopper". The kernel body exists only in the sm_90a cubin (compute_90a gencode); on every other target the
// launcher answers cudaErrorInvalidDeviceFunction and the caller keeps the mma.sync path.
#include "cuda/w4a4_gemm_sm90.cuh"

namespace svdq::cuda::sm90 {

size_t prepared_weight_bytes(int N, int K) { return static_cast<size_t>(padded_n(N)) * K; }
size_t prepared_wscale_count(int N, int K) { return static_cast<size_t>(padded_n(N)) * (K / kGroup); }

namespace {

// One thread per (channel, byte pair of the canonical row): 2 codes -> 2 e4m3 bytes at their swizzled places.
__global__ void prepare_weight_kernel(const int8_t* qweight, const void* wscales, bool scales_bf16, int N, int K,
                                      uint8_t* wq, float* ws) {
  const int G = K / kGroup;
  const int64_t Np = padded_n(N);
  const int64_t total = Np * (K / 2);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / (K / 2), j = i % (K / 2);
    int lo = 0, hi = 0;
    if (n < N) {
      const int b = qweight[n * (K / 2) + j];
      lo = static_cast<int8_t>(b << 4) >> 4;  // low nibble = even k (spec §3)
      hi = b >> 4;
    }
    wq[prepared_weight_offset(n, 2 * j, G)] = int4_to_e4m3(lo);
    wq[prepared_weight_offset(n, 2 * j + 1, G)] = int4_to_e4m3(hi);
    if (j % (kGroup / 2) == 0) {
      const int64_t g = 2 * j / kGroup;
      float v = 0.f;
      if (n < N) {
        const uint16_t bits = static_cast<const uint16_t*>(wscales)[n * G + g];
        v = scales_bf16 ? __uint_as_float(static_cast<uint32_t>(bits) << 16)
                        : __half2float(__ushort_as_half(bits));
      }
      ws[prepared_wscale_index(n, g, G)] = v;
    }
  }
}

}  // namespace

cudaError_t launch_prepare_weight_sm90(const int8_t* qweight, const void* wscales, bool scales_bf16, int N, int K,
                                       uint8_t* wq_out, float* ws_out, cudaStream_t stream) {
  if (N < 1 || K <= 0 || K % kGroup || !qweight || !wscales || !wq_out || !ws_out) return cudaErrorInvalidValue;
  const int64_t total = padded_n(N) * (K / 2);
  const int blocks = static_cast<int>((total + 255) / 256 < 65535 ? (total + 255) / 256 : 65535);
  prepare_weight_kernel<<<blocks, 256, 0, stream>>>(qweight, wscales, scales_bf16, N, K, wq_out, ws_out);
  return cudaGetLastError();
}

cudaError_t launch_w4a4_gemm_sm90(const GemmParams& p, cudaStream_t stream) { return launch_gemm_sm90<false>(p, stream); }

}  // namespace svdq::cuda::sm90
