// ops_cuda.cpp — CUDA implementations of the svdq ops (schemas: csrc/bindings.cpp, contracts:
// docs/dev/contracts.md, numerics: docs/numerics.md §4).
//
// Each op: shape comments, checks that name the tensor / shape / dtype / device, a device guard, the
// current stream, then one launcher call (csrc/cuda/*.h: plain pointers, cudaError_t back). Error codes are
// turned into messages that print M/N/K/R and the MMA path.
//
// Environment (read on every call, so tests can switch per call):
//   SVDQ_FORCE_INT4_MMA=1   w4a4_gemm uses the native int4 mma path even on sm_90 (emulated there, slow;
//                           for cross-checking). Default: int8 path on sm_90–sm_10x, int4 elsewhere.
//   SVDQ_QACT_KSPLIT=n      quantize_act uses n K-splits instead of its automatic plan (benchmark sweeps).

#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <climits>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>

#include "cuda/quantize_act.h"
#include "cuda/w4a4_gemm.h"

namespace svdq {
namespace {

constexpr int64_t kGroup = 64;
constexpr int64_t kMaxRank = 512;

int64_t padded_k(int64_t k) { return (k + kGroup - 1) / kGroup * kGroup; }

std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

// "x [4, 8] BFloat16 on cuda:0"
std::string describe(const char* name, const at::Tensor& t) {
  return std::string(name) + " " + shape_str(t) + " " + std::string(c10::toString(t.scalar_type())) + " on " +
         t.device().str();
}

void check_cuda(const char* op, const char* name, const at::Tensor& t, const at::Device& dev) {
  TORCH_CHECK(t.is_cuda(), op, ": ", describe(name, t), " must be a CUDA tensor (the CUDA implementation was ",
              "selected because another argument is on ", dev.str(), ")");
  TORCH_CHECK(t.device() == dev, op, ": ", describe(name, t), " must be on the same device as the other ",
              "inputs (", dev.str(), ")");
}

bool is_16bit(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// contiguous and 16-byte aligned (a copy when needed; kernels vectorize their loads)
at::Tensor dense16(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (c.numel() > 0 && !aligned16(c)) c = c.clone(at::MemoryFormat::Contiguous);
  return c;
}

bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v && (std::strcmp(v, "1") == 0 || std::strcmp(v, "true") == 0 || std::strcmp(v, "ON") == 0 ||
               std::strcmp(v, "on") == 0 || std::strcmp(v, "yes") == 0);
}

int env_int(const char* name, int dflt) {
  const char* v = std::getenv(name);
  if (!v || !*v) return dflt;
  return std::atoi(v);
}

const char* path_name(cuda::MmaPath p) { return p == cuda::MmaPath::kInt4 ? "int4 mma" : "int8 mma"; }

// The GEMM path for the current device. sm_90 / sm_10x have no (fast) int4 tensor cores: int8 path.
// sm_75–sm_89 and sm_120 (w4a4_gemm.h) use native int4. SVDQ_FORCE_INT4_MMA=1 overrides.
cuda::MmaPath choose_path(int cc_major, int cc_minor) {
  (void)cc_minor;
  if (env_flag("SVDQ_FORCE_INT4_MMA")) return cuda::MmaPath::kInt4;
  return (cc_major >= 9 && cc_major < 12) ? cuda::MmaPath::kInt8 : cuda::MmaPath::kInt4;
}

// ------------------------------------------------------------------------------------------------------------
// svdq::quantize_act(Tensor x, Tensor smooth, Tensor lora_down, Tensor? lora_scales)
//     -> (Tensor qact, Tensor ascales, Tensor lora_act)
// ------------------------------------------------------------------------------------------------------------
// e4m3 = true: svdq::quantize_act_e4m3 — the same kernel writes qact as uint8 [M, Kp] e4m3 bytes.
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_act_impl(const at::Tensor& x,        // [M, K] bf16/fp16
                                                                 const at::Tensor& smooth,   // [K]
                                                                 const at::Tensor& lora_down,  // [K, r] x.dtype
                                                                 const std::optional<at::Tensor>& lora_scales,  // [r] fp32
                                                                 bool e4m3) {
  const char* op = e4m3 ? "svdq::quantize_act_e4m3 (CUDA)" : "svdq::quantize_act (CUDA)";
  TORCH_CHECK(x.is_cuda(), op, ": ", describe("x", x), " must be a CUDA tensor");
  const at::Device dev = x.device();
  check_cuda(op, "smooth", smooth, dev);
  check_cuda(op, "lora_down", lora_down, dev);
  TORCH_CHECK(x.dim() == 2, op, ": ", describe("x", x), " must be 2-D [M, K] (flatten leading dims first)");
  TORCH_CHECK(is_16bit(x.scalar_type()), op, ": ", describe("x", x),
              " must be bfloat16 or float16 (fp32 activations run on the CPU/reference backends only)");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K >= 1, op, ": ", describe("x", x), " must have K >= 1 columns");
  TORCH_CHECK(smooth.dim() == 1 && smooth.size(0) == K, op, ": ", describe("smooth", smooth), " must be [K] = [",
              K, "] to match ", describe("x", x));
  TORCH_CHECK(smooth.scalar_type() == at::kFloat || is_16bit(smooth.scalar_type()), op, ": ",
              describe("smooth", smooth), " must be float32, bfloat16 or float16");
  TORCH_CHECK(lora_down.dim() == 2 && lora_down.size(0) == K, op, ": ", describe("lora_down", lora_down),
              " must be [K, r] with K = ", K, " (from ", describe("x", x), ")");
  const int64_t r = lora_down.size(1);
  TORCH_CHECK(r % 16 == 0 && r <= kMaxRank, op, ": ", describe("lora_down", lora_down),
              " has rank r = ", r, "; the CUDA kernels need r % 16 == 0 and r <= ", kMaxRank,
              " (SVDQLinear pads the rank with zero columns)");
  TORCH_CHECK(r == 0 || lora_down.scalar_type() == x.scalar_type(), op, ": ", describe("lora_down", lora_down),
              " must have the dtype of ", describe("x", x), " (the low-rank branch runs on 16-bit tensor cores)");
  at::Tensor scales;
  if (lora_scales.has_value() && lora_scales->defined()) {
    scales = *lora_scales;
    check_cuda(op, "lora_scales", scales, dev);
    TORCH_CHECK(scales.dim() == 1 && scales.size(0) == r, op, ": ", describe("lora_scales", scales),
                " must be [r] = [", r, "] (r from ", describe("lora_down", lora_down), ")");
    TORCH_CHECK(scales.scalar_type() == at::kFloat, op, ": ", describe("lora_scales", scales),
                " must be float32");
    scales = scales.contiguous();
  }

