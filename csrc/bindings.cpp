// svdq._C: the op schemas (TORCH_LIBRARY(svdq)) and a small pybind11 module for what is not an op.
//
// Implementations register per device elsewhere: csrc/cpu/ops_cpu.cpp (CPU) and the CUDA engineer's
// binding .cpp (csrc/cuda, TORCH_LIBRARY_IMPL(svdq, CUDA)). Fake (meta) implementations for torch.compile
// live in python/svdq/_native.py next to the Python wrappers. Semantics: docs/numerics.md §4; contracts:
// docs/dev/contracts.md. Everything registers when the shared library is loaded (import svdq._C).

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "cpu/dispatch.h"
#include "svdq_build_info.h"

TORCH_LIBRARY(svdq, m) {
  // Smooth x [M, K] by λ, quantize it to INT4 per 64-group (fp32 scales) and compute the low-rank down
  // projection x · lora_down · diag(lora_scales) in the same pass over x (spec §4.1).
  // -> qact int8 [M, Kp/2] (canonical packing), ascales fp32 [M, Kp/64], lora_act fp32 [M, r]
  m.def(
      "quantize_act(Tensor x, Tensor smooth, Tensor lora_down, Tensor? lora_scales)"
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
  // y [M, N] = Σ_g s_a s_w (q_a · q_w) + C(lora_act) · lora_upᵀ + bias, in out_dtype (spec §4.2).
  m.def(
      "w4a4_gemm(Tensor qact, Tensor ascales, Tensor qweight, Tensor wscales, Tensor lora_act,"
      " Tensor lora_up, Tensor? bias, ScalarType out_dtype) -> Tensor");
  // W4A8 (spec §8): smooth x and quantize it to FP8 e4m3 with one fp32 scale per token, plus the low-rank
  // down projection. -> qact uint8 [M, Kp] (e4m3 bytes), ascales fp32 [M], lora_act fp32 [M, r]
  m.def(
      "quantize_act_fp8(Tensor x, Tensor smooth, Tensor lora_down, Tensor? lora_scales)"
      " -> (Tensor qact, Tensor ascales, Tensor lora_act)");
  // y [M, N] = s_a[m] · Σ_g s_w (a_e4m3 · q_w) + C(lora_act) · lora_upᵀ + bias (spec §8.2); the weights are
  // the W4A4 ones as returned by prepare_weight.
  m.def(
      "w4a8_gemm(Tensor qact, Tensor ascales, Tensor qweight, Tensor wscales, Tensor lora_act,"
      " Tensor lora_up, Tensor? bias, ScalarType out_dtype) -> Tensor");
}

namespace {

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    size_t end = s.find(',', start);
    if (end == std::string::npos) end = s.size();
    if (end > start) out.push_back(s.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

pybind11::dict build_info() {
  pybind11::dict d;
  d["version"] = SVDQ_BI_VERSION;
  d["native"] = true;
  d["torch_version"] = SVDQ_BI_TORCH_VERSION;
  d["torch_cuda"] = SVDQ_BI_TORCH_CUDA;
  d["cuda"] = bool(SVDQ_BI_CUDA);
  d["cuda_archs"] = split(SVDQ_BI_CUDA_ARCHS);
  d["cuda_not_built_because"] = SVDQ_BI_CUDA_REASON;
  d["cuda_toolkit_root"] = SVDQ_BI_TOOLKIT_ROOT;
  d["nvcc_version"] = SVDQ_BI_NVCC;
  d["cxx_compiler"] = SVDQ_BI_CXX;
  d["build_type"] = SVDQ_BI_BUILD_TYPE;
  d["cpu_isas_compiled"] = split(SVDQ_BI_CPU_ISAS);
  d["cpu_isa_flags"] = SVDQ_BI_CPU_ISA_FLAGS;
  d["cpu_isas_supported"] = svdq::cpu::supported_isas();
  d["cpu_isa"] = svdq::cpu::active_isa();
  d["system_processor"] = SVDQ_BI_SYSTEM_PROCESSOR;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "svdq native extension: registers the torch ops svdq::* (see svdq._native)";
  m.def("build_info", &build_info, "What this extension was built with (compilers, CUDA archs, CPU ISAs).");
  m.def("set_cpu_isa", &svdq::cpu::set_isa, pybind11::arg("name"),
        "Use CPU kernel variant `name` ('base', 'avx2', 'avx512'); returns the previous one. For tests.");
}
