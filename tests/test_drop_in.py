"""SVDQLinear (and the fused-projection stand-ins) as drop-ins for nn.Linear: what diffusers and user code read
off a Linear, inputs of any stride / leading dims / M = 0, threads, context-local backends, a loud warning when
the native extension does not load.

Each test names the defect it guards against (found on the tiny FLUX model before the fix): non-contiguous
inputs crashed in ``svdq::quantize_act``; ``.weight`` / ``.device`` were missing; ``fuse_qkv_projections``
raised on ``ProjectionSlice``; 4 threads sharing one fused group gave wrong outputs and TypeErrors;
``use_backend`` leaked across asyncio tasks; a failed ``svdq._C`` import was silent.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading

import pytest
import torch
from torch import nn

import svdq
from svdq.testing import tiny
from svdq.linear import SVDQLinear
from svdq.models import ProjectionSlice, fuse_linears


def layer(k=200, n=96, seed=0, dtype=torch.float32) -> tuple[nn.Linear, SVDQLinear]:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) / k**0.5)
        lin.bias.copy_(torch.randn(n, generator=g))
    return lin, SVDQLinear.from_linear(lin, rank=16)


def test_linear_surface():
    lin, q = layer()
    assert (q.in_features, q.out_features) == (lin.in_features, lin.out_features)
    assert q.weight.shape == lin.weight.shape and q.weight.dtype == lin.weight.dtype
    assert q.weight.device == lin.weight.device == q.device
    assert torch.isnan(q.weight).all()  # a stand-in: arithmetic with it is loudly wrong, not silently
    with pytest.raises(RuntimeError):
        q.weight.data.add_(1)  # and it cannot be written
    assert torch.equal(q.bias, lin.bias)
    assert {"qweight", "wscales", "smooth", "lora_down", "lora_up", "bias"} == set(q.state_dict())
    x = torch.randn(3, 200)
    y = q(x)
    q16 = q.to(torch.bfloat16)  # .to(dtype) converts the layer, as nn.Linear's does
    assert q16.weight.dtype == torch.bfloat16 and q16(x.bfloat16()).dtype == torch.bfloat16
    assert q16.lora_scales.dtype == torch.float32
    assert torch.equal(SVDQLinear.from_linear(lin, rank=16)(x), y)


@pytest.mark.parametrize("case", ["transposed", "sliced", "expanded", "leading_none", "leading_3", "feature_map"])
def test_any_stride_and_leading_dims(case):
    lin, q = layer()
    g = torch.Generator().manual_seed(1)
    if case == "transposed":  # (seq, batch, K) viewed as (batch, seq, K), as attention code produces
        x = torch.randn(7, 2, 200, generator=g).transpose(0, 1)
    elif case == "sliced":  # every other channel of a wider tensor: last-dim stride 2
        x = torch.randn(2, 5, 400, generator=g)[..., ::2]
    elif case == "expanded":  # stride 0 along the batch
        x = torch.randn(1, 5, 200, generator=g).expand(3, 5, 200)
    elif case == "leading_none":
        x = torch.randn(200, generator=g)
    elif case == "leading_3":
        x = torch.randn(2, 3, 4, 200, generator=g)
    else:  # an NCHW conv feature map viewed as tokens, as SDXL's transformer blocks do before proj_in
        x = torch.randn(2, 200, 4, 4, generator=g).flatten(2).transpose(1, 2)
    assert case in ("leading_none", "leading_3") or not x.is_contiguous()
    y = q(x)
    assert y.shape == lin(x).shape
    assert torch.equal(y, q(x.contiguous()))  # same values as the dense copy, bit for bit


@pytest.mark.parametrize("shape", [(0, 200), (2, 0, 200), (0, 3, 200)])
def test_zero_rows(shape):
    lin, q = layer()
    x = torch.randn(*shape)
    assert q(x).shape == lin(x).shape


def test_fp32_layer_on_cuda_says_how_to_convert():
    if not torch.cuda.is_available() or "cuda" not in svdq.ops.available_backends():
        pytest.skip("needs a GPU with svdq's CUDA kernels")
    _, q = layer()
    q = q.cuda()
    with pytest.raises(ValueError, match=r"model.to\(torch.bfloat16\)"):
        q(torch.randn(4, 200, device="cuda"))
    q = q.to(torch.bfloat16)  # the conversion the message asks for: once, then it runs
    assert q(torch.randn(4, 200, device="cuda", dtype=torch.bfloat16)).shape == (4, 96)


class QKV(nn.Module):
    def __init__(self, k=128):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.to_q, self.to_k, self.to_v = (nn.Linear(k, 64) for _ in range(3))
        with torch.no_grad():
            for m in (self.to_q, self.to_k, self.to_v):
                m.weight.copy_(torch.randn(64, k, generator=g) / k**0.5)

    def forward(self, x):
        return torch.cat([self.to_q(x), self.to_k(x), self.to_v(x)], dim=-1)


def fused_qkv():
    model = QKV()
    fuse_linears(model, "to_qkv", {"q": (model, "to_q"), "k": (model, "to_k"), "v": (model, "to_v")})
    return svdq.quantize(model, progress=False)


def test_projection_slice_surface():
    model = fused_qkv()
    assert isinstance(model.to_q, ProjectionSlice)
    assert model.to_k.weight.shape == (64, 128) and model.to_k.weight.dtype == torch.float32
    assert torch.equal(model.to_k.bias, model.to_qkv.linear.bias[64:128])


def test_threads_share_a_fused_group_bit_exactly():
    """8 threads × 300 calls on one fused group (the per-input cache) equal the single-thread outputs. A GIL
    switch interval of 1 µs makes threads interleave inside the cache logic (measured: the per-module cache
    this replaced fails this test every run, with wrong outputs and TypeErrors)."""
    model = fused_qkv()
    inputs = [torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    errors, mismatches = [], []
    start = threading.Barrier(8)

    def worker(i):
        try:
            start.wait()
            with torch.no_grad():
                for _ in range(300):
                    if not torch.equal(model(inputs[i]), expected[i]):
                        mismatches.append(i)
        except Exception as e:  # noqa: BLE001  (collected, asserted below)
            errors.append(repr(e))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors and not mismatches, (errors[:3], len(mismatches))
    assert model.to_qkv._caches == {}  # every thread's entry was dropped once all parts were taken


def test_threads_on_quantized_flux_bit_exactly():
    model = tiny.tiny_flux_transformer(0)
    svdq.models.prepare(model)
    svdq.quantize(model, progress=False)

    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        return dict(hidden_states=torch.randn(1, 16, 16, generator=g), encoder_hidden_states=torch.randn(1, 8, 64, generator=g),
                    pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                    img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), return_dict=False)

    results = {}

    def worker(i):
        with torch.no_grad():
            results[i] = [model(**inputs(i))[0] for _ in range(2)]

    # One intra-op thread, for the reference and the threaded runs alike: 8 callers each with its own OpenMP
    # team would oversubscribe a small CI machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            expected = [model(**inputs(i))[0] for i in range(8)]
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        torch.set_num_threads(n)
    assert all(torch.equal(y, expected[i]) for i in range(8) for y in results[i])


def test_diffusers_fuse_qkv_projections_keeps_svdq_fusion():
    """diffusers' fuse/unfuse_qkv_projections on an svdq model: no error, nothing deleted, same output; FLUX
    double blocks run diffusers' own fused path (attn.to_qkv), not the stand-ins."""
    model = tiny.tiny_flux_transformer(0)
    svdq.models.prepare(model)
    svdq.quantize(model, progress=False)
    attn = model.transformer_blocks[0].attn
    assert attn.fused_projections is True
    x = dict(hidden_states=torch.randn(1, 16, 16), encoder_hidden_states=torch.randn(1, 8, 64),
             pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3),
             txt_ids=torch.zeros(8, 3), return_dict=False)
    with torch.no_grad():
        before = model(**x)[0]
        calls = []
        handle = attn.to_q.register_forward_hook(lambda *a: calls.append(1))
        model(**x)
        handle.remove()
        assert calls == []  # the ProjectionSlice is not used: diffusers called attn.to_qkv directly
        model.fuse_qkv_projections()
        model.unfuse_qkv_projections()
        assert isinstance(attn.to_qkv.linear, SVDQLinear)
        assert torch.equal(model(**x)[0], before)


