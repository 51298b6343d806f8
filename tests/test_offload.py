"""Offloading moves svdq's 4-bit tensors and never repacks them per step (issue 12 item 2), on the CPU.

The GPU modes (enable_model_cpu_offload / enable_sequential_cpu_offload / enable_group_offload with streams)
need an accelerator; here the same hooks run with the CPU as execution device, and a backend with a prepared
(non-canonical) layout stands in for CUDA's (tests/test_memory.py): hooks must carry the tensors (they end up
off the layer between calls), outputs stay bit-exact step after step, and `LAYOUT_STATS` counts conversions.
The GPU figures (peak memory, step time, no leak over 20 steps) are benchmarks/device_check.d/30-memory.sh.
"""

import copy
import glob

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from svdq import ops
from svdq.linear import LAYOUT_STATS, SVDQLinear, prepare_layout
from svdq.ops import reference, sm90_layout

from test_memory import TEST_LAYOUT, layer, test_layout  # noqa: F401  (fixture)

accelerate = pytest.importorskip("accelerate")


class Blocks(nn.Module):
    """Two blocks of two quantized layers: what diffusers' block-level group offloading walks (a ModuleList)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(layer(96, 200, seed=2 * i), nn.GELU(), layer(200, 96, seed=2 * i + 1)) for i in range(2)
        )

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x


def svdq_params(model) -> dict[str, torch.Tensor]:
    return {f"{n}.{p}": t for n, m in model.named_modules() if isinstance(m, SVDQLinear)
            for p, t in m.named_parameters(recurse=False)}


def x_in():
    return torch.randn(3, 200, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)


def _sm90_test_gemm(qact, ascales, qweight, wscales, lora_act, lora_up, bias, out_dtype):
    q, s = sm90_layout.unprepare(qweight, wscales, torch.float32, lora_up.shape[0])  # N from lora_up, as CUDA's
    return reference.w4a4_gemm(qact, ascales, q, s, lora_act, lora_up, bias, out_dtype)


@pytest.fixture
def sm90_test_layout():
    """A CPU backend with the Hopper layout's conversions ("cuda-sm90": e4m3 bytes, N padded to 128)."""
    ops.register_backend(ops.Backend(
        name="test-sm90", devices=("cpu",), priority=-1, quantize_act=reference.quantize_act,
        w4a4_gemm=_sm90_test_gemm, prepare_weight=sm90_layout.prepare, layout="test-sm90",
        unprepare_weight=sm90_layout.unprepare,
    ))
    try:
        yield "test-sm90"
    finally:
        ops._BACKENDS.pop("test-sm90")


@pytest.fixture(params=["canonical", "prepared", "prepared-sm90"])
def setup(request, test_layout):  # noqa: F811
    """(model, reference output, backend context): the CPU backend on canonical weights, or a test backend
    on weights prepared (on the CPU) before any hook takes its copies: CUDA's group-major layout or Hopper's
    (whose qweight has padded rows: N is not its leading dimension)."""
    model = Blocks()
    if request.param == "prepared-sm90":
        test_layout = request.getfixturevalue("sm90_test_layout")
    if request.param == "canonical":
        ctx = ops.use_backend("cpu") if "cpu" in ops.available_backends() else ops.use_backend("reference")
        with ctx:
            y = model(x_in())
        return model, y, lambda: ops.use_backend("cpu") if "cpu" in ops.available_backends() else \
            ops.use_backend("reference")
    with ops.use_backend(test_layout):
        y = model(x_in())
    prepare_layout(model, test_layout)
    assert all(m.layout == ops.registered_backend(test_layout).layout for m in model.modules()
               if isinstance(m, SVDQLinear))
    return model, y, lambda: ops.use_backend(test_layout)


def steps(model, ctx, n=3):
    outs = []
    with torch.no_grad():
        for _ in range(n):
            with ctx():
                outs.append(model(x_in()))
    return outs


