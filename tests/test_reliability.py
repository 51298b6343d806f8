"""Issue 18's seven findings, one test (or a few) each; each failed before the fix (docs/reliability.md).

1. a failed load_lora wedged the model; 2. svdq.load changed the model before failing on config metadata;
3. save_pretrained / from_pretrained: mixed or truncated directories; 4. quantize with a non-finite weight;
5. gradients stopped silently at SVDQLinear; 6. CLI tracebacks; 7. silent corruption and bad inputs.
The interrupt / injected-exception side of 1–4 is in tests/test_faults.py.
"""

from __future__ import annotations

import copy
import json
import struct
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import svdq
from svdq import cli
from svdq.testing import tiny
from svdq.checkpoint import CheckpointError
from svdq.linear import SVDQLinear
from svdq.lora import LoraError
from svdq.ops import autograd as svdq_autograd
from svdq.ops.reference import padded_k, quantize_groups

SMALL_FLUX = dict(num_layers=1, num_single_layers=1)


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(96, 64), nn.GELU(), nn.Linear(64, 80), nn.GELU(), nn.Linear(80, 48))


def state(model: nn.Module) -> tuple:
    """Module types and every tensor's value: what a failed operation must leave unchanged."""
    types = tuple((n, type(m).__name__, len(m._forward_hooks)) for n, m in model.named_modules())
    return types, {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(_equal(a[1][k], b[1][k]) for k in a[1])


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:  # bit-exact, NaN equal to NaN
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(torch.equal(a, b) or a.is_floating_point() and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))


@pytest.fixture(scope="module")
def quantized_mlp():
    model = mlp()
    svdq.quantize(model, rank=16, exclude=(), progress=False)
    return model


def peft(model: nn.Module, names, rank: int = 4, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in names:
        m = model.get_submodule(name)
        sd[f"{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.1
        sd[f"{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.1
    return sd


# ---------------------------------------------------------------------------------------------------------
# 1. load_lora with a bad argument: nothing registered, the model keeps working


def test_1_failed_load_lora_leaves_nothing_behind(quantized_mlp):
    model = copy.deepcopy(quantized_mlp)
    x = torch.randn(5, 96)
    lora = peft(model, ["0", "2", "4"])
    svdq.load_lora(model, lora, name="a")
    with torch.no_grad():
        y_a = model(x)
    before = state(model)
    for bad in (None, float("nan"), float("inf"), "1.0", True):
        with pytest.raises(LoraError, match="strength must be"):
            svdq.load_lora(model, lora, name="b", strength=bad)
        assert list(svdq.list_loras(model)) == ["a"] and same_state(state(model), before)
    with pytest.raises(LoraError, match="strength must be"):
        svdq.set_lora_strength(model, "a", float("nan"))
    with torch.no_grad():
        assert torch.equal(model(x), y_a)
    # Everything still works: load another, unload both, save.
    svdq.load_lora(model, lora, name="b", strength=0.5)
    svdq.unload_lora(model, "a")
    svdq.unload_lora(model, "b")
    assert svdq.list_loras(model) == {}
    with torch.no_grad():
        assert torch.equal(model(x), quantized_mlp(x))


# ---------------------------------------------------------------------------------------------------------
# 2. metadata from a newer svdq: CheckpointError naming file, field and versions, before touching the model


def _rewrite_meta(path, edit):
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    edit(meta)
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c.update(version=7), r"field 'config'.*'version' is 7; this svdq reads version 1 .*newer svdq"),
        (lambda c: c.update(dither="blue"), r"field 'config'.*\['dither'\] that this svdq does not know"),
        (lambda c: c.update(method="magic"), r"field 'config'.*invalid.*method must be one of"),
    ],
)
def test_2_unknown_config_fails_before_touching_the_model(quantized_mlp, tmp_path, edit, match):
    path = svdq.save(quantized_mlp, tmp_path / "m.safetensors")

    def edit_meta(meta):
        config = json.loads(meta["config"])
        edit(config)
        meta["config"] = json.dumps(config)

    _rewrite_meta(path, edit_meta)
    skeleton = mlp(3)
    before = state(skeleton)
    with pytest.raises(CheckpointError, match=match) as e:
        svdq.load(skeleton, path)
    assert str(path) in str(e.value)
    assert same_state(state(skeleton), before)


