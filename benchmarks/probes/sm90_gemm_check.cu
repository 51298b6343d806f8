// Standalone device check of the Hopper GEMMs (csrc/cuda/w4a4_gemm_sm90*.cu), no torch: used by
// benchmarks/device_check.d/10-hopper.sh until the kernels are bound to the svdq ops.
//   quant     quantize_act_fp8 vs the spec computed on the host (IEEE fp32), bit for bit
//   check     both formats (exact W4A4, W4A8) x bf16/fp16, odd M, N not a multiple of 128, r in
//             {0,16,32,64,256}: output vs a double-precision reference of spec §4.2 / §8.2 (with C() = the
//             16-bit rounding of lora_act); pass = rel. error <= 1e-3 and every element within 2 ulp of the
//             output dtype + 1e-3 * max|row| (spec §4.3). Exit code 1 if any case fails.
//   memcheck  one small case of each format (run under compute-sanitizer).
//   bench     M = 4608, the four FLUX.1 shapes, r = 32, bf16: GEMM-only time of both kernels and cuBLAS
//             bf16 (cublasGemmEx, fp32 accumulate) -> JSON in the layer-benchmark schema (shapes[].ms,
//             shapes[].speedup_vs_bf16). quantize_act is NOT included (not bound yet): rows are *_gemm_*.
// Build: nvcc -O3 -std=c++17 -I csrc -gencode=arch=compute_90a,code=sm_90a benchmarks/probes/sm90_gemm_check.cu
//        csrc/cuda/w4a4_gemm_sm90.cu csrc/cuda/w4a4_gemm_sm90_w4a8.cu csrc/cuda/quantize_act_fp8.cu -lcublas
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <functional>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda/w4a4_gemm_sm90.h"
#include "cuda/w4a4_gemm_sm90_layout.cuh"

using namespace svdq::cuda::sm90;

