"""The reference backend against docs/numerics.md, edge case by edge case."""

import pytest
import torch

from svdq.ops import reference as ref


def test_pack_unpack_roundtrip_all_values():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)  # [3, 32]
    packed = ref.pack_int4(q)
    assert packed.shape == (3, 16) and packed.dtype == torch.int8
    assert torch.equal(ref.unpack_int4(packed), q)
    # Low nibble holds the even k: q[0]=-8 (0x8), q[1]=-7 (0x9) -> byte 0x98.
    assert packed.view(torch.uint8)[0, 0].item() == 0x98


def test_activation_rounding_is_half_to_even():
    x = torch.zeros(1, 64)
    x[0, 0] = 7.0  # amax 7 -> s_a = 1 exactly, so x̂ / s_a = x
    x[0, 1:7] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5])
    qact, ascales, _ = ref.quantize_act(x, torch.ones(64), torch.zeros(64, 0))
    q = ref.unpack_int4(qact)[0, :7].tolist()
    assert ascales[0, 0].item() == 1.0
    assert q == [7, 0, 2, 2, 0, -2, -2]


def test_activation_scale_is_fp32_and_smoothing_divides():
    x = torch.full((2, 64), 3.0, dtype=torch.bfloat16)
    smooth = torch.full((64,), 2.0, dtype=torch.bfloat16)
    qact, ascales, _ = ref.quantize_act(x, smooth, torch.zeros(64, 0, dtype=torch.bfloat16))
    assert ascales.dtype == torch.float32
    fp32_scale = torch.tensor(1.5, dtype=torch.float32) / 7
    assert ascales[0, 0] == fp32_scale  # computed in fp32 ...
    assert ascales[0, 0] != fp32_scale.to(torch.bfloat16).float()  # ... and not rounded to the compute dtype
    assert (ref.unpack_int4(qact) == 7).all()


def test_weight_clamps_to_minus_eight_when_the_rounded_scale_is_small():
    # fp16 subnormal: amax/7 = 1.4 * 2^-24 rounds down to 2^-24, so ±amax / s = ±9.8 -> clamp to -8 / 7.
    tiny = 1.4 * 2.0**-24
    r = torch.zeros(1, 64)
    r[0, 0], r[0, 1] = -7 * tiny, 7 * tiny
    qweight, wscales = ref.quantize_weight(r, torch.float16)
    assert wscales.item() == 2.0**-24
    assert ref.unpack_int4(qweight)[0, :2].tolist() == [-8, 7]


def test_zero_group_has_zero_scale_and_codes():
    r = torch.randn(2, 128)
    r[1, 64:] = 0
    qweight, wscales = ref.quantize_weight(r, torch.bfloat16)
    assert wscales[1, 1].item() == 0
    assert (ref.unpack_int4(qweight)[1, 64:] == 0).all()
    assert (wscales[:, 0] > 0).all()


def test_k_padding_stores_zero_codes_and_keeps_math():
    torch.manual_seed(0)
    k, n, m = 100, 24, 5
    w = torch.randn(n, k)
    qweight, wscales = ref.quantize_weight(w, torch.float32)
    assert qweight.shape == (n, 64) and wscales.shape == (n, 2)
    assert (ref.unpack_int4(qweight)[:, k:] == 0).all()
    x = torch.randn(m, k)
    qact, ascales, lora_act = ref.quantize_act(x, torch.ones(k), torch.zeros(k, 0))
    assert qact.shape == (m, 64) and ascales.shape == (m, 2)
    y = ref.w4a4_gemm(qact, ascales, qweight, wscales, lora_act, torch.zeros(n, 0), None, torch.float32)
    # Independent evaluation of spec §4.2 in float64 from the dequantized operands.
    deq_a = (ref.unpack_int4(qact).double().view(m, 2, 64) * ascales.double().unsqueeze(-1)).view(m, 128)
    deq_w = (ref.unpack_int4(qweight).double().view(n, 2, 64) * wscales.double().unsqueeze(-1)).view(n, 128)
    torch.testing.assert_close(y.double(), deq_a @ deq_w.T, rtol=1e-5, atol=1e-5)
    # And it approximates the real product (4-bit error, not a layout bug).
    assert ((y - x @ w.T).norm() / (x @ w.T).norm()) < 0.2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 37])
def test_gemm_dtypes_odd_m_lowrank_and_bias(dtype, m):
    torch.manual_seed(m)
    k, n, r = 192, 40, 16
    x = torch.randn(m, k).to(dtype)
    w = torch.randn(n, k)
    down, up, bias = (torch.randn(k, r) * 0.1).to(dtype), (torch.randn(n, r) * 0.1).to(dtype), torch.randn(n).to(dtype)
    scales = torch.linspace(0.5, 1.5, r)
    qweight, wscales = ref.quantize_weight(w, dtype)
    qact, ascales, lora_act = ref.quantize_act(x, torch.ones(k, dtype=dtype), down, scales)
    y = ref.w4a4_gemm(qact, ascales, qweight, wscales, lora_act, up, bias, dtype)
    assert y.dtype == dtype and y.shape == (m, n)
    torch.testing.assert_close(lora_act, (x.float() @ down.float()) * scales)
    expected_lr = lora_act.to(dtype).double() @ up.double().T  # lora_act rounded to the compute dtype
    deq_a = (ref.unpack_int4(qact).double().view(m, 3, 64) * ascales.double().unsqueeze(-1)).view(m, k)
    deq_w = (ref.unpack_int4(qweight).double().view(n, 3, 64) * wscales.double().unsqueeze(-1)).view(n, k)
    expected = (deq_a @ deq_w.T + expected_lr + bias.double()).to(dtype)
    torch.testing.assert_close(y, expected, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-2)


def test_integer_dot_products_are_exact_at_extremes():
    # Every code at -8: a 64-long dot is 64 * 64 = 4096 per group; 4 groups must give exactly 4 * 4096.
    codes = torch.full((1, 256), -8, dtype=torch.int8)
    packed = ref.pack_int4(codes)
    ones = torch.ones(1, 4)
    y = ref.w4a4_gemm(packed, ones, packed, ones, torch.zeros(1, 0), torch.zeros(1, 0), None, torch.float32)
    assert y.item() == 4 * 4096


def test_empty_m():
    qact, ascales, lora_act = ref.quantize_act(torch.zeros(0, 64), torch.ones(64), torch.zeros(64, 16))
    y = ref.w4a4_gemm(qact, ascales, torch.zeros(8, 32, dtype=torch.int8), torch.ones(8, 1), lora_act,
                      torch.zeros(8, 16), None, torch.float32)
    assert y.shape == (0, 8)
