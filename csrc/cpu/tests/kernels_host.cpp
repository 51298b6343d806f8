// Host harness for the torch-free CPU kernels (csrc/cpu/kernels_isa.cpp): runs quantize_act_rows and the
// GEMM (gemm_prepare_rows + gemm_tasks) of one ISA level on inputs from a file and writes every output, so
// that tests/test_shifted_act.py can compare them with the reference (docs/numerics.md §4, §10) without
// building the extension. Built by the test with g++, once per ISA level this CPU runs:
//   g++ -std=c++17 -O2 -Icsrc -DSVDQ_ISA=<isa> -DSVDQ_ISA_<isa>=1 -DHARNESS_NS=<isa> <isa -march flags>
//       csrc/cpu/tests/kernels_host.cpp csrc/cpu/kernels_isa.cpp
// Usage: kernels_host IN OUT. IN (little endian): int64 M, K, N, r; float act_shift; int32 act_unsigned;
// then fp32 x [M, K], smooth [K], lora_down [K, r], lora_up [N, r], wscales [N, G], bias [N], and int8
// qweight [N, Kp/2]. OUT: int8 qact [M, Kp/2], fp32 ascales [M, G], lora_act [M, r], y [M, N] (fp32 output).
// The GEMM reads the quantizer's own qact/ascales/lora_act, as the op does. Single-threaded: the ops'
// threading (at::parallel_for over row blocks / tasks) only splits these same calls.
#include "cpu/kernels.h"

#include <cstdio>
#include <cstdlib>
#include <vector>

#ifndef HARNESS_NS
#error "compile with -DHARNESS_NS=<isa namespace>"
#endif

namespace k = svdq::cpu;
namespace isa = svdq::cpu::HARNESS_NS;

template <typename T>
static void read_into(FILE* f, std::vector<T>& v, size_t n) {
  v.resize(n);
  if (n && std::fread(v.data(), sizeof(T), n, f) != n) {
    std::fprintf(stderr, "kernels_host: short input\n");
    std::exit(2);
  }
}

template <typename T>
static void write_out(FILE* f, const std::vector<T>& v) {
  if (!v.empty()) std::fwrite(v.data(), sizeof(T), v.size(), f);
}

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: kernels_host IN OUT\n");
    return 2;
  }
  FILE* in = std::fopen(argv[1], "rb");
  if (!in) return 2;
  int64_t hdr[4];
  float shift;
  int32_t unsigned_codes;
  if (std::fread(hdr, 8, 4, in) != 4 || std::fread(&shift, 4, 1, in) != 1 || std::fread(&unsigned_codes, 4, 1, in) != 1)
    return 2;
  const int64_t M = hdr[0], K = hdr[1], N = hdr[2], r = hdr[3];
  const int64_t G = (K + k::kGroup - 1) / k::kGroup, Kp = G * k::kGroup, rp = (r + 15) / 16 * 16;
  std::vector<float> x, smooth, down, up, ws, bias;
  std::vector<int8_t> qw;
  read_into(in, x, M * K);
  read_into(in, smooth, K);
  read_into(in, down, K * r);
  read_into(in, up, N * r);
  read_into(in, ws, N * G);
  read_into(in, bias, N);
  read_into(in, qw, N * Kp / 2);
  std::fclose(in);

  // the kernel's rank tile: lora_down [K, rp] with zero columns r..rp (as csrc/cpu/ops_cpu.cpp passes it)
  std::vector<float> down_p(K * rp, 0.0f);
  for (int64_t kk = 0; kk < K; ++kk)
    for (int64_t j = 0; j < r; ++j) down_p[kk * rp + j] = down[kk * r + j];

  std::vector<int8_t> qact(M * Kp / 2);
  std::vector<float> ascales(M * G), lora_act(M * r), y(M * N);
  k::QuantizeActParams qp{};
  qp.M = M; qp.K = K; qp.G = G; qp.r = r;
  qp.x = x.data(); qp.xdtype = k::DType::f32;
  qp.smooth = smooth.data(); qp.lora_down = down_p.data(); qp.lora_scales = nullptr;
  qp.qact = qact.data(); qp.ascales = ascales.data(); qp.lora_act = lora_act.data();
  qp.act_shift = shift;
  if (M) isa::quantize_act_rows(qp, 0, M);

  const int64_t Mp = k::padded_rows(M);
  std::vector<int16_t> a_unpacked(Mp * Kp + 32);
  std::vector<float> lora_act_c(M * r + 1);
  k::GemmParams gp{};
  gp.M = M; gp.N = N; gp.G = G; gp.r = r;
  gp.qact = qact.data(); gp.ascales = ascales.data(); gp.qweight = qw.data(); gp.wscales = ws.data();
  gp.lora_act = lora_act.data(); gp.lora_up = up.data(); gp.bias = bias.data();
  gp.y = y.data(); gp.ydtype = k::DType::f32;
  gp.a_unpacked = a_unpacked.data(); gp.lora_act_c = lora_act_c.data();
  gp.n_tasks_m = 1;
  gp.act_unsigned = unsigned_codes != 0;
  if (M && N) {
    isa::gemm_prepare_rows(gp, 0, Mp);
    isa::gemm_tasks(gp, 0, (N + k::kColTile - 1) / k::kColTile);
  }

  FILE* out = std::fopen(argv[2], "wb");
  if (!out) return 2;
  write_out(out, qact);
  write_out(out, ascales);
  write_out(out, lora_act);
  write_out(out, y);
  std::fclose(out);
  return 0;
}
