// CPU kernels for the svdq ops — plain pointers and sizes in, no torch headers.
//
// csrc/cpu/kernels_isa.cpp is compiled once per ISA level (CMakeLists.txt: base = x86-64-v2,
// avx2 = x86-64-v3, avx512 = x86-64-v4 + VNNI) into the namespaces svdq::cpu::base / ::avx2 / ::avx512;
// csrc/cpu/ops_cpu.cpp validates the tensors, picks the best level the CPU supports (override with
// SVDQ_CPU_ISA=base|avx2|avx512) and runs the kernels in parallel with at::parallel_for. Threading stays in
// the torch-including file so that only one OpenMP runtime (torch's) is ever used.
#pragma once

#include <cstdint>

namespace svdq::cpu {

constexpr int kGroup = 64;  // GROUP_SIZE: input channels per scale (docs/numerics.md §1)

// dtype of x / y as the kernels see it (bf16 and fp16 are raw uint16 bit patterns)
enum class DType : int { f32 = 0, bf16 = 1, f16 = 2 };

struct QuantizeActParams {
  int64_t M, K, G, r;        // rows, input channels, groups (Kp / 64), rank
  const void* x;             // [M, K] dtype `xdtype`, row-major contiguous
  DType xdtype;
  const float* smooth;       // [K] fp32 (λ converted from the model dtype)
  const float* lora_down;    // [K, r] fp32
  const float* lora_scales;  // [r] fp32, or nullptr (all ones)
  int8_t* qact;              // [M, G * 32] packed INT4, low nibble = even k
  float* ascales;            // [M, G]
  float* lora_act;           // [M, r]
  // Spec §10: 0 = signed codes (§4.1); δ > 0 = shifted unsigned activations: x̂ = (x + δ) / λ, codes 0..15
  // (unsigned nibbles), scale = max|x̂| / 15. lora_act still reads the raw x. Zero-initialised callers
  // (`QuantizeActParams p{}`) get §4.1.
  float act_shift;
};

struct GemmParams {
  int64_t M, N, G, r;
  const int8_t* qact;        // [M, G * 32] packed INT4
  const float* ascales;      // [M, G] fp32
  const int8_t* qweight;     // [N, G * 32] packed INT4 (canonical layout: prepare_weight is a copy on CPU)
  const float* wscales;      // [N, G] fp32 (s_w converted from the model dtype; exact)
  const float* lora_act;     // [M, r] fp32, rounded to out dtype inside the kernel (spec §4.2, C(·))
  const float* lora_up;      // [N, r] fp32
  const float* bias;         // [N] fp32 or nullptr
  void* y;                   // [M, N] `ydtype`
  DType ydtype;
  // Workspace prepared by gemm_prepare_rows, shared by every tile task:
  int16_t* a_unpacked;       // [Mp, G * 64]  q_a as int16 (Mp = M rounded up to the row tile, zero rows)
  float* lora_act_c;         // [M, r]  C(lora_act)
  int64_t n_tasks_m;         // tasks split M into this many chunks (set by the caller)
  // Spec §10.2: qact holds unsigned codes 0..15 (a quantize_act_rows run with act_shift > 0); the shift's
  // correction is in `bias`. gemm_prepare_rows and gemm_tasks must see the same value.
  bool act_unsigned;
};

// Sizes the caller needs to allocate the workspace and schedule tasks (same for every ISA).
constexpr int kRowTile = 4;    // rows of y computed together (register tile)
// Rejected: 8-row tiles (16 vpdpbusd accumulators, two 4-row passes in the int16 kernel): measured on 1 Zen 4
// core, 256x768->2304: avx512 5.3 ms vs 4.6 ms, avx2 10.0 vs 7.5, base 28.7 vs 20.2 (noisy machine, load ~7).
constexpr int kColTile = 32;   // columns of y computed together (one int16 weight panel row = 64 bytes)
inline int64_t padded_rows(int64_t M) { return (M + kRowTile - 1) / kRowTile * kRowTile; }

#define SVDQ_DECLARE_ISA(ns)                                                                   \
  namespace ns {                                                                               \
  void quantize_act_rows(const QuantizeActParams& p, int64_t m0, int64_t m1);                  \
  void gemm_prepare_rows(const GemmParams& p, int64_t m0, int64_t m1);                         \
  void gemm_tasks(const GemmParams& p, int64_t t0, int64_t t1);                                \
  }

SVDQ_DECLARE_ISA(base)
SVDQ_DECLARE_ISA(avx2)
SVDQ_DECLARE_ISA(avx512)
#undef SVDQ_DECLARE_ISA

}  // namespace svdq::cpu