  const c10::cuda::CUDAGuard guard(dev);
  const int64_t kp = padded_k(K), groups = kp / kGroup;
  const auto opts = x.options();
  at::Tensor qact = e4m3 ? at::empty({M, kp}, opts.dtype(at::kByte)) : at::empty({M, kp / 2}, opts.dtype(at::kChar));
  at::Tensor ascales = at::empty({M, groups}, opts.dtype(at::kFloat));
  at::Tensor lora_act = at::empty({M, r}, opts.dtype(at::kFloat));
  if (M == 0) return {qact, ascales, lora_act};

  at::Tensor xc = x.stride(1) == 1 && x.stride(0) >= K ? x : x.contiguous();
  // λ: the kernel reads x's dtype or fp32; any other float dtype is converted to fp32 (exact).
  at::Tensor lam = smooth.scalar_type() == x.scalar_type() ? smooth.contiguous() : smooth.to(at::kFloat).contiguous();
  at::Tensor down = r > 0 ? dense16(lora_down) : lora_down;

  const int ksplit_override = env_int("SVDQ_QACT_KSPLIT", 0);
  const size_t ws_bytes = cuda::quantize_act_workspace_bytes(M, K, (int)r, ksplit_override);
  at::Tensor ws;
  if (ws_bytes > 0) ws = at::empty({(int64_t)(ws_bytes / sizeof(float))}, opts.dtype(at::kFloat));

  cuda::QuantizeActParams p;
  p.x = xc.data_ptr();
  p.M = M;
  p.K = K;
  p.ldx = xc.stride(0);
  p.dtype = x.scalar_type() == at::kBFloat16 ? cuda::ActDtype::kBF16 : cuda::ActDtype::kFP16;
  p.smooth = lam.data_ptr();
  p.smooth_fp32 = lam.scalar_type() == at::kFloat;
  p.lora_down = r > 0 ? down.data_ptr() : nullptr;
  p.r = (int)r;
  p.lora_scales = scales.defined() ? scales.data_ptr<float>() : nullptr;
  p.qact = static_cast<int8_t*>(qact.data_ptr());
  p.e4m3 = e4m3;
  p.ascales = ascales.data_ptr<float>();
  p.lora_act = r > 0 ? lora_act.data_ptr<float>() : nullptr;
  p.workspace = ws.defined() ? ws.data_ptr<float>() : nullptr;
  p.ksplit_override = ksplit_override;