#define CK(x)                                                                                       \
  do {                                                                                              \
    cudaError_t e_ = (x);                                                                           \
    if (e_ != cudaSuccess) {                                                                        \
      std::fprintf(stderr, "CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
      std::exit(2);                                                                                 \
    }                                                                                               \
  } while (0)

static double e4m3_value(uint8_t v) {
  const int s = v >> 7, e = (v >> 3) & 15, m = v & 7;
  const double x = e ? std::ldexp(1.0 + m / 8.0, e - 7) : std::ldexp(m / 8.0, -6);
  return s ? -x : x;
}
static uint16_t to16(float v, bool bf16) {
  if (bf16) { __nv_bfloat16 h = __float2bfloat16_rn(v); uint16_t u; std::memcpy(&u, &h, 2); return u; }
  __half h = __float2half_rn(v); uint16_t u; std::memcpy(&u, &h, 2); return u;
}
static float from16(uint16_t u, bool bf16) {
  if (bf16) { __nv_bfloat16 h; std::memcpy(&h, &u, 2); return __bfloat162float(h); }
  __half h; std::memcpy(&h, &u, 2); return __half2float(h);
}

struct Case {
  std::vector<uint8_t> qact;   // [M, K] e4m3
  std::vector<float> ascales;  // [M, G] or [M]
  std::vector<int8_t> qweight; // [N, K/2] canonical
  std::vector<int> codes;      // [N, K]
  std::vector<uint16_t> wscales, lora_up, bias;
  std::vector<float> lora_act;
};

static Case make_case(int M, int N, int K, int R, bool w4a8, bool bf16, uint32_t seed) {
  std::mt19937 rng(seed);
  const int G = K / 64;
  Case c;
  c.codes.resize((size_t)N * K);
  for (auto& q : c.codes) q = int(rng() % 16) - 8;
  c.qweight.resize((size_t)N * K / 2);
  for (size_t i = 0; i < c.qweight.size(); ++i)
    c.qweight[i] = int8_t((c.codes[2 * i] & 0xF) | ((c.codes[2 * i + 1] & 0xF) << 4));
  c.wscales.resize((size_t)N * G);
  for (auto& s : c.wscales) s = to16(0.002f * float(1 + rng() % 50), bf16);
  c.qact.resize((size_t)M * K);
  if (w4a8) {
    for (auto& v : c.qact) { uint8_t b; do { b = uint8_t(rng()); } while ((b & 0x7F) == 0x7F); v = b; }
    c.ascales.resize(M);
  } else {
    for (auto& v : c.qact) v = int4_to_e4m3(int(rng() % 16) - 8);
    c.ascales.resize((size_t)M * G);
  }
  for (auto& s : c.ascales) s = 0.0005f * float(1 + rng() % 100);
  c.lora_act.resize((size_t)M * R);
  for (auto& v : c.lora_act) v = float(int(rng() % 2001) - 1000) / 250.f;
  c.lora_up.resize((size_t)N * R);
  for (auto& v : c.lora_up) v = to16(float(int(rng() % 201) - 100) / 500.f, bf16);
  c.bias.resize(N);
  for (auto& v : c.bias) v = to16(float(int(rng() % 201) - 100) / 100.f, bf16);
  return c;
}

template <class T> static T* up(const std::vector<T>& v) {
  T* d = nullptr;
  CK(cudaMalloc(&d, std::max<size_t>(v.size(), 1) * sizeof(T)));
  if (!v.empty()) CK(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

struct Dev { GemmParams p; std::vector<void*> bufs; };

static Dev upload(const Case& c, int M, int N, int K, int R, bool bf16) {
  Dev d{};
  auto* qa = up(c.qact); auto* as = up(c.ascales); auto* qw = up(c.qweight); auto* ws16 = up(c.wscales);
  auto* la = up(c.lora_act); auto* lu = up(c.lora_up); auto* b = up(c.bias);
  uint8_t* wq; float* ws; void* out;
  CK(cudaMalloc(&wq, prepared_weight_bytes(N, K)));
  CK(cudaMalloc(&ws, prepared_wscale_count(N, K) * 4));
  CK(cudaMalloc(&out, (size_t)std::max(M, 1) * N * 2));
  CK(launch_prepare_weight_sm90(qw, ws16, bf16, N, K, wq, ws, 0));
  d.p = GemmParams{qa, as, wq, ws, R ? la : nullptr, R ? lu : nullptr, b, out, M, N, K, R, bf16};
  d.bufs = {qa, as, qw, ws16, la, lu, b, wq, ws, out};
  return d;
}

static bool check_case(int M, int N, int K, int R, bool w4a8, bool bf16, bool print) {
  const Case c = make_case(M, N, K, R, w4a8, bf16, 1000u * M + 7u * N + K + R + (w4a8 ? 1 : 0));
  Dev d = upload(c, M, N, K, R, bf16);
  CK(w4a8 ? launch_w4a8_gemm_sm90(d.p, 0) : launch_w4a4_gemm_sm90(d.p, 0));
  CK(cudaDeviceSynchronize());
  std::vector<uint16_t> y((size_t)M * N);
  CK(cudaMemcpy(y.data(), d.p.out, y.size() * 2, cudaMemcpyDeviceToHost));
  for (void* b : d.bufs) CK(cudaFree(b));
  const int G = K / 64;
  double num = 0, den = 0;
  long bad = 0;
  for (int m = 0; m < M; ++m) {
    std::vector<double> ref(N);
    double rowmax = 0;
    for (int n = 0; n < N; ++n) {
      double acc = 0;
      for (int g = 0; g < G; ++g) {
        double s = 0;  // exact group sum (integers, or multiples of 2^-9 for W4A8)
        for (int k = g * 64; k < g * 64 + 64; ++k) s += e4m3_value(c.qact[(size_t)m * K + k]) * c.codes[(size_t)n * K + k];
        const double sw = from16(c.wscales[(size_t)n * G + g], bf16);
        acc += w4a8 ? sw * double(float(s)) : double(c.ascales[(size_t)m * G + g]) * sw * s;
      }
      if (w4a8) acc *= c.ascales[m];
      for (int j = 0; j < R; ++j)
        acc += double(from16(to16(c.lora_act[(size_t)m * R + j], bf16), bf16)) * from16(c.lora_up[(size_t)n * R + j], bf16);
      acc += from16(c.bias[n], bf16);
      ref[n] = acc;
      rowmax = std::fmax(rowmax, std::fabs(acc));
    }
    for (int n = 0; n < N; ++n) {
      const double got = from16(y[(size_t)m * N + n], bf16), r16 = from16(to16(float(ref[n]), bf16), bf16);
      num += (got - ref[n]) * (got - ref[n]);
      den += ref[n] * ref[n];
      const double ulp = std::fabs(r16) * (bf16 ? std::ldexp(1.0, -7) : std::ldexp(1.0, -10));
      if (std::fabs(got - r16) > 2 * ulp + 1e-3 * rowmax) ++bad;
    }
  }
  const double rel = std::sqrt(num / std::fmax(den, 1e-300));
  const bool ok = rel <= 1e-3 && bad == 0 && std::isfinite(rel);
  if (print)
    std::printf("    {\"format\": \"%s\", \"dtype\": \"%s\", \"M\": %d, \"N\": %d, \"K\": %d, \"R\": %d, "
                "\"rel_err\": %.3g, \"elements_out_of_bound\": %ld, \"pass\": %s}",
                w4a8 ? "w4a8" : "w4a4_exact", bf16 ? "bf16" : "fp16", M, N, K, R, rel, bad, ok ? "true" : "false");
  return ok;
}

static float time_ms(const std::function<void()>& f, int iters) {
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
  for (int i = 0; i < 3; ++i) f();
  CK(cudaEventRecord(e0));
  for (int i = 0; i < iters; ++i) f();
  CK(cudaEventRecord(e1));
  CK(cudaEventSynchronize(e1));
  float ms = 0;
  CK(cudaEventElapsedTime(&ms, e0, e1));
  return ms / iters;
}

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "check";
  if (mode == "quant") {  // quantize_act_fp8 vs the spec computed here (IEEE fp32 on the host): bit for bit
    bool all = true;
    std::printf("{\"quantize_act_fp8\": [");
    const int cases[][2] = {{1, 64}, {37, 100}, {130, 3072}, {5, 12288}};
    for (int ci = 0; ci < 4; ++ci)
      for (bool bf16 : {true, false}) {
        const int M = cases[ci][0], K = cases[ci][1], Kp = (K + 63) / 64 * 64;
        std::mt19937 rng(ci * 2 + bf16);
        std::normal_distribution<float> nd;
        std::vector<uint16_t> x((size_t)M * K), sm(K);
        for (auto& v : x) v = to16(nd(rng) * (rng() % 50 == 0 ? 40.f : 1.f), bf16);
        for (int r = 0; r < M && M > 2; r += 3) for (int k = 0; k < K; ++k) x[(size_t)r * K + k] = 0;  // zero rows
        for (auto& v : sm) v = to16(0.5f + float(rng() % 1000) / 1000.f, bf16);
        auto* dx = up(x); auto* ds = up(sm);
        uint8_t* dq; float* da;
        CK(cudaMalloc(&dq, (size_t)M * Kp)); CK(cudaMalloc(&da, (size_t)M * 4));
        CK(launch_quantize_act_fp8(dx, ds, bf16, M, K, dq, da, 0));
        std::vector<uint8_t> q((size_t)M * Kp); std::vector<float> a(M);
        CK(cudaMemcpy(q.data(), dq, q.size(), cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(a.data(), da, a.size() * 4, cudaMemcpyDeviceToHost));
        long bad = 0;
        for (int m = 0; m < M; ++m) {
          float amax = 0;
          for (int k = 0; k < K; ++k) amax = std::fmax(amax, std::fabs(from16(x[(size_t)m * K + k], bf16) / from16(sm[k], bf16)));
          const float sc = amax / 448.0f;
          if (std::memcmp(&sc, &a[m], 4)) ++bad;
          for (int k = 0; k < Kp; ++k) {
            uint8_t want = 0;
            if (k < K && sc != 0) want = float_to_e4m3_rne(std::fmin(std::fmax(from16(x[(size_t)m * K + k], bf16) / from16(sm[k], bf16) / sc, -448.f), 448.f));
            if (q[(size_t)m * Kp + k] != want) ++bad;
          }
        }
        all = all && bad == 0;
        std::printf("%s\n  {\"M\": %d, \"K\": %d, \"dtype\": \"%s\", \"mismatches\": %ld}", ci || !bf16 ? "," : "", M, K,
                    bf16 ? "bf16" : "fp16", bad);
        CK(cudaFree(dx)); CK(cudaFree(ds)); CK(cudaFree(dq)); CK(cudaFree(da));
      }
    std::printf("\n], \"all_pass\": %s}\n", all ? "true" : "false");
    return all ? 0 : 1;
  }
  if (mode == "memcheck") {
    bool ok = check_case(37, 200, 128, 32, false, true, false) && check_case(5, 136, 192, 16, true, false, false);
    std::printf("memcheck case %s\n", ok ? "ok" : "FAILED");
    return ok ? 0 : 1;
  }
  if (mode == "check") {
    std::printf("{\"cases\": [\n");
    bool all = true, first = true;
    const int shapes[][4] = {{1, 128, 64, 0}, {37, 200, 128, 16}, {129, 256, 192, 32}, {255, 384, 256, 64},
                             {300, 136, 512, 256}, {513, 1024, 1024, 32}};
    for (bool w4a8 : {false, true})
      for (bool bf16 : {true, false})
        for (auto& s : shapes) {
          if (!first) std::printf(",\n");
          first = false;
          all = check_case(s[0], s[1], s[2], s[3], w4a8, bf16, true) && all;
        }
    std::printf("\n], \"all_pass\": %s}\n", all ? "true" : "false");
    return all ? 0 : 1;
  }
  // bench
  const int M = 4608, R = 32, iters = 20;
  const int shapes[][2] = {{3072, 9216}, {3072, 3072}, {3072, 12288}, {12288, 3072}};
  cublasHandle_t h;
  if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) { std::fprintf(stderr, "cublasCreate failed\n"); return 2; }
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("{\"device\": \"%s\", \"m\": %d, \"rank\": %d, \"dtype\": \"bf16\", \"iters\": %d, "
              "\"note\": \"GEMM only (quantize_act not included); svdq_sm90_gemm_r32 = exact W4A4, svdq_w4a8_gemm_r32 = W4A8\", "
              "\"shapes\": [\n", prop.name, M, R, iters);
  for (int si = 0; si < 4; ++si) {
    const int K = shapes[si][0], N = shapes[si][1];
    const Case ce = make_case(M, N, K, R, false, true, 1), c8 = make_case(M, N, K, R, true, true, 2);
    Dev de = upload(ce, M, N, K, R, true), d8 = upload(c8, M, N, K, R, true);
    __nv_bfloat16 *x, *w, *y;
    CK(cudaMalloc(&x, (size_t)M * K * 2)); CK(cudaMalloc(&w, (size_t)N * K * 2)); CK(cudaMalloc(&y, (size_t)M * N * 2));
    CK(cudaMemset(x, 0, (size_t)M * K * 2)); CK(cudaMemset(w, 0, (size_t)N * K * 2));
    const float alpha = 1.f, beta = 0.f;
    const float t_bf16 = time_ms([&] {
      cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &alpha, w, CUDA_R_16BF, K, x, CUDA_R_16BF, K, &beta, y,
                   CUDA_R_16BF, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    }, iters);
    const float t_exact = time_ms([&] { CK(launch_w4a4_gemm_sm90(de.p, 0)); }, iters);
    const float t_w4a8 = time_ms([&] { CK(launch_w4a8_gemm_sm90(d8.p, 0)); }, iters);
    const double flop = 2.0 * M * N * K;
    std::printf("%s  {\"K\": %d, \"N\": %d, \"ms\": {\"bf16\": %.5f, \"svdq_sm90_gemm_r32\": %.5f, \"svdq_w4a8_gemm_r32\": %.5f}, "
                "\"tflops\": {\"bf16\": %.1f, \"svdq_sm90_gemm_r32\": %.1f, \"svdq_w4a8_gemm_r32\": %.1f}, "
                "\"speedup_vs_bf16\": {\"bf16\": 1.0, \"svdq_sm90_gemm_r32\": %.3f, \"svdq_w4a8_gemm_r32\": %.3f}}",
                si ? ",\n" : "", K, N, t_bf16, t_exact, t_w4a8, flop / t_bf16 / 1e9, flop / t_exact / 1e9,
                flop / t_w4a8 / 1e9, t_bf16 / t_exact, t_bf16 / t_w4a8);
    for (void* b : de.bufs) CK(cudaFree(b));
    for (void* b : d8.bufs) CK(cudaFree(b));
    CK(cudaFree(x)); CK(cudaFree(w)); CK(cudaFree(y));
  }
  std::printf("\n]}\n");
  cublasDestroy(h);
  return 0;
}
