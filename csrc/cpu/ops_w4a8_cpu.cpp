// CPU implementation of the W4A8 ops (docs/numerics.md §8; schemas in csrc/bindings.cpp).
//
// W4A8 keeps the W4A4 checkpoint (int4 g64 weights, spec §3) and quantizes activations to FP8 e4m3 with one
// fp32 scale per token. On the CPU there is no FP8 arithmetic, so this backend is written with ATen ops:
//   quantize_act_fp8: the spec's elementwise steps in the spec's order (IEEE fp32 division, torch's RNE
//                     float → float8_e4m3fn cast), so qact and ascales are bit-identical to the reference;
//   w4a8_gemm:        Ŵ[n, k] = s_w[n, g] · q_w[n, k] (exact in fp32: an 11-bit scale times a 4-bit
//                     integer), then one fp32 GEMM a · Ŵᵀ scaled by s_a per row. The sum order differs
//                     from the reference's per-group sums (spec §8.3 allows it: ‖Δy‖/‖y‖ ≤ 1e-3).
// Both run on torch's threaded kernels; qweight is read in the canonical layout (prepare_weight is a copy).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <sstream>
#include <tuple>

namespace svdq::cpu {
namespace {

constexpr int64_t kGroup = 64;
constexpr double kFp8Max = 448.0;  // largest finite float8_e4m3fn

std::string describe(const at::Tensor& t) {
  std::ostringstream s;
  s << "shape " << t.sizes() << ", dtype " << t.scalar_type() << ", device " << t.device();
  return s.str();
}

#define W4A8_CHECK(cond, op, name, t, ...) \
  TORCH_CHECK(cond, "svdq::", op, ": ", name, " must be ", __VA_ARGS__, "; got ", describe(t))

void check_cpu2d(const char* op, const char* name, const at::Tensor& t, const char* shape) {
  W4A8_CHECK(t.device().is_cpu() && t.dim() == 2, op, name, t, "a 2-D CPU tensor ", shape);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_act_fp8(const at::Tensor& x, const at::Tensor& smooth,
                                                                const at::Tensor& lora_down,
                                                                const std::optional<at::Tensor>& lora_scales) {
  const char* op = "quantize_act_fp8";
  check_cpu2d(op, "x", x, "[M, K]");
  W4A8_CHECK(x.is_floating_point(), op, "x", x, "fp32/bf16/fp16 [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  W4A8_CHECK(K >= 1, op, "x", x, "[M, K] with K >= 1");
  W4A8_CHECK(smooth.dim() == 1 && smooth.size(0) == K && smooth.is_floating_point(), op, "smooth", smooth,
             "a floating [K] tensor, K = x.shape[1] = ", K);
  check_cpu2d(op, "lora_down", lora_down, "[K, r]");
  W4A8_CHECK(lora_down.size(0) == K && lora_down.is_floating_point(), op, "lora_down", lora_down,
             "a floating [K, r] tensor, K = x.shape[1] = ", K);
  const int64_t r = lora_down.size(1);
  if (lora_scales) {
    W4A8_CHECK(lora_scales->dim() == 1 && lora_scales->size(0) == r && lora_scales->scalar_type() == at::kFloat,
               op, "lora_scales", *lora_scales, "fp32 [r], r = lora_down.shape[1] = ", r);
  }
  const int64_t Kp = (K + kGroup - 1) / kGroup * kGroup;
  const at::Tensor xf = x.to(at::kFloat);
  at::Tensor xhat = at::constant_pad_nd(xf / smooth.to(at::kFloat), {0, Kp - K});
  const at::Tensor amax = M ? xhat.abs().amax({1}) : at::zeros({0}, xf.options());
  // IEEE division by a tensor (not a scalar: a scalar divisor may become a reciprocal multiply).
  const at::Tensor ascales = amax / at::full_like(amax, kFp8Max);
  const at::Tensor s = ascales.unsqueeze(1);
  const at::Tensor zero = s.eq(0);
  const at::Tensor scaled =
      at::where(zero, at::zeros_like(xhat), xhat / at::where(zero, at::ones_like(s), s)).clamp_(-kFp8Max, kFp8Max);
  const at::Tensor qact = scaled.to(at::kFloat8_e4m3fn).view(at::kByte);
  at::Tensor lora_act = at::matmul(xf, lora_down.to(at::kFloat));
  if (lora_scales) lora_act.mul_(*lora_scales);
  return {qact.contiguous(), ascales.contiguous(), lora_act.contiguous()};
}

at::Tensor w4a8_gemm(const at::Tensor& qact, const at::Tensor& ascales, const at::Tensor& qweight,
                     const at::Tensor& wscales, const at::Tensor& lora_act, const at::Tensor& lora_up,
                     const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  const char* op = "w4a8_gemm";
  check_cpu2d(op, "qact", qact, "[M, Kp]");
  W4A8_CHECK(qact.scalar_type() == at::kByte && qact.size(1) % kGroup == 0, op, "qact", qact,
             "uint8 [M, Kp] (e4m3 bytes from quantize_act_fp8), Kp a multiple of 64");
  const int64_t M = qact.size(0), Kp = qact.size(1), G = Kp / kGroup;
  W4A8_CHECK(ascales.dim() == 1 && ascales.size(0) == M && ascales.scalar_type() == at::kFloat, op, "ascales",
             ascales, "fp32 [M], M = qact.shape[0] = ", M);
  check_cpu2d(op, "qweight", qweight, "[N, Kp/2]");
  W4A8_CHECK(qweight.scalar_type() == at::kChar && qweight.size(1) == Kp / 2, op, "qweight", qweight,
             "int8 [N, Kp/2] with Kp/2 = qact.shape[1] / 2 = ", Kp / 2);
  const int64_t N = qweight.size(0);
  check_cpu2d(op, "wscales", wscales, "[N, Kp/64]");
  W4A8_CHECK(wscales.size(0) == N && wscales.size(1) == G && wscales.is_floating_point(), op, "wscales", wscales,
             "floating [N, Kp/64] = [", N, ", ", G, "]");
  check_cpu2d(op, "lora_up", lora_up, "[N, r]");
  const int64_t r = lora_up.size(1);
  W4A8_CHECK(lora_up.size(0) == N, op, "lora_up", lora_up, "[N, r] with N = qweight.shape[0] = ", N);
  check_cpu2d(op, "lora_act", lora_act, "[M, r]");
  W4A8_CHECK(lora_act.size(0) == M && lora_act.size(1) == r && lora_act.scalar_type() == at::kFloat, op,
             "lora_act", lora_act, "fp32 [M, r] = [", M, ", ", r, "]");
  if (bias) {
    W4A8_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->is_floating_point(), op, "bias", *bias,
               "floating [N], N = ", N);
  }
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf,
              "svdq::w4a8_gemm: out_dtype must be fp32, bf16 or fp16; got ", out_dtype);
  // int4 nibbles → int values (low nibble = even k, spec §3), sign-extended: ((b << 4) >> 4) for the low one.
  const at::Tensor b = qweight.to(at::kInt);
  const at::Tensor lo = at::bitwise_right_shift(at::bitwise_left_shift(b, 28), 28);
  const at::Tensor hi = at::bitwise_right_shift(b, 4);
  const at::Tensor qw = at::stack({lo, hi}, 2).reshape({N, G, kGroup}).to(at::kFloat);
  const at::Tensor w = (qw * wscales.to(at::kFloat).unsqueeze(2)).reshape({N, Kp});  // exact products
  const at::Tensor a = qact.view(at::kFloat8_e4m3fn).to(at::kFloat);
  at::Tensor acc = at::matmul(a, w.t()).mul_(ascales.unsqueeze(1));
  if (r) acc.add_(at::matmul(lora_act.to(out_dtype).to(at::kFloat), lora_up.to(at::kFloat).t()));
  if (bias) acc.add_(bias->to(at::kFloat));
  return acc.to(out_dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(svdq, CPU, m) {
  m.impl("quantize_act_fp8", &quantize_act_fp8);
  m.impl("w4a8_gemm", &w4a8_gemm);
}

}  // namespace svdq::cpu
