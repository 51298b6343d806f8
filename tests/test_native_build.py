"""The native libraries as built: they load, say what they were built with, register the op schemas of
docs/dev/contracts.md, use nothing of torch but its stable C ABI, and the CMake configure step takes the
documented CUDA and torch-version decisions. (That one build runs in another torch is proven by
scripts/wheel_check.sh, which CI runs: the wheel in a venv with torch 2.13.)

CI always builds the libraries, so a missing one fails here; SVDQ_ALLOW_NO_NATIVE=1 relaxes that.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import svdq
from svdq import _library, _native

ROOT = Path(__file__).resolve().parents[1]
ALLOW_NO_NATIVE = os.environ.get("SVDQ_ALLOW_NO_NATIVE") == "1"
needs_native = pytest.mark.skipif(not _native.AVAILABLE and ALLOW_NO_NATIVE, reason="SVDQ_ALLOW_NO_NATIVE=1")


def test_extension_loads():
    if ALLOW_NO_NATIVE and not _native.AVAILABLE:
        info = svdq.build_info()
        assert info["native"] is False and info["cuda"] is False
        pytest.skip("native library not built (allowed by SVDQ_ALLOW_NO_NATIVE=1)")
    assert _native.AVAILABLE, f"svdq's native library does not load: {_native.IMPORT_ERROR}"


@needs_native
def test_build_info():
    info = svdq.build_info()
    assert info["native"] is True
    assert info["version"] == svdq.__version__
    # built on the stable ABI of 2.10, with any torch at least that new, loaded into one at least that new
    assert info["torch_abi_min"] == "2.10"
    assert _library._major_minor(info["torch_version"]) >= (2, 10)
    assert _library._major_minor(torch.__version__) >= (2, 10)
    assert isinstance(info["cuda"], bool)
    # CUDA kernels load exactly into a torch built for the same CUDA major
    assert info["cuda_loaded"] == (info["cuda"] and (torch.version.cuda or "").split(".")[0] == info["cuda_major"])
    assert info["cxx_compiler"] and info["build_type"]
    assert "base" in info["cpu_isas_compiled"]  # the portable variant is always built (CMakeLists.txt)
    assert info["cpu_isa"] in info["cpu_isas_supported"]
    assert set(info["cpu_isas_supported"]) <= set(info["cpu_isas_compiled"])
    if info["cuda"]:
        assert info["cuda_archs"] and all(a.isdigit() for a in info["cuda_archs"])
        assert Path(info["cuda_toolkit_root"], "bin", "nvcc").exists()  # the toolkit it was built with
        assert re.match(r"\d+\.\d+", info["nvcc_version"])
        assert info["cuda_not_built_because"] == ""
    else:
        assert info["cuda_archs"] == [] and info["cuda_not_built_because"]


@needs_native
def test_op_schemas_match_contracts():
    expected = {
        "quantize_act": "svdq::quantize_act(Tensor x, Tensor smooth, Tensor lora_down, Tensor? lora_scales,"
        " float act_shift=0.) -> (Tensor qact, Tensor ascales, Tensor lora_act)",
        "prepare_weight": "svdq::prepare_weight(Tensor qweight, Tensor wscales) -> (Tensor, Tensor)",
        "w4a4_gemm": "svdq::w4a4_gemm(Tensor qact, Tensor ascales, Tensor qweight, Tensor wscales,"
        " Tensor lora_act, Tensor lora_up, Tensor? bias, ScalarType out_dtype, bool act_unsigned=False) -> Tensor",
    }
    for name, schema in expected.items():
        assert str(getattr(torch.ops.svdq, name).default._schema) == schema


@needs_native
def test_backends():
    names = svdq.ops.available_backends()
    assert "reference" in names and "cpu" in names
    assert ("cuda" in names) == (svdq.build_info()["cuda"] and torch.cuda.is_available())


# ---- the configure step (CMake only, no compilation) ----------------------------------------------------
# All configure tests share one build tree (module fixture), so the compiler checks run once.

needs_cmake = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")


@pytest.fixture(scope="module")
def cmake_tree(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cmake")


def configure(tmp_path: Path, **env) -> str:
    full_env = {**os.environ, **env}
    proc = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(tmp_path / "build"), "-G", "Ninja",
         f"-DPython_EXECUTABLE={sys.executable}", f"-DSVDQ_OUTPUT_DIR={tmp_path}"],
        env=full_env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


@needs_cmake
def test_configure_cpu_only_when_asked(cmake_tree):
    tmp_path = cmake_tree
    out = configure(tmp_path, SVDQ_NO_CUDA="1")
    assert "Not building svdq CUDA kernels because SVDQ_NO_CUDA is set" in out
    assert "svdq: CPU kernels for ISAs" in out
    info = json.loads((tmp_path / "_C.json").read_text())  # beside the libraries, read before loading them
    assert info["cuda"] is False and info["cuda_not_built_because"] == "SVDQ_NO_CUDA is set"
    assert info["cuda_archs"] == [] and "base" in info["cpu_isas_compiled"]
    header = (tmp_path / "build" / "generated" / "svdq_build_info.h").read_text()
    assert json.loads(header.split('R"svdq_json(')[1].split(")svdq_json")[0]) == info  # the same text in _C.so


@needs_cmake
def test_configure_without_toolkit(cmake_tree):
    tmp_path = cmake_tree
    out = configure(tmp_path, CUDA_HOME=str(tmp_path / "no-cuda-here"), SVDQ_NO_CUDA="")
    if torch.version.cuda is None:
        assert "Not building svdq CUDA kernels because torch" in out and "CPU-only build" in out
    elif not (ROOT / "csrc" / "cuda" / "cuda_sources.cmake").exists():
        assert "Not building svdq CUDA kernels because csrc/cuda/cuda_sources.cmake does not exist" in out
    else:
        assert f"Not building svdq CUDA kernels because no nvcc in {tmp_path / 'no-cuda-here'}/bin" in out


def _toolkit_root() -> Path | None:
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDAToolkit_ROOT"), "/usr/local/cuda"):
        if cand and Path(cand, "bin", "nvcc").exists():
            return Path(cand).resolve()
    return None


@needs_cmake
@pytest.mark.skipif(
    torch.version.cuda is None or _toolkit_root() is None
    or not (ROOT / "csrc" / "cuda" / "cuda_sources.cmake").exists(),
    reason="needs a CUDA build of torch, a CUDA toolkit and csrc/cuda/cuda_sources.cmake",
)
def test_configure_cuda_archs_override(cmake_tree):
    tmp_path = cmake_tree
    out = configure(tmp_path, SVDQ_CUDA_ARCHS="80;90", SVDQ_NO_CUDA="")
    assert "Building svdq CUDA kernels for archs 80;90 (CUDA_ARCHITECTURES 80-real;90)" in out
    assert f"svdq: CUDA toolkit root {_toolkit_root()}" in out


@needs_cmake
def test_cuda_architectures_property_gives_every_gpu_code():
    """SASS per arch, PTX of the newest and of each arch before a gap of majors: sm_100 (between 90 and 120
    in the default list) runs compute_90's PTX (before: only compute_120's PTX, which sm_100 cannot run)."""
    script = ROOT / "build" / "test_arch_property.cmake"
    script.parent.mkdir(exist_ok=True)
    script.write_text(
        f'include("{ROOT / "cmake" / "svdq_utils.cmake"}")\n'
        'foreach(_l "80;90" "75;80;86;89;90;120" "90" "86;80;100")\n'
        '  svdq_cuda_architectures_property(_p "${_l}")\n'
        '  message("${_l} -> ${_p}")\n'
        "endforeach()\n"
    )
    out = subprocess.run(["cmake", "-P", str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines() == [
        "80;90 -> 80-real;90",
        "75;80;86;89;90;120 -> 75-real;80-real;86-real;89-real;90;120",
        "90 -> 90",
        "86;80;100 -> 80-real;86;100",
    ]


@needs_cmake
@pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build of torch")
def test_configure_stops_on_nvcc_major_mismatch(tmp_path):
    """A toolkit whose nvcc major differs from torch's CUDA stops the configure step, naming both."""
    fake = tmp_path / "cuda-other"
    (fake / "bin").mkdir(parents=True)
    major = int(torch.version.cuda.split(".")[0])
    (fake / "bin" / "nvcc").write_text(
        f"#!/bin/sh\necho 'Cuda compilation tools, release {major - 1}.4, V{major - 1}.4.131'\n"
    )
    (fake / "bin" / "nvcc").chmod(0o755)
    if not (ROOT / "csrc" / "cuda" / "cuda_sources.cmake").exists():
        pytest.skip("no CUDA sources")
    proc = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(tmp_path / "build"), "-G", "Ninja",
         f"-DPython_EXECUTABLE={sys.executable}", f"-DSVDQ_OUTPUT_DIR={tmp_path}"],
        env={**os.environ, "CUDA_HOME": str(fake), "SVDQ_NO_CUDA": ""}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    err = " ".join((proc.stdout + proc.stderr).split())
    assert f"has nvcc {major - 1}.4, but torch was built with CUDA {torch.version.cuda}" in err
    assert "SVDQ_NO_CUDA=1" in err


