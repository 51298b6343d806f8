"""CPU backend (svdq._C, csrc/cpu) vs the reference (docs/numerics.md §4.3).

qact and ascales must match bit for bit, lora_act to 1e-5 relative, y to 1e-3 relative (plus, for 16-bit
outputs, every element within 2 ulp + 1e-3·‖row‖∞). Every compiled CPU kernel variant this machine supports
(base / avx2 / avx512) is tested. Sizes are deliberately misaligned (M 1, 3, 37, 118; K 100, 257).

CI always builds the extension, so a missing svdq._C fails this file; SVDQ_ALLOW_NO_NATIVE=1 skips it.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import svdq
from svdq import _native
from svdq.ops import reference

if not _native.AVAILABLE:
    if os.environ.get("SVDQ_ALLOW_NO_NATIVE") == "1":
        pytest.skip(f"svdq._C not built: {_native.IMPORT_ERROR}", allow_module_level=True)
    pytest.fail(
        f"svdq._C is not built ({_native.IMPORT_ERROR}); build it with `pip install --no-build-isolation -e .` "
        "or set SVDQ_ALLOW_NO_NATIVE=1",
        pytrace=False,
    )

OPS = torch.ops.svdq
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ISAS = _native.build_info()["cpu_isas_supported"]


@pytest.fixture(params=ISAS)
def isa(request):
    previous = _native.set_cpu_isa(request.param)
    yield request.param
    _native.set_cpu_isa(previous)


def make_inputs(m, k, n, r, dtype, seed, *, bias=True, scales=True):
    """Realistic-looking layer tensors: outlier channels in x, a few all-zero rows and weight groups."""
    g = torch.Generator().manual_seed(seed)
    mags = torch.logspace(-2, 1.5, k)[torch.randperm(k, generator=g)]
    x = torch.randn(m, k, generator=g) * mags
    if m > 2:
        x[1] = 0  # s_a = 0 for every group of this row
    x = x.to(dtype)
    smooth = (torch.rand(k, generator=g) * 4 + 0.25).to(dtype)
    lora_down = (torch.randn(k, r, generator=g) / k**0.5).to(dtype)
    lora_scales = torch.rand(r, generator=g) * 2 if scales else None
    kp = reference.padded_k(k)
    qweight = torch.randint(-128, 128, (n, kp // 2), generator=g, dtype=torch.int8)
    wscales = (torch.rand(n, kp // 64, generator=g) * 0.1).to(dtype)
    wscales[0, 0] = 0  # a zero-scale weight group
    lora_up = (torch.randn(n, r, generator=g) * 0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, smooth, lora_down, lora_scales, qweight, wscales, lora_up, b


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_y_close(y, y_ref):
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    if y.numel() == 0:
        return
    assert rel_err(y, y_ref) <= 1e-3
    if y.dtype != torch.float32:
        yr = y_ref.float()
        ulp = yr.abs().clamp_min(torch.finfo(y.dtype).tiny) * torch.finfo(y.dtype).eps
        tol = 2 * ulp + 1e-3 * yr.abs().amax(dim=1, keepdim=True)
        assert ((y.float() - yr).abs() <= tol).all()


def check_layer(m, k, n, r, dtype, seed, bias=True, scales=True):
    x, smooth, ld, ls, qw, ws, lu, b = make_inputs(m, k, n, r, dtype, seed, bias=bias, scales=scales)
    qact, ascales, lora_act = OPS.quantize_act(x, smooth, ld, ls)
    qact_r, ascales_r, lora_act_r = reference.quantize_act(x, smooth, ld, ls)
    assert torch.equal(qact, qact_r)
    assert torch.equal(ascales, ascales_r)
    assert lora_act.dtype == torch.float32 and lora_act.shape == (m, r)
    if m and r:
        assert rel_err(lora_act, lora_act_r) <= 1e-5
    # the GEMM gets the reference's activations, so its error is its own
    pqw, pws = OPS.prepare_weight(qw, ws)
    y = OPS.w4a4_gemm(qact_r, ascales_r, pqw, pws, lora_act_r, lu, b, dtype)
    assert_y_close(y, reference.w4a4_gemm(qact_r, ascales_r, qw, ws, lora_act_r, lu, b, dtype))


SHAPES = [  # (M, K, N, r)
    (1, 64, 32, 0),
    (3, 100, 70, 16),
    (37, 257, 33, 32),
    (118, 128, 96, 48),
    (5, 1, 1, 64),
    (64, 320, 130, 16),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}_K{}_N{}_r{}".format(*s))
def test_matches_reference(isa, shape, dtype):
    m, k, n, r = shape
    seed = zlib.crc32(f"{shape} {dtype}".encode())  # reproducible across runs (str hash() is salted per process)
    check_layer(m, k, n, r, dtype, seed, bias=(m % 2 == 1), scales=(k % 2 == 0))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("scales", [True, False])
def test_bias_and_scales(bias, scales):
    check_layer(13, 200, 45, 16, torch.bfloat16, 7, bias=bias, scales=scales)


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(0, 40),
    k=st.integers(1, 300),
    n=st.integers(1, 80),
    r=st.sampled_from([0, 16, 32, 48, 64, 5]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_sweep(m, k, n, r, dtype, seed):
    check_layer(m, k, n, r, dtype, seed, bias=seed % 2 == 0, scales=seed % 3 != 0)


def test_round_half_even_and_clamp():
    # amax 7 with λ = 1 -> s = 1: x̂ / s hits exact halves, which must round to even
    row = torch.tensor([7.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, -7.0, 6.5] + [0.0] * 54)
    x = torch.stack([row, -row, row * 1e-3])
    smooth = torch.ones(64)
    qact, ascales, _ = OPS.quantize_act(x, smooth, torch.zeros(64, 0), None)
    qact_r, ascales_r, _ = reference.quantize_act(x, smooth, torch.zeros(64, 0), None)
    assert torch.equal(qact, qact_r) and torch.equal(ascales, ascales_r)
    assert reference.unpack_int4(qact)[0, :10].tolist() == [7, 0, 2, 2, 0, -2, -2, 4, -7, 6]


def test_variants_agree_on_quantization():
    x, smooth, ld, ls, *_ = make_inputs(29, 333, 8, 32, torch.float16, 3)
    outs = []
    for name in ISAS:
        prev = _native.set_cpu_isa(name)
        try:
            outs.append(OPS.quantize_act(x, smooth, ld, ls))
        finally:
            _native.set_cpu_isa(prev)
    for qact, ascales, lora_act in outs[1:]:
        assert torch.equal(qact, outs[0][0]) and torch.equal(ascales, outs[0][1])
        assert rel_err(lora_act, outs[0][2]) <= 1e-6


def test_prepare_weight_returns_fresh_tensors():
    _, _, _, _, qw, ws, _, _ = make_inputs(1, 100, 20, 0, torch.bfloat16, 1)
    pqw, pws = OPS.prepare_weight(qw, ws)
    assert pqw.shape == qw.shape and pqw.dtype == torch.int8 and torch.equal(pqw, qw)
    assert pws.shape == ws.shape and pws.dtype == torch.float32 and torch.equal(pws, ws.float())
    assert pqw.data_ptr() != qw.data_ptr()


# ---- opcheck / torch.compile ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(dtype):
    x, smooth, ld, ls, qw, ws, lu, b = make_inputs(7, 130, 40, 16, dtype, 11)
    torch.library.opcheck(OPS.quantize_act.default, (x, smooth, ld, ls))
    torch.library.opcheck(OPS.quantize_act.default, (x, smooth, ld, None))
    torch.library.opcheck(OPS.prepare_weight.default, (qw, ws))
    qact, ascales, lora_act = OPS.quantize_act(x, smooth, ld, ls)
    pqw, pws = OPS.prepare_weight(qw, ws)
    torch.library.opcheck(OPS.w4a4_gemm.default, (qact, ascales, pqw, pws, lora_act, lu, b, dtype))
    torch.library.opcheck(OPS.w4a4_gemm.default, (qact, ascales, pqw, pws, lora_act, lu, None, dtype))


def test_torch_compile_fullgraph():
    x, smooth, ld, ls, qw, ws, lu, b = make_inputs(9, 100, 24, 16, torch.bfloat16, 5)
    pqw, pws = OPS.prepare_weight(qw, ws)

    def layer(x):
        qact, ascales, lora_act = OPS.quantize_act(x, smooth, ld, ls)
        return OPS.w4a4_gemm(qact, ascales, pqw, pws, lora_act, lu, b, x.dtype) * 2

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)


# ---- svdq.ops integration ------------------------------------------------------------------------------


def test_backend_registered():
    assert "cpu" in svdq.ops.available_backends()
    assert svdq.ops.select_backend(torch.device("cpu")).name == "cpu"
    if svdq.build_info()["cuda"] and torch.cuda.is_available():
        assert "cuda" in svdq.ops.available_backends()
    else:
        assert "cuda" not in svdq.ops.available_backends()


def test_svdq_linear_cpu_backend():
    x, smooth, ld, ls, qw, ws, lu, b = make_inputs(10, 192, 50, 32, torch.bfloat16, 9)
    x3 = x.reshape(2, 5, 192)
    pqw, pws = svdq.ops.prepare_weight(qw, ws, backend="cpu")
    y = svdq.ops.svdq_linear(x3, pqw, pws, smooth, ld, lu, b, ls, backend="cpu")
    y_ref = svdq.ops.svdq_linear(x3, qw, ws, smooth, ld, lu, b, ls, backend="reference")
    assert y.shape == (2, 5, 50)
    assert_y_close(y.reshape(10, 50), y_ref.reshape(10, 50))


# ---- bad inputs raise clear errors ---------------------------------------------------------------------


def _good(dtype=torch.bfloat16):
    x, smooth, ld, ls, qw, ws, lu, b = make_inputs(6, 100, 20, 16, dtype, 2)
    qact, ascales, lora_act = OPS.quantize_act(x, smooth, ld, ls)
    return dict(x=x, smooth=smooth, ld=ld, ls=ls, qw=qw, ws=ws, lu=lu, b=b, qact=qact, ascales=ascales,
                lora_act=lora_act)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(x=lambda t: t.to(torch.int32)), r"x must be float32, bfloat16 or float16 \[M, K\]; got shape \[6, 100\], dtype Int"),
        (dict(x=lambda t: t[:, :50].t()), r"x must be contiguous"),
        (dict(x=lambda t: t.reshape(2, 3, 100)), r"x must be a 2-D tensor"),
        (dict(smooth=lambda t: t[:99]), r"smooth must be of size 100 in dim 0 \(K = x.shape\[1\]\); got shape \[99\]"),
        (dict(ld=lambda t: t[:50]), r"lora_down must be of size 100 in dim 0"),
        (dict(ls=lambda t: t[:8]), r"lora_scales must be of size 16 in dim 0 \(r = lora_down.shape\[1\]\)"),
        (dict(ls=lambda t: t.double()), r"lora_scales must be float32, bfloat16 or float16|lora_scales must be of dtype Float"),
    ],
)
def test_quantize_act_bad_inputs(change, match):
    t = _good()
    for key, f in change.items():
        t[key] = f(t[key])
    with pytest.raises(RuntimeError, match=match):
        OPS.quantize_act(t["x"], t["smooth"], t["ld"], t["ls"])


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(qact=lambda t: t.float()), r"qact must be of dtype Char"),
        (dict(qact=lambda t: t[:, :30].contiguous()), r"qact must be of size 64 in dim 1 \(Kp/2 = ascales.shape\[1\] \* 32\)"),
        (dict(ascales=lambda t: t.half()), r"ascales must be of dtype Float"),
        (dict(ascales=lambda t: t[:5]), r"ascales must be of size 6 in dim 0 \(M = qact.shape\[0\]\)"),
        (dict(qw=lambda t: t[:, :16].contiguous()), r"qweight must be of size 64 in dim 1"),
        (dict(ws=lambda t: t[:19]), r"wscales must be of size 20 in dim 0 \(N = qweight.shape\[0\]\)"),
        (dict(ws=lambda t: t.t().contiguous().t()), r"wscales must be contiguous"),
        (dict(lora_act=lambda t: t[:, :8].contiguous()), r"lora_up must be of size 8 in dim 1 \(r = lora_act.shape\[1\]\)"),
        (dict(lu=lambda t: torch.cat([t, t], 1)), r"lora_up must be of size 16 in dim 1"),
        (dict(b=lambda t: t[:10]), r"bias must be of size 20 in dim 0"),
        (dict(lora_act=lambda t: t.bfloat16()), r"lora_act must be of dtype Float"),
    ],
)
def test_w4a4_gemm_bad_inputs(change, match):
    t = _good()
    for key, f in change.items():
        t[key] = f(t[key])
    with pytest.raises(RuntimeError, match=match):
        OPS.w4a4_gemm(t["qact"], t["ascales"], t["qw"], t["ws"], t["lora_act"], t["lu"], t["b"], torch.bfloat16)


def test_bad_out_dtype_and_prepare_weight():
    t = _good()
    with pytest.raises(RuntimeError, match="out_dtype must be float32, bfloat16 or float16"):
        OPS.w4a4_gemm(t["qact"], t["ascales"], t["qw"], t["ws"], t["lora_act"], t["lu"], t["b"], torch.int32)
    with pytest.raises(RuntimeError, match=r"qweight must be of size 32 in dim 1 \(Kp/2 = wscales.shape\[1\] \* 32\)"):
        OPS.prepare_weight(t["qw"], t["ws"][:, :1].contiguous())
    with pytest.raises(RuntimeError, match="qweight must be of dtype Char"):
        OPS.prepare_weight(t["qw"].to(torch.uint8), t["ws"])