def test_accelerate_sequential_offload_moves_the_4bit_tensors(setup):
    """accelerate's cpu_offload (what enable_sequential_cpu_offload calls, with offload_buffers=False for
    a model without direct parameters): every svdq tensor leaves the layer between calls (on "meta", restored
    from accelerate's state-dict copy at each call). That copy is canonical (state_dict is) and accelerate
    coerces it to the dtype the tensor had when hooked, so layers turn canonical when hooked and a prepared
    layout is rebuilt per call as a transient (counted, never kept); outputs stay bit-exact."""
    from accelerate import cpu_offload

    model, y_ref, ctx = setup
    prepared = next(m for m in model.modules() if isinstance(m, SVDQLinear)).layout != "canonical"
    n_layers = sum(isinstance(m, SVDQLinear) for m in model.modules())
    cpu_offload(model, execution_device=torch.device("cpu"), offload_buffers=False)
    params = svdq_params(model)
    assert params and all(t.device.type == "meta" for t in params.values()), \
        {k: t.device for k, t in params.items() if t.device.type != "meta"}
    before = dict(LAYOUT_STATS)
    for y in steps(model, ctx):
        assert torch.equal(y, y_ref)
    assert all(t.device.type == "meta" for t in svdq_params(model).values())  # gone again after the call
    assert LAYOUT_STATS["convert"] == before["convert"]  # hooks own the tensors: nothing rewritten in them
    assert LAYOUT_STATS["transient"] - before["transient"] == (3 * n_layers if prepared else 0)


def test_accelerate_model_offload_moves_once_and_never_converts(setup):
    """accelerate's cpu_offload_with_hook (enable_model_cpu_offload): the model moves with .to(); a layout
    survives moves, so no step converts."""
    from accelerate import cpu_offload_with_hook

    model, y_ref, ctx = setup
    model, hook = cpu_offload_with_hook(model, execution_device=torch.device("cpu"))
    before = dict(LAYOUT_STATS)
    for y in steps(model, ctx):
        assert torch.equal(y, y_ref)
    hook.offload()
    assert LAYOUT_STATS == before


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_diffusers_group_offload_to_disk_carries_the_4bit_tensors(setup, offload_type, tmp_path):
    """diffusers' apply_group_offloading writing groups to disk (the one mode whose bytes really leave on a
    CPU-only machine): the group files hold every svdq tensor — in the layer's layout, so a prepared layer
    comes back prepared — and no step converts."""
    from diffusers.hooks import apply_group_offloading

    model, y_ref, ctx = setup
    expected = {k: (t.dtype, tuple(t.shape), t.detach().clone()) for k, t in svdq_params(model).items()}
    assert len(expected) == 4 * 6  # qweight, wscales, smooth, lora_down, lora_up, bias of 4 layers
    kwargs = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    apply_group_offloading(model, onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                           offload_type=offload_type, offload_to_disk_path=str(tmp_path), **kwargs)
    before = dict(LAYOUT_STATS)
    for y in steps(model, ctx):
        assert torch.equal(y, y_ref)
    assert LAYOUT_STATS == before
    on_disk = {}
    for f in glob.glob(str(tmp_path / "*.safetensors")):
        on_disk.update({(t.dtype, tuple(t.shape), t.view(torch.uint8).sum().item()): t
                        for t in load_file(f).values()})
    for name, (dtype, shape, value) in expected.items():  # each svdq tensor is in a group file, bit for bit
        hit = on_disk.get((dtype, shape, value.view(torch.uint8).sum().item()))
        assert hit is not None and torch.equal(hit, value), name


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_diffusers_group_offload_in_memory_never_converts(setup, offload_type):
    from diffusers.hooks import apply_group_offloading

    model, y_ref, ctx = setup
    kwargs = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    apply_group_offloading(model, onload_device=torch.device("cpu"), offload_type=offload_type, **kwargs)
    before = dict(LAYOUT_STATS)
    for y in steps(model, ctx):
        assert torch.equal(y, y_ref)
    assert LAYOUT_STATS == before


def test_offloaded_copy_is_one_copy():
    """A deepcopy of a prepared model moved around keeps exactly its bytes (no padded-buffer views to lose)."""
    model = Blocks()
    clone = copy.deepcopy(model)
    for a, b in zip(svdq_params(model).values(), svdq_params(clone).values()):
        assert a.untyped_storage().nbytes() == a.numel() * a.element_size()
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()


def test_accelerate_sequential_offload_weight_only_layer():
    from accelerate import cpu_offload

    from svdq.weight_only import SVDQWeightOnlyLinear

    torch.manual_seed(0)
    model = nn.Sequential(SVDQWeightOnlyLinear.from_linear(nn.Linear(256, 128).to(torch.bfloat16)))
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        y_ref = model(x)  # a call on the CPU may switch the layer to the CPU kernel's layout
        cpu_offload(model, execution_device=torch.device("cpu"))
        assert torch.equal(model(x), y_ref) and torch.equal(model(x), y_ref)
