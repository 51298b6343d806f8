"""Shifted unsigned activations (docs/numerics.md §10; Nunchaku's mlp_fc2 numerics).

- the reference quantizer equals a direct, independently written implementation of §10.1 (numpy float32, one
  element at a time per group) bit for bit, and the reference GEMM reads the codes as unsigned (§10.2);
- broken variants are told apart: swapped nibbles, signed codes with the scale max/15, the shift not cancelled
  in the bias, unsigned codes read as signed by the GEMM;
- on GELU-distributed inputs the shifted layer's output error is lower than the signed one's;
- the torch-free CPU kernels (csrc/cpu/kernels_isa.cpp), built with g++ into a host harness
  (csrc/cpu/tests/kernels_host.cpp) for every ISA level this CPU runs, give the reference's codes and scales
  bit for bit and its outputs within spec §4.3 — signed and shifted;
- `SVDQLinear(act_shift=…)`: state_dict / svdq.save / svdq.load keep the shift; a Nunchaku-layout file's shifted
  mlp_fc2 layers (exported from an svdq FLUX.1 model quantized with shifted fc2) load into shifted layers that
  equal the svdq model's bit for bit on the reference backend.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import svdq
from svdq.linear import SVDQLinear
from svdq.ops import reference as ref

ROOT = Path(__file__).resolve().parents[1]
DELTA = 0.171875  # Nunchaku's SHIFT_GELU


# ---- an independent implementation of spec §10.1 (numpy float32, no torch op of the reference) -------------------


def spec_quantize_shifted(x: np.ndarray, lam: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """§10.1 written from the text: x̂ = (x + δ) / λ (fp32 add, fp32 divide), padding columns 0; per 64-group:
    non-finite → scale NaN, codes 0; else s = max|x̂| / 15, u = clamp(rint(x̂ / s), 0, 15) (s = 0 → 0); bytes
    u[2j] | u[2j+1] << 4. Returns (packed uint8 [M, Kp/2], scales float32 [M, G])."""
    m, k = x.shape
    kp = -(-k // 64) * 64
    xh = np.zeros((m, kp), dtype=np.float32)
    for i in range(m):
        for j in range(k):
            xh[i, j] = np.float32(np.float32(x[i, j]) + np.float32(delta)) / np.float32(lam[j])
    g = kp // 64
    codes = np.zeros((m, kp), dtype=np.uint8)
    scales = np.zeros((m, g), dtype=np.float32)
    for i in range(m):
        for gi in range(g):
            grp = xh[i, 64 * gi : 64 * gi + 64]
            if not np.all(np.isfinite(grp)):
                scales[i, gi] = np.float32("nan")
                continue
            s = np.float32(np.max(np.abs(grp))) / np.float32(15.0)
            scales[i, gi] = s
            if s == 0:
                continue
            for e in range(64):
                v = np.rint(np.float32(grp[e] / s))  # numpy rint: round half to even
                codes[i, 64 * gi + e] = int(min(max(v, 0.0), 15.0))
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    return packed, scales


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int32).numpy() if t.dtype == torch.float32 else t.contiguous().numpy()


def same_as_spec(qact: torch.Tensor, ascales: torch.Tensor, x: torch.Tensor, lam: torch.Tensor, delta: float) -> bool:
    packed, scales = spec_quantize_shifted(x.to(torch.float32).numpy(), lam.to(torch.float32).numpy(), delta)
    return np.array_equal(qact.view(torch.uint8).numpy(), packed) and np.array_equal(
        _bits(ascales), scales.view(np.int32)
    )


def _inputs(seed: int, m: int, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """GELU outputs (≥ −0.17) with a few hard cases: a zero row, a row under −δ, NaN / Inf groups, smoothing."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.gelu(torch.randn(m, k, generator=g) * 3, approximate="tanh")
    x[1] = 0.0  # all-zero groups: x̂ = δ/λ, not 0 — one scale for every code
    x[2, :5] = -0.5  # below −δ: negative x̂, clamps to 0, counts in max|x̂|
    if m > 4:
        x[3, 7] = float("nan")
        x[4, k - 1] = float("inf")
    lam = torch.rand(k, generator=g) * 3 + 0.05
    return x.to(dtype), lam.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [64, 100, 192])
