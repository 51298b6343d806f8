# Helpers for CMakeLists.txt. Each function has a doc block with an example.

# svdq_python_query(<out-var> <python code>)
#   Runs `${Python_EXECUTABLE} -c <code>` and stores stripped stdout in <out-var>; fails the configure step
#   with the interpreter's error output when the code raises.
#   Example: svdq_python_query(TORCH_VERSION "import torch; print(torch.__version__)")
function(svdq_python_query out_var code)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c "${code}"
    OUTPUT_VARIABLE _out ERROR_VARIABLE _err RESULT_VARIABLE _rc
    OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "svdq: python query failed (${Python_EXECUTABLE}):\n${code}\n${_err}")
  endif()
  set(${out_var} "${_out}" PARENT_SCOPE)
endfunction()

# svdq_import_torch(<min-version>)
#   Describes the torch installed in ${Python_EXECUTABLE} as the INTERFACE target `svdq::torch` (headers,
#   libtorch_cpu, which exports the stable C shim, and TORCH_TARGET_VERSION = <min-version>) and, when torch
#   is a CUDA build, `svdq::torch_cuda` (libtorch_cuda: the CUDA part of the shim). Stops the configure step
#   when torch is older than <min-version> (no stable ABI to build on). Sets in the caller's scope:
#     SVDQ_TORCH_VERSION   e.g. "2.14.1+cu130"
#     SVDQ_TORCH_CUDA      torch.version.cuda, "" for a CPU-only torch
#     SVDQ_TORCH_GPU_ARCH  compute capability of GPU 0 as "90", "" when no GPU is visible
#   Example: svdq_import_torch("2.10")  target_link_libraries(_C PRIVATE svdq::torch)
#
#   Why not find_package(Torch): for a CUDA build of torch, TorchConfig.cmake runs the deprecated FindCUDA,
#   then looks for nvrtc/cuDNN/cuSPARSELt, and aborts ("Your installed Caffe2 version uses CUDA but I cannot
#   find the CUDA libraries") when no toolkit is found, so a CPU-only build against a CUDA torch (this
#   project's CI) cannot configure; it also adds the C++ API (and its ABI flag), which the stable ABI avoids.
#   The libraries need only the headers and two shared libraries.
function(svdq_import_torch min_version)
  svdq_python_query(_info [=[
import os, torch
root = os.path.dirname(torch.__file__)
gpu = ""
try:
    if torch.version.cuda and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        gpu = f"{major}{minor}"
except Exception:
    pass
print(torch.__version__, torch.version.cuda or "none", os.path.join(root, "include"), os.path.join(root, "lib"),
      gpu or "none", sep=";")
]=])
  list(GET _info 0 _version)
  list(GET _info 1 _cuda)
  list(GET _info 2 _inc)
  list(GET _info 3 _lib)
  list(GET _info 4 _gpu)
  if(_cuda STREQUAL "none")
    set(_cuda "")
  endif()
  if(_gpu STREQUAL "none")
    set(_gpu "")
  endif()
  string(REGEX MATCH "^[0-9]+\\.[0-9]+" _mm "${_version}")
  if(_mm VERSION_LESS min_version)
    message(FATAL_ERROR "svdq: torch ${_version} (from ${Python_EXECUTABLE}) is older than ${min_version}: svdq is "
                        "built on PyTorch's stable ABI, which needs torch >= ${min_version} to build and to run. "
                        "Install a newer torch (pip install 'torch>=${min_version}') and build again.")
  endif()
  string(REGEX MATCH "^([0-9]+)\\.([0-9]+)" _ "${min_version}")
  math(EXPR _target "(${CMAKE_MATCH_1} << 56) | (${CMAKE_MATCH_2} << 48)" OUTPUT_FORMAT HEXADECIMAL)

  add_library(svdq_torch INTERFACE)
  add_library(svdq::torch ALIAS svdq_torch)
  target_include_directories(svdq_torch SYSTEM INTERFACE "${_inc}")
  target_compile_definitions(svdq_torch INTERFACE TORCH_TARGET_VERSION=${_target}ULL)
  find_library(_path_torch_cpu NAMES torch_cpu PATHS "${_lib}" NO_DEFAULT_PATH REQUIRED)
  target_link_libraries(svdq_torch INTERFACE "${_path_torch_cpu}")
  if(_cuda)
    add_library(svdq_torch_cuda INTERFACE)
    add_library(svdq::torch_cuda ALIAS svdq_torch_cuda)
    find_library(_path_torch_cuda NAMES torch_cuda PATHS "${_lib}" NO_DEFAULT_PATH)
    if(_path_torch_cuda)
      target_link_libraries(svdq_torch_cuda INTERFACE "${_path_torch_cuda}")
    endif()
  endif()
  message(STATUS "svdq: torch ${_version} (CUDA: ${_cuda}) from ${_lib}; stable ABI target ${min_version} "
                 "(TORCH_TARGET_VERSION=${_target})")
  set(SVDQ_TORCH_VERSION "${_version}" PARENT_SCOPE)
  set(SVDQ_TORCH_CUDA "${_cuda}" PARENT_SCOPE)
  set(SVDQ_TORCH_GPU_ARCH "${_gpu}" PARENT_SCOPE)
