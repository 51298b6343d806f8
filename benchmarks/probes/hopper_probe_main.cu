// Hopper probe program for benchmarks/device_check.d/pre-hopper-probe.sh (needs an sm_90 GPU):
//   exact   e4m3 wgmma group sums vs exact integer/rational sums, bit for bit: int4 codes incl. the
//           ±8·±8 extremes (|I| = 4096), random codes, cancelling sums, and W4A8-like wide-exponent e4m3
//           activations x int4 (reports the accumulator's worst error in ulps of fp32). The operands go
//           through the GEMM's own smem layout (swz64 + descriptors), so this also checks those on hardware.
//   tops    the consumer-loop probes of shared/tools/hopper_probe (probe.cu: no global memory, stub
//           producer, two consumer warpgroups drifting apart): int8 / e4m3 SS / e4m3 RS sign-magnitude /
//           W4A8 e4m3 (1 FFMA) / W4A8 int8 loops, TOPS each.
// Build: nvcc -O3 -std=c++17 -I csrc -gencode=arch=compute_90a,code=sm_90a benchmarks/probes/hopper_probe_main.cu
// Output: one JSON object on stdout.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <cuda_fp8.h>

#include <cstdint>
#include <type_traits>

#include "cuda/w4a4_gemm_sm90.cuh"
namespace probe_ns {  // the design study's probe, unchanged (its helpers would clash with the GEMM's)
#include "probe.cu"
}  // namespace probe_ns

using namespace svdq::cuda::sm90;

#define CK(x)                                                                               \
  do {                                                                                      \
    cudaError_t e_ = (x);                                                                   \
    if (e_ != cudaSuccess) {                                                                \
      std::printf("{\"error\": \"%s at %s:%d\"}\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
      std::exit(1);                                                                         \
    }                                                                                       \
  } while (0)

// One warpgroup: A [64 x 64] and B [128 x 64] e4m3 (row-major bytes in global) -> smem (64B swizzle, the
// GEMM's layout) -> D = A·Bᵀ with two wgmma m64n128k32 -> d[64][128] fp32 in global.
__global__ void __launch_bounds__(128) exact_kernel(const uint8_t* a, const uint8_t* b, float* d) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __shared__ __align__(1024) uint8_t sa[64 * 64];
  __shared__ __align__(1024) uint8_t sb[128 * 64];
  for (int i = threadIdx.x; i < 64 * 64; i += 128) sa[swz64(i / 64, i % 64)] = a[i];
  for (int i = threadIdx.x; i < 128 * 64; i += 128) sb[swz64(i / 64, i % 64)] = b[i];
  fence_proxy_async();
  __syncthreads();
  float acc[64];
  const uint64_t ad = smem_desc(smem_u32(sa), 512, 2), bd = smem_desc(smem_u32(sb), 512, 2);
  wg_fence();
  qgmma_e4m3_ss_n128(acc, ad, bd, 0);
  qgmma_e4m3_ss_n128(acc, ad + 2, bd + 2, 1);
  wg_commit();
  wg_wait0();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int i = 0; i < 64; ++i) d[acc_row(warp, lane, i) * 128 + acc_col(lane, i)] = acc[i];
#endif
}

static double e4m3_value(uint8_t v) {
  const int s = v >> 7, e = (v >> 3) & 15, m = v & 7;
  const double x = e ? std::ldexp(1.0 + m / 8.0, e - 7) : std::ldexp(m / 8.0, -6);
  return s ? -x : x;
}

struct ExactResult { std::string name; long mismatches; double max_abs_err, max_ulp_err, max_abs_sum; };

