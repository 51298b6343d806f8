// ops_cuda.cpp — CUDA implementations of the svdq ops (schemas: csrc/registration.cpp, contracts:
// docs/dev/contracts.md, numerics: docs/numerics.md §4).
//
// Each op: shape comments, checks that name the tensor / shape / dtype / device, a device guard, the
// current stream, then one launcher call (csrc/cuda/*.h: plain pointers, cudaError_t back). Error codes are
// turned into messages that print M/N/K/R and the MMA path. Compiled into _C_cuda.so, which only a CUDA
// torch loads (python/svdq/_library.py); like the CPU bindings it uses only torch's stable ABI
// (csrc/torch_stable.h; the stream and device guard come from its C shim).
//
// Environment (read on every call, so tests can switch per call):
//   SVDQ_FORCE_INT4_MMA=1   w4a4_gemm uses the native int4 mma path even on sm_90 (emulated there, slow;
//                           for cross-checking). Default: int8 path on sm_90–sm_10x, int4 elsewhere.
//   SVDQ_QACT_KSPLIT=n      quantize_act uses n K-splits instead of its automatic plan (benchmark sweeps).
// (SVDQ_SM90_FP8=0 is read by svdq.ops' backend selection, not here: on sm_90 it picks backend "cuda" — these
// mma.sync ops — instead of "cuda-sm90", the *_sm90 / W4A8 ops at the end of this file.)

#include <cuda_runtime.h>

#include <climits>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>

#include "cuda/quantize_act.h"
#include "cuda/w4a4_gemm.h"
#if defined(SVDQ_WITH_SM90)
#include "cuda/w4a4_gemm_sm90.h"
#endif
#include "torch_stable.h"

#include <torch/csrc/stable/accelerator.h>

