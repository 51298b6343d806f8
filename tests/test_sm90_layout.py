"""Host tests of the Hopper GEMM's weight layout "cuda-sm90" in torch (svdq/ops/sm90_layout.py): no GPU needed.

- The torch `prepare` (written from the layout's description) against the C++ layout functions of
  csrc/cuda/w4a4_gemm_sm90_layout.cuh, run by a host program that replays prepare_weight_kernel's per-byte
  loop (csrc/cuda/w4a4_gemm_sm90.cu) — bit for bit, random layers, bf16 and fp16 scales, N not a multiple of 128.
- canonical → sm90 → canonical round trips are bit-exact; broken variants (swapped nibbles, wrong N padding, a
  missing swizzle) are caught.
- SVDQLinear holding the sm90 layout on the CPU (offload preparation): state_dict canonical, outputs unchanged,
  copies keep every byte (storage rules, svdq.ops).
"""
import copy
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

import svdq
from svdq import ops
from svdq.linear import SVDQLinear, prepare_layout
from svdq.ops import reference, sm90_layout

ROOT = Path(__file__).resolve().parents[1]

# Replays prepare_weight_kernel (w4a4_gemm_sm90.cu) on the host with the layout header's functions.
# stdin: int32 N, K, scales_bf16; int8 qweight [N, K/2]; uint16 wscales [N, K/64].
# stdout: uint8 wq [Np*K]; float ws [Np*K/64].
HOST_PREPARE = r"""
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>
#include "w4a4_gemm_sm90_layout.cuh"
using namespace svdq::cuda::sm90;

static float half_to_float(uint16_t h) {  // IEEE binary16 -> binary32 (what __half2float does)
  const int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
  float v;
  if (e == 0) v = std::ldexp(static_cast<float>(m), -24);
  else if (e == 31) v = m ? NAN : INFINITY;
  else v = std::ldexp(static_cast<float>(m | 1024), e - 25);
  return s ? -v : v;
}

int main() {
  int hdr[3];
  if (fread(hdr, 4, 3, stdin) != 3) return 2;
  const int N = hdr[0], K = hdr[1], bf16 = hdr[2], G = K / kGroup;
  std::vector<int8_t> q(static_cast<size_t>(N) * K / 2);
  std::vector<uint16_t> s(static_cast<size_t>(N) * G);
  if (fread(q.data(), 1, q.size(), stdin) != q.size() || fread(s.data(), 2, s.size(), stdin) != s.size()) return 3;
  const int64_t Np = padded_n(N);
  std::vector<uint8_t> wq(static_cast<size_t>(Np) * K, 0xAA);  // poison: every byte must be written
  std::vector<float> ws(static_cast<size_t>(Np) * G, NAN);
  for (int64_t n = 0; n < Np; ++n)
    for (int j = 0; j < K / 2; ++j) {
      int lo = 0, hi = 0;
      if (n < N) {
        const int b = q[n * (K / 2) + j];
        lo = static_cast<int8_t>(b << 4) >> 4;
        hi = b >> 4;
      }
      wq[prepared_weight_offset(n, 2 * j, G)] = int4_to_e4m3(lo);
      wq[prepared_weight_offset(n, 2 * j + 1, G)] = int4_to_e4m3(hi);
      if (j % (kGroup / 2) == 0) {
        const int g = 2 * j / kGroup;
        float v = 0.f;
        if (n < N) {
          const uint16_t bits = s[n * G + g];
          if (bf16) { const uint32_t u = static_cast<uint32_t>(bits) << 16; std::memcpy(&v, &u, 4); }
          else v = half_to_float(bits);
        }
        ws[prepared_wscale_index(n, g, G)] = v;
      }
    }
  fwrite(wq.data(), 1, wq.size(), stdout);
  fwrite(ws.data(), 4, ws.size(), stdout);
  return 0;
}
"""