@needs_cmake
def test_configure_refuses_a_torch_without_the_stable_abi(tmp_path):
    """A torch older than 2.10 stops the configure step with a message naming both versions (the build would
    otherwise fail deep in the headers, or produce libraries that cannot load)."""
    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('__version__ = "2.9.1+cpu"\n\nclass version:\n    cuda = None\n')
    proc = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(tmp_path / "build"), "-G", "Ninja",
         f"-DPython_EXECUTABLE={sys.executable}", f"-DSVDQ_OUTPUT_DIR={tmp_path}"],
        env={**os.environ, "PYTHONPATH": str(tmp_path / "site")}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    err = " ".join((proc.stdout + proc.stderr).split())
    assert "torch 2.9.1+cpu" in err and "older than 2.10" in err and "pip install 'torch>=2.10'" in err


def test_loader_refuses_an_older_torch_naming_both_versions():
    with pytest.raises(_library.NativeLibraryError, match=r"built with torch 2\.14\.1\+cu130 .* 2\.10, .* torch 2\.9\.1"):
        _library.check_torch("2.9.1", "2.10", "2.14.1+cu130")
    _library.check_torch("2.10.0", "2.10", "2.14.1+cu130")  # the oldest supported
    _library.check_torch("2.13.0+cpu", "2.10", "2.14.1+cu130")  # older than the build: fine (stable ABI)
    _library.check_torch("3.0.0", "2.10", "2.14.1+cu130")


