"""Host-side tests of the CUDA GEMMs' layouts: each compiles a C++ test with the host compiler and runs it.

- csrc/cuda/tests/test_mma_layout.cpp (csrc/cuda/mma_layout.cuh, the mma.sync GEMM): PTX ISA fragment tables,
  ldmatrix, swizzles, the weight repack map and a CPU simulation of the whole kernel for both MMA paths.
- csrc/cuda/tests/test_sm90_layout.cpp (csrc/cuda/w4a4_gemm_sm90_layout.cuh, the Hopper sm_90a GEMM): smem
  swizzles against CUTLASS's Swizzle definition, int4 -> e4m3, the prepared weight map, the wgmma D / A fragment
  tables, the per-stage scale slots, descriptors, the persistent schedule and a CPU model of one tile's main loop.
Need no GPU and no CUDA toolkit.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "csrc" / "cuda" / "tests"


def _cxx():
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.parametrize("name", ["test_mma_layout", "test_sm90_layout"])
def test_layout_host(tmp_path, name):
    cxx = _cxx()
    if cxx is None:
        pytest.skip("no host C++ compiler")
    exe = tmp_path / name
    build = subprocess.run(
        [cxx, "-std=c++17", "-O2", "-Wall", "-I", str(ROOT / "csrc" / "cuda"), str(TESTS / f"{name}.cpp"), "-o", str(exe)],
        capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ALL PASSED" in run.stdout
