"""CPU checks of the CUDA activation quantizer's element arithmetic (csrc/cuda/quantize_act_layout.cuh).

The header is host+device code; here g++ compiles it into a small harness (csrc/cuda/tests/
quantize_act_host.cpp) and the harness's output is compared with the reference quantizer bit for bit. Needs
only g++ — no GPU, no CUDA toolkit, no built extension.
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

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    exe = tmp_path_factory.mktemp("qact") / "quantize_act_host"
    # -ffp-contract=off: the device code rounds each product separately (__fmul_rn); so must the host.
    subprocess.run(
        ["g++", "-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-Werror", f"-I{ROOT / 'csrc'}",
         str(HARNESS_SRC), "-o", str(exe)],
        check=True, capture_output=True, text=True,
    )
    return exe


def _run_quant(harness: Path, xhat: torch.Tensor, tmp_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    rows, kp = xhat.shape
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(struct.pack("<ii", rows, kp) + xhat.contiguous().numpy().astype("<f4").tobytes())
    subprocess.run([str(harness), "quant", str(src), str(dst)], check=True)
    raw = dst.read_bytes()
    nq = rows * kp // 2
    q = torch.frombuffer(bytearray(raw[:nq]), dtype=torch.int8).reshape(rows, kp // 2)
    s = torch.frombuffer(bytearray(raw[nq:]), dtype=torch.float32).reshape(rows, kp // 64)
    return q, s


def _xhat(x: torch.Tensor, smooth: torch.Tensor) -> torch.Tensor:
    """x̂ as the kernel forms it: fp32(x) / fp32(λ), zero-padded to Kp."""
    k = x.shape[1]
    xh = x.to(torch.float32) / smooth.to(torch.float32)
    return torch.nn.functional.pad(xh, (0, reference.padded_k(k) - k))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k", [(1, 64), (3, 100), (37, 128), (5, 3072), (2, 200)])
def test_group_quantizer_matches_reference(harness, tmp_path, dtype, m, k):
    g = torch.Generator().manual_seed(m * 1000 + k)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-3, 2, k)).to(dtype)
    smooth = (torch.rand(k, generator=g) * 4 + 0.1).to(dtype)
    xh = _xhat(x, smooth)
    q, s = _run_quant(harness, xh, tmp_path)
    q_ref, s_ref = reference.quantize_groups(xh, torch.float32)
    assert torch.equal(s.view(torch.int32), s_ref.view(torch.int32))
    assert torch.equal(q, reference.pack_int4(q_ref))
    # and the whole reference op agrees (x / λ computed the same way)
    qa, sa, _ = reference.quantize_act(x, smooth, torch.zeros(k, 0, dtype=dtype))
    assert torch.equal(q, qa) and torch.equal(s, sa)


def test_ties_zero_groups_and_tiny_scales(harness, tmp_path):
    rows = []
    # exact ties with an exactly representable scale (amax = 7 -> s = 1): round half to even
    tie = torch.tensor([k + 0.5 for k in range(-8, 7)] + [7.0], dtype=torch.float32)
    rows.append(torch.cat([tie, tie, -tie, tie * 0.5]))
    # amax = 3.5 -> s = 0.5, ties at (k + .5) / 2
    rows.append(torch.cat([tie * 0.5] * 4))
    # near-ties around a scale that is not a power of two
    s = torch.tensor(0.3, dtype=torch.float32) / 7
    base = (torch.arange(-8, 8, dtype=torch.float32) + 0.5) * s
    near = torch.stack([torch.nextafter(base, base + 1), torch.nextafter(base, base - 1), base, base]).flatten()
    near[-1] = 0.3
    rows.append(near)
    rows.append(torch.zeros(64))                                    # all-zero group: s = 0, q = 0
    rows.append(torch.full((64,), 1e-40) * torch.linspace(-1, 1, 64))  # subnormal x̂: exact path
    rows.append(torch.full((64,), 3e38) * torch.linspace(-1, 1, 64))   # huge x̂
    xh = torch.stack([r[:64] for r in rows])
    q, sc = _run_quant(harness, xh, tmp_path)
    q_ref, s_ref = reference.quantize_groups(xh, torch.float32)
    assert torch.equal(sc.view(torch.int32), s_ref.view(torch.int32))
    assert torch.equal(q, reference.pack_int4(q_ref))


def test_fast_path_sweep(harness):
    out = subprocess.run([str(harness), "nibble-sweep"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "bad=0" in out.stdout


def test_split_plan_invariants(harness):
    out = subprocess.run([str(harness), "plan"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "bad=0" in out.stdout