def test_use_backend_is_context_local():
    seen = {}

    def other_thread():
        seen["thread"] = svdq.ops.select_backend(torch.device("cpu")).name

    async def task(name, backend):
        if backend is None:
            await asyncio.sleep(0.01)
            seen[name] = svdq.ops.select_backend(torch.device("cpu")).name
            return
        with svdq.ops.use_backend(backend):
            await asyncio.sleep(0.02)  # the other task runs while this one holds its override
            seen[name] = svdq.ops.select_backend(torch.device("cpu")).name

    default = svdq.ops.select_backend(torch.device("cpu")).name
    with svdq.ops.use_backend("reference"):
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()

    async def both():
        await asyncio.gather(task("with", "reference"), task("without", None))

    asyncio.run(both())
    assert seen == {"thread": default, "with": "reference", "without": default}


def test_failed_native_import_warns_once_with_the_fix(tmp_path):
    code = (
        "import warnings\n"
        "warnings.simplefilter('always')\n"
        "import svdq, importlib; import svdq._native\n"
        "print('native', svdq.build_info()['native'], svdq.ops.available_backends())\n"
    )
    # a directory without the libraries: what an install without them gives
    env = {**os.environ, "SVDQ_LIBRARY_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert "native False ['reference']" in out.stdout
    assert out.stderr.count("svdq/_C.so did not load") == 1
    assert "pip install --no-build-isolation -e ." in out.stderr and "svdq doctor" in out.stderr


def test_doctor_reports_backends_and_problems(tmp_path):
    import json

    from svdq.cli import main

    out = subprocess.run([sys.executable, "-m", "svdq", "doctor", "--json"], capture_output=True, text=True,
                         timeout=300)
    rep = json.loads(out.stdout)
    assert out.returncode == (1 if rep["problems"] else 0)
    rows = {(r["device"], r["dtype"]): r for r in rep["backends"]}
    expected_cpu = "cpu" if "cpu" in svdq.ops.available_backends() else "reference"
    assert rows[("cpu", "bfloat16")]["backend"] == expected_cpu and rows[("cpu", "bfloat16")]["why"]
    assert rep["environment"]["torch"] == torch.__version__
    assert main(["doctor"]) in (0, 1)

    broken = subprocess.run(
        [sys.executable, "-c", "import sys\nfrom svdq.cli import main\nsys.exit(main(['doctor']))"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "SVDQ_LIBRARY_DIR": str(tmp_path)},
    )
    assert broken.returncode == 1
    assert "native library does not load" in broken.stdout and "--no-build-isolation" in broken.stdout
    assert "reference: svdq's native library is not loaded" in broken.stdout
