"""torch.compile traces through quantized layers and fused projections (fakes beside the op wrappers)."""

from collections import Counter

import pytest
import torch
from torch import nn
from torch.profiler import profile

import svdq
from svdq.models import fuse_linears, prepare
from svdq.testing.tiny import tiny_flux_transformer


class QKV(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(128, 64), nn.Linear(128, 64), nn.Linear(128, 64)

    def forward(self, x):
        return self.to_q(x) * self.to_k(x) + self.to_v(x)


def op_calls(fn, *args) -> Counter:
    with profile() as prof:
        fn(*args)
    return Counter(e.name for e in prof.events() if e.name.startswith("svdq::"))


def test_compiled_fused_projection_runs_the_fused_layer_once():
    if "cpu" not in svdq.ops.available_backends():
        pytest.fail("the native CPU backend is not built (svdq._C)")
    torch.manual_seed(0)
    model = QKV()
    fuse_linears(model, "to_qkv", {"q": (model, "to_q"), "k": (model, "to_k"), "v": (model, "to_v")})
    svdq.quantize(model, progress=False)
    x = torch.randn(2, 10, 128)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break is an error
    assert torch.equal(compiled(x), eager)
    calls = op_calls(compiled, x)
    assert calls["svdq::quantize_act"] == 1 and calls["svdq::w4a4_gemm"] == 1, calls
    assert op_calls(model, x)["svdq::w4a4_gemm"] == 1  # eager: the cache serves q, k and v from one GEMM


def test_quantized_flux_adds_no_graph_breaks():
    import torch._dynamo

    torch.manual_seed(0)
    tokens, text = 16, 8
    inputs = dict(
        hidden_states=torch.randn(1, tokens, 16),
        encoder_hidden_states=torch.randn(1, text, 64),
        pooled_projections=torch.randn(1, 32),
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(tokens, 3),
        txt_ids=torch.zeros(text, 3),
        return_dict=False,
    )
    full = tiny_flux_transformer(0)
    quant = tiny_flux_transformer(0)
    prepare(quant)
    svdq.quantize(quant, progress=False)
    torch._dynamo.reset()
    base = torch._dynamo.explain(full)(**inputs)
    torch._dynamo.reset()
    ours = torch._dynamo.explain(quant)(**inputs)
    assert ours.graph_break_count == base.graph_break_count, ours.break_reasons[:3]
    assert ours.graph_count == base.graph_count
