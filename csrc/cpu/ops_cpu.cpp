// CPU implementations of the svdq ops (schemas: csrc/registration.cpp, semantics: docs/numerics.md §4).
//
// Host wrappers: shape comments, checks that name the tensor and say what was expected, conversion of the
// small model-dtype tensors (smooth, lora_down, wscales, lora_up, bias) to fp32, then the kernels of
// csrc/cpu/kernels_isa.cpp over torch's thread pool (torch::stable::parallel_for). x and y are read / written
// by the kernels in their own dtype (fp32, bf16, fp16), so the big tensors cross memory once. Only torch's
// stable ABI is used (csrc/torch_stable.h).

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <optional>
#include <sstream>
#include <tuple>

#include "cpu/dispatch.h"
#include "cpu/kernels.h"
#include "torch_stable.h"

namespace svdq::cpu {
namespace {

// ---- ISA dispatch --------------------------------------------------------------------------------------

struct Isa {
  const char* name;
  void (*quantize_act_rows)(const QuantizeActParams&, int64_t, int64_t);
  void (*gemm_prepare_rows)(const GemmParams&, int64_t, int64_t);
  void (*gemm_tasks)(const GemmParams&, int64_t, int64_t);
  bool (*cpu_has)();
};

#define SVDQ_ISA_ENTRY(ns, has) Isa{#ns, &ns::quantize_act_rows, &ns::gemm_prepare_rows, &ns::gemm_tasks, has}

bool has_base() { return true; }
#if defined(__x86_64__) || defined(_M_X64)
bool has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
}
bool has_avx512() {
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512vnni");
}
#endif

// Every compiled variant, worst first.
const std::vector<Isa>& compiled_isas() {
  static const std::vector<Isa> isas = {
#ifdef SVDQ_HAVE_ISA_base
      SVDQ_ISA_ENTRY(base, &has_base),
#endif
#ifdef SVDQ_HAVE_ISA_avx2
      SVDQ_ISA_ENTRY(avx2, &has_avx2),
#endif
#ifdef SVDQ_HAVE_ISA_avx512
      SVDQ_ISA_ENTRY(avx512, &has_avx512),
#endif
  };
  return isas;
}

const Isa* find_isa(const std::string& name) {
  for (const Isa& isa : compiled_isas())
    if (name == isa.name && isa.cpu_has()) return &isa;
  return nullptr;
}

const Isa* best_isa() {
  const Isa* best = nullptr;
  for (const Isa& isa : compiled_isas())
    if (isa.cpu_has()) best = &isa;
  SVDQ_CHECK(best, "svdq: no CPU kernel variant was compiled for this CPU");
  return best;
}

std::atomic<const Isa*>& active() {
  static std::atomic<const Isa*> isa{[] {
    const char* env = std::getenv("SVDQ_CPU_ISA");
    if (env && *env) {
      const Isa* chosen = find_isa(env);
      SVDQ_CHECK(chosen, "svdq: SVDQ_CPU_ISA=", env, " is not compiled in or not supported by this CPU");
      return chosen;
    }
    return best_isa();
  }()};
  return isa;
}

// ---- checks --------------------------------------------------------------------------------------------

std::string describe(const Tensor& t) {
  return cat("shape ", shape_str(t), ", dtype ", dtype_name(t.scalar_type()), ", device ", device_str(t),
             t.is_contiguous() ? ", contiguous" : ", non-contiguous");
}

// SVDQ_CHECK with the op, the tensor's name, what was expected and what the tensor is.
#define SVDQ_EXPECT(cond, op, name, t, ...) \
  SVDQ_CHECK(cond, "svdq::", op, ": ", name, " must be ", __VA_ARGS__, "; got ", describe(t))

// device, dtype class, rank and contiguity in one go
void check_tensor(const char* op, const char* name, const Tensor& t, int64_t dim, bool floating,
                  const char* shape) {
  SVDQ_EXPECT(t.is_cpu(), op, name, t, "a CPU tensor ", shape);
  SVDQ_EXPECT(t.dim() == dim, op, name, t, "a ", dim, "-D tensor ", shape);
  if (floating)
    SVDQ_EXPECT(is_float_dtype(t.scalar_type()), op, name, t, "float32, bfloat16 or float16 ", shape);
  SVDQ_EXPECT(t.is_contiguous(), op, name, t, "contiguous (call .contiguous()) ", shape);
}

void check_dtype(const char* op, const char* name, const Tensor& t, ScalarType d, const char* shape) {
  SVDQ_EXPECT(t.scalar_type() == d, op, name, t, "of dtype ", dtype_name(d), " ", shape);
}

void check_size(const char* op, const char* name, const Tensor& t, int64_t dim, int64_t expected,
                const char* what) {
  SVDQ_EXPECT(t.size(dim) == expected, op, name, t, "of size ", expected, " in dim ", dim, " (", what, ")");
}

DType to_dtype(ScalarType d) {
  switch (d) {
    case dtype::f32: return DType::f32;
    case dtype::bf16: return DType::bf16;
    case dtype::f16: return DType::f16;
    default: SVDQ_CHECK(false, "svdq: unsupported dtype ", dtype_name(d));
  }
  return DType::f32;
}

Tensor f32(const Tensor& t) { return as_contiguous(t, dtype::f32); }

// ---- ops -----------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> quantize_act(const Tensor& x,          // [M, K]
                                                const Tensor& smooth,     // [K]
                                                const Tensor& lora_down,  // [K, r]
                                                const std::optional<Tensor>& lora_scales,  // [r]
                                                double act_shift) {  // δ (spec §10), 0 = signed
  const char* op = "quantize_act";
  SVDQ_CHECK(act_shift >= 0.0 && act_shift < 1e30, "svdq::quantize_act: act_shift must be a finite shift >= 0 "
             "(0 = signed activations, spec §10); got ", act_shift);
  check_tensor(op, "x", x, 2, true, "[M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  SVDQ_CHECK(K >= 1, "svdq::quantize_act: x must have K >= 1 columns; got ", describe(x));
  check_tensor(op, "smooth", smooth, 1, true, "[K]");
  check_size(op, "smooth", smooth, 0, K, "K = x.shape[1]");
  check_tensor(op, "lora_down", lora_down, 2, true, "[K, r]");
  check_size(op, "lora_down", lora_down, 0, K, "K = x.shape[1]");
  const int64_t r = lora_down.size(1);
  if (lora_scales) {
    check_tensor(op, "lora_scales", *lora_scales, 1, true, "[r]");
    check_dtype(op, "lora_scales", *lora_scales, dtype::f32, "[r]");
    check_size(op, "lora_scales", *lora_scales, 0, r, "r = lora_down.shape[1]");
  }
  const int64_t G = (K + kGroup - 1) / kGroup;

  Tensor qact = empty_like_device(x, {M, G * kGroup / 2}, dtype::i8);
  Tensor ascales = empty_like_device(x, {M, G}, dtype::f32);
  Tensor lora_act = empty_like_device(x, {M, r}, dtype::f32);
  if (M == 0) return {qact, ascales, lora_act};

  const Tensor smooth32 = f32(smooth);
  const int64_t rp = (r + 15) / 16 * 16;  // the kernel's rank tile: zero columns r..rp
  Tensor down32 = torch::stable::new_zeros(x, {K, rp}, dtype::f32);
  if (r) {
    Tensor cols = torch::stable::narrow(down32, 1, 0, r);
    torch::stable::copy_(cols, lora_down);
  }
  const std::optional<Tensor> scales32 = lora_scales ? std::optional<Tensor>(f32(*lora_scales)) : std::nullopt;

  QuantizeActParams p{};
  p.M = M; p.K = K; p.G = G; p.r = r;
  p.act_shift = static_cast<float>(act_shift);
  p.x = x.data_ptr();
  p.xdtype = to_dtype(x.scalar_type());
  p.smooth = smooth32.const_data_ptr<float>();
  p.lora_down = down32.const_data_ptr<float>();
  p.lora_scales = scales32 ? scales32->const_data_ptr<float>() : nullptr;
  p.qact = qact.mutable_data_ptr<int8_t>();
  p.ascales = ascales.mutable_data_ptr<float>();
  p.lora_act = lora_act.mutable_data_ptr<float>();
  const Isa* isa = active().load();
  const int64_t blocks = (M + kRowTile - 1) / kRowTile;
  torch::stable::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    isa->quantize_act_rows(p, b0 * kRowTile, std::min(b1 * kRowTile, M));
  });
  return {qact, ascales, lora_act};
}