endfunction()

# svdq_json_string(<out-var> <text>)
#   <text> as a JSON string literal (quotes, backslashes and control characters escaped).
#   Example: svdq_json_string(j "a\"b")  ->  j = "a\\"b" with the surrounding quotes
function(svdq_json_string out_var text)
  string(REPLACE "\\" "\\\\" text "${text}")
  string(REPLACE "\"" "\\\"" text "${text}")
  string(REPLACE "\n" "\\n" text "${text}")
  string(REPLACE "\t" "\\t" text "${text}")
  set(${out_var} "\"${text}\"" PARENT_SCOPE)
endfunction()

# svdq_json_object(<out-var> KEY TYPE VALUE [KEY TYPE VALUE ...])
#   A JSON object from triples; TYPE is str (VALUE escaped), list (a ;- or ,-separated list of strings) or raw
#   (VALUE inserted as is: numbers, true/false). Example: svdq_json_object(j version str 1.0 cuda raw true)
function(svdq_json_object out_var)
  set(_json "")
  set(_args "${ARGN}")  # quoted: keeps empty values
  list(LENGTH _args _n)
  math(EXPR _last "${_n} - 1")
  foreach(_i RANGE 0 ${_last} 3)
    math(EXPR _t "${_i} + 1")
    math(EXPR _v "${_i} + 2")
    list(GET _args ${_i} _key)
    list(GET _args ${_t} _type)
    if(_v LESS _n)
      list(GET _args ${_v} _value)
    else()
      set(_value "")
    endif()
    if(_type STREQUAL "str")
      svdq_json_string(_value "${_value}")
    elseif(_type STREQUAL "list")
      string(REPLACE "," ";" _items "${_value}")
      set(_value "")
      foreach(_item IN LISTS _items)
        svdq_json_string(_q "${_item}")
        if(_value)
          string(APPEND _value ", ")
        endif()
        string(APPEND _value "${_q}")
      endforeach()
      set(_value "[${_value}]")
    endif()
    if(_json)
      string(APPEND _json ", ")
    endif()
    string(APPEND _json "\"${_key}\": ${_value}")
  endforeach()
  set(${out_var} "{${_json}}" PARENT_SCOPE)
endfunction()

# svdq_find_cuda_toolkit(<root-var> <reason-var>)
#   The CUDA toolkit root to build with: CUDA_HOME, else CUDAToolkit_ROOT (env or -D), else /usr/local/cuda.
#   Never derived from `which nvcc` (/usr/local/bin/nvcc can be a wrapper script, and its parent is not a
#   toolkit). <root-var> is "" with the reason in <reason-var> when that root has no bin/nvcc.
#   Example: svdq_find_cuda_toolkit(root why)  ->  root=/usr/local/cuda
function(svdq_find_cuda_toolkit root_var reason_var)
  if(DEFINED ENV{CUDA_HOME} AND NOT "$ENV{CUDA_HOME}" STREQUAL "")
    set(_root "$ENV{CUDA_HOME}")
    set(_from "CUDA_HOME")
  elseif(CUDAToolkit_ROOT)
    set(_root "${CUDAToolkit_ROOT}")
    set(_from "CUDAToolkit_ROOT")
  elseif(DEFINED ENV{CUDAToolkit_ROOT} AND NOT "$ENV{CUDAToolkit_ROOT}" STREQUAL "")
    set(_root "$ENV{CUDAToolkit_ROOT}")
    set(_from "CUDAToolkit_ROOT")
  else()
    set(_root "/usr/local/cuda")
    set(_from "default")
  endif()
  if(EXISTS "${_root}/bin/nvcc")
    get_filename_component(_root "${_root}" REALPATH)
    set(${root_var} "${_root}" PARENT_SCOPE)
    set(${reason_var} "${_from}" PARENT_SCOPE)
  else()
    set(${root_var} "" PARENT_SCOPE)
    set(${reason_var} "no nvcc in ${_root}/bin (toolkit root from ${_from})" PARENT_SCOPE)
  endif()
endfunction()