@pytest.fixture(scope="module")
def host_prepare(tmp_path_factory):
    cxx = next((shutil.which(c) for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c and shutil.which(c)),
               None)
    if cxx is None:
        pytest.skip("no host C++ compiler")
    d = tmp_path_factory.mktemp("sm90_layout")
    (d / "prepare.cpp").write_text(HOST_PREPARE)
    build = subprocess.run([cxx, "-std=c++17", "-O2", "-Wall", "-I", str(ROOT / "csrc" / "cuda"), str(d / "prepare.cpp"),
                            "-o", str(d / "prepare")], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    exe = d / "prepare"

    def run(qweight: torch.Tensor, wscales: torch.Tensor):
        n, kp = qweight.shape[0], qweight.shape[1] * 2
        data = struct.pack("<3i", n, kp, int(wscales.dtype == torch.bfloat16))
        data += qweight.contiguous().numpy().tobytes() + wscales.contiguous().view(torch.int16).numpy().tobytes()
        out = subprocess.run([str(exe)], input=data, capture_output=True, timeout=60)
        assert out.returncode == 0, out.stderr
        np_ = sm90_layout.padded_n(n)
        raw = torch.frombuffer(bytearray(out.stdout), dtype=torch.uint8)
        assert raw.numel() == np_ * kp + np_ * (kp // 64) * 4
        return raw[: np_ * kp].reshape(np_, kp), raw[np_ * kp:].view(torch.float32).reshape(np_, kp // 64)

    return run


def random_layer(n: int, k: int, dtype: torch.dtype, seed: int):
    """Canonical weights with every code -8..7 present (GPTQ-style rounding reaches -8) and varied scales."""
    g = torch.Generator().manual_seed(seed)
    kp = reference.padded_k(k)
    codes = torch.randint(-8, 8, (n, kp), generator=g, dtype=torch.int8)
    qweight = sm90_layout.pack_codes(codes)
    wscales = (torch.rand(n, kp // 64, generator=g) * 0.02 + 1e-4).to(dtype)
    wscales[0, 0] = 0  # an all-zero group's scale
    return qweight, wscales


SHAPES = [(1, 64), (130, 192), (256, 128), (333, 640)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prepare_matches_the_layout_functions(host_prepare, dtype):
    for i, (n, k) in enumerate(SHAPES):
        qweight, wscales = random_layer(n, k, dtype, seed=i)
        wq, ws = sm90_layout.prepare(qweight, wscales)
        ref_q, ref_s = host_prepare(qweight, wscales)
        assert wq.dtype == torch.uint8 and ws.dtype == torch.float32
        assert wq.shape == ref_q.shape and torch.equal(wq, ref_q), (n, k)
        assert torch.equal(ws.view(torch.int32), ref_s.view(torch.int32)), (n, k)
        assert wq.is_contiguous() and wq.untyped_storage().nbytes() == wq.numel()  # owns exactly (rule 5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_trip_is_bit_exact(dtype):
    for i, (n, k) in enumerate(SHAPES + [(128, 3072), (200, 64)]):
        qweight, wscales = random_layer(n, k, dtype, seed=100 + i)
        wq, ws = sm90_layout.prepare(qweight, wscales)
        assert wq.shape == (sm90_layout.padded_n(n), qweight.shape[1] * 2)
        q2, s2 = sm90_layout.unprepare(wq, ws, dtype, out_features=n)
        assert torch.equal(q2, qweight) and s2.dtype == dtype
        assert torch.equal(s2.view(torch.int16), wscales.view(torch.int16)), (n, k)
    # real quantized weights (svdq's quantizer) too
    qweight, wscales = reference.quantize_weight(torch.randn(77, 300), torch.bfloat16)
    q2, s2 = sm90_layout.unprepare(*sm90_layout.prepare(qweight, wscales), torch.bfloat16, out_features=77)
    assert torch.equal(q2, qweight) and torch.equal(s2, wscales)


def _swapped_nibbles(qweight):
    lo = torch.bitwise_right_shift(torch.bitwise_left_shift(qweight, 4), 4)
    hi = torch.bitwise_right_shift(qweight, 4)
    return torch.stack((hi, lo), dim=-1).reshape(qweight.shape[0], -1)


@pytest.mark.parametrize("broken", ["swapped_nibbles", "no_swizzle"])
def test_broken_variants_are_caught(host_prepare, monkeypatch, broken):
    qweight, wscales = random_layer(130, 192, torch.bfloat16, seed=7)
    ref_q, ref_s = host_prepare(qweight, wscales)
    good_q, good_s = sm90_layout.prepare(qweight, wscales)
    if broken == "swapped_nibbles":
        monkeypatch.setattr(sm90_layout, "unpack_codes", _swapped_nibbles)
    elif broken == "pad_to_64":
        monkeypatch.setattr(sm90_layout, "padded_n", lambda n: (n + 63) // 64 * 64)
        monkeypatch.setattr(sm90_layout, "TILE_N", 64)
    else:
        monkeypatch.setattr(sm90_layout, "_swizzle", lambda tiles: tiles.reshape(*tiles.shape[:2], -1, 64))
    bad_q, bad_s = sm90_layout.prepare(qweight, wscales)
    assert not torch.equal(bad_q, ref_q)
    # and a round trip through the correct inverse does not give the canonical weights back
    monkeypatch.undo()
    q2, _ = sm90_layout.unprepare(bad_q, bad_s, torch.bfloat16, out_features=130)
    assert not torch.equal(q2, qweight)
    assert torch.equal(sm90_layout.unprepare(good_q, good_s, torch.bfloat16, 130)[0], qweight)


@pytest.mark.parametrize("n", [64, 130])
def test_wrong_n_padding_is_caught(host_prepare, monkeypatch, n):
    """Tiles of 64 channels (padding N to 64): a different size than the kernel reads, refused by the inverse."""
    qweight, wscales = random_layer(n, 128, torch.float16, seed=3)
    ref_q, ref_s = host_prepare(qweight, wscales)
    assert ref_q.shape[0] == sm90_layout.padded_n(n) and ref_q.shape[0] % 128 == 0
    monkeypatch.setattr(sm90_layout, "padded_n", lambda n: (n + 63) // 64 * 64)
    monkeypatch.setattr(sm90_layout, "TILE_N", 64)
    bad_q, bad_s = sm90_layout.prepare(qweight, wscales)
    assert bad_q.shape != ref_q.shape and bad_s.shape != ref_s.shape
    monkeypatch.undo()
    with pytest.raises(ValueError, match="Np|pads to|multiples of 128"):
        sm90_layout.unprepare(bad_q, bad_s, torch.float16, out_features=n)


def test_bad_inputs_raise_clear_errors():
    qweight, wscales = random_layer(130, 192, torch.bfloat16, seed=1)
    wq, ws = sm90_layout.prepare(qweight, wscales)
    with pytest.raises(ValueError, match="out_features"):
        sm90_layout.unprepare(wq, ws, torch.bfloat16, None)
    with pytest.raises(ValueError, match="out_features=100 pads to 128"):
        sm90_layout.unprepare(wq, ws, torch.bfloat16, 100)
    with pytest.raises(ValueError, match="uint8"):
        sm90_layout.unprepare(wq.view(torch.int8), ws, torch.bfloat16, 130)
    with pytest.raises(ValueError, match="float32"):
        sm90_layout.unprepare(wq, ws.to(torch.bfloat16), torch.bfloat16, 130)
    bad = wq.clone()
    bad[0, 0] = 0x7F  # e4m3 NaN: not an INT4 code
    with pytest.raises(ValueError, match="not INT4 codes"):
        sm90_layout.unprepare(bad, ws, torch.bfloat16, 130)
    with pytest.raises(ValueError, match="wscales must be bfloat16/float16"):
        sm90_layout.prepare(qweight, wscales.float())
    with pytest.raises(ValueError, match="qweight must be int8"):
        sm90_layout.prepare(qweight.view(torch.uint8), wscales)


def test_backend_is_registered_for_conversions():
    """The "cuda-sm90" layout converts on every machine (offload preparation on a CPU host); its backend runs
    only on a compute capability 9.0 GPU with the sm_90a kernels built."""
    if not svdq.build_info()["native"]:
        pytest.skip("the native library registers the backend")
    be = ops.registered_backend("cuda-sm90")
    assert be.layout == "cuda-sm90" and be.devices == ("cuda",)
    assert ops.layout_backend("cuda-sm90") is be
    if not torch.cuda.is_available():
        assert not be.is_available() and "cuda-sm90" not in ops.available_backends()


def _layer(n=200, k=200, rank=16, dtype=torch.bfloat16):
    torch.manual_seed(0)
    return SVDQLinear.from_linear(torch.nn.Linear(k, n).to(dtype), rank=rank)


def test_layer_holds_the_sm90_layout_on_the_cpu():
    if not svdq.build_info()["native"]:
        pytest.skip("the native library registers the backend")
    m = _layer()  # N = 200: padded to 256 channels
    x = torch.randn(3, m.in_features, dtype=m.dtype)
    y = m(x)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    assert prepare_layout(m, "cuda-sm90") == 1
    assert m.layout == "cuda-sm90" and m.qweight.dtype == torch.uint8 and m.wscales.dtype == torch.int32
    assert m.qweight.shape == (sm90_layout.padded_n(m.out_features), state["qweight"].shape[1] * 2)
    sd = m.state_dict()
    assert torch.equal(sd["qweight"], state["qweight"]) and torch.equal(sd["wscales"], state["wscales"])
    c = copy.deepcopy(m)
    assert c.layout == "cuda-sm90" and torch.equal(c.qweight, m.qweight)
    assert torch.equal(c(x), y)  # a CPU call converts back to canonical (bit-exact weights: same output)
    h = m.to(torch.float16)  # .to(dtype) rounds the scales as canonical ones: back to canonical first
    assert h.layout == "canonical" and torch.equal(h.wscales, state["wscales"].to(torch.float16))