namespace svdq {
namespace {

constexpr int64_t kGroup = 64;
constexpr int64_t kMaxRank = 512;

int64_t padded_k(int64_t k) { return (k + kGroup - 1) / kGroup * kGroup; }

// "x [4, 8] BFloat16 on cuda:0"
std::string describe(const char* name, const Tensor& t) {
  return cat(name, " ", shape_str(t), " ", dtype_name(t.scalar_type()), " on ", device_str(t));
}

// The CUDA device all of an op's tensors must be on (the first tensor's).
struct Dev {
  int32_t index;
  std::string str() const { return "cuda:" + std::to_string(index); }
};

void check_cuda(const char* op, const char* name, const Tensor& t, const Dev& dev) {
  SVDQ_CHECK(t.is_cuda(), op, ": ", describe(name, t), " must be a CUDA tensor (the CUDA implementation was ",
             "selected because another argument is on ", dev.str(), ")");
  SVDQ_CHECK(t.get_device_index() == dev.index, op, ": ", describe(name, t),
             " must be on the same device as the other inputs (", dev.str(), ")");
}

bool is_16bit(ScalarType t) { return t == dtype::bf16 || t == dtype::f16; }

bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// contiguous and 16-byte aligned (a copy when needed; kernels vectorize their loads)
Tensor dense16(const Tensor& t) {
  Tensor c = torch::stable::contiguous(t);
  if (c.numel() > 0 && !aligned16(c)) c = torch::stable::clone(c);  // a fresh allocation is aligned
  return c;
}

// torch's current stream on device dev (what every op must launch on).
cudaStream_t current_stream(const Dev& dev) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(dev.index, &stream));
  return static_cast<cudaStream_t>(stream);
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
// svdq::quantize_act(Tensor x, Tensor smooth, Tensor lora_down, Tensor? lora_scales, float act_shift=0.0)
//     -> (Tensor qact, Tensor ascales, Tensor lora_act)
// ------------------------------------------------------------------------------------------------------------
// e4m3 = true: svdq::quantize_act_e4m3 — the same kernel writes qact as uint8 [M, Kp] e4m3 bytes.
std::tuple<Tensor, Tensor, Tensor> quantize_act_impl(const Tensor& x,        // [M, K] bf16/fp16
                                                     const Tensor& smooth,   // [K]
                                                     const Tensor& lora_down,  // [K, r] x.dtype
                                                     const std::optional<Tensor>& lora_scales,  // [r] fp32
                                                     bool e4m3) {
  const char* op = e4m3 ? "svdq::quantize_act_e4m3 (CUDA)" : "svdq::quantize_act (CUDA)";
  SVDQ_CHECK(x.is_cuda(), op, ": ", describe("x", x), " must be a CUDA tensor");
  const Dev dev{x.get_device_index()};
  check_cuda(op, "smooth", smooth, dev);
  check_cuda(op, "lora_down", lora_down, dev);
  SVDQ_CHECK(x.dim() == 2, op, ": ", describe("x", x), " must be 2-D [M, K] (flatten leading dims first)");
  SVDQ_CHECK(is_16bit(x.scalar_type()), op, ": ", describe("x", x),
             " must be bfloat16 or float16 (fp32 activations run on the CPU/reference backends only)");
  const int64_t M = x.size(0), K = x.size(1);
  SVDQ_CHECK(K >= 1, op, ": ", describe("x", x), " must have K >= 1 columns");
  SVDQ_CHECK(smooth.dim() == 1 && smooth.size(0) == K, op, ": ", describe("smooth", smooth), " must be [K] = [",
             K, "] to match ", describe("x", x));
  SVDQ_CHECK(smooth.scalar_type() == dtype::f32 || is_16bit(smooth.scalar_type()), op, ": ",
             describe("smooth", smooth), " must be float32, bfloat16 or float16");
  SVDQ_CHECK(lora_down.dim() == 2 && lora_down.size(0) == K, op, ": ", describe("lora_down", lora_down),
             " must be [K, r] with K = ", K, " (from ", describe("x", x), ")");
  const int64_t r = lora_down.size(1);
  SVDQ_CHECK(r % 16 == 0 && r <= kMaxRank, op, ": ", describe("lora_down", lora_down),
             " has rank r = ", r, "; the CUDA kernels need r % 16 == 0 and r <= ", kMaxRank,
             " (SVDQLinear pads the rank with zero columns)");
  SVDQ_CHECK(r == 0 || lora_down.scalar_type() == x.scalar_type(), op, ": ", describe("lora_down", lora_down),
             " must have the dtype of ", describe("x", x), " (the low-rank branch runs on 16-bit tensor cores)");
  std::optional<Tensor> scales;
  if (lora_scales.has_value()) {
    const Tensor& sc = *lora_scales;
    check_cuda(op, "lora_scales", sc, dev);
    SVDQ_CHECK(sc.dim() == 1 && sc.size(0) == r, op, ": ", describe("lora_scales", sc),
               " must be [r] = [", r, "] (r from ", describe("lora_down", lora_down), ")");
    SVDQ_CHECK(sc.scalar_type() == dtype::f32, op, ": ", describe("lora_scales", sc),
               " must be float32");
    scales = torch::stable::contiguous(sc);
  }

  const torch::stable::accelerator::DeviceGuard guard(dev.index);
  const int64_t kp = padded_k(K), groups = kp / kGroup;
  Tensor qact = e4m3 ? empty_like_device(x, {M, kp}, dtype::u8) : empty_like_device(x, {M, kp / 2}, dtype::i8);
  Tensor ascales = empty_like_device(x, {M, groups}, dtype::f32);
  Tensor lora_act = empty_like_device(x, {M, r}, dtype::f32);
  if (M == 0) return {qact, ascales, lora_act};

  Tensor xc = x.stride(1) == 1 && x.stride(0) >= K ? x : torch::stable::contiguous(x);
  // λ: the kernel reads x's dtype or fp32; any other float dtype is converted to fp32 (exact).
  Tensor lam = smooth.scalar_type() == x.scalar_type() ? torch::stable::contiguous(smooth) : as_contiguous(smooth, dtype::f32);
  Tensor down = r > 0 ? dense16(lora_down) : lora_down;

  const int ksplit_override = env_int("SVDQ_QACT_KSPLIT", 0);
  const size_t ws_bytes = cuda::quantize_act_workspace_bytes(M, K, (int)r, ksplit_override);
  std::optional<Tensor> ws;
  if (ws_bytes > 0) ws = empty_like_device(x, {(int64_t)(ws_bytes / sizeof(float))}, dtype::f32);

  cuda::QuantizeActParams p;
  p.x = xc.data_ptr();
  p.M = M;
  p.K = K;
  p.ldx = xc.stride(0);
  p.dtype = x.scalar_type() == dtype::bf16 ? cuda::ActDtype::kBF16 : cuda::ActDtype::kFP16;
  p.smooth = lam.data_ptr();
  p.smooth_fp32 = lam.scalar_type() == dtype::f32;
  p.lora_down = r > 0 ? down.data_ptr() : nullptr;
  p.r = (int)r;
  p.lora_scales = scales ? scales->mutable_data_ptr<float>() : nullptr;
  p.qact = static_cast<int8_t*>(qact.data_ptr());
  p.e4m3 = e4m3;
  p.ascales = ascales.mutable_data_ptr<float>();
  p.lora_act = r > 0 ? lora_act.mutable_data_ptr<float>() : nullptr;
  p.workspace = ws ? ws->mutable_data_ptr<float>() : nullptr;
  p.ksplit_override = ksplit_override;

  const cudaError_t err = cuda::launch_quantize_act(p, current_stream(dev));
  SVDQ_CHECK(err == cudaSuccess, op, ": kernel launch failed (", cudaGetErrorName(err), ": ",
             cudaGetErrorString(err), ") for M=", M, " K=", K, " Kp=", kp, " r=", r, " x dtype ",
             dtype_name(x.scalar_type()), ", smooth dtype ", dtype_name(lam.scalar_type()), ", on ",
             dev.str());
  return {qact, ascales, lora_act};
}

std::tuple<Tensor, Tensor, Tensor> quantize_act_cuda(const Tensor& x, const Tensor& smooth,
                                                     const Tensor& lora_down,
                                                     const std::optional<Tensor>& lora_scales,
                                                     double act_shift) {
  SVDQ_CHECK(act_shift == 0.0, "svdq::quantize_act (CUDA): act_shift = ", act_shift, " (shifted unsigned "
             "activations, spec §10) has no CUDA kernel yet; such layers run the reference backend on the GPU");
  return quantize_act_impl(x, smooth, lora_down, lora_scales, false);
}

// svdq::quantize_act_e4m3: qact uint8 [M, Kp], each INT4 code as its float8_e4m3fn byte (exact).
std::tuple<Tensor, Tensor, Tensor> quantize_act_e4m3_cuda(const Tensor& x, const Tensor& smooth,
                                                          const Tensor& lora_down,
                                                          const std::optional<Tensor>& lora_scales) {
  return quantize_act_impl(x, smooth, lora_down, lora_scales, true);
}

// A canonical weight (spec §3: int8 [N, Kp/2] codes, 16-bit [N, Kp/64] scales) on one CUDA device, as both
// prepare ops take it; N + 128 must fit an int (the sm_90a layout pads N to whole 128-row tiles).
struct CanonicalWeight {
  Dev dev;
  int64_t N, kp;
};

CanonicalWeight check_canonical_weight(const char* op, const Tensor& qweight, const Tensor& wscales) {
  SVDQ_CHECK(qweight.is_cuda(), op, ": ", describe("qweight", qweight), " must be a CUDA tensor");
  const Dev dev{qweight.get_device_index()};
  check_cuda(op, "wscales", wscales, dev);
  SVDQ_CHECK(qweight.dim() == 2 && qweight.scalar_type() == dtype::i8, op, ": ", describe("qweight", qweight),
             " must be int8 [N, Kp/2] (canonical packing, docs/numerics.md §3)");
  const int64_t N = qweight.size(0), kp = qweight.size(1) * 2;
  SVDQ_CHECK(N >= 1 && kp >= kGroup && kp % kGroup == 0, op, ": ", describe("qweight", qweight),
             " must have N >= 1 rows and Kp/2 columns with Kp a positive multiple of 64");
  SVDQ_CHECK(wscales.dim() == 2 && wscales.size(0) == N && wscales.size(1) == kp / kGroup, op, ": ",
             describe("wscales", wscales), " must be [N, Kp/64] = [", N, ", ", kp / kGroup, "] to match ",
             describe("qweight", qweight));
  SVDQ_CHECK(is_16bit(wscales.scalar_type()), op, ": ", describe("wscales", wscales),
             " must be bfloat16 or float16 on CUDA (fp32 models run on the CPU/reference backends)");
  SVDQ_CHECK(N <= INT_MAX - 128 && kp <= INT_MAX, op, ": N=", N, " Kp=", kp, " exceed the kernel's int range");
  return {dev, N, kp};
}

// ------------------------------------------------------------------------------------------------------------
// svdq::prepare_weight(Tensor qweight, Tensor wscales) -> (Tensor, Tensor)
//   canonical qweight int8 [N, Kp/2], wscales bf16/fp16 [N, Kp/64]
//   -> prepared qweight int8 [N, Kp/2] and prepared wscales fp32 [N, Kp/64] (the GEMM's fragment layout).
// The leading dim stays N (fakes infer N from it); the contents are permuted (group-major, mma_layout.cuh §4).
// Should the GEMM's prepared sizes ever exceed N rows (padded tiles), the returned tensors are views of the
// first N rows of the padded buffer, and w4a4_gemm checks that the storage behind them is large enough.
// ------------------------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor> prepare_weight_cuda(const Tensor& qweight,   // [N, Kp/2] int8
                                               const Tensor& wscales) {  // [N, Kp/64] bf16/fp16
  constexpr const char* op = "svdq::prepare_weight (CUDA)";
  const auto [dev, N, kp] = check_canonical_weight(op, qweight, wscales);

  const torch::stable::accelerator::DeviceGuard guard(dev.index);
  Tensor qw = torch::stable::contiguous(qweight);
  Tensor ws = torch::stable::contiguous(wscales);
  const size_t qbytes = cuda::prepared_qweight_bytes((int)N, (int)kp);
  const size_t sbytes = cuda::prepared_wscales_bytes((int)N, (int)kp);
  const int64_t n_pad = (int64_t)(qbytes / (size_t)(kp / 2));
  SVDQ_CHECK(n_pad >= N && (size_t)n_pad * (size_t)(kp / 2) == qbytes &&
                 (size_t)n_pad * (size_t)(kp / kGroup) * sizeof(float) == sbytes,
             op, ": the GEMM's prepared sizes (", qbytes, " B, ", sbytes, " B for N=", N, ", Kp=", kp,
             ") are not whole padded rows; ops_cuda.cpp and w4a4_gemm.h disagree");
  Tensor qbuf = empty_like_device(qweight, {n_pad, kp / 2}, dtype::i8);
  Tensor sbuf = empty_like_device(qweight, {n_pad, kp / kGroup}, dtype::f32);
  const cudaError_t err =
      cuda::launch_repack_weight(qw.const_data_ptr<int8_t>(), ws.data_ptr(), ws.scalar_type() == dtype::bf16, (int)N,
                                 (int)kp, qbuf.data_ptr(), sbuf.data_ptr(), current_stream(dev));
  SVDQ_CHECK(err == cudaSuccess, op, ": repack kernel failed (", cudaGetErrorName(err), ": ",
             cudaGetErrorString(err), ") for N=", N, " Kp=", kp, " on ", dev.str());
  if (n_pad == N) return {qbuf, sbuf};
  return {torch::stable::narrow(qbuf, 0, 0, N), torch::stable::narrow(sbuf, 0, 0, N)};
}

