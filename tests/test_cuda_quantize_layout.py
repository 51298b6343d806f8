"""CPU checks of the CUDA activation quantizer's arithmetic (csrc/cuda/quantize_act_layout.cuh), the non-finite
input rule, and the e4m3 form of the codes.

The header is host+device code; g++ compiles it into a small harness (csrc/cuda/tests/quantize_act_host.cpp)
that runs the kernel's per-(row, group) orchestration element for element, and whose output is compared with
the reference quantizer bit for bit. The same harness proves the kernel's division shortcuts exhaustively
(docs/kernels.md §11): x/λ by a corrected reciprocal over all bf16×bf16 and fp16×fp16 pairs (and bf16 x × every
fp32 λ significand), amax/7 over every fp32 significand, RN(1/λ) from MUFU.RCP ± 2 ulp. Needs only g++ — no GPU,
no CUDA toolkit. The op-level tests at the bottom run the reference and CPU backends (and CUDA when present).
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from svdq.ops import reference

ROOT = Path(__file__).resolve().parents[1]
HARNESS_SRC = ROOT / "csrc" / "cuda" / "tests" / "quantize_act_host.cpp"

needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


def _native_op(name: str) -> bool:
    try:
        import svdq  # noqa: F401  (loads svdq._C when built)
    except ImportError:
        return False
    return hasattr(torch.ops, "svdq") and hasattr(torch.ops.svdq, name)


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    exe = tmp_path_factory.mktemp("qact") / "quantize_act_host"
    # -ffp-contract=off: the device code rounds each product separately (__fmul_rn); so must the host.
    # -O3 -march=native: the exhaustive division proofs (4·2^32 pairs) vectorize; they take seconds then.
    flags = ["-O3", "-march=native"]
    probe = subprocess.run(["g++", "-march=native", "-E", "-x", "c++", "/dev/null"], capture_output=True)
    if probe.returncode != 0:
        flags = ["-O3"]
    subprocess.run(
        ["g++", "-std=c++17", *flags, "-ffp-contract=off", "-Wall", "-Werror", f"-I{ROOT / 'csrc'}",
         str(HARNESS_SRC), "-o", str(exe)],
        check=True, capture_output=True, text=True,
    )
    return exe


def _run_quant(harness: Path, x: torch.Tensor, smooth: torch.Tensor, tmp_path: Path,
               recip_allowed: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's quantizer on x [M, K] (values of a 16-bit dtype) and λ [K] → (qact, ascales, e4m3 bytes)."""
    m, k = x.shape
    kp = reference.padded_k(k)
    xf = torch.nn.functional.pad(x.to(torch.float32), (0, kp - k))
    lam = torch.nn.functional.pad(smooth.to(torch.float32), (0, kp - k), value=1.0)
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(struct.pack("<iii", m, kp, int(recip_allowed)) + xf.contiguous().numpy().astype("<f4").tobytes()
                    + lam.contiguous().numpy().astype("<f4").tobytes())
    subprocess.run([str(harness), "quant", str(src), str(dst)], check=True)
    raw = dst.read_bytes()
    nq, ns = m * kp // 2, m * kp // 64 * 4
    q = torch.frombuffer(bytearray(raw[:nq]), dtype=torch.int8).reshape(m, kp // 2)
    s = torch.frombuffer(bytearray(raw[nq:nq + ns]), dtype=torch.float32).reshape(m, kp // 64)
    e = torch.frombuffer(bytearray(raw[nq + ns:]), dtype=torch.uint8).reshape(m, kp)
    return q, s, e


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN scales compare equal to NaN scales)."""
    if a.dtype == torch.float32:
        return torch.equal(a.view(torch.int32), b.view(torch.int32))
    return torch.equal(a, b)


def _check(harness, tmp_path, x, smooth, recip_allowed=True):
    k = x.shape[1]
    q, s, e = _run_quant(harness, x, smooth, tmp_path, recip_allowed)
    qa, sa, _ = reference.quantize_act(x, smooth, torch.zeros(k, 0, dtype=x.dtype))
    assert _same(s, sa), (s, sa)
    assert torch.equal(q, qa)
    assert torch.equal(e, reference.int4_codes_to_e4m3(qa))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k", [(1, 64), (3, 100), (37, 128), (5, 3072), (2, 200)])
def test_group_quantizer_matches_reference(harness, tmp_path, dtype, m, k):
    g = torch.Generator().manual_seed(m * 1000 + k)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-3, 2, k)).to(dtype)
    smooth = (torch.rand(k, generator=g) * 4 + 0.1).to(dtype)
    _check(harness, tmp_path, x, smooth)
    # fp32 λ: the kernel takes the IEEE reciprocal (and '/' for fp16 x); same results
    _check(harness, tmp_path, x, smooth.float() * 1.0001, recip_allowed=dtype == torch.bfloat16)


def test_ties_zero_groups_and_tiny_scales(harness, tmp_path):
    rows = []
    # exact ties with an exactly representable scale (amax = 7 -> s = 1): round half to even
    tie = torch.tensor([k + 0.5 for k in range(-8, 7)] + [7.0], dtype=torch.float32)
    rows.append(torch.cat([tie, tie, -tie, tie * 0.5]))
    rows.append(torch.cat([tie * 0.5] * 4))  # amax = 3.5 -> s = 0.5, ties at (k + .5) / 2
    rows.append(torch.zeros(64))  # all-zero group: s = 0, q = 0
    rows.append(torch.full((64,), 1e-40) * torch.linspace(-1, 1, 64))  # subnormal x: exact group
    rows.append(torch.full((64,), 2e-19) * torch.linspace(-1, 1, 64))  # amax near the 2^-60 exact threshold
    rows.append(torch.full((64,), 3e38) * torch.linspace(-1, 1, 64))  # huge: exact group
    rows.append(torch.full((64,), 1.3e36) * torch.linspace(-1, 1, 64))  # near the 2^120 threshold
    x = torch.stack([r[:64] for r in rows]).to(torch.bfloat16)
    _check(harness, tmp_path, x, torch.ones(64, dtype=torch.bfloat16))
    # unusable λ (0 → x̂ = ±Inf/NaN, subnormal, tiny, huge, Inf): IEEE division for those lanes
    lam = torch.ones(64)
    lam[0], lam[9], lam[17], lam[25], lam[33], lam[41] = 0.0, 1e-39, 1e-6, 3e38, float("inf"), 2**-16
    _check(harness, tmp_path, x[:3], lam.to(torch.bfloat16))


def test_near_ties_after_smoothing(harness, tmp_path):
    # x̂ = x/λ lands within an ulp of a half-integer multiple of s: the per-lane exact path must catch it
    g = torch.Generator().manual_seed(5)
    s = 0.3 / 7
    base = (torch.arange(-7, 7, dtype=torch.float32) + 0.5) * s
    lam = (torch.rand(64, generator=g) + 0.5).to(torch.bfloat16)
    for dtype in (torch.bfloat16, torch.float16):
        xs = []
        for sh in (-2, -1, 0, 1, 2):
            v = torch.cat([base, base, base, base, torch.tensor([0.3] * 8)])[:64] * lam.float()
            v = v.to(dtype).float()
            xs.append(torch.nextafter(v, v + sh) if sh else v)
        _check(harness, tmp_path, torch.stack(xs).to(dtype), lam.to(dtype))


def test_nonfinite_groups_harness(harness, tmp_path):
    x = torch.randn(4, 192).to(torch.bfloat16)
    x[0, 3] = float("nan")
    x[1, 70] = float("inf")
    x[2, 130] = -float("inf")
    x[3, 5] = 3e38  # finite, x̂ = 3e38 / 0.5 overflows to Inf
    smooth = torch.ones(192, dtype=torch.bfloat16)
    smooth[5] = 0.5
    _check(harness, tmp_path, x, smooth)
    q, s, _ = _run_quant(harness, x, smooth, tmp_path)
    assert torch.isnan(s[0, 0]) and torch.isnan(s[1, 1]) and torch.isnan(s[2, 2]) and torch.isnan(s[3, 0])
    assert torch.isfinite(s[0, 1:]).all() and torch.isfinite(s[1, [0, 2]]).all()
    codes = reference.unpack_int4(q)
    assert (codes[0, :64] == 0).all() and (codes[1, 64:128] == 0).all()


@pytest.mark.parametrize("mode", ["div-exhaustive bf16", "div-exhaustive fp16", "div-fp32-lambda",
                                  "div7-exhaustive", "rcp16", "e4m3-table", "nibble-sweep", "plan"])
def test_exhaustive_proofs(harness, mode):
    """The kernel's division shortcuts equal IEEE division on every input they are used for."""
    out = subprocess.run([str(harness), *mode.split()], capture_output=True, text=True, timeout=600)
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "bad=0" in out.stdout


def test_harness_detects_a_wrong_division(harness, tmp_path):
    """Negative control: the claims checker fails when the correction step is dropped."""
    src = HARNESS_SRC.read_text()
    hdr = (ROOT / "csrc" / "cuda" / "quantize_act_layout.cuh").read_text()
    broken = hdr.replace("return fma_rn(e, r, y);", "return y;")
    assert broken != hdr
    inc = tmp_path / "cuda"
    inc.mkdir()
    (inc / "quantize_act_layout.cuh").write_text(broken)
    (tmp_path / "h.cpp").write_text(src)
    exe = tmp_path / "h"
    subprocess.run(["g++", "-std=c++17", "-O2", "-ffp-contract=off", f"-I{tmp_path}", str(tmp_path / "h.cpp"),
                    "-o", str(exe)], check=True, capture_output=True)
    out = subprocess.run([str(exe), "div7-exhaustive"], capture_output=True, text=True)
    assert out.returncode != 0 and "bad=0" not in out.stdout


# ---- op level: reference, CPU, CUDA -----------------------------------------------------------------------

def _backends():
    devs = []
    if _native_op("quantize_act_e4m3"):
        devs.append("cpu")
        import svdq

        if torch.cuda.is_available() and svdq.build_info().get("cuda"):
            devs.append("cuda")
    return devs


def test_reference_nonfinite_rule():
    x = torch.randn(3, 130, dtype=torch.float32).to(torch.bfloat16)
    x[0, 3] = float("nan")
    x[2, 129] = float("inf")
    k = x.shape[1]
    qa, sa, _ = reference.quantize_act(x, torch.ones(k, dtype=torch.bfloat16), torch.zeros(k, 0, dtype=x.dtype))
    assert torch.isnan(sa[0, 0]) and torch.isnan(sa[2, 2]) and torch.isfinite(sa[1]).all()
    assert (reference.unpack_int4(qa)[0, :64] == 0).all()
    qw, ws = reference.quantize_weight(torch.randn(8, k) * 0.1, torch.bfloat16)
    y = reference.w4a4_gemm(qa, sa, qw, ws, torch.zeros(3, 0), torch.zeros(8, 0, dtype=x.dtype), None, x.dtype)
    assert torch.isnan(y[0]).all() and torch.isnan(y[2]).all() and torch.isfinite(y[1]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_native_nonfinite_and_e4m3_match_reference(dtype):
    devs = _backends()
    if not devs:
        pytest.skip("svdq._C not built")
    g = torch.Generator().manual_seed(3)
    m, k, n, r = 37, 200, 72, 16
    x = (torch.randn(m, k, generator=g) * 2).to(dtype)
    x[1, 7] = float("nan")
    x[4, 150] = float("inf")
    x[9, 64] = -float("inf")
    smooth = (torch.rand(k, generator=g) + 0.5).to(dtype)
    down = (torch.randn(k, r, generator=g) * 0.05).to(dtype)
    scales = torch.rand(r, generator=g) + 0.5
    ref = reference.quantize_act(x, smooth, down, scales)
    ref8 = reference.quantize_act_e4m3(x, smooth, down, scales)
    qw, ws = reference.quantize_weight(torch.randn(n, k, generator=g) * 0.05, dtype)
    up = (torch.randn(n, r, generator=g) * 0.1).to(dtype)
    y_ref = reference.w4a4_gemm(ref[0], ref[1], qw, ws, ref[2], up, None, dtype)
    bad_rows = torch.tensor([1, 4, 9])
    assert torch.isnan(y_ref[bad_rows]).all()
    good = torch.ones(m, dtype=torch.bool)
    good[bad_rows] = False
    assert torch.isfinite(y_ref[good]).all()
    for dev in devs:
        args = [t.to(dev) for t in (x, smooth, down, scales)]
        qa, sa, la = torch.ops.svdq.quantize_act(*args)
        q8, sa8, la8 = torch.ops.svdq.quantize_act_e4m3(*args)
        assert torch.equal(qa.cpu(), ref[0]), dev
        assert _same(sa.cpu(), ref[1]), dev
        assert torch.equal(q8.cpu(), ref8[0]) and q8.dtype == torch.uint8 and q8.shape == (m, reference.padded_k(k))
        assert _same(sa8.cpu(), sa.cpu()) and torch.equal(la8.cpu().isnan(), la.cpu().isnan())
        assert torch.equal(q8.cpu().view(torch.float8_e4m3fn).float(), reference.unpack_int4(qa.cpu()).float())
        pq, ps = torch.ops.svdq.prepare_weight(qw.to(dev), ws.to(dev))
        y = torch.ops.svdq.w4a4_gemm(qa, sa, pq, ps, la, up.to(dev), None, dtype).cpu()
        assert torch.isnan(y[bad_rows]).all(), dev
        assert torch.isfinite(y[good]).all(), dev


def test_e4m3_op_schema_and_fake():
    """torch.library.opcheck: schema, fake (torch.compile) and the CPU kernel agree for quantize_act_e4m3."""
    if not _native_op("quantize_act_e4m3"):
        pytest.skip("svdq._C not built")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 100, generator=g).to(torch.bfloat16)
    smooth = (torch.rand(100, generator=g) + 0.5).to(torch.bfloat16)
    down = (torch.randn(100, 16, generator=g) * 0.1).to(torch.bfloat16)
    torch.library.opcheck(torch.ops.svdq.quantize_act_e4m3.default, (x, smooth, down, torch.ones(16)))
    torch.library.opcheck(torch.ops.svdq.quantize_act_e4m3.default, (x, smooth, down[:, :0].contiguous(), None))
