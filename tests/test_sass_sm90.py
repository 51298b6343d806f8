"""The Hopper (sm_90a) GEMMs compiled standalone with nvcc: no ptxas warning (C7514 = wgmma serialized, C7508 =
setmaxnreg ignored), the main loop is FP8 wgmma (QGMMA) with no spills, and it stays within the SASS budget
written next to the kernel (csrc/cuda/w4a4_gemm_sm90.cuh: kSassBudgetW4A4 / kSassBudgetW4A8, instructions per
warp per 64-group). Needs nvcc (CUDA 12.4+) and a cuobjdump (the toolkit's or the triton wheel's); no GPU."""
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA = ROOT / "csrc" / "cuda"
KERNEL_HEADER = CUDA / "w4a4_gemm_sm90.cuh"
FILES = {"w4a4_gemm_sm90.cu": False, "w4a4_gemm_sm90_w4a8.cu": True}  # file -> is the W4A8 kernel


def _tool(name):
    for d in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if d and (Path(d) / "bin" / name).is_file():
            return str(Path(d) / "bin" / name)
    if shutil.which(name):
        return shutil.which(name)
    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        p = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / name
        if p.is_file():
            return str(p)
    return None


def _loops():
    spec = importlib.util.spec_from_file_location("sass_loops", ROOT / "benchmarks" / "probes" / "sass_loops.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _budget(name):
    m = re.search(rf"constexpr int {name} = (\d+);", KERNEL_HEADER.read_text())
    assert m, f"{name} not found in {KERNEL_HEADER}"
    return int(m.group(1))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    nvcc, cuobjdump = _tool("nvcc"), _tool("cuobjdump")
    if nvcc is None or cuobjdump is None:
        pytest.skip(f"needs nvcc and cuobjdump (found {nvcc}, {cuobjdump})")
    out = tmp_path_factory.mktemp("sm90")
    procs = {}
    for f in FILES:  # both at once: the two compiles are the whole cost of this test
        cubin = out / (f + ".cubin")
        cmd = [nvcc, "-O3", "-std=c++17", "-lineinfo", "-I", str(ROOT / "csrc"),
               "-gencode=arch=compute_90a,code=sm_90a", "-cubin", "-Xptxas", "-v", "-o", str(cubin), str(CUDA / f)]
        procs[f] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), cubin)
    result = {}
    for f, (proc, cubin) in procs.items():
        log = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, f"nvcc {f} failed:\n{log[-4000:]}"
        sass = subprocess.run([cuobjdump, "--dump-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
        result[f] = (log, sass)
    return result


@pytest.mark.parametrize("f", list(FILES))
def test_no_ptxas_warnings(compiled, f):
    log, _ = compiled[f]
    assert "C7514" not in log, "wgmma serialized (C7514): a wgmma stays in flight across the promotion\n" + log
    assert "C7508" not in log, "setmaxnreg ignored (C7508)\n" + log
    assert not re.search(r"ptxas warning", log), log


@pytest.mark.parametrize("f", list(FILES))
def test_main_loop_is_qgmma_within_budget(compiled, f):
    w4a8 = FILES[f]
    _, sass = compiled[f]
    loops = _loops().report(sass)
    gemms = {n: r for n, r in loops.items() if "gemm_sm90_kernel" in n}
    # one kernel (both output dtypes) per file: the exact one here, the W4A8 one in its own file
    assert len(gemms) == 2 and all(("ILb1E" in n) == w4a8 for n in gemms), list(gemms)
    budget = _budget("kSassBudgetW4A8" if w4a8 else "kSassBudgetW4A4")
    for name, r in gemms.items():
        assert r is not None, f"{name}: no loop with QGMMA (the sm_90a cubin is not on the FP8 wgmma path)"
        ops = r["opcodes"]
        assert ops.get("QGMMA") == 2, (name, ops)  # 2 x m64n128k32 = one 64-K group
        assert "LDL" not in ops and "STL" not in ops, (name, ops)  # no spills in the main loop
        # the promotion: 1 FFMA (W4A8) or FMUL + FFMA (W4A4) per accumulator, 64 accumulators per thread
        assert ops.get("FFMA") == 64 and ops.get("FMUL", 0) == (0 if w4a8 else 64), (name, ops)
        assert ops.get("LD", 0) == 0, (name, ops)  # scales read with LDS, not generic loads
        assert r["instructions"] <= budget, f"{name}: {r['instructions']} SASS/warp/group > budget {budget}: {ops}"
    assert "USETMAXREG" in sass  # setmaxnreg survived (producer 40 / consumers 232)