// The checks and operands both GEMM ops share: every tensor on qact's CUDA device, a 16-bit output, and the
// epilogue's operands (spec §4.2: acc + lora_act · lora_upᵀ + bias, cast to out_dtype) checked against the GEMM's
// M and N and made dense — one definition for the mma.sync GEMM and the sm_90a ones.
Dev check_gemm_devices(const char* op, const Tensor& qact, const Tensor& ascales, const Tensor& qweight,
                       const Tensor& wscales, const Tensor& lora_act, const Tensor& lora_up, ScalarType out_dtype) {
  SVDQ_CHECK(qact.is_cuda(), op, ": ", describe("qact", qact), " must be a CUDA tensor");
  const Dev dev{qact.get_device_index()};
  check_cuda(op, "ascales", ascales, dev);
  check_cuda(op, "qweight", qweight, dev);
  check_cuda(op, "wscales", wscales, dev);
  check_cuda(op, "lora_act", lora_act, dev);
  check_cuda(op, "lora_up", lora_up, dev);
  SVDQ_CHECK(is_16bit(out_dtype), op, ": out_dtype ", dtype_name(out_dtype), " must be bfloat16 or float16 on CUDA");
  return dev;
}

struct EpilogueOperands {
  int64_t rank;
  Tensor lora_act, lora_up;    // dense when rank > 0
  std::optional<Tensor> bias;  // dense
};

