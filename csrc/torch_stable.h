// torch_stable.h — everything the op bindings use of PyTorch: its stable C ABI only.
//
// The bindings (csrc/registration.cpp, csrc/cpu/ops_cpu.cpp, csrc/cuda/ops_cuda.cpp) include this header and
// no ATen / c10 / torch/library.h header, so the built library calls libtorch only through the versioned C
// shim (aoti_torch_* / torch_* functions) and keeps working in every later torch. CMakeLists.txt compiles
// them with TORCH_TARGET_VERSION = 2.10 (the oldest torch whose stable ABI has everything used here:
// torch::stable::parallel_for / get_num_threads for the CPU kernels, empty / to / contiguous with dtype and
// device arguments); using anything newer fails to compile. The kernel files (.cu, kernels_isa.cpp) include
// no torch header at all. docs/building.md: "One build for every torch".
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace svdq {

using Tensor = torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;
namespace dtype {
constexpr ScalarType f32 = ScalarType::Float;
constexpr ScalarType bf16 = ScalarType::BFloat16;
constexpr ScalarType f16 = ScalarType::Half;
constexpr ScalarType i8 = ScalarType::Char;
constexpr ScalarType u8 = ScalarType::Byte;
constexpr ScalarType i16 = ScalarType::Short;
}  // namespace dtype

// Concatenates anything an ostream prints: the message of a failed check.
template <class... Args>
std::string cat(const Args&... args) {
  std::ostringstream s;
  ((s << args), ...);
  return s.str();
}

// A failed check throws std::runtime_error with exactly the message (torch turns it into a Python
// RuntimeError). Not STD_TORCH_CHECK: that prefixes the C++ function, source path and line, which tell a user
// nothing; our messages name the op, the tensor, what was expected and what it got.
#define SVDQ_CHECK(cond, ...) \
  do {                        \
    if (!(cond)) throw std::runtime_error(::svdq::cat(__VA_ARGS__)); \
  } while (0)

inline const char* dtype_name(ScalarType d) { return torch::headeronly::toString(d); }

inline bool is_float_dtype(ScalarType d) { return d == dtype::f32 || d == dtype::bf16 || d == dtype::f16; }

// "[4, 8]"
inline std::string shape_str(const Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

// "cpu", "cuda:0"
inline std::string device_str(const Tensor& t) {
  if (t.is_cpu()) return "cpu";
  if (t.is_cuda()) return "cuda:" + std::to_string(t.get_device_index());
  return "device type " + std::to_string(static_cast<int>(t.device().type()));
}

// A fresh uninitialized tensor on t's device.
inline Tensor empty_like_device(const Tensor& t, std::initializer_list<int64_t> sizes, ScalarType d) {
  return torch::stable::new_empty(t, torch::headeronly::IntHeaderOnlyArrayRef(sizes), d);
}

// t converted to dtype d, contiguous (a no-op when it already is both).
inline Tensor as_contiguous(const Tensor& t, ScalarType d) {
  return torch::stable::contiguous(torch::stable::to(t, d));
}

// Bytes of storage reachable from t's data pointer (the prepared-weight checks: a slice or clone of a padded
// buffer has less).
inline int64_t storage_bytes_from(const Tensor& t) {
  int64_t nbytes = 0;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_storage_size(t.get(), &nbytes));
  return nbytes - t.storage_offset() * static_cast<int64_t>(t.element_size());
}

}  // namespace svdq
