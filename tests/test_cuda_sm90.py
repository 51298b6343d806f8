"""The Hopper (sm_90a) FP8-wgmma ops and backend "cuda-sm90" vs the reference (docs/numerics.md §4.2, §8).

Skipped without a compute capability 9.0 GPU and the sm_90a kernels (built when 90 is in SVDQ_CUDA_ARCHS).
The layout itself is host-tested in tests/test_sm90_layout.py; here the native ops run:
- integer parts exact: prepare_weight_sm90 = the torch layout byte for byte, quantize_act_e4m3 = quantize_act's
  codes, quantize_act_fp8 = the reference bit for bit, and unit-scale GEMMs give the exact integer sums (±8·±8
  extremes included);
- outputs: rel. error <= 1e-3 (+ half an ulp of the output dtype) against the spec in fp32 and elementwise within
  2 ulp + 1e-3·row max, both formats, bf16/fp16, odd M, N % 128 != 0, r in {0, 16, 32, 64, 256}, bias or not;
- bad inputs raise errors naming the tensor; SVDQLinear end to end on the sm90 backend and with SVDQ_SM90_FP8=0.
"""

from __future__ import annotations

import copy

import pytest
import torch

import svdq
from svdq.ops import reference, sm90_layout


def _sm90_gpu() -> bool:
    return (torch.cuda.is_available() and bool(svdq.build_info().get("cuda_loaded"))
            and torch.cuda.get_device_capability(0) == (9, 0))


pytestmark = pytest.mark.skipif(not _sm90_gpu(), reason="needs an sm_90 GPU (H100/H200) and svdq's CUDA kernels")


@pytest.fixture(autouse=True)
def _sm90_backend_on(monkeypatch):
    """These tests are about backend "cuda-sm90": on, whatever the calling environment says. A build without 90
    in its arch list skips them; a build with it must have registered the sm_90a ops (no silent skip)."""
    if "90" not in svdq.build_info().get("cuda_archs", []):
        pytest.skip(f"built without sm_90 (SVDQ_CUDA_ARCHS: {svdq.build_info().get('cuda_archs')})")
    missing = [op for op in ("prepare_weight_sm90", "w4a4_gemm_sm90", "quantize_act_fp8", "w4a8_gemm")
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"svdq::{op}", "CUDA")]
    assert not missing, f"built for sm_90 but the CUDA kernels of {missing} are not registered (SVDQ_WITH_SM90?)"
    monkeypatch.setenv("SVDQ_SM90_FP8", "1")


DTYPES = [torch.bfloat16, torch.float16]
RANKS = [0, 16, 32, 64, 256]
# (M, K, N): odd M, K not a multiple of 64 (quantizer padding), N not a multiple of 128 (padded tiles)
SHAPES = [(1, 64, 128), (37, 100, 200), (129, 256, 136), (300, 640, 384)]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def act_inputs(m, k, r, dtype, seed):
    g = _gen(seed)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-2, 2, k)[torch.randperm(k, generator=g)]).to(dtype)
    smooth = (torch.rand(k, generator=g) * 8 + 0.05).to(dtype)
    down = (torch.randn(k, r, generator=g) / k**0.5).to(dtype)
    scales = torch.rand(r, generator=g) + 0.5 if r else None
    return [t.cuda() if t is not None else None for t in (x, smooth, down, scales)]


def weights(n, k, r, dtype, seed, bias=True):
    g = _gen(seed)
    qweight, wscales = reference.quantize_weight(torch.randn(n, k, generator=g) * 0.05, dtype)
    up = (torch.randn(n, r, generator=g) * 0.1).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return qweight.cuda(), wscales.cuda(), up.cuda(), None if b is None else b.cuda()


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    den = b.norm().item()
    return (a - b).norm().item() / (den if den else 1.0)


def check_close(y, y32, dtype):
    assert torch.isfinite(y.float()).all()
    half_ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    assert rel(y, y32) <= 1e-3 + half_ulp, f"relative error {rel(y, y32):.2e}"
    yd, rd = y.float(), y32.to(dtype).float()
    ulp = rd.abs() * (2.0**-7 if dtype == torch.bfloat16 else 2.0**-10)
    rowmax = y32.abs().amax(dim=1, keepdim=True)
    bad = (yd - rd).abs() > 2 * ulp + 1e-3 * rowmax + 1e-6
    assert not bad.any(), f"{int(bad.sum())} elements off, worst {(yd - rd).abs().max().item():.3e}"


def poison(nbytes):
    t = torch.full((max(nbytes, 1) + 4096,), 0x7F, dtype=torch.uint8, device="cuda")
    del t