EpilogueOperands epilogue_operands(const char* op, const Dev& dev, int64_t M, int64_t N, const Tensor& lora_act,
                                   const Tensor& lora_up, const std::optional<Tensor>& bias, ScalarType out_dtype) {
  const int64_t r = lora_up.size(1);
  SVDQ_CHECK(r % 16 == 0 && r <= kMaxRank, op, ": rank r = ", r, " (", describe("lora_up", lora_up),
             ") must be a multiple of 16 and <= ", kMaxRank);
  SVDQ_CHECK(lora_act.dim() == 2 && lora_act.size(0) == M && lora_act.size(1) == r &&
                 lora_act.scalar_type() == dtype::f32,
             op, ": ", describe("lora_act", lora_act), " must be float32 [M, r] = [", M, ", ", r, "]");
  SVDQ_CHECK(r == 0 || lora_up.scalar_type() == out_dtype, op, ": ", describe("lora_up", lora_up),
             " must have dtype out_dtype = ", dtype_name(out_dtype));
  std::optional<Tensor> b;
  if (bias.has_value()) {
    const Tensor& bt = *bias;
    check_cuda(op, "bias", bt, dev);
    SVDQ_CHECK(bt.dim() == 1 && bt.size(0) == N, op, ": ", describe("bias", bt), " must be [N] = [", N, "]");
    SVDQ_CHECK(bt.scalar_type() == out_dtype, op, ": ", describe("bias", bt), " must have dtype out_dtype = ",
               dtype_name(out_dtype));
    b = dense16(bt);
  }
  return {r, r > 0 ? dense16(lora_act) : lora_act, r > 0 ? dense16(lora_up) : lora_up, b};
}