static ExactResult run_exact(const std::string& name, const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) {
  uint8_t *da, *db;
  float* dd;
  CK(cudaMalloc(&da, a.size()));
  CK(cudaMalloc(&db, b.size()));
  CK(cudaMalloc(&dd, 64 * 128 * 4));
  CK(cudaMemcpy(da, a.data(), a.size(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(db, b.data(), b.size(), cudaMemcpyHostToDevice));
  exact_kernel<<<1, 128>>>(da, db, dd);
  CK(cudaGetLastError());
  std::vector<float> d(64 * 128);
  CK(cudaMemcpy(d.data(), dd, d.size() * 4, cudaMemcpyDeviceToHost));
  CK(cudaFree(da)); CK(cudaFree(db)); CK(cudaFree(dd));
  ExactResult r{name, 0, 0, 0, 0};
  for (int i = 0; i < 64; ++i)
    for (int j = 0; j < 128; ++j) {
      double exact = 0;  // exact in double: multiples of 2^-18, |sum| < 2^18
      for (int k = 0; k < 64; ++k) exact += e4m3_value(a[i * 64 + k]) * e4m3_value(b[j * 64 + k]);
      const double got = d[i * 128 + j], err = std::fabs(got - exact);
      const double ulp = exact != 0 ? std::ldexp(1.0, std::ilogb(std::fabs(exact)) - 23) : std::ldexp(1.0, -149);
      if (got != static_cast<double>(static_cast<float>(exact))) ++r.mismatches;
      r.max_abs_err = std::fmax(r.max_abs_err, err);
      r.max_ulp_err = std::fmax(r.max_ulp_err, err / ulp);
      r.max_abs_sum = std::fmax(r.max_abs_sum, std::fabs(exact));
    }
  return r;
}

template <int V>
static double time_probe(int sms, int G) {
  const size_t smem = sizeof(probe_ns::Smem) + 1024;  // probe.cu's stage buffers
  CK(cudaFuncSetAttribute(probe_ns::probe<V>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  float* out;
  CK(cudaMalloc(&out, (size_t)sms * 256 * probe_ns::kNAcc * 4));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
  probe_ns::probe<V><<<sms, 384, smem>>>(out, G / 10);  // warm-up
  CK(cudaEventRecord(e0));
  probe_ns::probe<V><<<sms, 384, smem>>>(out, G);
  CK(cudaEventRecord(e1));
  CK(cudaEventSynchronize(e1));
  CK(cudaGetLastError());
  float ms = 0;
  CK(cudaEventElapsedTime(&ms, e0, e1));
  CK(cudaFree(out));
  const double flop = 2.0 * sms * G * 128.0 * NT * 64.0;  // 128 weight rows x NT tokens x 64 K per group
  return flop / (ms * 1e-3) / 1e12;
}

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "all";
  int dev = 0, sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  std::printf("{\n  \"sms\": %d", sms);
  if (mode == "exact" || mode == "all") {
    std::mt19937 rng(1);
    std::vector<ExactResult> res;
    std::vector<uint8_t> a(64 * 64), b(128 * 64);
    auto fill = [&](std::vector<uint8_t>& v, auto f) { for (size_t i = 0; i < v.size(); ++i) v[i] = f(i); };
    fill(a, [](size_t) { return int4_to_e4m3(-8); });
    fill(b, [](size_t) { return int4_to_e4m3(-8); });
    res.push_back(run_exact("int4 (-8)x(-8): I = +4096", a, b));
    fill(b, [](size_t i) { return int4_to_e4m3(i % 2 ? 7 : -8); });
    res.push_back(run_exact("int4 (-8)x(7|-8) alternating", a, b));
    fill(a, [&](size_t) { return int4_to_e4m3(int(rng() % 16) - 8); });
    fill(b, [&](size_t) { return int4_to_e4m3(int(rng() % 16) - 8); });
    res.push_back(run_exact("int4 random codes", a, b));
    fill(a, [&](size_t i) { return int4_to_e4m3((i / 64) % 2 ? 7 : -8); });
    fill(b, [&](size_t i) { return int4_to_e4m3((i % 64) < 32 ? 8 - 1 : -7); });
    res.push_back(run_exact("int4 cancelling halves", a, b));
    // W4A8: e4m3 activations over the whole exponent range (x int4 weights): not all exactly summable in fp32
    fill(a, [&](size_t) { return int4_to_e4m3(int(rng() % 16) - 8); });
    fill(b, [&](size_t) { uint8_t v; do { v = uint8_t(rng()); } while ((v & 0x7F) == 0x7F); return v; });
    res.push_back(run_exact("w4a8: random e4m3 (full range) x int4", a, b));
    fill(b, [&](size_t i) { return uint8_t(i % 64 == 0 ? 0x7E : (0x08 | (rng() & 0x87))); });
    res.push_back(run_exact("w4a8: one 448 + 63 tiny values per row", a, b));
    std::printf(",\n  \"exact\": [");
    for (size_t i = 0; i < res.size(); ++i)
      std::printf("%s\n    {\"case\": \"%s\", \"mismatches_vs_fp32_of_exact\": %ld, \"max_abs_err\": %.6g, "
                  "\"max_err_ulp_fp32\": %.3g, \"max_abs_sum\": %.6g}",
                  i ? "," : "", res[i].name.c_str(), res[i].mismatches, res[i].max_abs_err, res[i].max_ulp_err,
                  res[i].max_abs_sum);
    std::printf("\n  ]");
  }
  if (mode == "tops" || mode == "all") {
    const int G = 20000;
    std::printf(",\n  \"tops\": {\"int8_rs_i2f_fmul_ffma\": %.1f, \"e4m3_ss_fmul_ffma\": %.1f, "
                "\"e4m3_rs_signmag_fmul_ffma\": %.1f, \"w4a8_e4m3_ss_1ffma\": %.1f, \"w4a8_int8_ss_i2f_ffma\": %.1f, "
                "\"note\": \"probe.cu consumer loops, 2 consumer warpgroups of 64x%d, stub producer, no global memory\"}",
                time_probe<0>(sms, G), time_probe<3>(sms, G), time_probe<6>(sms, G), time_probe<4>(sms, G),
                time_probe<5>(sms, G), NT);
  }
  std::printf("\n}\n");
  return 0;
}