# ---- integer parts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_prepare_op_equals_the_torch_layout(dtype):
    for i, (n, k) in enumerate(((1, 64), (200, 100), (384, 3072), (136, 256))):
        qweight, wscales, _, _ = weights(n, k, 0, dtype, seed=i)
        pq, ps = torch.ops.svdq.prepare_weight_sm90(qweight, wscales)
        tq, ts = sm90_layout.prepare(qweight.cpu(), wscales.cpu())
        assert pq.shape == tq.shape and torch.equal(pq.cpu(), tq), (n, k)
        assert torch.equal(ps.cpu().view(torch.int32), ts.view(torch.int32)), (n, k)
        q2, s2 = sm90_layout.unprepare(pq, ps, dtype, out_features=n)  # on the GPU, in torch
        assert torch.equal(q2, qweight) and torch.equal(s2, wscales)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_act_e4m3_and_fp8_codes_exact(dtype):
    for m, k, _ in SHAPES:
        x, smooth, down, scales = act_inputs(m, k, 32, dtype, seed=m + k)
        qa, sa, la = torch.ops.svdq.quantize_act(x, smooth, down, scales)
        qe, se, le = torch.ops.svdq.quantize_act_e4m3(x, smooth, down, scales)
        codes = qe.view(torch.float8_e4m3fn).float()
        assert torch.equal(sm90_layout.pack_codes(codes.to(torch.int8)), qa)
        assert torch.equal(se, sa) and torch.equal(le, la)
        q8, s8, l8 = torch.ops.svdq.quantize_act_fp8(x, smooth, down, scales)
        rq, rs, rl = reference.quantize_act_fp8(x, smooth, down, scales)
        assert torch.equal(q8, rq) and torch.equal(s8, rs), (m, k)
        assert torch.equal(l8, la)  # the same low-rank kernel as the W4A4 path
        assert rel(l8, rl) <= 1e-5