def test_cuda_kernels_load_only_into_a_torch_for_the_same_cuda_major():
    info = {"cuda": True, "cuda_major": "13", "nvcc_version": "13.0.88"}
    assert _library.cuda_mismatch(info, "13.0", "2.14.1+cu130") == ""
    assert _library.cuda_mismatch(info, "13.2", "2.16.0+cu132") == ""
    assert "CPU-only build" in _library.cuda_mismatch(info, None, "2.13.0+cpu")
    why = _library.cuda_mismatch(info, "12.8", "2.11.0+cu128")
    assert "CUDA 13.0.88" in why and "CUDA 12.8" in why and "cu12" in why
    assert _library.cuda_mismatch({"cuda": False}, None, "2.13.0+cpu") == ""


def test_loader_reports_missing_libraries(tmp_path, monkeypatch):
    monkeypatch.setenv("SVDQ_LIBRARY_DIR", str(tmp_path))
    with pytest.raises(_library.NativeLibraryError, match="not built: no .*_C.so"):
        _library.load()
    (tmp_path / "_C.so").write_bytes(b"")
    with pytest.raises(_library.NativeLibraryError, match="_C.json .* missing or unreadable"):
        _library.load()


def _undefined_symbols(path: Path) -> list[str]:
    out = subprocess.run(["nm", "-DC", "--undefined-only", str(path)], capture_output=True, text=True, check=True)
    return [line.split(None, 1)[-1] for line in out.stdout.splitlines() if line.strip()]


def _needed(path: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True).stdout
    return [m for m in re.findall(r"Shared library: \[([^\]]+)\]", out)]


@needs_native
@pytest.mark.skipif(shutil.which("nm") is None or shutil.which("readelf") is None, reason="binutils missing")
def test_libraries_use_only_the_stable_abi():
    """What makes one build load into every torch >= 2.10 and every Python: nothing from torch's C++ API
    (c10::, at::, torch:: symbols change between releases), only its C shim; no libpython, no pybind11."""
    libs = [_library.library_dir() / "_C.so"]
    if svdq.build_info()["cuda"]:
        libs.append(_library.library_dir() / "_C_cuda.so")
    for lib in libs:
        symbols = _undefined_symbols(lib)
        cxx_torch = [s for s in symbols if re.match(r"(c10|at|torch|caffe2|pybind11)::", s)]
        assert not cxx_torch, f"{lib.name} uses torch's C++ ABI: {cxx_torch[:5]}"
        assert not [s for s in symbols if s.startswith("Py")], f"{lib.name} uses the Python C API"
        shim = [s for s in symbols if s.startswith(("aoti_torch_", "torch_"))]
        assert shim, f"{lib.name} does not call torch's stable C shim"
        needed = _needed(lib)
        assert not [n for n in needed if n.startswith(("libpython", "libc10", "libtorch_python", "libtorch.so"))], needed
        assert "libtorch_cpu.so" in needed
    if len(libs) == 2:
        assert "libtorch_cuda.so" in _needed(libs[1]) and "libtorch_cuda.so" not in _needed(libs[0])


def _load_setup_module():
    import importlib.util
    from unittest import mock

    spec = importlib.util.spec_from_file_location("svdq_setup_under_test", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    with mock.patch("setuptools.setup", lambda **kw: None):  # load its functions without running a build
        spec.loader.exec_module(module)
    return module


def test_wheel_label_names_the_cuda_major(tmp_path):
    """setup.py's version label (+cu13 / +cpu) follows CMakeLists.txt's rule for building CUDA."""
    module = _load_setup_module()
    assert module.cuda_label({"SVDQ_NO_CUDA": "1"}, "13.0") == "cpu"
    assert module.cuda_label({}, None) == "cpu"  # a CPU-only torch
    assert module.cuda_label({"CUDA_HOME": str(tmp_path)}, "13.0") == "cpu"  # no nvcc there
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.8, V12.8.93'\n")
    (tmp_path / "bin" / "nvcc").chmod(0o755)
    assert module.cuda_label({"CUDA_HOME": str(tmp_path)}, "12.8") == "cu12"