// ------------------------------------------------------------------------------------------------------------
// svdq::w4a4_gemm(Tensor qact, Tensor ascales, Tensor qweight, Tensor wscales, Tensor lora_act, Tensor lora_up,
//                 Tensor? bias, ScalarType out_dtype, bool act_unsigned=False) -> Tensor y [M, N] out_dtype
// ------------------------------------------------------------------------------------------------------------
Tensor w4a4_gemm_cuda(const Tensor& qact,      // [M, Kp/2] int8 (quantize_act)
                      const Tensor& ascales,   // [M, Kp/64] fp32
                      const Tensor& qweight,   // [N, Kp/2] int8, prepared (prepare_weight on CUDA)
                      const Tensor& wscales,   // [N, Kp/64] fp32, prepared
                      const Tensor& lora_act,  // [M, r] fp32
                      const Tensor& lora_up,   // [N, r] out_dtype
                      const std::optional<Tensor>& bias,  // [N] out_dtype or None
                      ScalarType out_dtype,
                      bool act_unsigned) {  // spec §10.2: no CUDA kernel yet (checked below)
  constexpr const char* op = "svdq::w4a4_gemm (CUDA)";
  SVDQ_CHECK(!act_unsigned, op, ": act_unsigned (shifted unsigned activations, spec §10) has no CUDA kernel yet");
  const Dev dev = check_gemm_devices(op, qact, ascales, qweight, wscales, lora_act, lora_up, out_dtype);
  SVDQ_CHECK(qact.dim() == 2 && qact.scalar_type() == dtype::i8, op, ": ", describe("qact", qact),
             " must be int8 [M, Kp/2] from svdq::quantize_act");
  const int64_t M = qact.size(0), kp = qact.size(1) * 2, groups = kp / kGroup;
  SVDQ_CHECK(kp >= kGroup && kp % kGroup == 0, op, ": ", describe("qact", qact),
             " must have Kp/2 columns with Kp a positive multiple of 64");
  SVDQ_CHECK(ascales.dim() == 2 && ascales.size(0) == M && ascales.size(1) == groups &&
                 ascales.scalar_type() == dtype::f32,
             op, ": ", describe("ascales", ascales), " must be float32 [M, Kp/64] = [", M, ", ", groups,
             "] to match ", describe("qact", qact));
  SVDQ_CHECK(qweight.dim() == 2 && qweight.scalar_type() == dtype::i8 && qweight.size(1) * 2 == kp, op, ": ",
             describe("qweight", qweight), " must be the prepared int8 [N, Kp/2] with Kp = ", kp,
             " (from ", describe("qact", qact), ")");
  const int64_t N = qweight.size(0);
  SVDQ_CHECK(N >= 1, op, ": ", describe("qweight", qweight), " must have N >= 1 rows");
  SVDQ_CHECK(wscales.dim() == 2 && wscales.size(0) == N && wscales.size(1) == groups &&
                 wscales.scalar_type() == dtype::f32,
             op, ": ", describe("wscales", wscales), " must be the prepared float32 [N, Kp/64] = [", N, ", ",
             groups, "] (call svdq::prepare_weight on the CUDA tensors first)");
  SVDQ_CHECK(M <= INT_MAX && N <= INT_MAX && kp <= INT_MAX, op, ": M=", M, " N=", N, " Kp=", kp,
             " exceed the kernel's int range");
  const size_t qbytes = cuda::prepared_qweight_bytes((int)N, (int)kp);
  const size_t sbytes = cuda::prepared_wscales_bytes((int)N, (int)kp);
  SVDQ_CHECK(qweight.is_contiguous() && storage_bytes_from(qweight) >= (int64_t)qbytes, op, ": ",
             describe("qweight", qweight), " is not a prepared weight: the GEMM reads ", qbytes,
             " contiguous bytes (N padded to whole tiles) but the tensor's storage holds ",
             storage_bytes_from(qweight), " (pass the tensors returned by svdq::prepare_weight unchanged; do not "
             "clone/slice them)");
  SVDQ_CHECK(wscales.is_contiguous() && storage_bytes_from(wscales) >= (int64_t)sbytes, op, ": ",
             describe("wscales", wscales), " is not a prepared scale tensor: the GEMM reads ", sbytes,
             " bytes but the storage holds ", storage_bytes_from(wscales),
             " (pass the tensors returned by svdq::prepare_weight unchanged)");
  SVDQ_CHECK(aligned16(qweight) && reinterpret_cast<uintptr_t>(wscales.data_ptr()) % 4 == 0, op,
             ": prepared ", describe("qweight", qweight), " must be 16-byte aligned and ",
             describe("wscales", wscales), " 4-byte aligned (as prepare_weight returns them)");
  SVDQ_CHECK(lora_up.dim() == 2 && lora_up.size(0) == N, op, ": ", describe("lora_up", lora_up),
             " must be [N, r] with N = ", N, " (from ", describe("qweight", qweight), ")");
  const auto [r, la, lu, b] = epilogue_operands(op, dev, M, N, lora_act, lora_up, bias, out_dtype);

  const torch::stable::accelerator::DeviceGuard guard(dev.index);
  Tensor y = empty_like_device(qact, {M, N}, out_dtype);
  if (M == 0) return y;
  Tensor qa = dense16(qact);
  Tensor as = torch::stable::contiguous(ascales);

  int cc_major = 0, cc_minor = 0;
  cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, dev.index);
  cudaDeviceGetAttribute(&cc_minor, cudaDevAttrComputeCapabilityMinor, dev.index);
  const cuda::MmaPath path = choose_path(cc_major, cc_minor);

  cuda::W4A4GemmParams p;
  p.qact = qa.const_data_ptr<int8_t>();
  p.ascales = as.const_data_ptr<float>();
  p.qweight = qweight.data_ptr();
  p.wscales = wscales.data_ptr();
  p.lora_act = r > 0 ? la.const_data_ptr<float>() : nullptr;
  p.lora_up = r > 0 ? lu.data_ptr() : nullptr;
  p.bias = b ? b->data_ptr() : nullptr;
  p.out = y.data_ptr();
  p.M = (int)M;
  p.N = (int)N;
  p.K = (int)kp;
  p.R = (int)r;
  p.out_bf16 = out_dtype == dtype::bf16;
  p.path = path;
  const cudaError_t err = cuda::launch_w4a4_gemm(p, current_stream(dev));
  SVDQ_CHECK(err == cudaSuccess, op, ": kernel failed (", cudaGetErrorName(err), ": ", cudaGetErrorString(err),
             ") for M=", M, " N=", N, " K=", kp, " R=", r, " path=", path_name(path), " on sm_", cc_major,
             cc_minor, " (", dev.str(), ")",
             err == cudaErrorInvalidValue ? "; invalid value: a size/alignment outside the kernel's contract "
                                            "(w4a4_gemm.h), or the int8 path below sm_80"
                                          : "");
  return y;
}