@pytest.mark.parametrize("w4a8", [False, True])
def test_unit_scale_gemm_gives_exact_integer_sums(w4a8):
    """Scales 1, r = 0, no bias, fp16 out: y must be the exact integer dot products (|sum| <= 4096 per 64-group,
    fp32 accumulation over groups), including the ±8·±8 extremes."""
    m, n, kp = 130, 200, 192
    g = _gen(5)
    a = torch.randint(-8, 8, (m, kp), generator=g)
    w = torch.randint(-8, 8, (n, kp), generator=g)
    a[0], w[0] = -8, -8          # (-8)·(-8) · 192 = 12288
    a[1], w[1] = 7, -8           # 7·(-8) · 192
    w[2, :64], a[2, :64] = -8, 7  # one extreme group
    exact = a.double() @ w.double().T  # |.| <= 12288 < 2^24: exact in the kernel's fp32; cast to fp16 as it does
    qact = a.float().to(torch.float8_e4m3fn).view(torch.uint8).cuda()
    qweight = sm90_layout.pack_codes(w.to(torch.int8))
    pq, ps = torch.ops.svdq.prepare_weight_sm90(qweight.cuda(), torch.ones(n, kp // 64, dtype=torch.float16).cuda())
    ascales = torch.ones(m, device="cuda") if w4a8 else torch.ones(m, kp // 64, device="cuda")
    la, up = torch.zeros(m, 0, device="cuda"), torch.zeros(n, 0, dtype=torch.float16, device="cuda")
    gemm = torch.ops.svdq.w4a8_gemm if w4a8 else torch.ops.svdq.w4a4_gemm_sm90
    y = gemm(qact, ascales, pq, ps, la, up, None, torch.float16)
    assert torch.equal(y.cpu(), exact.to(torch.float16))


# ---- outputs vs the spec ----------------------------------------------------------------------------------


def spec_y32(w4a8, qact, ascales, qweight, wscales, lora_act, up, b, dtype):
    """The spec's y before the final cast (lora_act rounded to the compute dtype), in fp32 on the GPU."""
    la = lora_act.to(dtype).to(torch.float32)
    if w4a8:
        return reference.w4a8_gemm(qact, ascales, qweight, wscales, la, up, b, torch.float32)
    packed = sm90_layout.pack_codes(qact.view(torch.float8_e4m3fn).float().to(torch.int8))
    return reference.w4a4_gemm(packed, ascales, qweight, wscales, la, up, b, torch.float32)


@pytest.mark.parametrize("w4a8", [False, True], ids=["w4a4", "w4a8"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r", RANKS)
def test_gemm_matches_the_spec(w4a8, dtype, r):
    for i, (m, k, n) in enumerate(SHAPES):
        bias = (i + r) % 2 == 0
        x, smooth, down, scales = act_inputs(m, k, r, dtype, seed=10 * i + r)
        qweight, wscales, up, b = weights(n, k, r, dtype, seed=7 * i + r, bias=bias)
        quant = torch.ops.svdq.quantize_act_fp8 if w4a8 else torch.ops.svdq.quantize_act_e4m3
        qa, sa, la = quant(x, smooth, down, scales)
        pq, ps = torch.ops.svdq.prepare_weight_sm90(qweight, wscales)
        poison(m * n * 2)
        gemm = torch.ops.svdq.w4a8_gemm if w4a8 else torch.ops.svdq.w4a4_gemm_sm90
        y = gemm(qa, sa, pq, ps, la, up, b, dtype)
        torch.cuda.synchronize()
        assert y.shape == (m, n) and y.dtype == dtype
        check_close(y, spec_y32(w4a8, qa, sa, qweight, wscales, la, up, b, dtype), dtype)


@pytest.mark.parametrize("w4a8", [False, True], ids=["w4a4", "w4a8"])
def test_flux_size(w4a8):
    m, k, n, r, dtype = 4608, 3072, 3072, 32, torch.bfloat16
    x, smooth, down, scales = act_inputs(m, k, r, dtype, seed=1)
    qweight, wscales, up, b = weights(n, k, r, dtype, seed=2)
    quant = torch.ops.svdq.quantize_act_fp8 if w4a8 else torch.ops.svdq.quantize_act_e4m3
    qa, sa, la = quant(x, smooth, down, scales)
    pq, ps = torch.ops.svdq.prepare_weight_sm90(qweight, wscales)
    y = (torch.ops.svdq.w4a8_gemm if w4a8 else torch.ops.svdq.w4a4_gemm_sm90)(qa, sa, pq, ps, la, up, b, dtype)
    check_close(y, spec_y32(w4a8, qa, sa, qweight, wscales, la, up, b, dtype), dtype)


def test_opcheck():
    m, k, n, r, dtype = 37, 128, 136, 16, torch.float16
    x, smooth, down, scales = act_inputs(m, k, r, dtype, seed=3)
    qweight, wscales, up, b = weights(n, k, r, dtype, seed=4)
    torch.library.opcheck(torch.ops.svdq.prepare_weight_sm90.default, (qweight, wscales))
    pq, ps = torch.ops.svdq.prepare_weight_sm90(qweight, wscales)
    torch.library.opcheck(torch.ops.svdq.quantize_act_fp8.default, (x, smooth, down, scales))
    qe, se, le = torch.ops.svdq.quantize_act_e4m3(x, smooth, down, scales)
    torch.library.opcheck(torch.ops.svdq.w4a4_gemm_sm90.default, (qe, se, pq, ps, le, up, b, dtype))
    q8, s8, l8 = torch.ops.svdq.quantize_act_fp8(x, smooth, down, scales)
    torch.library.opcheck(torch.ops.svdq.w4a8_gemm.default, (q8, s8, pq, ps, l8, up, None, dtype))


# ---- bad inputs -------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    m, k, n, r, dtype = 5, 128, 200, 16, torch.bfloat16
    x, smooth, down, scales = act_inputs(m, k, r, dtype, seed=8)
    qweight, wscales, up, b = weights(n, k, r, dtype, seed=9)
    pq, ps = torch.ops.svdq.prepare_weight_sm90(qweight, wscales)
    qe, se, le = torch.ops.svdq.quantize_act_e4m3(x, smooth, down, scales)
    q8, s8, l8 = torch.ops.svdq.quantize_act_fp8(x, smooth, down, scales)
    g4, g8 = torch.ops.svdq.w4a4_gemm_sm90, torch.ops.svdq.w4a8_gemm
    qa, sa, la = torch.ops.svdq.quantize_act(x, smooth, down, scales)
    with pytest.raises(RuntimeError, match=r"qact .* must be uint8 \[M, Kp\] e4m3"):
        g4(qa, sa, pq, ps, la, up, b, dtype)  # packed INT4 qact of the mma.sync path
    gq, gs = torch.ops.svdq.prepare_weight(qweight, wscales)
    with pytest.raises(RuntimeError, match="sm90-prepared uint8"):
        g8(q8, s8, gq, gs, l8, up, b, dtype)  # the "cuda-g64" layout
    with pytest.raises(RuntimeError, match=r"ascales .* must be float32 \[M\]"):
        g8(q8, se, pq, ps, l8, up, b, dtype)  # W4A4 per-group scales into the W4A8 GEMM
    with pytest.raises(RuntimeError, match=r"ascales .* must be float32 \[M, Kp/64\]"):
        g4(qe, s8, pq, ps, le, up, b, dtype)
    big_up = torch.zeros(300, r, dtype=dtype, device="cuda")
    with pytest.raises(RuntimeError, match=r"\[Np, Kp\] = \[384"):
        g4(qe, se, pq, ps, le, big_up, None, dtype)  # lora_up says N = 300 -> Np = 384, the weights hold 256
    buf = torch.empty(pq.numel() + 64, dtype=torch.uint8, device="cuda")
    shifted = buf[64:].view(pq.shape)
    shifted.copy_(pq)
    with pytest.raises(RuntimeError, match="128-byte aligned"):
        g4(qe, se, shifted, ps, le, up, b, dtype)
    with pytest.raises(RuntimeError, match="lora_act"):
        g4(qe, se, pq, ps, le[:, :8].contiguous(), up, b, dtype)
    with pytest.raises(RuntimeError, match="bias"):
        g8(q8, s8, pq, ps, l8, up, b.float(), dtype)
    with pytest.raises(RuntimeError, match="smooth .* with the dtype of x"):
        torch.ops.svdq.quantize_act_fp8(x, smooth.float(), down, scales)
    with pytest.raises(RuntimeError, match="wscales .* must be bfloat16 or float16"):
        torch.ops.svdq.prepare_weight_sm90(qweight, wscales.float())


# ---- the backend and SVDQLinear ---------------------------------------------------------------------------


def test_backend_selected_on_sm90_and_switchable(monkeypatch):
    assert svdq.ops.select_backend(torch.device("cuda")).name == "cuda-sm90"
    monkeypatch.setenv("SVDQ_SM90_FP8", "0")
    assert svdq.ops.select_backend(torch.device("cuda")).name == "cuda"
    monkeypatch.delenv("SVDQ_SM90_FP8")  # opt-in until the device check has measured it
    assert svdq.ops.select_backend(torch.device("cuda")).name == "cuda"


@pytest.mark.parametrize("dtype", DTYPES)
def test_svdq_linear_end_to_end(monkeypatch, dtype):
    torch.manual_seed(0)
    lin = torch.nn.Linear(3072, 650, bias=True).to(dtype)  # N = 650: padded to 768 in the sm90 layout
    base = svdq.SVDQLinear.from_linear(lin, rank=32)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    cpu_copy = copy.deepcopy(base)
    lin_gpu = copy.deepcopy(lin).cuda()
    layer = base.cuda()
    assert layer.layout == "cuda-sm90" and layer.qweight.shape == (768, 3072)
    x = torch.randn(2, 77, 3072, dtype=dtype, device="cuda")
    y = layer(x)
    with svdq.ops.use_backend("reference"):
        y_ref = layer(x)
        with svdq.ops.use_act_format("fp8"):
            y8_ref = layer(x)
    assert y.shape == (2, 77, 650) and y.dtype == dtype
    half_ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    assert rel(y, y_ref) <= 1e-3 + half_ulp
    with svdq.ops.use_act_format("fp8"):
        y8 = layer(x)
    assert rel(y8, y8_ref) <= 1e-3 + half_ulp
    y_lin = lin_gpu(x)
    assert rel(y, y_lin) < 0.2 and rel(y8, y_lin) < 0.2
    sd = layer.state_dict()
    for key in ("qweight", "wscales"):
        assert torch.equal(sd[key].cpu(), state[key]), key
    # the int8 mma.sync path on the same GPU: the layer converts once to its layout and agrees
    monkeypatch.setenv("SVDQ_SM90_FP8", "0")
    y_int8 = layer(x)
    assert layer.layout == "cuda-g64" and rel(y_int8, y_ref) <= 1e-3 + half_ulp
    with svdq.ops.use_act_format("fp8"), pytest.raises(ValueError, match="no W4A8 kernels"):
        layer(x)
    monkeypatch.setenv("SVDQ_SM90_FP8", "1")
    assert torch.equal(layer(x), y) and layer.layout == "cuda-sm90"  # back, bit for bit
    # prepared on the CPU (offload), carried to the GPU without a repack
    svdq.linear.prepare_layout(cpu_copy, "cuda-sm90")
    moved = cpu_copy.cuda()
    assert moved.layout == "cuda-sm90" and torch.equal(moved.qweight, layer.qweight)
    assert torch.equal(moved(x), y)