  const cudaError_t err = cuda::launch_quantize_act(p, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed (", cudaGetErrorName(err), ": ",
              cudaGetErrorString(err), ") for M=", M, " K=", K, " Kp=", kp, " r=", r, " x dtype ",
              c10::toString(x.scalar_type()), ", smooth dtype ", c10::toString(lam.scalar_type()), ", on ",
              dev.str());
  return {qact, ascales, lora_act};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_act_cuda(const at::Tensor& x, const at::Tensor& smooth,
                                                                 const at::Tensor& lora_down,
                                                                 const std::optional<at::Tensor>& lora_scales) {
  return quantize_act_impl(x, smooth, lora_down, lora_scales, false);
}

// svdq::quantize_act_e4m3: qact uint8 [M, Kp], each INT4 code as its float8_e4m3fn byte (exact).
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_act_e4m3_cuda(const at::Tensor& x, const at::Tensor& smooth,
                                                                      const at::Tensor& lora_down,
                                                                      const std::optional<at::Tensor>& lora_scales) {
  return quantize_act_impl(x, smooth, lora_down, lora_scales, true);
}

// ------------------------------------------------------------------------------------------------------------
// svdq::prepare_weight(Tensor qweight, Tensor wscales) -> (Tensor, Tensor)
//   canonical qweight int8 [N, Kp/2], wscales bf16/fp16 [N, Kp/64]
//   -> prepared qweight int8 [N, Kp/2] and prepared wscales fp32 [N, Kp/64] (the GEMM's fragment layout).
// The leading dim stays N (fakes infer N from it); the contents are permuted (group-major, mma_layout.cuh §4).
// Should the GEMM's prepared sizes ever exceed N rows (padded tiles), the returned tensors are views of the
// first N rows of the padded buffer, and w4a4_gemm checks that the storage behind them is large enough.
// ------------------------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> prepare_weight_cuda(const at::Tensor& qweight,   // [N, Kp/2] int8
                                                       const at::Tensor& wscales) {  // [N, Kp/64] bf16/fp16
  constexpr const char* op = "svdq::prepare_weight (CUDA)";
  TORCH_CHECK(qweight.is_cuda(), op, ": ", describe("qweight", qweight), " must be a CUDA tensor");
  const at::Device dev = qweight.device();
  check_cuda(op, "wscales", wscales, dev);
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kChar, op, ": ", describe("qweight", qweight),
              " must be int8 [N, Kp/2] (canonical packing, docs/numerics.md §3)");
  const int64_t N = qweight.size(0), kp = qweight.size(1) * 2;
  TORCH_CHECK(N >= 1 && kp >= kGroup && kp % kGroup == 0, op, ": ", describe("qweight", qweight),
              " must have N >= 1 rows and Kp/2 columns with Kp a positive multiple of 64");
  TORCH_CHECK(wscales.dim() == 2 && wscales.size(0) == N && wscales.size(1) == kp / kGroup, op, ": ",
              describe("wscales", wscales), " must be [N, Kp/64] = [", N, ", ", kp / kGroup, "] to match ",
              describe("qweight", qweight));
  TORCH_CHECK(is_16bit(wscales.scalar_type()), op, ": ", describe("wscales", wscales),
              " must be bfloat16 or float16 on CUDA (fp32 models run on the CPU/reference backends)");
  TORCH_CHECK(N <= INT_MAX && kp <= INT_MAX, op, ": N=", N, " Kp=", kp, " exceed the kernel's int range");

