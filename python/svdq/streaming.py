"""Block-by-block ("streaming"), resumable quantization: ``svdq.quantize(model, calibration=..., streaming=True)``.

Why: `svdq.quantize` runs the calibration with hooks on every selected layer at once and keeps every layer's
statistics until the end — for a full-size FLUX.1-dev ≈ 64 GB of GPTQ Hessians alone (`svdq.gptq`), so on an
80 GB GPU the widest layers fall back to round-to-nearest. Streaming keeps one block's statistics at a time.

1. **Capture.** ``calibration(model)`` runs once on the 16-bit model. Hooks record, per model call, the
   inputs of the first repeated block (`svdq.models.generic.find_blocks`: FLUX.1's double then single
   blocks, PixArt's / Wan's / Qwen-Image's ``transformer_blocks``), the statistics of the selected layers
   *outside* the blocks, and how each block's inputs come from the block before it: every input tensor must be
   one of that block's outputs or one of its inputs, by identity (FLUX passes ``hidden_states`` /
   ``encoder_hidden_states`` from block to block and ``temb`` / ``image_rotary_emb`` through). A model whose
   blocks are not such a chain (a UNet: resnets between blocks) is refused, naming the block and input.
   Blocks whose weights live off ``device`` are moved there for their forward and back (sequential offload).
2. **Per block, in order:** move it to ``device``; run it on every captured call with hooks on its selected
   layers (the statistics of `svdq.quantize`: row sample, channel max, GPTQ Hessian); quantize its layers
   (`svdq.quantize.build_layers`, the same code); swap them in; produce the next block's inputs; save the
   block's quantized layers to ``state_dir``; move the block back.
3. The selected layers outside the blocks are quantized last, from the capture's statistics (16-bit inputs).

**Which outputs feed the next block** (``propagate``): ``"quantized"`` (default) — GPTQ's sequential order
(Frantar et al. 2022; their reference code reruns each quantized layer block to produce the next one's inputs):
block i+1 is calibrated on what the *quantized* blocks before it produce, i.e. on the activations the
quantized model will see. ``"16bit"`` — the 16-bit block's outputs: every layer sees exactly the inputs of the
non-streaming run, and the result equals ``svdq.quantize(streaming=False)`` bit for bit (tests/
test_streaming_quantize.py). Either way each diffusion step's first-block input comes from the 16-bit model's
own sampling trajectory (the capture), as in the non-streaming run.

**Resuming** (``state_dir``): after each block, its quantized layers go to ``block-NNNNN.safetensors``
(metadata ``format = "svdq-streaming-block"``: `svdq.load` refuses it) and ``manifest.json`` records it; both
are written to a temporary name and renamed (an interrupted write leaves the previous state). A rerun with the
same arguments captures again, checks that model, config and calibration match the manifest (else it stops,
naming what differs), loads the finished blocks instead of quantizing them (each still runs once, to produce
the next block's inputs) and continues. The model itself is changed all-or-nothing, as by `svdq.quantize`: an
interrupted run leaves it 16-bit.

Memory: the captured activations (every calibration call's block inputs, twice while a block produces the
next ones; on ``device``) + one block on ``device`` + that block's statistics. Layers of finished blocks are
4-bit; the replaced 16-bit layers return to the block's home device.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from ._transaction import ModuleSnapshot, deferred_interrupts, read_all_tensors
from .gptq import layers_within_memory
from .linear import SVDQLinear
from .quantize import QuantizeConfig, _set_submodule, build_layers, collect_input_stats
from .weight_only import SVDQWeightOnlyLinear

log = logging.getLogger("svdq")

STATE_FORMAT = "svdq-streaming-state"
BLOCK_FORMAT = "svdq-streaming-block"
STATE_VERSION = 1
PROPAGATIONS = ("quantized", "16bit")
MANIFEST = "manifest.json"
# Relative tolerance when a rerun's calibration capture is compared with the manifest's: GPU kernels need
# not be bitwise reproducible, but other prompts, seeds, step counts or sizes change the sums far more.
CALIBRATION_RTOL = 1e-3
WEIGHTS_RTOL = 1e-6  # the same weights summed on another device / in another order


class StreamingError(ValueError):
    """Streaming quantization cannot run on this model / state directory; the message says why."""


def quantize_streaming(
    model: nn.Module,
    calibration: Callable[[nn.Module], object] | None,
    config: QuantizeConfig,
    layers: dict[str, nn.Linear],
    wo_layers: dict[str, nn.Linear],
    *,
    state_dir=None,
    device=None,
    propagate: str = "quantized",
    progress: bool = True,
    process_group=None,
    adjust=None,
) -> nn.Module:
    """The streaming path of `svdq.quantize` (see the module docstring); `layers` / `wo_layers` are the W4A4
    and W4A16 selections `svdq.quantize` made, ``adjust`` its per-layer step (`build_layers`). Returns `model`,
    quantized in place."""
    if propagate not in PROPAGATIONS:
        raise ValueError(f"propagate must be one of {PROPAGATIONS}, got {propagate!r}")
    if calibration is None:
        raise ValueError("streaming=True needs calibration (data-free quantization keeps no statistics: use "
                         "streaming=False)")
    if config.rank_budget is not None:
        raise ValueError("rank_budget spreads ranks over the whole model after seeing every layer; streaming "
                         "quantizes block by block: use streaming=False for a rank budget")
    if process_group == "auto":
        process_group = getattr(model, "_parallel_config", None)
    if process_group is not None:
        raise ValueError("streaming=True does not merge calibration statistics across ranks (svdq.parallel): "
                         "quantize in one process")
    block_names = _blocks(model)
    blocks = [model.get_submodule(n) for n in block_names]
    device = torch.device(device) if device is not None else _device_of(blocks[0])
    per_block = [({n: m for n, m in layers.items() if _inside(n, b)},
                  {n: m for n, m in wo_layers.items() if _inside(n, b)}) for b in block_names]
    outside = {n: m for n, m in {**layers, **wo_layers}.items() if not any(_inside(n, b) for b in block_names)}

    # 1. Capture: the first block's inputs per call, the outside layers' statistics, the block chain.
    homes = [_device_of(b) for b in blocks]
    capture = _Capture(block_names, blocks, device)
    hessians = _hessian_layers(config, {n: m for n, m in layers.items() if n in outside})
    try:
        with capture.hooks():
            outside_stats = collect_input_stats(model, outside, calibration, config.calib_tokens, hessians)
    except BaseException:
        with deferred_interrupts():  # a failed forward may have left an offloaded block on `device`
            for block, home in zip(blocks, homes):
                block.to(home)
        raise
    capture.check_complete()
    run = {
        "config": config.to_dict(),
        "propagate": propagate,
        "blocks": block_names,
        "layers": {n: [m.in_features, m.out_features] for n, m in {**layers, **wo_layers}.items()},
        "calibration": capture.fingerprint(),
    }
    state = _State(Path(state_dir), run) if state_dir is not None else None

    report = dict(getattr(model, "svdq_report", {}) or {})
    snapshot = ModuleSnapshot(model)  # the 16-bit structure: put back on any failure (all-or-nothing)
    replaced: list[tuple[nn.Module, torch.device]] = []  # 16-bit layers swapped out, and their home devices
    inputs = capture.calls  # per call: the flattened inputs of the current block (leaves on `device`)
    capture.calls = None
    bar = tqdm(total=len(blocks), desc="svdq streaming", unit="block", disable=not progress)
    try:
        with bar:
            for i, (name, block) in enumerate(zip(block_names, blocks)):
                t0 = time.perf_counter()
                bar.set_postfix_str(name)
                block.to(device)
                blk_layers, blk_wo = per_block[i]
                weights = _fingerprint_module(block) if state is not None else None
                done = state.finished(name, weights) if state is not None else None
                last = i + 1 == len(blocks)
                nxt = None
                if done is not None:  # resumed: load the saved layers; the block still runs to feed the next
                    if propagate == "16bit" and not last:
                        nxt = _run_block(block, inputs, capture, i)
                    new = state.load_layers(name, done, config, device)
                    report.update(done["report"])
                else:
                    blk_stats, outputs = _calibrate_block(block, blk_layers, blk_wo, inputs, capture, i, config,
                                                          keep_outputs=propagate == "16bit" and not last)
                    nxt = outputs
                    blk_report: dict = {}
                    new = build_layers(blk_layers, blk_wo, blk_stats, config, blk_report, adjust=adjust)
                    del blk_stats
                    report.update(blk_report)
                for lname, layer in new.items():
                    replaced.append((model.get_submodule(lname), homes[i]))
                    _set_submodule(model, lname, layer)
                if propagate == "quantized" and not last:
                    nxt = _run_block(block, inputs, capture, i)
                if done is None and state is not None:
                    state.save_block(i, name, new, weights, blk_report)
                inputs = nxt
                if homes[i] != device:
                    block.to(homes[i])
                    for old, home in replaced[-len(new):] if new else []:
                        old.to(home)
                log.info("svdq streaming: %s %s in %.1f s", name, "resumed" if done is not None else "quantized",
                         time.perf_counter() - t0)
                bar.update(1)
        del inputs
        # 3. Layers outside the blocks (selected by the user's include patterns): from the capture's statistics.
        out_w4a4 = {n: m for n, m in layers.items() if n in outside}
        out_wo = {n: m for n, m in wo_layers.items() if n in outside}
        for lname, layer in build_layers(out_w4a4, out_wo, outside_stats, config, report, adjust=adjust).items():
            _set_submodule(model, lname, layer)
        with deferred_interrupts():
            model.svdq_report = report
            model.svdq_config = config
    except BaseException:
        with deferred_interrupts():
            snapshot.restore()
            for (old, home) in replaced:
                old.to(home)
            for block, home in zip(blocks, homes):
                block.to(home)
        raise
    from .integrations.diffusers_quantizer import attach

    attach(model)  # diffusers' save_pretrained / LoRA API work on it (no-op for non-diffusers models)
    return model


def place_offloaded(model: nn.Module, device, offload="cpu") -> list[str]:
    """Move ``model`` to ``device`` except its repeated blocks, which go to ``offload``: the layout for streaming
    a denoiser that does not fit ``device`` whole (``svdq.quantize(model, streaming=True, device=device)`` then
    brings each block over for its turn, also during the calibration pass). Returns the block names."""
    names = _blocks(model)
    device, offload = torch.device(device), torch.device(offload)

    def place(module: nn.Module, prefix: str) -> None:
        if prefix in names:
            module.to(offload)
        elif prefix and not any(_inside(n, prefix) for n in names):
            module.to(device)  # holds no block
        else:  # holds blocks: its own tensors here, then each child
            module._apply(lambda t: t.to(device), recurse=False)
            for child_name, child in module.named_children():
                place(child, f"{prefix}.{child_name}" if prefix else child_name)

    place(model, "")
    return names


# ---- structure --------------------------------------------------------------------------------------------


def _blocks(model: nn.Module) -> list[str]:
    """The repeated blocks, in module order: a generic plan's (`svdq.models.generic`) or found anew."""
    from .models import generic

    plan = getattr(model, "_svdq_plan", None)
    names = list(plan.blocks) if plan is not None else generic.find_blocks(model)
    if not names:
        raise StreamingError(f"{type(model).__name__} has no repeated attention blocks (nn.ModuleList elements "
                             "containing an attention module) to stream: use streaming=False")
    return names