def test_reference_quantizer_equals_the_independent_spec_implementation(dtype, k):
    x, lam = _inputs(k, 6, k, dtype)
    qact, ascales, lora_act = ref.quantize_act(x, lam, torch.zeros(k, 0, dtype=dtype), act_shift=DELTA)
    assert same_as_spec(qact, ascales, x, lam, DELTA)
    assert torch.isnan(ascales[3, 0]) and torch.isnan(ascales[4, -1])  # the NaN rule of §4.1
    u = ref.unpack_uint4(qact)
    assert int(u.max()) == 15 and int(u[2, :5].max()) == 0  # full unsigned range; under −δ clamps to 0
    kp = ref.padded_k(k)
    if kp > k:
        assert int(u[:, k:].max()) == 0  # padding columns are x̂ = 0, not δ


def test_lora_act_reads_the_raw_input_and_signed_path_is_unchanged():
    x, lam = _inputs(1, 5, 128, torch.float32)
    x = torch.nan_to_num(x, nan=0.0, posinf=1.0)
    down = torch.randn(128, 16)
    _, _, la = ref.quantize_act(x, lam, down, act_shift=DELTA)
    assert torch.equal(la, x @ down)
    signed = ref.quantize_act(x, lam, down)
    again = ref.quantize_act(x, lam, down, act_shift=0.0)
    assert all(torch.equal(a, b) for a, b in zip(signed, again))
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="act_shift"):
            ref.quantize_act(x, lam, down, act_shift=bad)


# ---- broken variants ---------------------------------------------------------------------------------------


def _swapped_nibbles(x, lam, delta):
    qact, s, _ = ref.quantize_act(x, lam, torch.zeros(x.shape[1], 0), act_shift=delta)
    b = qact.view(torch.uint8)
    return ((b >> 4) | ((b & 0xF) << 4)).view(torch.int8), s


def _signed_codes_with_max_over_15(x, lam, delta):
    kp = ref.padded_k(x.shape[1])
    xh = torch.nn.functional.pad((x.float() + delta) / lam.float(), (0, kp - x.shape[1]))
    g = xh.view(x.shape[0], -1, 64)
    s = g.abs().amax(-1, keepdim=True) / 15
    q = torch.round(g / s).clamp(-8, 7).view(x.shape[0], kp)  # signed range: codes above 7 saturate
    return ref.pack_int4(q), s.squeeze(-1)


@pytest.mark.parametrize("broken", [_swapped_nibbles, _signed_codes_with_max_over_15])
def test_broken_quantizers_are_told_apart(broken):
    x, lam = _inputs(3, 4, 128, torch.float32)
    qact, ascales = broken(x, lam, DELTA)
    assert not same_as_spec(qact, ascales, x, lam, DELTA)


def _layer(seed=0, k=512, n=256, rank=32, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) / k**0.5)
        lin.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return lin


