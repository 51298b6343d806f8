"""Host-side test of the Hopper (sm_90a) GEMM layouts (csrc/cuda/w4a4_gemm_sm90_layout.cuh).

Compiles csrc/cuda/tests/test_sm90_layout.cpp with the host C++ compiler and runs it: smem swizzles against
CUTLASS's Swizzle definition, int4 -> e4m3, the prepared weight map, the wgmma D / A fragment tables, the
per-stage scale slots, descriptors, the persistent schedule and a CPU model of one tile's main loop.
Needs no GPU and no CUDA toolkit."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "csrc" / "cuda" / "tests" / "test_sm90_layout.cpp"


def _cxx():
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def test_sm90_layout_host(tmp_path):
    cxx = _cxx()
    if cxx is None:
        pytest.skip("no host C++ compiler")
    exe = tmp_path / "test_sm90_layout"
    build = subprocess.run(
        [cxx, "-std=c++17", "-O2", "-Wall", "-I", str(ROOT / "csrc" / "cuda"), str(SRC), "-o", str(exe)],
        capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ALL PASSED" in run.stdout