#if defined(SVDQ_WITH_SM90)
// ------------------------------------------------------------------------------------------------------------
// Hopper (sm_90a) FP8-wgmma ops (csrc/cuda/w4a4_gemm_sm90.h; docs/kernels.md §12). Layout "cuda-sm90":
// weights as e4m3 bytes uint8 [Np, Kp] and fp32 scales [Np, Kp/64], Np = N rounded up to 128 (the tensors own
// exactly the bytes the kernel reads; python/svdq/ops/sm90_layout.py is the same layout in torch). N is not in
// their shape, so the GEMMs take it from lora_up [N, r]. Their kernels exist only in the sm_90a cubin: other
// devices get a clear error here instead of a "no kernel image" from the launch.
// ------------------------------------------------------------------------------------------------------------
void require_sm90(const char* op, const Dev& dev) {
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev.index);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev.index);
  SVDQ_CHECK(major == 9 && minor == 0, op, ": needs a compute capability 9.0 GPU (H100/H200: its kernels are "
             "sm_90a code), but ", dev.str(), " is sm_", major, minor, " (other GPUs run svdq::w4a4_gemm)");
}

std::string launch_error(cudaError_t err) { return cat(cudaGetErrorName(err), ": ", cudaGetErrorString(err)); }

// svdq::prepare_weight_sm90(Tensor qweight, Tensor wscales) -> (Tensor, Tensor)
//   canonical qweight int8 [N, Kp/2], wscales bf16/fp16 [N, Kp/64] -> uint8 [Np, Kp] e4m3, fp32 [Np, Kp/64]
std::tuple<Tensor, Tensor> prepare_weight_sm90_cuda(const Tensor& qweight, const Tensor& wscales) {
  constexpr const char* op = "svdq::prepare_weight_sm90 (CUDA)";
  const auto [dev, N, kp] = check_canonical_weight(op, qweight, wscales);
  require_sm90(op, dev);

  const torch::stable::accelerator::DeviceGuard guard(dev.index);
  Tensor qw = torch::stable::contiguous(qweight);
  Tensor ws = torch::stable::contiguous(wscales);
  const size_t qbytes = cuda::sm90::prepared_weight_bytes((int)N, (int)kp);
  const size_t scount = cuda::sm90::prepared_wscale_count((int)N, (int)kp);
  const int64_t n_pad = (int64_t)(qbytes / (size_t)kp);
  SVDQ_CHECK(n_pad >= N && n_pad % 128 == 0 && (size_t)n_pad * (size_t)kp == qbytes &&
                 (size_t)n_pad * (size_t)(kp / kGroup) == scount,
             op, ": the GEMM's prepared sizes (", qbytes, " B, ", scount, " scales for N=", N, ", Kp=", kp,
             ") are not whole padded rows; ops_cuda.cpp and w4a4_gemm_sm90.h disagree");
  Tensor qbuf = empty_like_device(qweight, {n_pad, kp}, dtype::u8);
  Tensor sbuf = empty_like_device(qweight, {n_pad, kp / kGroup}, dtype::f32);
  const cudaError_t err = cuda::sm90::launch_prepare_weight_sm90(
      qw.const_data_ptr<int8_t>(), ws.data_ptr(), ws.scalar_type() == dtype::bf16, (int)N, (int)kp,
      static_cast<uint8_t*>(qbuf.data_ptr()), sbuf.mutable_data_ptr<float>(), current_stream(dev));
  SVDQ_CHECK(err == cudaSuccess, op, ": kernel failed (", launch_error(err), ") for N=", N, " Kp=", kp, " on ",
             dev.str());
  return {qbuf, sbuf};
}

