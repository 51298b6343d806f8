// quantize_act.h — launcher API of the fused activation quantizer + low-rank down projection (CUDA).
//
// Spec: docs/numerics.md §4.1. Implementation and design notes: quantize_act.cu.
// Plain pointers and integers in, cudaError_t out; no torch headers (csrc/cuda/ops_cuda.cpp validates the
// tensors and turns error codes into messages).
#pragma once

#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

namespace svdq {
namespace cuda {

// 16-bit activation dtypes the kernel reads. x and lora_down always share one.
enum class ActDtype : int { kBF16 = 0, kFP16 = 1 };

struct QuantizeActParams {
  // Inputs
  const void* x = nullptr;          // [M, K] ActDtype, row stride ldx elements, unit column stride
  int64_t M = 0;                    // rows (tokens), >= 0
  int64_t K = 0;                    // input features, >= 1
  int64_t ldx = 0;                  // row stride of x in elements (>= K)
  ActDtype dtype = ActDtype::kBF16;
  const void* smooth = nullptr;     // [K] λ: ActDtype, or fp32 when smooth_fp32
  bool smooth_fp32 = false;
  const void* lora_down = nullptr;  // [K, r] ActDtype, contiguous (row stride r); may be null when r == 0
  int r = 0;                        // rank: 0 or a multiple of 16, <= 512
  const float* lora_scales = nullptr;  // [r] fp32, or null (= all ones)
  // Outputs
  int8_t* qact = nullptr;      // [M, Kp/2] canonical packed INT4 (low nibble = even k), contiguous;
                               // e4m3: uint8 [M, Kp], each code as a float8_e4m3fn byte (exact)
  bool e4m3 = false;           // qact format: false = packed INT4, true = e4m3 bytes (same codes, same ascales)
  float* ascales = nullptr;    // [M, Kp/64] fp32, contiguous
  float* lora_act = nullptr;   // [M, r] fp32, contiguous (may be null when r == 0)
  // Scratch: quantize_act_workspace_bytes(...) bytes (fp32 split-K partials); null allowed when that is 0.
  float* workspace = nullptr;
  // > 0: use this many K-splits instead of the automatic plan (benchmark sweeps; SVDQ_QACT_KSPLIT in the
  // binding). Must be the same value passed to quantize_act_workspace_bytes.
  int ksplit_override = 0;
};

// Bytes of scratch `launch_quantize_act` needs for these sizes on the current device (0 when the grid does
// not split K). The split plan depends on the SM count, so ask on the device you launch on.
size_t quantize_act_workspace_bytes(int64_t M, int64_t K, int r, int ksplit_override = 0);

// Launches the kernel(s) on `stream`. Returns cudaErrorInvalidValue for arguments outside the contract
// (the binding checks them first, with better messages), or the launch error.
cudaError_t launch_quantize_act(const QuantizeActParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace svdq
