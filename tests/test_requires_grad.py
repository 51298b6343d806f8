"""`model.requires_grad_(True)` on a quantized model (issue 12 regression).

The 4-bit tensors are ``nn.Parameter``s so that offload hooks move them, and integer Parameters cannot require
grad: torch raised on ``requires_grad_(True)``, which diffusers / PEFT training code and users call on whole
models. They are `svdq.linear.FrozenParameter`s now: the call keeps the codes and their scales (``qweight``,
``wscales``, W4A16 ``wzeros``) frozen — no gradient exists for them — and makes every floating parameter
trainable exactly as torch would (smoothing, low-rank branch, biases, the 16-bit layers), with gradients.
"""

import copy
import pickle

import pytest
import torch

import svdq
from svdq.linear import FrozenParameter, SVDQLinear
from svdq.models import FAMILIES, prepare
from svdq.testing import tiny
from svdq.weight_only import SVDQWeightOnlyLinear

FROZEN = {"qweight", "wscales", "wzeros"}


def quantized_flux():
    """Tiny FLUX.1, W4A4 blocks and W4A16 AdaLN (both layer kinds), data-free."""
    model = tiny.tiny_flux_transformer(0)
    prepare(model)
    svdq.quantize(model, weight_only=FAMILIES["flux"].adaln, progress=False)
    return model


@pytest.fixture(scope="module")
def model():
    return quantized_flux()


def frozen_names(model) -> set[str]:
    """Full names of the parameters that must never require grad: the 4-bit layers' codes and scales."""
    return {f"{layer}.{leaf}" for layer, m in model.named_modules()
            if isinstance(m, (SVDQLinear, SVDQWeightOnlyLinear))
            for leaf, _ in m.named_parameters(recurse=False) if leaf in FROZEN}


def check_requires_grad(model) -> None:
    frozen = frozen_names(model)
    assert frozen
    model.requires_grad_(True)  # raised "only Tensors of floating point dtype can require gradients"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    everything = {n for n, _ in model.named_parameters()}
    assert trainable == everything - frozen  # every floating parameter as torch would, not one more or fewer
    assert all(type(dict(model.named_parameters())[n]) is FrozenParameter for n in frozen)
    model.requires_grad_(False)
    assert not any(p.requires_grad for p in model.parameters())


def test_requires_grad_true_keeps_codes_frozen_and_trains_the_rest(model):
    layers = [m for m in model.modules() if isinstance(m, SVDQLinear)]
    w4a16 = [m for m in model.modules() if isinstance(m, SVDQWeightOnlyLinear)]
    assert layers and w4a16
    x = tiny.tiny_model_inputs("flux")
    with torch.no_grad():
        reference = model(**x)[0]
    check_requires_grad(model)

    model.requires_grad_(True)
    try:
        out = model(**x)[0]
        assert torch.equal(out.detach(), reference)  # the graph-recording forward computes the same values
        out.square().mean().backward()
        for m in layers + w4a16:
            for name, p in m.named_parameters(recurse=False):
                if name in FROZEN:
                    assert p.grad is None
                else:
                    assert p.grad is not None and torch.isfinite(p.grad).all(), name
        # the low-rank branch and biases of the W4A4 layers actually learn something (non-zero gradients)
        assert sum(float(m.lora_up.grad.abs().sum()) for m in layers) > 0
        assert sum(float(m.bias.grad.abs().sum()) for m in w4a16) > 0
    finally:
        model.requires_grad_(False)
        model.zero_grad(set_to_none=True)


def test_frozen_tensors_survive_copies_moves_and_loads(model, tmp_path):
    """Every way a model gets its Parameters anew keeps the codes `FrozenParameter`s."""
    check_requires_grad(copy.deepcopy(model))
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    check_requires_grad(bf16)
    assigned = copy.deepcopy(model)
    assigned.load_state_dict(model.state_dict(), assign=True)  # torch puts plain Parameters in
    check_requires_grad(assigned)
    svdq.save_pretrained(model, tmp_path / "q")
    check_requires_grad(svdq.from_pretrained(tmp_path / "q"))


def test_frozen_tensors_survive_swap_on_conversion(model):
    """``torch.__future__.set_swap_module_params_on_conversion(True)`` makes ``.to()`` swap in plain
    Parameters; the layers put the class back on the same objects."""
    m = copy.deepcopy(model)
    layer = next(x for x in m.modules() if isinstance(x, SVDQLinear))
    before = layer.qweight
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        m.to(torch.bfloat16)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    assert layer.qweight is before  # same object (hooks keyed on it still find it)
    check_requires_grad(m)


def test_w4a16_zero_point_layer():
    """A zero-point W4A16 layer (``wzeros`` uint8) alone: frozen codes, scales and zeros; a trainable bias."""
    layer = SVDQWeightOnlyLinear.from_linear(torch.nn.Linear(64, 32), zero_point=True)
    layer.requires_grad_(True)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"bias"}
    layer(torch.randn(2, 64)).sum().backward()
    assert layer.bias.grad is not None and layer.qweight.grad is None
    layer.load_state_dict(layer.state_dict(), assign=True)
    assert type(layer.wzeros) is FrozenParameter
    layer.requires_grad_(True)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"bias"}


def test_pickled_layer_keeps_frozen_codes():
    """Pickling (multiprocessing sends layers this way) keeps the class and the values."""
    layer = SVDQLinear.from_linear(torch.nn.Linear(64, 32), rank=16)
    copied = pickle.loads(pickle.dumps(layer))
    assert type(copied.qweight) is FrozenParameter and torch.equal(copied.qweight, layer.qweight)
    copied.requires_grad_(True)
    assert {n for n, p in copied.named_parameters() if p.requires_grad} == {"smooth", "lora_down", "lora_up", "bias"}


def test_explicit_request_still_refused():
    """Asking one code tensor itself for a gradient cannot be met: torch's error for integers, and a float
    scale tensor set by hand makes the forward say what to do instead."""
    layer = SVDQLinear.from_linear(torch.nn.Linear(64, 32), rank=16)
    with pytest.raises(RuntimeError, match="floating point"):
        layer.qweight.requires_grad = True
    layer.wscales.requires_grad = True
    with pytest.raises(RuntimeError, match="wscales cannot have a gradient"):
        layer(torch.randn(2, 64, requires_grad=True))


def test_peft_modules_to_save_on_a_quantized_layer(model):
    """PEFT's ``modules_to_save`` copies a module and calls ``requires_grad_(True)`` on it (raised on a
    quantized layer): now the copy's low-rank branch, smoothing and bias train, its codes stay frozen."""
    pytest.importorskip("peft")
    from peft import LoraConfig

    m = copy.deepcopy(model)
    target = "transformer_blocks.0.attn.to_out.0"
    m.add_adapter(LoraConfig(r=4, target_modules=["x_embedder"], modules_to_save=[target]))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    saved = f"{target}.modules_to_save.default"
    assert {f"{saved}.{leaf}" for leaf in ("smooth", "lora_down", "lora_up", "bias")} <= trainable
    assert not any(n.startswith(saved) and n.rpartition(".")[2] in FROZEN for n in trainable)
    assert {"x_embedder.lora_A.default.weight", "x_embedder.lora_B.default.weight"} <= trainable
