"""SASS instruction budgets of the hot loops, from cubins compiled here (no GPU needed).

The budgets and the reasons for them live next to the kernels, as lines

    // SASS-BUDGET sm_<arch> <mangled kernel-name substring> <per-element|per-warp-group> <max>

in csrc/cuda/quantize_act.cu and csrc/cuda/w4a4_gemm.cu. For every such line the test compiles the file for
that architecture with the build's flags (nvcc -O3 -std=c++17 -lineinfo; quantize_act.cu with
-DSVDQ_SASS_BUDGET_BUILD, which instantiates only the budgeted kernels), disassembles it with cuobjdump
(the toolkit's, else the one in the triton wheel), and counts the kernel's hot loop with
benchmarks/tools/sass_loop_count.py: quantize_act — its step loop minus the out-of-line rare paths, per
element (32 per thread and step); w4a4_gemm — the k-loop (the loop holding the IMMAs), per warp and 64-group.
A change that blows a budget fails here. Skipped only when nvcc is missing.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
sys.path.insert(0, str(ROOT / "benchmarks" / "tools"))
import sass_loop_count  # noqa: E402

BUDGET_RE = re.compile(r"//\s*SASS-BUDGET\s+sm_(\d+)\s+(\S+)\s+(per-element|per-warp-group)\s+([\d.]+)")
FILES = {"quantize_act.cu": ["-DSVDQ_SASS_BUDGET_BUILD"], "w4a4_gemm.cu": []}
ELEMENTS_PER_THREAD_STEP = 32  # quantize_act: 4 chunks of 8 elements per thread and step


def _nvcc():
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").exists():
            return str(Path(root) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _cuobjdump(nvcc):
    cands = [str(Path(nvcc).parent / "cuobjdump")] if nvcc else []
    cands += [shutil.which("cuobjdump") or ""]
    cands += sorted(glob.glob(str(Path(sys.prefix) / "lib" / "python3*" / "site-packages" / "triton" / "backends" /
                                  "nvidia" / "bin" / "cuobjdump")))
    for c in cands:
        if c and Path(c).exists() and os.access(c, os.X_OK):
            return c
    return None


NVCC = _nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def _budgets():
    out = []
    for name in FILES:
        for m in BUDGET_RE.finditer((CUDA_DIR / name).read_text()):
            out.append((name, int(m.group(1)), m.group(2), m.group(3), float(m.group(4))))
    return out


BUDGETS = _budgets()


def test_budgets_are_declared():
    kinds = {(f, a) for f, a, *_ in BUDGETS}
    # the list: quantize_act per element (sm_90), the mma.sync loop for sm_89 (int4) and sm_90 (int8)
    assert ("quantize_act.cu", 90) in kinds
    assert ("w4a4_gemm.cu", 90) in kinds and ("w4a4_gemm.cu", 89) in kinds
    for _, _, func, _, _ in BUDGETS:
        if "w4a4_gemm" in func:
            assert func.endswith(("Li0E", "Li1E")), func


@pytest.fixture(scope="module")
def sass(tmp_path_factory):
    cuobjdump = _cuobjdump(NVCC)
    assert cuobjdump, "no cuobjdump (CUDA toolkit or the triton wheel) to disassemble the cubins"
    cache = {}
    tmp = tmp_path_factory.mktemp("sass")

    def get(name, arch):
        if (name, arch) not in cache:
            cubin = tmp / f"{name}.sm{arch}.cubin"
            cmd = [NVCC, "-std=c++17", "-O3", "-lineinfo", f"-arch=sm_{arch}", "-cubin", *FILES[name],
                   str(CUDA_DIR / name), "-o", str(cubin)]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            assert res.returncode == 0, res.stdout + res.stderr
            dis = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, timeout=300)
            assert dis.returncode == 0, dis.stderr
            cache[(name, arch)] = dis.stdout
        return cache[(name, arch)]

    return get


@pytest.mark.parametrize("name,arch,func,unit,budget", BUDGETS,
                         ids=[f"{f}-sm{a}-{fn.split('_kernel')[-1]}" for f, a, fn, _, _ in BUDGETS])
def test_hot_loop_within_budget(sass, name, arch, func, unit, budget):
    ins = sass_loop_count.load(sass(name, arch), func, text=True)
    assert ins, f"{func} not in the sm_{arch} cubin of {name}"
    counts = sass_loop_count.hot_loop_count(ins, "IMMA" if unit == "per-warp-group" else None)
    assert counts is not None, f"no loop found in {func}"
    total = sum(counts.values())
    value = total / ELEMENTS_PER_THREAD_STEP if unit == "per-element" else total
    top = ", ".join(f"{op} {n}" for op, n in counts.most_common(8))
    print(f"{name} sm_{arch} {func}: {value:.2f} {unit} (budget {budget}); {top}")
    assert value <= budget, f"{func} on sm_{arch}: {value:.2f} instructions {unit} > budget {budget} ({top})"
    # a counter that lost the loop would pass any budget: the loop must hold the kernel's real work
    if unit == "per-warp-group":
        mma = sum(n for op, n in counts.items() if op.startswith("IMMA"))
        assert mma == (32 if func.endswith("Li1E") else 16), counts
        assert counts["FFMA"] >= 128, counts  # 64 accumulators x 2 promotion FFMAs
    else:
        assert value >= 0.5 * budget, f"suspiciously few instructions ({value:.2f}) — loop detection broken?"
        assert counts["FMNMX.NAN"] >= ELEMENTS_PER_THREAD_STEP, counts  # |max| of every element