// svdq::w4a4_gemm_sm90 (exact W4A4, qact = quantize_act_e4m3's [M, Kp] e4m3 codes, ascales [M, Kp/64]) and the
// CUDA svdq::w4a8_gemm (qact = quantize_act_fp8's, ascales [M]); both take prepare_weight_sm90's weights.
Tensor gemm_sm90(const Tensor& qact, const Tensor& ascales, const Tensor& qweight, const Tensor& wscales,
                 const Tensor& lora_act, const Tensor& lora_up, const std::optional<Tensor>& bias,
                 ScalarType out_dtype, bool w4a8) {
  const char* op = w4a8 ? "svdq::w4a8_gemm (CUDA, sm_90a)" : "svdq::w4a4_gemm_sm90 (CUDA)";
  const char* qact_from = w4a8 ? "svdq::quantize_act_fp8" : "svdq::quantize_act_e4m3";
  const Dev dev = check_gemm_devices(op, qact, ascales, qweight, wscales, lora_act, lora_up, out_dtype);
  SVDQ_CHECK(qact.dim() == 2 && qact.scalar_type() == dtype::u8, op, ": ", describe("qact", qact),
             " must be uint8 [M, Kp] e4m3 bytes from ", qact_from);
  const int64_t M = qact.size(0), kp = qact.size(1), groups = kp / kGroup;
  SVDQ_CHECK(kp >= kGroup && kp % kGroup == 0, op, ": ", describe("qact", qact),
             " must have Kp columns, a positive multiple of 64");
  if (w4a8) {
    SVDQ_CHECK(ascales.dim() == 1 && ascales.size(0) == M && ascales.scalar_type() == dtype::f32, op, ": ",
               describe("ascales", ascales), " must be float32 [M] = [", M, "] (one scale per token, spec §8.1)");
  } else {
    SVDQ_CHECK(ascales.dim() == 2 && ascales.size(0) == M && ascales.size(1) == groups &&
                   ascales.scalar_type() == dtype::f32,
               op, ": ", describe("ascales", ascales), " must be float32 [M, Kp/64] = [", M, ", ", groups,
               "] to match ", describe("qact", qact));
  }
  SVDQ_CHECK(lora_up.dim() == 2, op, ": ", describe("lora_up", lora_up), " must be [N, r]");
  const int64_t N = lora_up.size(0);
  SVDQ_CHECK(N >= 1 && N <= INT_MAX - 128 && M <= INT_MAX && kp <= INT_MAX, op, ": M=", M, " N=", N, " Kp=", kp,
             " must satisfy N >= 1 and fit the kernel's int range (N is lora_up's leading dimension)");
  const int64_t n_pad = (N + 127) / 128 * 128;
  SVDQ_CHECK(qweight.dim() == 2 && qweight.scalar_type() == dtype::u8 && qweight.size(0) == n_pad &&
                 qweight.size(1) == kp,
             op, ": ", describe("qweight", qweight), " must be the sm90-prepared uint8 [Np, Kp] = [", n_pad, ", ", kp,
             "] (N = ", N, " from lora_up rounded up to 128; svdq::prepare_weight_sm90)");
  SVDQ_CHECK(wscales.dim() == 2 && wscales.size(0) == n_pad && wscales.size(1) == groups &&
                 wscales.scalar_type() == dtype::f32,
             op, ": ", describe("wscales", wscales), " must be the sm90-prepared float32 [Np, Kp/64] = [", n_pad,
             ", ", groups, "] (svdq::prepare_weight_sm90)");
  SVDQ_CHECK(qweight.is_contiguous() && wscales.is_contiguous() &&
                 reinterpret_cast<uintptr_t>(qweight.data_ptr()) % 128 == 0 &&
                 reinterpret_cast<uintptr_t>(wscales.data_ptr()) % 128 == 0,
             op, ": prepared ", describe("qweight", qweight), " and ", describe("wscales", wscales),
             " must be contiguous and 128-byte aligned (whole tensors, as prepare_weight_sm90 returns them)");
  const auto [r, la, lu, b] = epilogue_operands(op, dev, M, N, lora_act, lora_up, bias, out_dtype);
  require_sm90(op, dev);

  const torch::stable::accelerator::DeviceGuard guard(dev.index);
  Tensor y = empty_like_device(qact, {M, N}, out_dtype);
  if (M == 0) return y;
  Tensor qa = dense16(qact);
  Tensor as = torch::stable::contiguous(ascales);

  cuda::sm90::GemmParams p;
  p.qact = static_cast<const uint8_t*>(qa.data_ptr());
  p.ascales = as.const_data_ptr<float>();
  p.wq = static_cast<const uint8_t*>(qweight.data_ptr());
  p.ws = static_cast<const float*>(wscales.data_ptr());
  p.lora_act = r > 0 ? la.const_data_ptr<float>() : nullptr;
  p.lora_up = r > 0 ? lu.data_ptr() : nullptr;
  p.bias = b ? b->data_ptr() : nullptr;
  p.out = y.data_ptr();
  p.M = (int)M;
  p.N = (int)N;
  p.K = (int)kp;
  p.R = (int)r;
  p.out_bf16 = out_dtype == dtype::bf16;
  const cudaError_t err = w4a8 ? cuda::sm90::launch_w4a8_gemm_sm90(p, current_stream(dev))
                               : cuda::sm90::launch_w4a4_gemm_sm90(p, current_stream(dev));
  SVDQ_CHECK(err == cudaSuccess, op, ": kernel failed (", launch_error(err), ") for M=", M, " N=", N, " K=", kp,
             " R=", r, " on ", dev.str(),
             err == cudaErrorInvalidValue ? "; invalid value: a size/alignment outside the kernel's contract "
                                            "(w4a4_gemm_sm90.h)"
                                          : "");
  return y;
}

Tensor w4a4_gemm_sm90_cuda(const Tensor& qact, const Tensor& ascales, const Tensor& qweight, const Tensor& wscales,
                           const Tensor& lora_act, const Tensor& lora_up, const std::optional<Tensor>& bias,
                           ScalarType out_dtype) {
  return gemm_sm90(qact, ascales, qweight, wscales, lora_act, lora_up, bias, out_dtype, false);
}

Tensor w4a8_gemm_cuda(const Tensor& qact, const Tensor& ascales, const Tensor& qweight, const Tensor& wscales,
                      const Tensor& lora_act, const Tensor& lora_up, const std::optional<Tensor>& bias,
                      ScalarType out_dtype) {
  return gemm_sm90(qact, ascales, qweight, wscales, lora_act, lora_up, bias, out_dtype, true);
}