def test_2_fused_skeleton_is_restored_on_a_bad_tensor(flux_dir, tmp_path):
    quant, _ = flux_dir
    path = svdq.save(quant, tmp_path / "f.safetensors")
    name = next(iter(svdq.quantized_layers(quant)))
    _flip_bit(path, f"{name}.qweight")
    skeleton = tiny.tiny_flux_transformer(5, **SMALL_FLUX)
    before = state(skeleton)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        svdq.load(skeleton, path)
    assert same_state(state(skeleton), before) and not svdq.models.is_fused(skeleton)


# ---------------------------------------------------------------------------------------------------------
# 3. directories: corrupt files are named; save_pretrained keeps the user's files, refuses a file target


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    model = tiny.tiny_flux_transformer(0, **SMALL_FLUX)
    svdq.models.prepare(model)
    svdq.quantize(model, rank=16, progress=False)
    d = tmp_path_factory.mktemp("flux") / "q"
    svdq.save_pretrained(model, d)
    return model, d


def test_3_truncated_or_mixed_directory_is_named(flux_dir, tmp_path):
    import shutil

    model, d = flux_dir
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    (bad / "config.json").write_text((d / "config.json").read_text()[:40])
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        svdq.from_pretrained(bad)
    shutil.copy2(d / "config.json", bad / "config.json")
    info = json.loads((bad / "svdq.json").read_text())
    (bad / "svdq.json").write_text(json.dumps({**info, "class_name": "PixArtTransformer2DModel"}))
    with pytest.raises(CheckpointError, match="files from different saves"):
        svdq.from_pretrained(bad)
    # Saving over a directory keeps files that are not the model's.
    (bad / "svdq.json").write_text(json.dumps(info))
    (bad / "README.md").write_text("notes\n")
    svdq.save_pretrained(model, bad)
    assert (bad / "README.md").read_text() == "notes\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # no temporary sibling left
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(FileExistsError, match="exists and is not a directory"):
        svdq.save_pretrained(model, target)


# ---------------------------------------------------------------------------------------------------------
# 4. quantize with a non-finite weight: the layer is named, the model untouched


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_4_non_finite_weight_names_the_layer(value, capfd):
    model = mlp()
    with torch.no_grad():
        model[2].weight[3, 7] = value
    before = state(model)
    with pytest.raises(ValueError, match=r"layer '2' has 1 non-finite value\(s\) \(NaN/inf\) in its weight"):
        svdq.quantize(model, rank=16, exclude=(), progress=False)
    assert same_state(state(model), before) and not hasattr(model, "svdq_config")
    assert "MKL" not in capfd.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# 5. gradients through SVDQLinear on every backend (straight-through estimator, docs/numerics.md §9)


def ste_reference(layer: SVDQLinear, x, smooth, down, up, bias, scales):
    """The layer in differentiable PyTorch: the activation quantizer with a straight-through estimator."""
    qweight, wscales = layer.canonical_weights()
    w_hat = svdq_autograd.dequantize(qweight, wscales, layer.in_features)
    k, m = layer.in_features, x.shape[0]
    xf = x.to(torch.float32)
    xhat = xf / smooth.to(torch.float32)
    q, s = quantize_groups(torch.nn.functional.pad(xhat.detach(), (0, padded_k(k) - k)), torch.float32)
    fake = (q.to(torch.float32).view(m, -1, 64) * s.unsqueeze(-1)).view(m, -1)[:, :k]
    xq = xhat + (fake - xhat).detach()  # forward: the quantized value; backward: identity
    act = (xf @ down.to(torch.float32)) * scales
    y = xq @ w_hat.T + act.to(x.dtype).to(torch.float32) @ up.to(torch.float32).T + bias.to(torch.float32)
    return y.to(x.dtype)


