"""Finding, checking and loading svdq's native libraries (built by CMakeLists.txt).

Three files sit in the package directory (or in ``$SVDQ_LIBRARY_DIR``):

- ``_C.json``: what the build used (torch, CUDA, CPU ISAs), read first, without loading any code;
- ``_C.so``: the ``svdq::*`` op schemas and the CPU kernels;
- ``_C_cuda.so``: the CUDA kernels (only in CUDA builds), loaded only into a torch built for the same CUDA major,
  so that ``_C.so`` works in a CPU-only torch too.

They use only PyTorch's stable C ABI and no Python headers, so one build loads into every torch from
``torch_abi_min`` (2.10) on and into every CPython; an older torch is refused here, before loading, with both
versions named. ``torch.ops.load_library`` loads them (their static initializers register the ops);
``ctypes`` reaches the few plain C functions (build info, the CPU kernel variant).
"""

from __future__ import annotations

import ctypes
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent


class NativeLibraryError(ImportError):
    """The native libraries are missing, do not match this torch, or failed to load (the message says which)."""


@dataclass
class NativeLibrary:
    info: dict  # _C.json plus the run-time fields of build_info()
    lib: ctypes.CDLL  # _C.so, for its C functions

    def cpu_isas(self) -> list[str]:
        return [s for s in _call_text(self.lib.svdq_cpu_isas).split(",") if s]

    def active_cpu_isa(self) -> str:
        return _call_text(self.lib.svdq_active_cpu_isa)

    def set_cpu_isa(self, name: str) -> str:
        buf = ctypes.create_string_buffer(1024)
        rc = self.lib.svdq_set_cpu_isa(name.encode(), buf, ctypes.c_size_t(len(buf)))
        if rc != 0:
            raise RuntimeError(buf.value.decode())
        return buf.value.decode()


def _call_text(fn) -> str:
    buf = ctypes.create_string_buffer(1024)
    fn(buf, ctypes.c_size_t(len(buf)))
    text = buf.value.decode()
    if text.startswith("error: "):
        raise RuntimeError(f"svdq: {text[7:]}")
    return text


def _major_minor(version: str) -> tuple[int, int]:
    parts = version.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise NativeLibraryError(f"svdq: cannot read a major.minor version from {version!r}") from None


def check_torch(runtime: str, abi_min: str, built_with: str) -> None:
    """Raise unless torch ``runtime`` can load libraries built on the stable ABI of ``abi_min``."""
    if _major_minor(runtime) < _major_minor(abi_min):
        raise NativeLibraryError(
            f"svdq's native libraries were built with torch {built_with} for PyTorch's stable ABI {abi_min}, "
            f"which torch {runtime} (installed) does not have: install torch >= {abi_min} "
            f"(pip install 'torch>={abi_min}')"
        )


def cuda_mismatch(info: dict, torch_cuda: str | None, torch_version: str) -> str:
    """Why _C_cuda.so must not be loaded into this torch ("" when it can be)."""
    if not info.get("cuda"):
        return ""
    if not torch_cuda:
        return f"torch {torch_version} is a CPU-only build"
    major = torch_cuda.split(".")[0]
    if major != str(info.get("cuda_major")):
        return (
            f"the CUDA kernels were built with CUDA {info.get('nvcc_version')} (for a torch built for CUDA "
            f"{info.get('cuda_major')}); torch {torch_version} is built for CUDA {torch_cuda}: install the svdq "
            f"wheel for cu{major} or build from source"
        )
    return ""


def library_dir() -> Path:
    return Path(os.environ.get("SVDQ_LIBRARY_DIR") or PACKAGE_DIR)


def load() -> NativeLibrary:
    """Check and load the libraries; raises `NativeLibraryError` saying what is wrong and what to do."""
    where = library_dir()
    so, meta = where / "_C.so", where / "_C.json"
    if not so.exists():
        raise NativeLibraryError(f"svdq's native library is not built: no {so}")
    try:
        info = json.loads(meta.read_text())
    except (OSError, ValueError) as e:
        raise NativeLibraryError(f"svdq: {meta} (the build info beside {so.name}) is missing or unreadable: {e}") from e
    check_torch(torch.__version__, info.get("torch_abi_min", "?"), info.get("torch_version", "?"))
    try:
        torch.ops.load_library(str(so))
    except (OSError, RuntimeError) as e:  # RuntimeError: the registration failed (e.g. a second copy of svdq's ops)
        raise NativeLibraryError(f"svdq: {so} does not load into torch {torch.__version__}: {e}") from e
    lib = ctypes.CDLL(str(so))  # the handle torch just opened
    lib.svdq_build_info_json.restype = ctypes.c_char_p
    lib.svdq_set_cpu_isa.restype = ctypes.c_int
    if json.loads(lib.svdq_build_info_json().decode()) != info:
        raise NativeLibraryError(f"svdq: {meta} does not describe {so} (files from two builds): rebuild")
    info = dict(info)
    info["cuda_loaded"] = False
    info["cuda_not_loaded_because"] = ""
    if info.get("cuda"):
        why = cuda_mismatch(info, torch.version.cuda, torch.__version__)
        if not why:
            try:
                torch.ops.load_library(str(where / "_C_cuda.so"))
                info["cuda_loaded"] = True
            except (OSError, RuntimeError) as e:
                why = f"{where / '_C_cuda.so'} does not load: {e}"
        info["cuda_not_loaded_because"] = why
    return NativeLibrary(info=info, lib=lib)