// quantize_act, then each INT4 code as its float8_e4m3fn byte (the CUDA kernel writes them directly).
std::tuple<Tensor, Tensor, Tensor> quantize_act_e4m3(const Tensor& x, const Tensor& smooth, const Tensor& lora_down,
                                                     const std::optional<Tensor>& lora_scales) {
  auto [qact, ascales, lora_act] = quantize_act(x, smooth, lora_down, lora_scales, 0.0);
  static const uint8_t kE4m3[16] = {0x00, 0x38, 0x40, 0x44, 0x48, 0x4A, 0x4C, 0x4E,
                                    0xD0, 0xCE, 0xCC, 0xCA, 0xC8, 0xC4, 0xC0, 0xB8};  // codes 0..7, -8..-1
  const int64_t M = qact.size(0), half = qact.size(1);
  Tensor out = empty_like_device(qact, {M, 2 * half}, dtype::u8);
  const uint8_t* src = reinterpret_cast<const uint8_t*>(qact.const_data_ptr<int8_t>());
  uint8_t* dst = out.mutable_data_ptr<uint8_t>();
  torch::stable::parallel_for(0, M * half, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      dst[2 * i] = kE4m3[src[i] & 0xF];
      dst[2 * i + 1] = kE4m3[src[i] >> 4];
    }
  });
  return {out, ascales, lora_act};
}

