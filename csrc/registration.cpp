// svdq's native library (python/svdq/_C.so): the op schemas and the few C functions Python reads with ctypes.
//
// Built on PyTorch's stable C ABI (csrc/torch_stable.h) and without Python headers, so one build loads into
// every torch >= 2.10 and every Python: python/svdq/_library.py loads it with torch.ops.load_library, which
// runs the registrations below. Implementations register per device elsewhere: csrc/cpu/ops_cpu.cpp (CPU, in
// this library), python/svdq/ops/w4a8_cpu.py (the CPU W4A8 ops, written with torch ops) and
// csrc/cuda/ops_cuda.cpp (CUDA, in _C_cuda.so, loaded only into a CUDA torch). Fake (meta) implementations
// for torch.compile live in python/svdq/_native.py next to the Python wrappers. Semantics: docs/numerics.md
// §4; contracts: docs/dev/contracts.md.

#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "cpu/dispatch.h"
#include "svdq_build_info.h"
#include "torch_stable.h"

STABLE_TORCH_LIBRARY(svdq, m) {
  // Smooth x [M, K] by λ, quantize it to INT4 per 64-group (fp32 scales) and compute the low-rank down
  // projection x · lora_down · diag(lora_scales) in the same pass over x (spec §4.1).
  // -> qact int8 [M, Kp/2] (canonical packing), ascales fp32 [M, Kp/64], lora_act fp32 [M, r]
  // act_shift δ > 0: shifted unsigned activations (spec §10): x̂ = (x + δ)/λ, codes 0..15, scale max|x̂|/15.
  m.def(
      "quantize_act(Tensor x, Tensor smooth, Tensor lora_down, Tensor? lora_scales, float act_shift=0.0)"
      " -> (Tensor qact, Tensor ascales, Tensor lora_act)");
  // quantize_act with the INT4 codes written as float8_e4m3fn bytes (exact), for the Hopper FP8 GEMM path:
  // -> qact uint8 [M, Kp], ascales fp32 [M, Kp/64], lora_act fp32 [M, r] — the same codes, scales and
  // lora_act as quantize_act.
  m.def(
      "quantize_act_e4m3(Tensor x, Tensor smooth, Tensor lora_down, Tensor? lora_scales)"
      " -> (Tensor qact, Tensor ascales, Tensor lora_act)");
  // Load-time repack of the canonical qweight int8 [N, Kp/2] / wscales [N, Kp/64] into the layout this
  // device's GEMM reads; the result keeps N as its leading dimension (the fake infers N from it).
  m.def("prepare_weight(Tensor qweight, Tensor wscales) -> (Tensor, Tensor)");
  // y [M, N] = Σ_g s_a s_w (q_a · q_w) + C(lora_act) · lora_upᵀ + bias, in out_dtype (spec §4.2);
  // act_unsigned: qact holds the unsigned codes of shifted activations (spec §10.2).
  m.def(
      "w4a4_gemm(Tensor qact, Tensor ascales, Tensor qweight, Tensor wscales, Tensor lora_act,"
      " Tensor lora_up, Tensor? bias, ScalarType out_dtype, bool act_unsigned=False) -> Tensor");
  // W4A8 (spec §8): smooth x and quantize it to FP8 e4m3 with one fp32 scale per token, plus the low-rank
  // down projection. -> qact uint8 [M, Kp] (e4m3 bytes), ascales fp32 [M], lora_act fp32 [M, r]
  m.def(
      "quantize_act_fp8(Tensor x, Tensor smooth, Tensor lora_down, Tensor? lora_scales)"
      " -> (Tensor qact, Tensor ascales, Tensor lora_act)");
  // y [M, N] = s_a[m] · Σ_g s_w (a_e4m3 · q_w) + C(lora_act) · lora_upᵀ + bias (spec §8.2); the weights are
  // the W4A4 ones as returned by prepare_weight (CPU), or by prepare_weight_sm90 (CUDA: sm_90 only).
  m.def(
      "w4a8_gemm(Tensor qact, Tensor ascales, Tensor qweight, Tensor wscales, Tensor lora_act,"
      " Tensor lora_up, Tensor? bias, ScalarType out_dtype) -> Tensor");
  // Hopper (sm_90a FP8-wgmma GEMMs, CUDA only; layout "cuda-sm90", python/svdq/ops/sm90_layout.py): canonical
  // qweight int8 [N, Kp/2] / wscales bf16|fp16 [N, Kp/64] -> e4m3 bytes uint8 [Np, Kp] and fp32 [Np, Kp/64],
  // Np = N rounded up to 128 (so the GEMMs take N from lora_up [N, r]).
  m.def("prepare_weight_sm90(Tensor qweight, Tensor wscales) -> (Tensor, Tensor)");
  // w4a4_gemm on quantize_act_e4m3's qact (uint8 [M, Kp]) and prepare_weight_sm90's weights (spec §4.2, exact).
  m.def(
      "w4a4_gemm_sm90(Tensor qact, Tensor ascales, Tensor qweight, Tensor wscales, Tensor lora_act,"
      " Tensor lora_up, Tensor? bias, ScalarType out_dtype) -> Tensor");
}

namespace {

// Copies s into out (NUL-terminated, truncated to out_len); returns s's full length.
size_t copy_out(const std::string& s, char* out, size_t out_len) {
  if (out && out_len) {
    const size_t n = s.size() < out_len - 1 ? s.size() : out_len - 1;
    std::memcpy(out, s.data(), n);
    out[n] = 0;
  }
  return s.size();
}

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ",") + x;
  return s;
}

}  // namespace

// What the build recorded (JSON, the same text as _C.json beside the library, which Python reads before
// loading). The C++ side of svdq.build_info(); Python adds the run-time fields.
extern "C" const char* svdq_build_info_json() { return SVDQ_BI_JSON; }

// The CPU kernel variants compiled in and supported by this CPU ("base,avx2"), and the active one. No C++
// exception crosses these functions (ctypes callers).
extern "C" size_t svdq_cpu_isas(char* out, size_t out_len) noexcept {
  try {
    return copy_out(join(svdq::cpu::supported_isas()), out, out_len);
  } catch (const std::exception& e) {
    return copy_out(std::string("error: ") + e.what(), out, out_len);
  }
}

extern "C" size_t svdq_active_cpu_isa(char* out, size_t out_len) noexcept {
  try {
    return copy_out(svdq::cpu::active_isa(), out, out_len);
  } catch (const std::exception& e) {
    return copy_out(std::string("error: ") + e.what(), out, out_len);
  }
}

// Switches the CPU kernel variant (tests compare them). Returns 0 and the previous variant's name in out, or
// 1 and the error message.
extern "C" int svdq_set_cpu_isa(const char* name, char* out, size_t out_len) noexcept {
  try {
    copy_out(svdq::cpu::set_isa(name), out, out_len);
    return 0;
  } catch (const std::exception& e) {
    copy_out(e.what(), out, out_len);
    return 1;
  }
}