BACKENDS = [b for b in ("reference", "cpu", "cuda") if b in svdq.ops.available_backends()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_5_gradients_match_the_ste_reference(backend):
    device = "cuda" if backend == "cuda" else "cpu"
    dtype = torch.bfloat16 if backend == "cuda" else torch.float32
    torch.manual_seed(0)
    layer = SVDQLinear.from_linear(nn.Linear(100, 40), rank=16).to(device=device, dtype=dtype)
    names = ("smooth", "lora_down", "lora_up", "bias")
    for n in names:
        getattr(layer, n).requires_grad_(True)
    x = torch.randn(2, 7, 100, device=device, dtype=dtype, requires_grad=True)
    with svdq.ops.use_backend(backend):
        y = layer(x)
        with torch.no_grad():
            assert torch.equal(y, layer(x))  # the forward is the inference forward, bit for bit
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *(getattr(layer, n) for n in names)], g)
    leaves = [x.detach().clone().requires_grad_(True)] + [getattr(layer, n).detach().clone().requires_grad_(True) for n in names]
    x2, smooth, down, up, bias = leaves
    ref = ste_reference(layer, x2.reshape(-1, 100), smooth, down, up, bias, layer.lora_scales).reshape(y.shape)
    want = torch.autograd.grad(ref, leaves, g)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for n, a, b in zip(("x", *names), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, n
        assert float((a.float() - b.float()).norm() / b.float().norm()) < tol, n
    for n in names:
        getattr(layer, n).requires_grad_(False)


def test_5_gradients_reach_upstream_layers_and_lora_factors(quantized_mlp):
    """The finding: upstream .grad was None on the cpu backend. Now a QLoRA-style step trains adapters."""
    model = copy.deepcopy(quantized_mlp)
    first = nn.Linear(32, 96)
    x = torch.randn(16, 32)
    (model(first(x)) ** 2).mean().backward()
    assert first.weight.grad is not None and float(first.weight.grad.abs().sum()) > 0
    # Adapter factors: gradients equal those of an independent reference (16-bit delta via hooks).
    lora = peft(model, ["0", "4"])
    svdq.load_lora(model, lora, name="t", strength=0.7)
    params = svdq.lora_parameters(model, "t")
    assert len(params) == 4 and all(p.requires_grad and p.is_leaf for p in params)
    target = torch.randn(16, 48)
    loss = ((model(first(x).detach()) - target) ** 2).mean()
    loss.backward()
    # Reference: the quantized model without the adapter, plus s·x·Aᵀ·Bᵀ at each LoRA layer (autograd on A, B).
    ref_model = copy.deepcopy(quantized_mlp)
    factors = {n: (lora[f"{n}.lora_A.weight"].clone().requires_grad_(True),
                   lora[f"{n}.lora_B.weight"].clone().requires_grad_(True)) for n in ("0", "4")}
    for n, (a, b) in factors.items():
        ref_model.get_submodule(n).register_forward_hook(
            lambda m, args, out, a=a, b=b: out + ((args[0] @ a.T) * (0.7 * 4 / 4)) @ b.T)
    ((ref_model(first(x).detach()) - target) ** 2).mean().backward()
    for (down, up), (a, b) in zip(zip(params[::2], params[1::2]), factors.values()):
        r = a.shape[0]
        assert torch.allclose(down.grad[:, :r], a.grad.T, rtol=1e-4, atol=1e-6)
        assert torch.allclose(up.grad[:, :r], b.grad, rtol=1e-4, atol=1e-6)
        assert not down.grad[:, r:].any() and not up.grad[:, r:].any()  # zero padding columns stay zero
    # An optimizer step changes the output; freeze_lora fuses the trained factors into the branch.
    z = torch.randn(4, 96)
    with torch.no_grad():
        y0 = model(z)
        for p in params:
            p -= 0.5 * p.grad
        y1 = model(z)
    assert not torch.equal(y0, y1)
    svdq.freeze_lora(model, "t")
    with torch.no_grad():
        assert torch.allclose(model(z), y1, rtol=1e-5, atol=1e-6)
    svdq.unload_lora(model, "t")
    with torch.no_grad():
        assert torch.equal(model(z), quantized_mlp(z))


def test_5_weight_only_layers_pass_gradients():
    """W4A16 layers compute with F.linear on the dequantized weight: input and LoRA-factor gradients flow."""
    model = mlp()
    svdq.quantize(model, rank=16, exclude=("2",), weight_only=("2",), progress=False)
    assert isinstance(model[2], svdq.SVDQWeightOnlyLinear) and isinstance(model[0], SVDQLinear)
    x = torch.randn(4, 96, requires_grad=True)
    g = torch.randn(4, 48)
    (gx,) = torch.autograd.grad(model(x), x, g)
    # Reference: the same network with the W4A16 layer as an nn.Linear holding the dequantized weight.
    ref = copy.deepcopy(model)
    lin = nn.Linear(64, 80)
    with torch.no_grad():
        lin.weight.copy_(model[2].dequantize(torch.float32))
        lin.bias.copy_(model[2].bias)
    ref[2] = lin
    x2 = x.detach().clone().requires_grad_(True)
    (gx_ref,) = torch.autograd.grad(ref(x2), x2, g)
    assert torch.allclose(gx, gx_ref, rtol=1e-5, atol=1e-7)
    svdq.load_lora(model, peft(model, ["2"]), name="w")
    down, up = svdq.lora_parameters(model, "w")
    model(x).sum().backward()
    assert down.grad is not None and up.grad is not None and float(up.grad.abs().sum()) > 0


def test_5_unsupported_gradients_are_clear_errors(quantized_mlp):
    model = copy.deepcopy(quantized_mlp)
    layer = model[0]
    x = torch.randn(3, 96, requires_grad=True)
    layer.wscales.requires_grad_(True)  # model.requires_grad_(True) does this: the scales stay frozen (FrozenParameter)
    assert not layer.wscales.requires_grad
    layer.wscales.requires_grad = True  # an explicit request for a gradient that does not exist
    with pytest.raises(RuntimeError, match="wscales cannot have a gradient"):
        layer(x)
    layer.wscales.requires_grad = False
    with pytest.raises(RuntimeError, match="SVDQLinear has no second derivative"):
        torch.autograd.grad(layer(x).sum(), x, create_graph=True)


# ---------------------------------------------------------------------------------------------------------
# 6. CLI: one error line, exit 1, before the work; --debug shows the traceback


def test_6_cli_errors_are_one_line(tmp_path, capsys):
    out_file = tmp_path / "taken"
    out_file.write_text("x")
    missing_model = str(tmp_path / "no-such-pipeline")
    image_dir = tmp_path / "taken.png"
    image_dir.mkdir()
    cases = [
        (["quantize", "--model", missing_model, "--out", str(out_file), "--data-free"], f"--out {out_file}: exists and is not a directory"),
        (["quantize", "--model", missing_model, "--out", str(out_file / "sub"), "--data-free"], "is a file, not a directory"),
        (["quantize", "--model", missing_model, "--out", str(tmp_path / "o"), "--steps", "0"], "--steps must be >= 1, got 0"),
        (["generate", "--model", missing_model, "--prompt", "p", "--steps", "0"], "--steps must be >= 1, got 0"),
        (["generate", "--model", missing_model, "--prompt", "p", "--out", str(image_dir)], "is a directory, expected a file path"),
        (["eval", "--model", missing_model, "--quantized", "q", "--out", str(out_file)], f"--out {out_file}: exists and is not a directory"),
        (["eval", "--model", missing_model, "--quantized", "q", "--limit", "0"], "--limit must be >= 1, got 0"),
        (["demo", "--out", str(out_file)], f"--out {out_file}: exists and is not a directory"),
        (["demo", "--steps", "0"], "--steps must be >= 1, got 0"),
    ]
    truncated = tmp_path / "lora.safetensors"
    save_file({"a.lora_A.weight": torch.zeros(4, 8), "a.lora_B.weight": torch.zeros(8, 4)}, str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:-20])
    cases.append((["lora", "inspect", str(truncated), "--model", "tiny"], f"{truncated}: not a readable safetensors LoRA file"))
    for argv, message in cases:
        assert cli.main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error:" in err and message in err, (argv, err)
        assert "Traceback" not in err
    with pytest.raises(ValueError, match="--steps must be >= 1"):
        cli.main(["--debug", "demo", "--steps", "0"])
    with pytest.raises(ValueError, match="not a readable safetensors LoRA file"):
        cli.main(["lora", "inspect", str(truncated), "--model", "tiny", "--debug"])