std::tuple<Tensor, Tensor> prepare_weight(const Tensor& qweight,   // [N, Kp/2] int8
                                          const Tensor& wscales) {  // [N, Kp/64]
  // The CPU GEMM reads the canonical qweight (it repacks 32-column panels on the fly, see kernels_isa.cpp),
  // so qweight is a checked copy (an op returns fresh tensors, never aliases of its inputs); wscales become
  // fp32 (exact), as on CUDA, so that one fake serves both devices and the GEMM skips a conversion per call.
  const char* op = "prepare_weight";
  check_tensor(op, "qweight", qweight, 2, false, "[N, Kp/2]");
  check_dtype(op, "qweight", qweight, dtype::i8, "[N, Kp/2]");
  check_tensor(op, "wscales", wscales, 2, true, "[N, Kp/64]");
  check_size(op, "wscales", wscales, 0, qweight.size(0), "N = qweight.shape[0]");
  check_size(op, "qweight", qweight, 1, wscales.size(1) * kGroup / 2, "Kp/2 = wscales.shape[1] * 32");
  return {torch::stable::clone(qweight),
          torch::stable::contiguous(torch::stable::to(wscales, dtype::f32, std::nullopt, std::nullopt, std::nullopt,
                                                      /*non_blocking=*/false, /*copy=*/true))};
}