def _inside(name: str, block: str) -> bool:
    return name.startswith(block + ".")


def _device_of(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def _hessian_layers(config: QuantizeConfig, layers: dict[str, nn.Linear]):
    """The layers that get a GPTQ Hessian, as `svdq.quantize` chooses them (here among one block's layers)."""
    if config.rounding != "gptq" or config.method == "naive":
        return ()
    return layers_within_memory(layers)


def _leaves_with_paths(tree) -> tuple[list, list[str], object]:
    with_paths, spec = pytree.tree_flatten_with_path(tree)
    return [v for _, v in with_paths], [pytree.keystr(p) for p, _ in with_paths], spec


def _to(x, device: torch.device):
    return x.to(device) if torch.is_tensor(x) else x


class _Capture:
    """Phase 1's hooks: the first block's inputs per model call (``calls``: flattened leaves on ``device``) and
    how each later block's inputs come from the one before (``sources[i]``: per input leaf ``("out", k)``,
    ``("in", k)`` or ``("const", value)``), checked on every call."""

    def __init__(self, names: list[str], blocks: list[nn.Module], device: torch.device):
        self.names, self.blocks, self.device = names, blocks, device
        self.calls: list[list] | None = []
        self.specs: list = [None] * len(blocks)  # the input tree structure of each block
        self.paths: list[list[str]] = [[] for _ in blocks]  # leaf names, for error messages
        self.sources: list = [None] * len(blocks)
        self.next = 0  # the block expected next in the current call
        self.prev_in: list | None = None
        self.prev_out: list | None = None
        self.moved: dict[int, torch.device] = {}  # block index -> where its inputs / outputs live (offloaded)

    @contextlib.contextmanager
    def hooks(self):
        handles = []
        for i, block in enumerate(self.blocks):
            handles.append(block.register_forward_pre_hook(
                lambda m, a, k, _i=i: self._pre(_i, a, k), with_kwargs=True))
            handles.append(block.register_forward_hook(
                lambda m, a, k, out, _i=i: self._post(_i, out), with_kwargs=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self.prev_in = self.prev_out = None

    def _pre(self, i: int, args, kwargs):
        leaves, paths, spec = _leaves_with_paths((args, kwargs))
        if i == 0:
            if self.next not in (0, len(self.blocks)):
                raise StreamingError(f"streaming: a model call ran blocks {self.names[:self.next]} but not "
                                     f"{self.names[self.next]!r}; the blocks must all run, in order, in every call")
            self.next = 0
            if self.specs[0] is None:
                self.specs[0], self.paths[0] = spec, paths
            elif spec != self.specs[0]:
                raise StreamingError(f"streaming: {self.names[0]!r} received differently structured inputs in "
                                     f"calibration call {len(self.calls)} ({paths} vs {self.paths[0]})")
            memo: dict[int, torch.Tensor] = {}  # one copy per tensor object (a tensor passed twice stays one)
            self.calls.append([memo.setdefault(id(v), v.detach().to(self.device, copy=True))
                               if torch.is_tensor(v) else v for v in leaves])
        else:
            if self.next != i:
                raise StreamingError(f"streaming: block {self.names[i]!r} ran after {self.names[self.next - 1]!r}; "
                                     "the blocks must run once each, in module order, in every model call")
            self._check_chain(i, leaves, paths, spec)
        self.next = i + 1
        self.prev_in = leaves
        home = _device_of(self.blocks[i])
        if home == self.device:
            return None
        # Offloaded block: run it on `device`, hand its outputs back where its inputs were.
        self.blocks[i].to(self.device)
        self.moved[i] = next((v.device for v in leaves if torch.is_tensor(v)), home)
        self.moved[-1 - i] = home
        return pytree.tree_unflatten([_to(v, self.device) for v in leaves], spec)

    def _post(self, i: int, output):
        moved = i in self.moved
        if moved:
            back, home = self.moved.pop(i), self.moved.pop(-1 - i)
            output = pytree.tree_map(lambda v: _to(v, back), output)
            self.blocks[i].to(home)
        self.prev_out = pytree.tree_leaves(output)
        if i + 1 == len(self.blocks):
            self.prev_in = self.prev_out = None  # the activations of this call are not needed any more
        return output if moved else None

    def _check_chain(self, i: int, leaves: list, paths: list[str], spec) -> None:
        sources = []
        for j, (v, path) in enumerate(zip(leaves, paths)):
            src = None
            if torch.is_tensor(v):
                src = next((("out", k) for k, o in enumerate(self.prev_out or []) if o is v), None)
                src = src or next((("in", k) for k, o in enumerate(self.prev_in or []) if o is v), None)
                if src is None:
                    raise StreamingError(
                        f"streaming: input {path} of block {self.names[i]!r} is neither an output nor an input of "
                        f"{self.names[i - 1]!r} (the model computes it between the blocks); streaming needs "
                        "blocks that feed each other directly: use streaming=False for this model")
            else:
                src = ("const", v)
            sources.append(src)
        if self.sources[i] is None:
            self.specs[i], self.paths[i], self.sources[i] = spec, paths, sources
            return
        same = spec == self.specs[i] and all(
            a[0] == b[0] and (a[1] == b[1] if a[0] != "const" else _same_const(a[1], b[1]))
            for a, b in zip(sources, self.sources[i]))
        if not same:
            raise StreamingError(f"streaming: the inputs of block {self.names[i]!r} come from {self.names[i - 1]!r} "
                                 f"differently in calibration call {len(self.calls) - 1} than in the first call")

    def check_complete(self) -> None:
        if not self.calls:
            raise StreamingError(f"streaming: the calibration never ran the first block {self.names[0]!r}")
        if self.next != len(self.blocks):
            raise StreamingError(f"streaming: the last calibration call stopped after {self.names[:self.next][-1:]}"
                                 f" (expected all {len(self.blocks)} blocks)")

    def fingerprint(self) -> list:
        """Per call: each input leaf's shape and (sum, sum of |x|) — what a rerun's capture must match."""
        return [[_fingerprint_tensor(v) if torch.is_tensor(v) else _fingerprint_value(v) for v in call]
                for call in self.calls]

    def next_inputs(self, i: int, inputs: list, outputs) -> list:
        """Block i+1's flattened inputs from block i's inputs and outputs (the chain found at capture)."""
        out = pytree.tree_leaves(outputs)
        return [out[k].to(self.device) if kind == "out" else inputs[k] if kind == "in" else k
                for kind, k in self.sources[i + 1]]


def _same_const(a, b) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # objects without a usable ==: only the same object counts
        return False


# ---- per block ----------------------------------------------------------------------------------------------


def _call(block: nn.Module, leaves: list, spec):
    args, kwargs = pytree.tree_unflatten(leaves, spec)
    return block(*args, **kwargs)


def _run_block(block: nn.Module, inputs: list[list], capture: _Capture, i: int) -> list[list]:
    """Block i on every captured call → block i+1's inputs."""
    with torch.no_grad():
        return [capture.next_inputs(i, leaves, _call(block, leaves, capture.specs[i])) for leaves in inputs]


def _calibrate_block(block, blk_layers, blk_wo, inputs, capture: _Capture, i: int, config: QuantizeConfig,
                     keep_outputs: bool):
    """Statistics of the block's selected layers over every captured call (and, with ``keep_outputs``, the
    16-bit block's outputs as the next block's inputs, from the same pass)."""
    outputs = [] if keep_outputs else None

    def run(_block):
        for leaves in inputs:
            y = _call(_block, leaves, capture.specs[i])
            if keep_outputs:
                outputs.append(capture.next_inputs(i, leaves, y))

    stats = collect_input_stats(block, {**blk_layers, **blk_wo}, run, config.calib_tokens,
                                _hessian_layers(config, blk_layers), None)
    return stats, outputs


def _fingerprint_tensor(t: torch.Tensor) -> list:
    t64 = t.detach().to(torch.float64)
    return [list(t.shape), str(t.dtype).removeprefix("torch."), float(t64.sum()), float(t64.abs().sum())]


def _fingerprint_value(v) -> str:
    # Plain values by value; other objects by type only (their repr may hold a memory address).
    return repr(v) if isinstance(v, (bool, int, float, str, type(None))) else type(v).__qualname__


def _fingerprint_module(module: nn.Module) -> dict:
    with torch.no_grad():
        return {k: _fingerprint_tensor(t) for k, t in module.state_dict().items()}


def _close(a, b, rtol: float) -> bool:
    """Two fingerprints (nested lists of shape / dtype / sums) agree: structure exactly, sums within rtol of
    the larger sum of |x|."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rtol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        if len(a) == 4 and len(b) == 4 and isinstance(a[2], float) and isinstance(b[2], float):
            if a[:2] != b[:2]:
                return False
            scale = max(abs(a[3]), abs(b[3]), 1e-30)
            return abs(a[2] - b[2]) <= rtol * scale and abs(a[3] - b[3]) <= rtol * scale
        return len(a) == len(b) and all(_close(x, y, rtol) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=rtol) or a == b
    return a == b


# ---- the state directory ------------------------------------------------------------------------------------


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` then rename over ``path`` (as `svdq.save`): an interrupted write leaves the old file."""
    tmp = None
    try:
        with deferred_interrupts():  # a pending Ctrl-C is raised inside the try: the cleanup below sees `tmp`
            fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
            os.close(fd)
        write(tmp)
        os.replace(tmp, path)
    finally:
        with deferred_interrupts():
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)


class _State:
    """``state_dir``: ``manifest.json`` + one ``block-NNNNN.safetensors`` per finished block."""

    def __init__(self, path: Path, run: dict):
        if path.exists() and not path.is_dir():
            raise StreamingError(f"state_dir {path}: exists and is not a directory")
        path.mkdir(parents=True, exist_ok=True)
        self.path, self.run = path, run
        self.manifest = {"format": STATE_FORMAT, "version": STATE_VERSION, "run": run, "blocks": {}}
        file = path / MANIFEST
        if file.exists():
            try:
                old = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise StreamingError(f"state_dir {path}: {MANIFEST} is unreadable ({e}); delete the directory "
                                     "to start over") from e
            if not isinstance(old, dict) or old.get("format") != STATE_FORMAT or old.get("version") != STATE_VERSION:
                raise StreamingError(f"state_dir {path}: {MANIFEST} is not an svdq streaming state of version "
                                     f"{STATE_VERSION}; delete the directory or choose another")
            self._check_same_run(old.get("run", {}))
            self.manifest["blocks"] = old.get("blocks", {})

    def _check_same_run(self, old: dict) -> None:
        for key, what, rtol in (("config", "quantization config", None), ("propagate", "propagate", None),
                                ("blocks", "model (its blocks)", None), ("layers", "model (its layers)", None),
                                ("calibration", "calibration data (prompts, seeds, steps, sizes)", CALIBRATION_RTOL)):
            a, b = old.get(key), self.run[key]
            if key == "config":
                b = json.loads(json.dumps(b))  # tuples → lists, as the manifest stores them
            if not (_close(a, b, rtol) if rtol else a == b):
                raise StreamingError(
                    f"state_dir {self.path} holds a run with a different {what}; rerun with the same arguments to "
                    "resume it, or delete the directory (or choose another state_dir) to start over")

    def finished(self, name: str, weights: dict) -> dict | None:
        """The manifest entry of block ``name`` when it is finished (its file present) — after checking that
        the block's 16-bit weights are those it was quantized from — else None."""
        entry = self.manifest["blocks"].get(name)
        if entry is None:
            return None
        if not (self.path / entry["file"]).is_file():
            log.warning("svdq streaming: %s is missing from %s; quantizing %s again", entry["file"], self.path, name)
            return None
        if not _close(entry["weights"], json.loads(json.dumps(weights)), WEIGHTS_RTOL):
            raise StreamingError(f"state_dir {self.path}: block {name!r} was quantized from different weights; "
                                 "delete the directory (or choose another state_dir) to start over")
        return entry

    def load_layers(self, name: str, entry: dict, config: QuantizeConfig, device) -> dict[str, nn.Module]:
        file = self.path / entry["file"]
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                tensors = read_all_tensors(f)
        except Exception as e:
            raise StreamingError(f"state_dir {self.path}: {file.name} (block {name!r}) is unreadable ({e}); "
                                 "delete it to quantize the block again") from e
        if meta.get("format") != BLOCK_FORMAT or meta.get("block") != name:
            raise StreamingError(f"state_dir {self.path}: {file.name} is not the saved block {name!r}")
        layers = {}
        for lname, spec in entry["layers"].items():
            dtype = getattr(torch, spec["dtype"])
            if spec["kind"] == "w4a4":
                shift = {"act_shift": spec["act_shift"]} if spec.get("act_shift") else {}  # spec §10 layers
                layer = SVDQLinear(spec["in"], spec["out"], spec["rank"], spec["bias"], dtype, device, **shift)
                layer.act_format = config.act_format
            else:
                layer = SVDQWeightOnlyLinear(spec["in"], spec["out"], spec["bias"], dtype, device,
                                             zero_point=spec.get("zero_point", False))
            prefix = lname + "."
            sd = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
            try:
                layer.load_state_dict(sd, strict=True)
            except RuntimeError as e:
                raise StreamingError(f"state_dir {self.path}: {file.name}: layer {lname!r} does not load ({e})") from e
            layers[lname] = layer
        return layers

    def save_block(self, index: int, name: str, layers: dict[str, nn.Module], weights: dict, report: dict) -> None:
        file = f"block-{index:05d}.safetensors"
        tensors, specs = {}, {}
        for lname, layer in layers.items():
            for k, t in layer.state_dict().items():
                tensors[f"{lname}.{k}"] = t.detach().contiguous().cpu()
            spec = {"in": layer.in_features, "out": layer.out_features, "bias": layer.bias is not None,
                    "dtype": str(layer.dtype).removeprefix("torch.")}
            if isinstance(layer, SVDQLinear):
                spec.update(kind="w4a4", rank=layer.rank, act_shift=float(getattr(layer, "act_shift", 0.0)))
            else:
                spec.update(kind="w4a16", zero_point=layer.zero_point_kind or False)
            specs[lname] = spec
        meta = {"format": BLOCK_FORMAT, "block": name, "version": str(STATE_VERSION)}
        _atomic_write(self.path / file, lambda tmp: save_file(tensors, tmp, metadata=meta))
        self.manifest["blocks"][name] = {"file": file, "weights": weights, "layers": specs, "report": report}
        text = json.dumps(self.manifest, indent=1)
        _atomic_write(self.path / MANIFEST, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