def _gelu_inputs(seed=1, m=256, k=512, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.gelu(torch.randn(m, k, generator=g) * 2, approximate="tanh").to(dtype)


def _err(layer, x, lin) -> float:
    """Output error against the 16-bit layer (weight + activation quantization)."""
    with torch.no_grad(), svdq.ops.use_backend("reference"):
        y = layer(x).double()
        want = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
    return float((y - want).norm() / want.norm())


def _act_err(layer, x, lin) -> float:
    """Output error against the same 4-bit weights with exact activations: what the activation quantizer (and a
    wrong bias) adds, the part §10 changes."""
    with torch.no_grad(), svdq.ops.use_backend("reference"):
        y = layer(x).double()
    w = ref.unpack_int4(layer.qweight).double()[:, : layer.in_features]
    w = w * layer.wscales.double().repeat_interleave(64, 1)[:, : layer.in_features]
    xd = x.double()
    want = (xd / layer.smooth.double()) @ w.T + (xd @ layer.lora_down.double()) @ layer.lora_up.double().T
    want = want + lin.bias.detach().double()
    return float((y - want).norm() / want.norm())


def test_reference_gemm_reads_unsigned_codes_and_equals_a_dense_product():
    lin = _layer(k=192, n=96, rank=16)
    layer = SVDQLinear.from_linear(lin, rank=16, act_shift=DELTA)
    x = _gelu_inputs(m=9, k=192)
    qact, ascales, la = ref.quantize_act(x, layer.smooth, layer.lora_down, act_shift=DELTA)
    y = ref.w4a4_gemm(qact, ascales, layer.qweight, layer.wscales, la, layer.lora_up, layer.bias, torch.float32,
                      act_unsigned=True)
    u = ref.unpack_uint4(qact).double() * ascales.double().repeat_interleave(64, 1)
    w = ref.unpack_int4(layer.qweight).double() * layer.wscales.double().repeat_interleave(64, 1)
    dense = u @ w.T + la.double() @ layer.lora_up.double().T + layer.bias.double()
    assert float((y.double() - dense).norm() / dense.norm()) < 1e-6
    # the same codes read as signed (the GEMM's flag forgotten) are far off
    wrong = ref.w4a4_gemm(qact, ascales, layer.qweight, layer.wscales, la, layer.lora_up, layer.bias, torch.float32)
    assert float((wrong.double() - dense).norm() / dense.norm()) > 0.1


def test_shifted_beats_signed_on_gelu_inputs_and_the_bias_fold_is_needed():
    errs = []
    for seed in range(2):
        lin = _layer(seed, k=256, n=128)
        x = _gelu_inputs(seed + 10, m=128, k=256)
        signed_layer = SVDQLinear.from_linear(lin, rank=16)
        shifted_layer = SVDQLinear.from_linear(lin, rank=16, act_shift=DELTA)
        signed, shifted = _err(signed_layer, x, lin), _err(shifted_layer, x, lin)
        signed_act, shifted_act = _act_err(signed_layer, x, lin), _act_err(shifted_layer, x, lin)
        errs.append((round(signed, 4), round(shifted, 4), round(signed_act, 4), round(shifted_act, 4)))
        assert shifted < signed, (seed, signed, shifted)
        assert shifted_act < 0.75 * signed_act, (seed, signed_act, shifted_act)
        # broken: the shift not cancelled (the 16-bit layer's bias stored as is)
        with torch.no_grad():
            shifted_layer.bias.copy_(lin.bias)
        broken = _act_err(shifted_layer, x, lin)
        assert broken > max(1.5 * shifted_act, signed_act)
    print("rel. error vs 16-bit / vs exact activations, signed and shifted (fp32, rank 16, 256->128, GELU):", errs)


def test_shift_bias_is_the_fp64_formula():
    lin = _layer(k=100, n=40, rank=16)
    layer = SVDQLinear.from_linear(lin, rank=16, act_shift=DELTA)
    q = ref.unpack_int4(layer.qweight).double()[:, :100]
    s = layer.wscales.double().repeat_interleave(64, 1)[:, :100]
    want = (lin.bias.double() - DELTA * (q * s / layer.smooth.double()).sum(1)).float()
    assert torch.equal(layer.bias, want)


# ---- the torch-free CPU kernels through a host harness ----------------------------------------------------------

_ISA_FLAGS = {"base": ["-march=x86-64-v2"], "avx2": ["-march=x86-64-v3"],
              "avx512": ["-march=x86-64-v4", "-mavx512vnni"]}
_ISA_CPU = {"base": set(), "avx2": {"avx2", "fma", "f16c", "bmi2"},
            "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}}


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _runnable_isas() -> list[str]:
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    flags = _cpu_flags()
    return [isa for isa, need in _ISA_CPU.items() if need <= flags]


@pytest.fixture(scope="module", params=_runnable_isas() or [pytest.param("none", marks=pytest.mark.skip("x86-64 only"))])
def harness(request, tmp_path_factory) -> Path:
    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    isa = request.param
    exe = tmp_path_factory.mktemp(f"kh_{isa}") / "kernels_host"
    subprocess.run(
        ["g++", "-std=c++17", "-O2", "-Wall", "-Werror", "-Wno-maybe-uninitialized", f"-I{ROOT / 'csrc'}",
         f"-DSVDQ_ISA={isa}", f"-DSVDQ_ISA_{isa}=1", f"-DHARNESS_NS={isa}", *_ISA_FLAGS[isa],
         str(ROOT / "csrc/cpu/tests/kernels_host.cpp"), str(ROOT / "csrc/cpu/kernels_isa.cpp"), "-o", str(exe)],
        check=True, capture_output=True, text=True,
    )
    return exe


def _run_kernels(exe: Path, tmp: Path, x, smooth, down, up, wscales, bias, qweight, shift: float, unsigned: bool):
    m, k = x.shape
    n, r = up.shape
    kp = ref.padded_k(k)
    g = kp // 64
    f32 = lambda t: t.to(torch.float32).contiguous().numpy().astype("<f4").tobytes()  # noqa: E731
    blob = struct.pack("<qqqqfi", m, k, n, r, shift, int(unsigned))
    blob += f32(x) + f32(smooth) + f32(down) + f32(up) + f32(wscales) + f32(bias) + qweight.contiguous().numpy().tobytes()
    src, dst = tmp / "in.bin", tmp / "out.bin"
    src.write_bytes(blob)
    subprocess.run([str(exe), str(src), str(dst)], check=True)
    raw = dst.read_bytes()
    sizes = [m * kp // 2, 4 * m * g, 4 * m * r, 4 * m * n]
    assert len(raw) == sum(sizes)
    out, o = [], 0
    for size in sizes:
        out.append(bytearray(raw[o : o + size]))
        o += size
    qact = torch.frombuffer(out[0], dtype=torch.int8).reshape(m, kp // 2) if m else torch.zeros(0, kp // 2, dtype=torch.int8)
    ascales = torch.frombuffer(out[1], dtype=torch.float32).reshape(m, g) if m else torch.zeros(0, g)
    lora_act = torch.frombuffer(out[2], dtype=torch.float32).reshape(m, r) if m * r else torch.zeros(m, r)
    y = torch.frombuffer(out[3], dtype=torch.float32).reshape(m, n) if m * n else torch.zeros(m, n)
    return qact, ascales, lora_act, y


@pytest.mark.parametrize("shift", [0.0, DELTA])
@pytest.mark.parametrize("m,k,n,r", [(7, 192, 40, 16), (13, 100, 70, 20), (4, 64, 32, 0)])
def test_cpu_kernels_match_the_reference(harness, tmp_path, shift, m, k, n, r):
    lin = _layer(seed=m, k=k, n=n)
    layer = SVDQLinear.from_linear(lin, rank=max(r, 1), act_shift=shift) if r else SVDQLinear.from_linear(lin, rank=0, act_shift=shift)
    down, up = layer.lora_down[:, :r], layer.lora_up[:, :r]
    x, _ = _inputs(m + 100, m, k, torch.float32)
    x[5 % m, :3] = -4.0  # strongly negative: signed groups use it, shifted ones clamp it
    qact, ascales, la, y = _run_kernels(harness, tmp_path, x, layer.smooth, down, up, layer.wscales, layer.bias,
                                        layer.qweight, shift, shift != 0.0)
    rq, rs, rla = ref.quantize_act(x, layer.smooth, down, act_shift=shift)
    assert torch.equal(qact, rq)
    assert torch.equal(ascales.view(torch.int32), rs.view(torch.int32))  # NaN scales included, bit for bit
    if r:  # rows with NaN / Inf inputs carry NaN here in both
        ok = torch.isfinite(rla).all(1)
        assert torch.equal(torch.isfinite(la), torch.isfinite(rla))
        assert torch.allclose(la[ok], rla[ok], rtol=1e-5, atol=1e-5 * float(rla[ok].abs().max()))
    ry = ref.w4a4_gemm(rq, rs, layer.qweight, layer.wscales, rla, up, layer.bias, torch.float32,
                       act_unsigned=shift != 0.0)
    finite = torch.isfinite(ry).all(1)
    assert torch.equal(torch.isfinite(y), torch.isfinite(ry))  # NaN rows stay NaN
    yf, ryf = y[finite].double(), ry[finite].double()
    assert float((yf - ryf).norm() / ryf.norm()) <= 1e-5  # spec §4.3 allows 1e-3 (fp32 sum order)
    if shift:
        # the GEMM told the codes are signed (GemmParams.act_unsigned forgotten): far off
        *_, wrong = _run_kernels(harness, tmp_path, x, layer.smooth, down, up, layer.wscales, layer.bias,
                                 layer.qweight, shift, False)
        assert float((wrong[finite].double() - ryf).norm() / ryf.norm()) > 0.05


# ---- SVDQLinear, checkpoints ------------------------------------------------------------------------------------


def test_svdq_linear_shift_survives_state_dict_and_checkpoints(tmp_path):
    lin = _layer(k=128, n=64)
    model = torch.nn.Sequential(SVDQLinear.from_linear(lin, rank=16, act_shift=DELTA), torch.nn.GELU(),
                                SVDQLinear.from_linear(_layer(2, k=64, n=32), rank=16))
    assert "act_shift=0.171875" in repr(model[0])
    sd = model.state_dict()
    assert float(sd["0.act_shift"]) == DELTA and "2.act_shift" not in sd
    fresh = SVDQLinear(128, 64, 16, True, torch.float32)
    fresh.load_state_dict({k[2:]: v for k, v in sd.items() if k.startswith("0.")})
    assert fresh.act_shift == DELTA
    # a state dict without the key loads as a signed layer
    fresh.load_state_dict({k[2:]: v for k, v in sd.items() if k.startswith("0.") and not k.endswith("act_shift")})
    assert fresh.act_shift == 0.0
    # a signed layer's strict load refuses nothing extra and a malformed shift is an error naming the key
    bad = {k[2:]: v for k, v in sd.items() if k.startswith("0.")}
    bad["act_shift"] = torch.tensor([-1.0])
    with pytest.raises(RuntimeError, match="act_shift"):
        fresh.load_state_dict(bad)

    x = _gelu_inputs(m=8, k=128)
    with svdq.ops.use_backend("reference"):
        want = model(x)
    path = svdq.save(model, tmp_path / "m.safetensors")
    skeleton = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    loaded = svdq.load(skeleton, path)
    assert loaded[0].act_shift == DELTA and loaded[2].act_shift == 0.0
    with svdq.ops.use_backend("reference"):
        assert torch.equal(loaded(x), want)
    # the default backend: its own §10 kernels (the CPU op) or, without them, the reference ops (bit-exact)
    ref_y = svdq.ops.svdq_linear(
        x, model[0].qweight, model[0].wscales, model[0].smooth, model[0].lora_down, model[0].lora_up, model[0].bias,
        model[0].lora_scales, backend="reference", act_shift=DELTA)
    if svdq.ops.select_backend(x.device).shifted_act:
        assert float((model[0](x) - ref_y).norm() / ref_y.norm()) < 1e-5
    else:
        assert torch.equal(model[0](x), ref_y)
    with pytest.raises(ValueError, match=r"W4A4 \(act_format='int4'\) only, not 'fp8'"):
        with svdq.ops.use_act_format("fp8"):
            model[0](x)


# ---- Nunchaku-layout files: shifted mlp_fc2 layers load into shifted SVDQLinears ---------------------------------


def _as_shifted(layer: SVDQLinear, delta: float) -> SVDQLinear:
    """The same 4-bit layer run on shifted activations: same codes, scales, smoothing and branch; bias b' (§10.3)."""
    t = {k: v.clone() for k, v in layer.state_dict().items()}
    t["bias"] = ref.shift_bias(t.get("bias"), t["qweight"], t["wscales"], t["smooth"], delta)
    t["act_shift"] = torch.tensor([delta])
    new = SVDQLinear(layer.in_features, layer.out_features, layer.rank, True, layer.dtype, act_shift=delta)
    new.load_state_dict(t)
    return new


def test_a_shifted_layer_round_trips_through_the_nunchaku_layout():
    from svdq.formats import nunchaku as nk

    layer = _as_shifted(SVDQLinear.from_linear(_layer(4, k=256, n=128).to(torch.bfloat16), rank=16), nk.SHIFT_GELU)
    t = {k: v for k, v in layer.state_dict().items() if k != "act_shift"}
    loaded = nk.svdq_layer(nk.layer_to_nunchaku(t, 256, 128), 256, 128, nk.act_shift_of("shifted"), where="f: fc2")
    assert loaded.act_shift == nk.SHIFT_GELU
    for k, v in layer.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = _gelu_inputs(m=16, k=256, dtype=torch.bfloat16)
    with svdq.ops.use_backend("reference"):
        assert torch.equal(loaded(x), layer(x))
    no_bias = {k: v for k, v in nk.layer_to_nunchaku(t, 256, 128).items() if k != "bias"}
    with pytest.raises(svdq.checkpoint.CheckpointError, match="f: fc2: a shifted .* without 'bias'"):
        nk.svdq_layer(no_bias, 256, 128, nk.SHIFT_GELU, where="f: fc2")


@pytest.fixture(scope="module")
def shifted_flux():
    """A tiny FLUX.1 (1 double + 1 single block, hidden 128, bf16) quantized data-free with 4-bit AdaNorm, its
    double-block fc2 layers made shifted (same codes; §10.3 bias)."""
    from svdq.quantize import _set_submodule, quantized_layers
    from svdq.testing.tiny import tiny_flux_transformer
    from svdq.formats import nunchaku as nk

    model = tiny_flux_transformer(0, dtype=torch.bfloat16, num_layers=1, num_single_layers=1)  # hidden 128
    svdq.models.prepare(model)
    svdq.quantize(model, rank=16, progress=False, rounding="nearest", weight_only=svdq.models.FAMILIES["flux"].adaln)
    layers = quantized_layers(model)
    for name in ("transformer_blocks.0.ff.net.2", "transformer_blocks.0.ff_context.net.2"):
        _set_submodule(model, name, _as_shifted(layers[name], nk.SHIFT_GELU))
    return model


def test_flux_file_with_shifted_fc2_layers_loads_layers_equal_to_the_svdq_model(shifted_flux, tmp_path):
    """A tiny FLUX.1 svdq model whose double-block fc2 layers are shifted (spec §10), exported to Nunchaku's layout:
    the export keeps their bias (no second fold), and every double-block W4A4 layer of the file — shifted fc2 ones
    with Nunchaku's act_shift — loads into an SVDQLinear equal to the model's, bit for bit, outputs included."""
    import copy

    from safetensors.torch import load_file

    from svdq.formats import nunchaku as nk
    from svdq.quantize import _set_submodule, quantized_layers

    model = copy.deepcopy(shifted_flux)
    layers = quantized_layers(model)
    f = load_file(str(nk.export_flux(model, tmp_path / "svdq-int4_r16-tiny.safetensors")))
    # the header check no longer stops at the shifted fc2 layers (it may still name kinds svdq cannot run yet)
    try:
        listed = nk.check_layers(tmp_path / "svdq-int4_r16-tiny.safetensors")
    except svdq.checkpoint.CheckpointError as e:
        assert "mlp_fc2" not in str(e)
    else:
        assert ("transformer_blocks.0.mlp_fc2", "shifted", "transformer_blocks.0.ff.net.2") in listed
    for theirs, (kind, _) in nk.FLUX_DOUBLE_LAYERS.items():
        if kind == "awq":
            continue
        ours = next(o for o, t in nk._EXPORT_DOUBLE.items() if t == theirs)
        mine = layers[f"transformer_blocks.0.{ours}"]
        prefix = f"transformer_blocks.0.{theirs}."
        tensors = {k[len(prefix):]: v for k, v in f.items() if k.startswith(prefix)}
        loaded = nk.svdq_layer(tensors, mine.in_features, mine.out_features, nk.act_shift_of(kind), where=theirs)
        assert loaded.act_shift == mine.act_shift == (nk.SHIFT_GELU if kind == "shifted" else 0.0), theirs
        want = mine.state_dict()
        got = loaded.state_dict()
        assert got.keys() == want.keys(), theirs
        for k in want:
            assert torch.equal(got[k], want[k]), (theirs, k)
        x = _gelu_inputs(m=8, k=mine.in_features, dtype=torch.bfloat16)
        with svdq.ops.use_backend("reference"):
            assert torch.equal(loaded(x), mine(x)), theirs
    # a shifted layer the runtime would not shift (not an fc2), or by another δ, is refused by the export
    _set_submodule(model, "transformer_blocks.0.attn.to_out.0",
                   _as_shifted(layers["transformer_blocks.0.attn.to_out.0"], nk.SHIFT_GELU))
    with pytest.raises(ValueError, match=r"attn\.to_out\.0.*shifts only the double blocks' mlp_fc2"):
        nk.export_flux(model, tmp_path / "bad.safetensors")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_shifted_layer_on_cuda_falls_back_to_the_reference_ops():
    """No CUDA kernel for spec §10 yet: a shifted layer on the GPU (weights held in the CUDA layout) runs the
    reference ops on canonical weights and equals the CPU reference (codes bit for bit, outputs to §4.3)."""
    lin = _layer(5, k=256, n=128).to(torch.bfloat16)
    layer = SVDQLinear.from_linear(lin, rank=16, act_shift=DELTA)
    x = _gelu_inputs(m=33, k=256, dtype=torch.bfloat16)
    with svdq.ops.use_backend("reference"):
        want = layer(x).float()
    gpu = layer.to("cuda")
    got = gpu(x.cuda()).float().cpu()
    assert float((got - want).norm() / want.norm()) < 1e-3
    q_cpu = ref.quantize_act(x, layer.smooth.cpu(), layer.lora_down.cpu(), act_shift=DELTA)
    q_gpu = ref.quantize_act(x.cuda(), gpu.smooth, gpu.lora_down, act_shift=DELTA)
    assert torch.equal(q_gpu[0].cpu(), q_cpu[0]) and torch.equal(q_gpu[1].cpu(), q_cpu[1])


def test_a_backend_without_shifted_kernels_warns_once_and_runs_the_reference(caplog, monkeypatch):
    """A backend without §10 kernels (CUDA today) runs shifted layers through the reference ops, exactly, and says
    so once per process (a Nunchaku FLUX.1 on a GPU is otherwise slow for no visible reason)."""
    import logging

    from svdq import linear as linear_mod

    lin = _layer(5, k=256, n=128).to(torch.bfloat16)
    layer = SVDQLinear.from_linear(lin, rank=16, act_shift=DELTA)
    x = _gelu_inputs(m=9, k=256, dtype=torch.bfloat16)
    with svdq.ops.use_backend("reference"):
        want = layer(x)
    monkeypatch.setitem(svdq.ops._BACKENDS, "no-shift", svdq.ops.Backend(
        name="no-shift", devices=("cpu",), priority=-1, quantize_act=ref.quantize_act, w4a4_gemm=ref.w4a4_gemm))
    monkeypatch.setattr(linear_mod, "_FALLBACK_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="svdq"), svdq.ops.use_backend("no-shift"):
        assert torch.equal(layer(x), want) and torch.equal(layer(x), want)
    warned = [r for r in caplog.records if "no kernel for shifted unsigned activations" in r.getMessage()]
    assert len(warned) == 1 and "'no-shift'" in warned[0].getMessage()


# ---- the quantizer's per-layer choice ---------------------------------------------------------------------------


def test_quantizer_shifts_the_layer_after_gelu_where_it_measures_lower():
    from svdq.quantize import QuantizeConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(256, 64))
    x = torch.randn(64, 128) * 2
    with torch.no_grad():
        y16 = model(x)
    config = QuantizeConfig(rank=16, rounding="nearest", act_shift=DELTA, exclude=(), alphas=(0.0, 0.5))
    svdq.quantize(model, calibration=lambda m: m(x), config=config, progress=False)
    report = model.svdq_report
    assert report["0"]["act_shift"] == 0.0 and "rel_error_shifted" not in report["0"]  # inputs below −δ
    after_gelu = report["2"]
    assert after_gelu["rel_error_shifted"] < after_gelu["rel_error_signed"]  # measured on the sample, both ways
    assert after_gelu["act_shift"] == DELTA and model[2].act_shift == DELTA and model[0].act_shift == 0.0
    assert model.svdq_config.act_shift == DELTA
    assert QuantizeConfig.from_dict(model.svdq_config.to_dict()).act_shift == DELTA
    # configs written before the field load as 0 (off); the default is off
    old = model.svdq_config.to_dict()
    old.pop("act_shift")
    assert QuantizeConfig.from_dict(old).act_shift == 0.0 and QuantizeConfig().act_shift == 0.0
    with torch.no_grad():  # the model runs (the shifted layer through the reference ops on a CPU build)
        assert torch.isfinite(model(x)).all() and model(x).shape == y16.shape
    with pytest.raises(ValueError, match="act_shift"):
        QuantizeConfig(act_shift=-1.0)


def test_diffusers_save_and_from_pretrained_keep_shifted_layers(shifted_flux, tmp_path):
    """diffusers' save_pretrained / from_pretrained (svdq's registered quantizer) carry the shift: the layer is
    rebuilt shifted from the metadata and the stored value is checked against it."""
    from diffusers import FluxTransformer2DModel

    from svdq.quantize import quantized_layers

    model = shifted_flux
    name = "transformer_blocks.0.ff.net.2"
    model.save_pretrained(tmp_path / "m")
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path / "m")
    a, b = quantized_layers(model)[name], quantized_layers(loaded)[name]
    assert b.act_shift == DELTA and quantized_layers(loaded)["transformer_blocks.0.attn.to_out.0"].act_shift == 0.0
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k
    # svdq.from_pretrained reads the same directory
    assert quantized_layers(svdq.from_pretrained(tmp_path / "m"))[name].act_shift == DELTA


@pytest.mark.skipif("cpu" not in svdq.ops.available_backends(), reason="needs the native CPU backend (svdq._C)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_cpu_ops_run_shifted_layers_like_the_reference(dtype):
    """The CPU op (csrc/cpu/ops_cpu.cpp → kernels_isa.cpp), for every ISA level this CPU runs: codes and scales
    bit for bit, outputs within spec §4.3; the layer runs on it (no reference fallback)."""
    from svdq import _native

    be = svdq.ops.registered_backend("cpu")
    if not be.shifted_act:
        pytest.skip("this build's cpu backend has no shifted-activation ops")
    lin = _layer(6, k=200, n=72).to(dtype)
    layer = SVDQLinear.from_linear(lin, rank=16, act_shift=DELTA)
    x, _ = _inputs(7, 11, 200, dtype)
    want_q = ref.quantize_act(x, layer.smooth, layer.lora_down, act_shift=DELTA)
    want_y = ref.w4a4_gemm(*want_q[:2], layer.qweight, layer.wscales, want_q[2], layer.lora_up, layer.bias,
                           torch.float32, act_unsigned=True)
    ok = torch.isfinite(want_y).all(1)
    for isa in _native.build_info()["cpu_isas_supported"]:
        prev = _native.set_cpu_isa(isa)
        try:
            q = be.quantize_act(x, layer.smooth, layer.lora_down, None, act_shift=DELTA)
            assert torch.equal(q[0], want_q[0]) and torch.equal(q[1].view(torch.int32), want_q[1].view(torch.int32)), isa
            y = be.w4a4_gemm(*q[:2], layer.qweight, layer.wscales, q[2], layer.lora_up, layer.bias, torch.float32,
                             act_unsigned=True)
            assert float((y[ok] - want_y[ok]).norm() / want_y[ok].norm()) < 1e-5, isa
            assert torch.equal(torch.isfinite(y), torch.isfinite(want_y)), isa
        finally:
            _native.set_cpu_isa(prev)