// svdq::quantize_act_fp8 (spec §8.1): codes + per-token scales from launch_quantize_act_fp8 (bit-exact to the
// reference); lora_act from the W4A4 quantize_act kernel, whose INT4 codes go to a scratch buffer. Why that
// kernel and not torch::stable::matmul: it accumulates x · lora_down in fp32 from the 16-bit x as the reference
// does (a 16-bit matmul would round lora_act to bf16/fp16; an fp32 one needs an fp32 copy of x), and its
// lora_act is bit-identical to the W4A4 path's, so the two formats differ only in the activation codes. Cost:
// x is read twice and M·Kp/2 + M·Kp/16 scratch bytes are written (a fused low-rank pass in quantize_act_fp8.cu
// would remove both). r = 0 launches only the FP8 quantizer.
std::tuple<Tensor, Tensor, Tensor> quantize_act_fp8_cuda(const Tensor& x, const Tensor& smooth,
                                                         const Tensor& lora_down,
                                                         const std::optional<Tensor>& lora_scales) {
  constexpr const char* op = "svdq::quantize_act_fp8 (CUDA)";
  SVDQ_CHECK(x.is_cuda(), op, ": ", describe("x", x), " must be a CUDA tensor");
  const Dev dev{x.get_device_index()};
  check_cuda(op, "smooth", smooth, dev);
  SVDQ_CHECK(x.dim() == 2 && is_16bit(x.scalar_type()), op, ": ", describe("x", x),
             " must be bfloat16/float16 [M, K] (flatten leading dims first)");
  const int64_t M = x.size(0), K = x.size(1);
  SVDQ_CHECK(K >= 1 && M <= INT_MAX && K <= INT_MAX, op, ": ", describe("x", x), " must have 1 <= K and M, K in int range");
  SVDQ_CHECK(smooth.dim() == 1 && smooth.size(0) == K && smooth.scalar_type() == x.scalar_type(), op, ": ",
             describe("smooth", smooth), " must be [K] = [", K, "] with the dtype of ", describe("x", x),
             " (the FP8 quantizer divides in that dtype's exact fp32 values; convert λ once, losslessly)");
  require_sm90(op, dev);
  // The low-rank part (and all of lora_down / lora_scales' checks) is quantize_act's; it returns lora_act.
  const int64_t r = lora_down.dim() == 2 ? lora_down.size(1) : -1;
  std::optional<Tensor> lora_act;
  if (r != 0) lora_act = std::get<2>(quantize_act_impl(x, smooth, lora_down, lora_scales, false));

  const torch::stable::accelerator::DeviceGuard guard(dev.index);
  const int64_t kp = padded_k(K);
  Tensor qact = empty_like_device(x, {M, kp}, dtype::u8);
  Tensor ascales = empty_like_device(x, {M}, dtype::f32);
  if (!lora_act) {
    SVDQ_CHECK(lora_down.dim() == 2 && lora_down.size(0) == K, op, ": ", describe("lora_down", lora_down),
               " must be [K, r] with K = ", K);
    lora_act = empty_like_device(x, {M, 0}, dtype::f32);
  }
  if (M == 0) return {qact, ascales, *lora_act};
  Tensor xc = torch::stable::contiguous(x);
  Tensor lam = torch::stable::contiguous(smooth);
  const cudaError_t err = cuda::sm90::launch_quantize_act_fp8(xc.data_ptr(), lam.data_ptr(),
                                                              x.scalar_type() == dtype::bf16, (int)M, (int)K,
                                                              static_cast<uint8_t*>(qact.data_ptr()),
                                                              ascales.mutable_data_ptr<float>(), current_stream(dev));
  SVDQ_CHECK(err == cudaSuccess, op, ": kernel failed (", launch_error(err), ") for M=", M, " K=", K, " on ",
             dev.str());
  return {qact, ascales, *lora_act};
}
#endif  // SVDQ_WITH_SM90

}  // namespace
}  // namespace svdq

STABLE_TORCH_LIBRARY_IMPL(svdq, CUDA, m) {
  m.impl("quantize_act", TORCH_BOX(&svdq::quantize_act_cuda));
  m.impl("quantize_act_e4m3", TORCH_BOX(&svdq::quantize_act_e4m3_cuda));
  m.impl("prepare_weight", TORCH_BOX(&svdq::prepare_weight_cuda));
  m.impl("w4a4_gemm", TORCH_BOX(&svdq::w4a4_gemm_cuda));
#if defined(SVDQ_WITH_SM90)
  // Hopper (built when 90 is in the arch list; the ops check for a compute capability 9.0 device).
  m.impl("prepare_weight_sm90", TORCH_BOX(&svdq::prepare_weight_sm90_cuda));
  m.impl("w4a4_gemm_sm90", TORCH_BOX(&svdq::w4a4_gemm_sm90_cuda));
  m.impl("quantize_act_fp8", TORCH_BOX(&svdq::quantize_act_fp8_cuda));
  m.impl("w4a8_gemm", TORCH_BOX(&svdq::w4a8_gemm_cuda));
#endif
}
