"""The native extension as built: it loads, says what it was built with, registers the op schemas of
docs/dev/contracts.md, and the CMake configure step takes the documented CUDA decisions.

CI always builds svdq._C, so a missing extension fails here; SVDQ_ALLOW_NO_NATIVE=1 relaxes that.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import svdq
from svdq import _native

ROOT = Path(__file__).resolve().parents[1]
ALLOW_NO_NATIVE = os.environ.get("SVDQ_ALLOW_NO_NATIVE") == "1"
needs_native = pytest.mark.skipif(not _native.AVAILABLE and ALLOW_NO_NATIVE, reason="SVDQ_ALLOW_NO_NATIVE=1")


def test_extension_loads():
    if ALLOW_NO_NATIVE and not _native.AVAILABLE:
        info = svdq.build_info()
        assert info["native"] is False and info["cuda"] is False
        pytest.skip("svdq._C not built (allowed by SVDQ_ALLOW_NO_NATIVE=1)")
    assert _native.AVAILABLE, f"svdq._C does not load: {_native.IMPORT_ERROR}"


@needs_native
def test_build_info():
    info = svdq.build_info()
    assert info["native"] is True
    assert info["version"] == svdq.__version__
    # built against the torch it runs with (same release; local tags such as +cu130 may differ)
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert isinstance(info["cuda"], bool)
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
        "quantize_act": "svdq::quantize_act(Tensor x, Tensor smooth, Tensor lora_down, Tensor? lora_scales)"
        " -> (Tensor qact, Tensor ascales, Tensor lora_act)",
        "prepare_weight": "svdq::prepare_weight(Tensor qweight, Tensor wscales) -> (Tensor, Tensor)",
        "w4a4_gemm": "svdq::w4a4_gemm(Tensor qact, Tensor ascales, Tensor qweight, Tensor wscales,"
        " Tensor lora_act, Tensor lora_up, Tensor? bias, ScalarType out_dtype) -> Tensor",
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
         f"-DPython_EXECUTABLE={sys.executable}", f"-DSVDQ_OUTPUT_DIR={tmp_path}", "-DSVDQ_OUTPUT_NAME=_C.so"],
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
    header = (tmp_path / "build" / "generated" / "svdq_build_info.h").read_text()
    assert "#define SVDQ_BI_CUDA 0" in header


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
         f"-DPython_EXECUTABLE={sys.executable}", f"-DSVDQ_OUTPUT_DIR={tmp_path}", "-DSVDQ_OUTPUT_NAME=_C.so"],
        env={**os.environ, "CUDA_HOME": str(fake), "SVDQ_NO_CUDA": ""}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    err = " ".join((proc.stdout + proc.stderr).split())
    assert f"has nvcc {major - 1}.4, but torch was built with CUDA {torch.version.cuda}" in err
    assert "SVDQ_NO_CUDA=1" in err


def test_setup_refuses_pip_build_isolation():
    """setup.py stops when it would compile against the torch in pip's temporary build environment."""
    import importlib.util
    from unittest import mock

    spec = importlib.util.spec_from_file_location("svdq_setup_under_test", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    with mock.patch("setuptools.setup", lambda **kw: None):  # load its functions without running a build
        spec.loader.exec_module(module)
    isolated = "/tmp/pip-build-env-abc123/overlay/lib/python3.11/site-packages/torch/__init__.py"
    with pytest.raises(RuntimeError, match="--no-build-isolation"):
        module.check_build_torch(isolated, {})
    module.check_build_torch(isolated, {"SVDQ_ALLOW_BUILD_ISOLATION": "1"})
    module.check_build_torch(torch.__file__, {})  # the installed torch: fine