  const c10::cuda::CUDAGuard guard(dev);
  at::Tensor qw = qweight.contiguous();
  at::Tensor ws = wscales.contiguous();
  const size_t qbytes = cuda::prepared_qweight_bytes((int)N, (int)kp);
  const size_t sbytes = cuda::prepared_wscales_bytes((int)N, (int)kp);
  const int64_t n_pad = (int64_t)(qbytes / (size_t)(kp / 2));
  TORCH_CHECK(n_pad >= N && (size_t)n_pad * (size_t)(kp / 2) == qbytes &&
                  (size_t)n_pad * (size_t)(kp / kGroup) * sizeof(float) == sbytes,
              op, ": the GEMM's prepared sizes (", qbytes, " B, ", sbytes, " B for N=", N, ", Kp=", kp,
              ") are not whole padded rows; ops_cuda.cpp and w4a4_gemm.h disagree");
  at::Tensor qbuf = at::empty({n_pad, kp / 2}, qweight.options().dtype(at::kChar));
  at::Tensor sbuf = at::empty({n_pad, kp / kGroup}, qweight.options().dtype(at::kFloat));
  const cudaError_t err =
      cuda::launch_repack_weight(qw.data_ptr<int8_t>(), ws.data_ptr(), ws.scalar_type() == at::kBFloat16, (int)N,
                                 (int)kp, qbuf.data_ptr(), sbuf.data_ptr(), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, op, ": repack kernel failed (", cudaGetErrorName(err), ": ",
              cudaGetErrorString(err), ") for N=", N, " Kp=", kp, " on ", dev.str());
  if (n_pad == N) return {qbuf, sbuf};
  return {qbuf.narrow(0, 0, N), sbuf.narrow(0, 0, N)};
}

// Bytes of storage reachable from t's data pointer.
int64_t storage_bytes_from(const at::Tensor& t) {
  return (int64_t)t.storage().nbytes() - t.storage_offset() * (int64_t)t.element_size();
}

// ------------------------------------------------------------------------------------------------------------
// svdq::w4a4_gemm(Tensor qact, Tensor ascales, Tensor qweight, Tensor wscales, Tensor lora_act, Tensor lora_up,
//                 Tensor? bias, ScalarType out_dtype) -> Tensor y [M, N] out_dtype
// ------------------------------------------------------------------------------------------------------------
at::Tensor w4a4_gemm_cuda(const at::Tensor& qact,      // [M, Kp/2] int8 (quantize_act)
                          const at::Tensor& ascales,   // [M, Kp/64] fp32
                          const at::Tensor& qweight,   // [N, Kp/2] int8, prepared (prepare_weight on CUDA)
                          const at::Tensor& wscales,   // [N, Kp/64] fp32, prepared
                          const at::Tensor& lora_act,  // [M, r] fp32
                          const at::Tensor& lora_up,   // [N, r] out_dtype
                          const std::optional<at::Tensor>& bias,  // [N] out_dtype or None
                          at::ScalarType out_dtype) {
  constexpr const char* op = "svdq::w4a4_gemm (CUDA)";
  TORCH_CHECK(qact.is_cuda(), op, ": ", describe("qact", qact), " must be a CUDA tensor");
  const at::Device dev = qact.device();
  check_cuda(op, "ascales", ascales, dev);
  check_cuda(op, "qweight", qweight, dev);
  check_cuda(op, "wscales", wscales, dev);
  check_cuda(op, "lora_act", lora_act, dev);
  check_cuda(op, "lora_up", lora_up, dev);
  TORCH_CHECK(is_16bit(out_dtype), op, ": out_dtype ", c10::toString(out_dtype),
              " must be bfloat16 or float16 on CUDA");
  TORCH_CHECK(qact.dim() == 2 && qact.scalar_type() == at::kChar, op, ": ", describe("qact", qact),
              " must be int8 [M, Kp/2] from svdq::quantize_act");
  const int64_t M = qact.size(0), kp = qact.size(1) * 2, groups = kp / kGroup;
  TORCH_CHECK(kp >= kGroup && kp % kGroup == 0, op, ": ", describe("qact", qact),
              " must have Kp/2 columns with Kp a positive multiple of 64");
  TORCH_CHECK(ascales.dim() == 2 && ascales.size(0) == M && ascales.size(1) == groups &&
                  ascales.scalar_type() == at::kFloat,
              op, ": ", describe("ascales", ascales), " must be float32 [M, Kp/64] = [", M, ", ", groups,
              "] to match ", describe("qact", qact));
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kChar && qweight.size(1) * 2 == kp, op, ": ",
              describe("qweight", qweight), " must be the prepared int8 [N, Kp/2] with Kp = ", kp,
              " (from ", describe("qact", qact), ")");
  const int64_t N = qweight.size(0);
  TORCH_CHECK(N >= 1, op, ": ", describe("qweight", qweight), " must have N >= 1 rows");
  TORCH_CHECK(wscales.dim() == 2 && wscales.size(0) == N && wscales.size(1) == groups &&
                  wscales.scalar_type() == at::kFloat,
              op, ": ", describe("wscales", wscales), " must be the prepared float32 [N, Kp/64] = [", N, ", ",
              groups, "] (call svdq::prepare_weight on the CUDA tensors first)");
  TORCH_CHECK(M <= INT_MAX && N <= INT_MAX && kp <= INT_MAX, op, ": M=", M, " N=", N, " Kp=", kp,
              " exceed the kernel's int range");
  const size_t qbytes = cuda::prepared_qweight_bytes((int)N, (int)kp);
  const size_t sbytes = cuda::prepared_wscales_bytes((int)N, (int)kp);
  TORCH_CHECK(qweight.is_contiguous() && storage_bytes_from(qweight) >= (int64_t)qbytes, op, ": ",
              describe("qweight", qweight), " is not a prepared weight: the GEMM reads ", qbytes,
              " contiguous bytes (N padded to whole tiles) but the tensor's storage holds ",
              storage_bytes_from(qweight), " (pass the tensors returned by svdq::prepare_weight unchanged; do not "
              "clone/slice them)");
  TORCH_CHECK(wscales.is_contiguous() && storage_bytes_from(wscales) >= (int64_t)sbytes, op, ": ",
              describe("wscales", wscales), " is not a prepared scale tensor: the GEMM reads ", sbytes,
              " bytes but the storage holds ", storage_bytes_from(wscales),
              " (pass the tensors returned by svdq::prepare_weight unchanged)");
  TORCH_CHECK(aligned16(qweight) && reinterpret_cast<uintptr_t>(wscales.data_ptr()) % 4 == 0, op,
              ": prepared ", describe("qweight", qweight), " must be 16-byte aligned and ",
              describe("wscales", wscales), " 4-byte aligned (as prepare_weight returns them)");
  TORCH_CHECK(lora_up.dim() == 2 && lora_up.size(0) == N, op, ": ", describe("lora_up", lora_up),
              " must be [N, r] with N = ", N, " (from ", describe("qweight", qweight), ")");
  const int64_t r = lora_up.size(1);
  TORCH_CHECK(r % 16 == 0 && r <= kMaxRank, op, ": rank r = ", r, " (", describe("lora_up", lora_up),
              ") must be a multiple of 16 and <= ", kMaxRank);
  TORCH_CHECK(lora_act.dim() == 2 && lora_act.size(0) == M && lora_act.size(1) == r &&
                  lora_act.scalar_type() == at::kFloat,
              op, ": ", describe("lora_act", lora_act), " must be float32 [M, r] = [", M, ", ", r, "]");
  TORCH_CHECK(r == 0 || lora_up.scalar_type() == out_dtype, op, ": ", describe("lora_up", lora_up),
              " must have dtype out_dtype = ", c10::toString(out_dtype));
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = *bias;
    check_cuda(op, "bias", b, dev);
    TORCH_CHECK(b.dim() == 1 && b.size(0) == N, op, ": ", describe("bias", b), " must be [N] = [", N, "]");
    TORCH_CHECK(b.scalar_type() == out_dtype, op, ": ", describe("bias", b), " must have dtype out_dtype = ",
                c10::toString(out_dtype));
    b = dense16(b);
  }

  const c10::cuda::CUDAGuard guard(dev);
  at::Tensor y = at::empty({M, N}, qact.options().dtype(out_dtype));
  if (M == 0) return y;
  at::Tensor qa = dense16(qact);
  at::Tensor as = ascales.contiguous();
  at::Tensor la = r > 0 ? dense16(lora_act) : lora_act;
  at::Tensor lu = r > 0 ? dense16(lora_up) : lora_up;

  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const cuda::MmaPath path = choose_path(prop->major, prop->minor);

  cuda::W4A4GemmParams p;
  p.qact = qa.data_ptr<int8_t>();
  p.ascales = as.data_ptr<float>();
  p.qweight = qweight.data_ptr();
  p.wscales = wscales.data_ptr();
  p.lora_act = r > 0 ? la.data_ptr<float>() : nullptr;
  p.lora_up = r > 0 ? lu.data_ptr() : nullptr;
  p.bias = b.defined() ? b.data_ptr() : nullptr;
  p.out = y.data_ptr();
  p.M = (int)M;
  p.N = (int)N;
  p.K = (int)kp;
  p.R = (int)r;
  p.out_bf16 = out_dtype == at::kBFloat16;
  p.path = path;
  const cudaError_t err = cuda::launch_w4a4_gemm(p, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, op, ": kernel failed (", cudaGetErrorName(err), ": ", cudaGetErrorString(err),
              ") for M=", M, " N=", N, " K=", kp, " R=", r, " path=", path_name(path), " on sm_", prop->major,
              prop->minor, " (", dev.str(), ")",
              err == cudaErrorInvalidValue ? "; invalid value: a size/alignment outside the kernel's contract "
                                             "(w4a4_gemm.h), or the int8 path below sm_80"
                                           : "");
  return y;
}

}  // namespace
}  // namespace svdq

TORCH_LIBRARY_IMPL(svdq, CUDA, m) {
  m.impl("quantize_act", &svdq::quantize_act_cuda);
  m.impl("quantize_act_e4m3", &svdq::quantize_act_e4m3_cuda);
  m.impl("prepare_weight", &svdq::prepare_weight_cuda);
  m.impl("w4a4_gemm", &svdq::w4a4_gemm_cuda);
}
