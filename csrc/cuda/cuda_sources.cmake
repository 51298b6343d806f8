# csrc/cuda/cuda_sources.cmake — the CUDA sources of svdq._C, included by the top CMakeLists.txt when CUDA is
# built. Paths are relative to the repository root.
#
#   SVDQ_CUDA_SOURCES          .cu files (CUDA headers only, no torch): compiled by nvcc into a static library
#   SVDQ_CUDA_BINDING_SOURCES  .cpp with TORCH_LIBRARY_IMPL(svdq, CUDA, m): compiled with the extension
#   SVDQ_CUDA_FLAGS            extra nvcc flags (never --use_fast_math: the quantizer needs IEEE division)
#
# Example (what the top CMakeLists does with them):
#   include(csrc/cuda/cuda_sources.cmake)
#   add_library(svdq_cuda_kernels STATIC ${SVDQ_CUDA_SOURCES})
#   target_sources(_C PRIVATE ${SVDQ_CUDA_BINDING_SOURCES})

set(_svdq_cuda_kernel_files
  csrc/cuda/quantize_act.cu     # fused activation quantizer + low-rank down (quantize_act.h)
  csrc/cuda/w4a4_gemm.cu        # W4A4 GEMM, both MMA paths (w4a4_gemm.h)
  csrc/cuda/repack_weight.cu    # prepare_weight: canonical -> fragment layout (w4a4_gemm.h)
)
set(SVDQ_CUDA_SOURCES "")
foreach(_f IN LISTS _svdq_cuda_kernel_files)
  if(EXISTS "${CMAKE_CURRENT_SOURCE_DIR}/${_f}")
    list(APPEND SVDQ_CUDA_SOURCES "${_f}")
  else()
    # A missing kernel file fails at link time (undefined launcher) with this message to explain it.
    message(WARNING "svdq: ${_f} does not exist (yet); the CUDA extension will not link without it")
  endif()
endforeach()
message(STATUS "svdq: CUDA kernel sources: ${SVDQ_CUDA_SOURCES}")

set(SVDQ_CUDA_BINDING_SOURCES csrc/cuda/ops_cuda.cpp)

# -lineinfo: source lines in compute-sanitizer / ncu reports at no run-time cost.
list(APPEND SVDQ_CUDA_FLAGS -lineinfo)