def test_6_cli_checks_out_before_loading(tmp_path, monkeypatch, capsys):
    """A read-only --out is reported before the pipeline is loaded (tests run as root: os.access is faked)."""
    import os

    import svdq.pretrained as P

    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode))
    monkeypatch.setattr(P, "load_pipeline", lambda *a, **k: pytest.fail("loaded the pipeline before checking --out"))
    rc = cli.main(["quantize", "--model", "x/y", "--out", str(tmp_path / "new"), "--data-free"])
    assert rc == 1 and f"directory {tmp_path} is not writable" in capsys.readouterr().err


def test_6_unexpected_errors_are_one_line_too(monkeypatch, capsys):
    import svdq.commands.demo as demo

    def boom(args):
        raise KeyError("something internal")

    monkeypatch.setattr(demo, "run", boom)
    rc = cli.main(["demo", "--out", "/nonexistent-dir-for-test"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "KeyError" in err and "--debug" in err


# ---------------------------------------------------------------------------------------------------------
# 7. silent corruption and bad inputs


def _flip_bit(path, key: str, byte: int = 5, bit: int = 3) -> None:
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    start = json.loads(data[8 : 8 + n])[key]["data_offsets"][0]
    data[8 + n + start + byte] ^= 1 << bit
    path.write_bytes(bytes(data))


def test_7_bit_flip_is_detected(quantized_mlp, tmp_path):
    path = svdq.save(quantized_mlp, tmp_path / "m.safetensors")
    meta = svdq.read_metadata(path)
    assert set(meta["checksums"]) == set(quantized_mlp.state_dict())
    _flip_bit(path, "2.qweight")
    skeleton = mlp(4)
    before = state(skeleton)
    with pytest.raises(CheckpointError, match=r"checksum mismatch in tensor\(s\) \['2\.qweight'\]"):
        svdq.load(skeleton, path)
    assert same_state(state(skeleton), before)
    loaded = svdq.load(skeleton, path, verify=False)  # the escape hatch: loads the flipped bits as they are
    assert not torch.equal(loaded[2].qweight, quantized_mlp[2].qweight)


@pytest.mark.parametrize("tensor", ["wscales", "smooth"])
def test_7_non_finite_scales_are_rejected(quantized_mlp, tmp_path, tensor):
    bad = copy.deepcopy(quantized_mlp)
    with torch.no_grad():
        getattr(bad[4], tensor).view(-1)[1] = float("nan")
    path = svdq.save(bad, tmp_path / "nan.safetensors")  # a consistent file (checksums of the NaN bytes)
    skeleton = mlp(5)
    before = state(skeleton)
    with pytest.raises(CheckpointError, match=rf"layer '4' has 1 non-finite value\(s\) \(NaN/inf\) in {tensor}"):
        svdq.load(skeleton, path)
    assert same_state(state(skeleton), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_7_bad_inputs_are_clear_errors_in_every_backend(quantized_mlp, backend):
    device = "cuda" if backend == "cuda" else "cpu"
    layer = copy.deepcopy(quantized_mlp[0]).to(device)
    if backend == "cuda":
        layer = layer.to(torch.bfloat16)
    with svdq.ops.use_backend(backend):
        for x in (torch.arange(96, device=device).reshape(1, 96), torch.ones(1, 96, dtype=torch.float64, device=device),
                  torch.ones(1, 96, dtype=torch.bool, device=device)):
            with pytest.raises(ValueError, match=rf"input dtype {x.dtype} is not supported; inputs are float32"):
                layer(x)
            with pytest.raises(ValueError, match="is not supported"):
                svdq.ops.quantize_act(x, layer.smooth, layer.lora_down, backend=backend)
        with pytest.raises(ValueError, match="0-dim tensor"):
            layer(torch.tensor(1.0, device=device))


def test_7_from_pretrained_keywords(flux_dir):
    _, d = flux_dir
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['torch_dtyp'\]"):
        svdq.from_pretrained(d, torch_dtyp=torch.float32)
    with pytest.raises(ValueError, match="holds a torch.float32 quantized model but torch_dtype=torch.bfloat16"):
        svdq.from_pretrained(d, torch_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="per-module placement is not supported"):
        svdq.from_pretrained(d, device_map={"transformer_blocks": "cpu", "": "cpu"})
    with pytest.raises(ValueError, match="device_map='auto'"):
        svdq.from_pretrained(d, device_map="auto")
    m = svdq.from_pretrained(d, torch_dtype=torch.float32, device_map={"": "cpu"}, low_cpu_mem_usage=True)
    m2 = svdq.from_pretrained(d, dtype="auto", device_map="cpu", verify=False)
    assert svdq.quantized_layers(m).keys() == svdq.quantized_layers(m2).keys() and svdq.quantized_layers(m)


def test_7_cli_runs_as_a_process(tmp_path):
    """The installed entry point: exit status 1 and one stderr line (no traceback) for a bad argument."""
    r = subprocess.run([sys.executable, "-m", "svdq", "demo", "--steps", "0", "--out", str(tmp_path / "d")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == ["svdq demo: error: --steps must be >= 1, got 0"]