# svdq_cuda_archs(<out-var>)
#   The GPU architectures to compile for, as a list of compute capabilities without dots ("80;89;90"):
#   $ENV{SVDQ_CUDA_ARCHS} or -DSVDQ_CUDA_ARCHS=..., else the GPU torch sees (SVDQ_TORCH_GPU_ARCH), else
#   every architecture we ship (SVDQ_SHIPPED_CUDA_ARCHS).
#   Example: SVDQ_CUDA_ARCHS="89;90" pip install ...  ->  out = 89;90
function(svdq_cuda_archs out_var)
  if(DEFINED ENV{SVDQ_CUDA_ARCHS} AND NOT "$ENV{SVDQ_CUDA_ARCHS}" STREQUAL "")
    set(_archs "$ENV{SVDQ_CUDA_ARCHS}")
  elseif(SVDQ_CUDA_ARCHS)
    set(_archs "${SVDQ_CUDA_ARCHS}")
  elseif(SVDQ_TORCH_GPU_ARCH)
    set(_archs "${SVDQ_TORCH_GPU_ARCH}")
  else()
    set(_archs "${SVDQ_SHIPPED_CUDA_ARCHS}")
  endif()
  string(REPLACE "," ";" _archs "${_archs}")
  string(REPLACE " " ";" _archs "${_archs}")
  string(REPLACE "." "" _archs "${_archs}")
  list(REMOVE_ITEM _archs "")
  list(REMOVE_DUPLICATES _archs)
  set(${out_var} "${_archs}" PARENT_SCOPE)
endfunction()

# svdq_cuda_architectures_property(<out-var> <archs>)
#   CUDA_ARCHITECTURES value for <archs>: SASS for each ("80-real"), plus PTX ("90" = SASS + PTX) of the
#   newest one, so that future GPUs can JIT it, and of every arch followed by a gap of whole major versions,
#   so that the GPUs in the gap run too: a cubin runs only on its own major, PTX on any later GPU.
#   Example: "80;90" -> "80-real;90"; "75;80;86;89;90;120" -> "75-real;80-real;86-real;89-real;90;120"
#   (sm_100 / sm_103 / sm_110 JIT compute_90's PTX).
function(svdq_cuda_architectures_property out_var archs)
  set(_sorted ${archs})
  list(SORT _sorted COMPARE NATURAL)
  list(LENGTH _sorted _n)
  set(_prop "")
  math(EXPR _last "${_n} - 1")
  foreach(_i RANGE ${_last})
    list(GET _sorted ${_i} _a)
    set(_ptx FALSE)
    if(_i EQUAL _last)
      set(_ptx TRUE)
    else()
      math(EXPR _j "${_i} + 1")
      list(GET _sorted ${_j} _next)
      math(EXPR _major "${_a} / 10")
      math(EXPR _gap "${_next} / 10 - ${_major}")
      if(_gap GREATER 1)
        set(_ptx TRUE)
      endif()
    endif()
    if(_ptx)
      list(APPEND _prop "${_a}")
    else()
      list(APPEND _prop "${_a}-real")
    endif()
  endforeach()
  set(${out_var} "${_prop}" PARENT_SCOPE)
endfunction()

# svdq_check_nvcc_matches_torch(<cuda-root> <torch-cuda>)
#   Stops the configure step when the toolkit's nvcc has another major version than the CUDA torch was built
#   with ("13.0"): the kernels would need a CUDA runtime of nvcc's major, but the extension runs on the one
#   torch loads (and a newer nvcc emits PTX the torch-era driver stack may not JIT). SVDQ_ALLOW_CUDA_MISMATCH=1
#   (environment) skips the check. Example: svdq_check_nvcc_matches_torch(/usr/local/cuda-12.4 13.0) -> error.
function(svdq_check_nvcc_matches_torch root torch_cuda)
  execute_process(COMMAND "${root}/bin/nvcc" --version OUTPUT_VARIABLE _out ERROR_VARIABLE _err
                  RESULT_VARIABLE _rc)
  string(REGEX MATCH "release ([0-9]+)\\.([0-9]+)" _m "${_out}")
  if(NOT _rc EQUAL 0 OR NOT _m)
    message(FATAL_ERROR "svdq: cannot read the version of ${root}/bin/nvcc (${_err}${_out})")
  endif()
  set(_nvcc_major "${CMAKE_MATCH_1}")
  set(_nvcc_version "${CMAKE_MATCH_1}.${CMAKE_MATCH_2}")
  string(REGEX MATCH "^[0-9]+" _torch_major "${torch_cuda}")
  if(NOT _nvcc_major STREQUAL _torch_major AND NOT "$ENV{SVDQ_ALLOW_CUDA_MISMATCH}" STREQUAL "1")
    message(FATAL_ERROR
      "svdq: the CUDA toolkit at ${root} has nvcc ${_nvcc_version}, but torch was built with CUDA ${torch_cuda}: "
      "their major versions must match. Point CUDA_HOME at a CUDA ${_torch_major}.x toolkit, install a torch "
      "built for CUDA ${_nvcc_major}, or build CPU-only with SVDQ_NO_CUDA=1 (SVDQ_ALLOW_CUDA_MISMATCH=1 skips "
      "this check).")
  endif()
  message(STATUS "svdq: nvcc ${_nvcc_version} matches torch's CUDA ${torch_cuda} (major ${_torch_major})")
endfunction()