Tensor w4a4_gemm(const Tensor& qact,     // [M, Kp/2] int8
                 const Tensor& ascales,  // [M, Kp/64] fp32
                 const Tensor& qweight,  // [N, Kp/2] int8
                 const Tensor& wscales,  // [N, Kp/64]
                 const Tensor& lora_act, // [M, r] fp32
                 const Tensor& lora_up,  // [N, r]
                 const std::optional<Tensor>& bias,  // [N]
                 ScalarType out_dtype,
                 bool act_unsigned) {  // qact holds shifted unsigned codes (spec §10.2)
  const char* op = "w4a4_gemm";
  check_tensor(op, "qact", qact, 2, false, "[M, Kp/2]");
  check_dtype(op, "qact", qact, dtype::i8, "[M, Kp/2]");
  check_tensor(op, "ascales", ascales, 2, false, "[M, Kp/64]");
  check_dtype(op, "ascales", ascales, dtype::f32, "[M, Kp/64]");
  const int64_t M = qact.size(0), G = ascales.size(1), Kp = G * kGroup;
  check_size(op, "ascales", ascales, 0, M, "M = qact.shape[0]");
  check_size(op, "qact", qact, 1, Kp / 2, "Kp/2 = ascales.shape[1] * 32");
  check_tensor(op, "qweight", qweight, 2, false, "[N, Kp/2]");
  check_dtype(op, "qweight", qweight, dtype::i8, "[N, Kp/2]");
  check_size(op, "qweight", qweight, 1, Kp / 2, "Kp/2 = ascales.shape[1] * 32");
  const int64_t N = qweight.size(0);
  check_tensor(op, "wscales", wscales, 2, true, "[N, Kp/64]");
  check_size(op, "wscales", wscales, 0, N, "N = qweight.shape[0]");
  check_size(op, "wscales", wscales, 1, G, "Kp/64 = ascales.shape[1]");
  check_tensor(op, "lora_act", lora_act, 2, false, "[M, r]");
  check_dtype(op, "lora_act", lora_act, dtype::f32, "[M, r]");
  check_size(op, "lora_act", lora_act, 0, M, "M = qact.shape[0]");
  const int64_t r = lora_act.size(1);
  check_tensor(op, "lora_up", lora_up, 2, true, "[N, r]");
  check_size(op, "lora_up", lora_up, 0, N, "N = qweight.shape[0]");
  check_size(op, "lora_up", lora_up, 1, r, "r = lora_act.shape[1]");
  if (bias) {
    check_tensor(op, "bias", *bias, 1, true, "[N]");
    check_size(op, "bias", *bias, 0, N, "N = qweight.shape[0]");
  }
  SVDQ_CHECK(is_float_dtype(out_dtype), "svdq::w4a4_gemm: out_dtype must be float32, bfloat16 or float16; got ",
             dtype_name(out_dtype));

  Tensor y = empty_like_device(qact, {M, N}, out_dtype);
  if (M == 0 || N == 0) return y;

  const Tensor ws32 = f32(wscales), up32 = f32(lora_up);
  const std::optional<Tensor> bias32 = bias ? std::optional<Tensor>(f32(*bias)) : std::nullopt;
  const int64_t Mp = padded_rows(M);
  Tensor a_unpacked = empty_like_device(qact, {Mp, Kp}, dtype::i16);
  Tensor lora_act_c = empty_like_device(qact, {M, r}, dtype::f32);

  GemmParams p{};
  p.M = M; p.N = N; p.G = G; p.r = r;
  p.act_unsigned = act_unsigned;
  p.qact = qact.const_data_ptr<int8_t>();
  p.ascales = ascales.const_data_ptr<float>();
  p.qweight = qweight.const_data_ptr<int8_t>();
  p.wscales = ws32.const_data_ptr<float>();
  p.lora_act = lora_act.const_data_ptr<float>();
  p.lora_up = up32.const_data_ptr<float>();
  p.bias = bias32 ? bias32->const_data_ptr<float>() : nullptr;
  p.y = y.mutable_data_ptr();
  p.ydtype = to_dtype(out_dtype);
  p.a_unpacked = a_unpacked.mutable_data_ptr<int16_t>();
  p.lora_act_c = lora_act_c.mutable_data_ptr<float>();

  // Tasks = 32-column blocks x row chunks, column-block major so that each thread's contiguous range of
  // tasks reuses one weight panel. Enough tasks for 4 per thread, never a chunk under one row tile.
  const int64_t n_blocks = (N + kColTile - 1) / kColTile, tiles_m = Mp / kRowTile;
  const int64_t want = 4 * static_cast<int64_t>(torch::stable::get_num_threads());
  p.n_tasks_m = std::max<int64_t>(1, std::min<int64_t>(tiles_m, (want + n_blocks - 1) / n_blocks));
  const Isa* isa = active().load();
  torch::stable::parallel_for(0, Mp, 16, [&](int64_t m0, int64_t m1) { isa->gemm_prepare_rows(p, m0, m1); });
  torch::stable::parallel_for(0, n_blocks * p.n_tasks_m, 1, [&](int64_t t0, int64_t t1) { isa->gemm_tasks(p, t0, t1); });
  return y;
}

}  // namespace

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (const Isa& isa : compiled_isas())
    if (isa.cpu_has()) names.emplace_back(isa.name);
  return names;
}

std::string active_isa() { return active().load()->name; }

std::string set_isa(const std::string& name) {
  const Isa* isa = find_isa(name);
  SVDQ_CHECK(isa, "svdq: CPU kernel variant '", name, "' is not compiled in or not supported by this CPU");
  return active().exchange(isa)->name;
}

}  // namespace svdq::cpu

STABLE_TORCH_LIBRARY_IMPL(svdq, CPU, m) {
  m.impl("quantize_act", TORCH_BOX(&svdq::cpu::quantize_act));
  m.impl("quantize_act_e4m3", TORCH_BOX(&svdq::cpu::quantize_act_e4m3));
  m.impl("prepare_weight", TORCH_BOX(&svdq::cpu::prepare_weight));
  m.impl("w4a4_gemm", TORCH_BOX(&svdq::cpu::w4a4_gemm));
}
