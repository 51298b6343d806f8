"""Context parallelism for svdq models: diffusers' own `enable_parallelism` (Ulysses / ring attention over
torch.distributed), made to work where diffusers alone does not, and calibration that sees every rank's tokens.

    torchrun --nproc-per-node 2 my_script.py        # NCCL on GPUs, gloo on CPU

    dist.init_process_group()                        # in my_script.py
    svdq.parallel.enable_context_parallel(transformer, ulysses=2)
    image = pipe(prompt).images[0]                   # every rank runs the pipeline; rank 0 saves

svdq adds nothing to the parallel scheme itself: its layers quantize activations per token, so splitting the
sequence across ranks changes no quantized value (Ulysses output is bit-equal to one process; ring attention
merges partial softmaxes and is equal to it within floating-point rounding). What this module adds
(docs/parallel.md):

- `enable_context_parallel`: calls ``model.enable_parallelism(config=ContextParallelConfig(...))``. On a machine
  with no accelerator diffusers 0.42 computes the rank's device as ``rank % torch.accelerator.device_count()``
  (= 0, ZeroDivisionError); the call runs with that count read as 1 there (the device is the CPU either way).
- ring attention on the CPU: none of diffusers' CPU attention backends returns the log-sum-exp that ring
  attention merges with. `register_cpu_ring_attention` gives diffusers' ``_native_math`` backend a
  context-parallel path built on PyTorch's own CPU flash attention (which returns it); calls without context
  parallelism still go to diffusers' original function.
- calibration: `gather_input_stats` merges the per-layer statistics `svdq.quantize` records, over a process
  group, so that every rank ends with the statistics one process would have seen (`svdq.quantize(...,
  process_group=...)`).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from .quantize import InputStats

CPU_RING_BACKEND = "_native_math"


def enable_context_parallel(model: nn.Module, *, ulysses: int = 1, ring: int = 1, **config) -> nn.Module:
    """Shard ``model``'s sequence over the default process group: Ulysses degree ``ulysses``, ring degree ``ring``.

    ``model`` is a diffusers transformer (quantized or not); extra keyword arguments go to diffusers'
    ``ContextParallelConfig``. ulysses × ring must equal the world size. With ``ring > 1`` on the CPU the model's
    attention backend becomes ``_native_math`` with svdq's log-sum-exp path (`register_cpu_ring_attention`).
    Returns ``model``.
    """
    from diffusers import ContextParallelConfig

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "enable_context_parallel needs torch.distributed initialized first (launch with torchrun and call "
            "torch.distributed.init_process_group())"
        )
    if not hasattr(model, "enable_parallelism"):
        raise TypeError(f"{type(model).__name__} is not a diffusers model with enable_parallelism()")
    for name, degree in (("ulysses", ulysses), ("ring", ring)):
        if not isinstance(degree, int) or degree < 1:
            raise ValueError(f"{name} degree must be a positive integer, got {degree!r}")
    world = dist.get_world_size()
    if ulysses * ring != world:
        raise ValueError(f"ulysses ({ulysses}) × ring ({ring}) = {ulysses * ring} must equal the world size {world}")
    on_cpu = _accelerator_count() == 0
    if ring > 1 and on_cpu:
        register_cpu_ring_attention()
        model.set_attention_backend(CPU_RING_BACKEND)
    cp = ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring, **config)
    with _one_device_when_no_accelerator(on_cpu):
        model.enable_parallelism(config=cp)
    return model


def _accelerator_count() -> int:
    acc = getattr(torch, "accelerator", None)
    return acc.device_count() if acc is not None else torch.cuda.device_count()


@contextlib.contextmanager
def _one_device_when_no_accelerator(active: bool):
    """diffusers' `_resolve_parallel_config` takes ``rank % torch.accelerator.device_count()``: 0 on a CPU-only
    machine. Read the count as 1 for the duration of the call there; nothing else is changed."""
    if not active:
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


# ---- ring attention on the CPU ----------------------------------------------------------------------------


def _cpu_lse_forward_op(
    ctx,
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    return_lse=False,
    _save_ctx=True,
    _parallel_config=None,
):
    """One ring step: attention of local queries over one KV chunk, with its log-sum-exp (diffusers' forward-op
    contract: tensors are [B, S, H, D]; lse comes back [B, S, H])."""
    if attn_mask is not None or dropout_p or is_causal or enable_gqa:
        raise ValueError(
            "svdq's CPU ring attention supports plain attention only (no mask, dropout, causal or GQA)"
        )
    q, k, v = (t.permute(0, 2, 1, 3) for t in (query, key, value))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    out = out.permute(0, 2, 1, 3)
    return (out, lse.permute(0, 2, 1)) if return_lse else out


def _cpu_lse_backward_op(ctx, grad_out, *args, **kwargs):
    raise NotImplementedError("svdq's CPU ring attention is inference-only (no backward)")


_ORIGINAL_NATIVE_MATH = None


def register_cpu_ring_attention() -> None:
    """Give diffusers' ``_native_math`` attention backend a context-parallel path on the CPU (idempotent).

    Under context parallelism calls go through diffusers' own templated ring/Ulysses attention with a forward
    op that returns the log-sum-exp (PyTorch's ``_scaled_dot_product_flash_attention_for_cpu``); every other
    call goes to diffusers' original ``_native_math`` function, unchanged.
    """
    global _ORIGINAL_NATIVE_MATH
    from diffusers.models import attention_dispatch as ad

    name = ad.AttentionBackendName(CPU_RING_BACKEND)
    registry = ad._AttentionBackendRegistry
    if _ORIGINAL_NATIVE_MATH is not None:
        return
    original = registry._backends[name]

    def native_math_or_cpu_ring(
        query,
        key,
        value,
        attn_mask=None,
        dropout_p=0.0,
        is_causal=False,
        scale=None,
        enable_gqa=False,
        return_lse=False,
        _parallel_config=None,
    ):
        if _parallel_config is None:
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse)
        return ad._templated_context_parallel_attention(
            query,
            key,
            value,
            attn_mask,
            dropout_p,
            is_causal,
            scale,
            enable_gqa,
            return_lse,
            forward_op=_cpu_lse_forward_op,
            backward_op=_cpu_lse_backward_op,
            _parallel_config=_parallel_config,
        )

    registry.register(name, constraints=registry._constraints.get(name), supports_context_parallel=True)(
        native_math_or_cpu_ring
    )
    _ORIGINAL_NATIVE_MATH = original


# ---- calibration over ranks ------------------------------------------------------------------------------

_MERSENNE31 = 2**31 - 1
_KEY_COLUMNS = 256  # columns of a row that enter its key (evenly spread): enough to tell real activations apart


def row_keys(x: torch.Tensor) -> torch.Tensor:
    """int64 keys in [0, 2^62) for the rows of x [R, K], a function of each row's bytes alone.

    `svdq.quantize` keeps, per layer, the calibration rows with the smallest keys. Random keys would make the
    sample depend on the order and the split of the tokens; content keys make it the same whether one process
    sees all tokens or each rank sees a shard (`gather_input_stats`), while still acting as a uniform random
    choice. Keys hash the exact bytes: rows that differ in the last bit get unrelated keys (near-identical rows,
    common in attention outputs, must not collide: the merge counts rows by key). Two independent 31-bit hashes: Σ cᵢ·wᵢ over the row's up-to-256 columns read as int16 words (|w| <
    2^15, c < 2^31, ≤ 512 words: exact in int64, no overflow), each taken mod 2^31 − 1 — the sums spread far
    wider than the modulus, so the residues are close to uniform and unrelated to the rows' magnitudes.
    """
    rows, k = x.shape
    if k > _KEY_COLUMNS:
        x = x[:, torch.linspace(0, k - 1, _KEY_COLUMNS, device=x.device).round().long()]
    words = x.contiguous().view(torch.int16).reshape(rows, -1).to(torch.int64)  # the row's bytes, 2 at a time
    gen = torch.Generator().manual_seed(0x5D9)
    coeffs = torch.randint(0, 2**31, (2, words.shape[1]), generator=gen, dtype=torch.int64).to(x.device)
    h = torch.remainder(words @ coeffs.T, _MERSENNE31) if x.device.type == "cpu" else None
    if h is None:  # integer matmul is CPU-only in PyTorch: the same sums by broadcasting
        h = torch.remainder(torch.stack([(words * c).sum(1) for c in coeffs], 1), _MERSENNE31)
    return (h[:, 0] << 31) | h[:, 1]



def gather_input_stats(stats: dict[str, "InputStats"], capacity: int, group=None) -> None:
    """Merge every rank's calibration statistics in place, so each rank holds what one process would have
    recorded from all ranks' tokens: channel-wise max (max over ranks), rows seen (sum), the row sample (the
    ``capacity`` rows with the smallest content keys over all ranks — the keys depend on a row's bytes only,
    so the choice does not depend on how tokens were split), Σ xᵀx (sum; equal to one process within fp32
    rounding).

    A row that every rank holds (an input replicated across ranks, e.g. a timestep embedding) is counted
    once: per key, the multiplicity kept is the largest on any one rank, not the sum.
    """
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size(group)
    if world == 1:
        return
    for name in sorted(stats):  # same order on every rank: the collectives pair up
        s = stats[name]
        has = torch.tensor([s.absmax is not None], dtype=torch.int64)
        flags = [torch.zeros_like(has) for _ in range(world)]
        dist.all_gather(flags, has, group=group)
        present = [bool(f.item()) for f in flags]
        if not any(present):
            continue
        if not all(present):
            raise RuntimeError(
                f"layer {name!r} ran on some ranks' calibration but not on others' ({present}); every rank must "
                "run the same calibration"
            )
        absmax = s.absmax.to("cpu", torch.float32).contiguous()
        dist.all_reduce(absmax, op=dist.ReduceOp.MAX, group=group)
        s.absmax = absmax.to(s.absmax.device)
        seen = torch.tensor([s.seen], dtype=torch.int64)
        dist.all_reduce(seen, group=group)
        s.seen = int(seen.item())
        if getattr(s, "xtx", None) is not None:
            xtx = s.xtx.to("cpu").contiguous()
            dist.all_reduce(xtx, group=group)
            s.xtx = xtx.to(s.xtx.device)
        s.keys, s.sample = merge_samples(_all_gather_rows(s.keys, s.sample, world, group), capacity)


def _all_gather_rows(keys: torch.Tensor, rows: torch.Tensor, world: int, group) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every rank's (keys int64 [n], rows [n, K]) — tensors only (no pickling), rows sent as raw bytes (gloo has
    no bfloat16), padded to the longest rank's n."""
    n = torch.tensor([keys.numel()], dtype=torch.int64)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n, group=group)
    longest = max(int(c) for c in counts)
    raw = rows.contiguous().view(torch.uint8).reshape(rows.shape[0], -1)
    pad = longest - keys.numel()
    keys_p = torch.cat([keys, keys.new_zeros(pad)])
    raw_p = torch.cat([raw, raw.new_zeros(pad, raw.shape[1])])
    all_keys = [torch.empty_like(keys_p) for _ in range(world)]
    all_raw = [torch.empty_like(raw_p) for _ in range(world)]
    dist.all_gather(all_keys, keys_p, group=group)
    dist.all_gather(all_raw, raw_p, group=group)
    return [
        (k[: int(c)], r[: int(c)].view(rows.dtype).reshape(int(c), rows.shape[1]))
        for k, r, c in zip(all_keys, all_raw, counts)
    ]


def merge_samples(per_rank: list[tuple[torch.Tensor, torch.Tensor]], capacity: int):
    """(keys, rows) of several ranks → the ``capacity`` smallest-key rows, sorted by key; a key on several
    ranks keeps the largest multiplicity any one rank has (replicated inputs are not counted ``world`` times)."""
    counts: dict[int, int] = {}
    first: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for keys, rows in per_rank:
        local: dict[int, int] = {}
        for i, k in enumerate(keys.tolist()):
            local[k] = local.get(k, 0) + 1
            first.setdefault(k, (keys[i], rows[i]))
        for k, c in local.items():
            counts[k] = max(counts.get(k, 0), c)
    order = sorted(counts)
    out_keys, out_rows = [], []
    for k in order:
        kt, row = first[k]
        for _ in range(counts[k]):
            out_keys.append(kt)
            out_rows.append(row)
            if len(out_keys) == capacity:
                break
        if len(out_keys) == capacity:
            break
    return torch.stack(out_keys), torch.stack(out_rows)


# ---- launching ------------------------------------------------------------------------------------------


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of a torchrun launch (its environment names a rank and a world)."""
    import os

    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


@contextlib.contextmanager
def distributed_session(device: str):
    """The process group of a torchrun launch for the duration of a command: NCCL when ``device`` is CUDA
    (each rank on GPU ``LOCAL_RANK``), gloo on the CPU; on the way out, always a barrier and
    ``destroy_process_group`` so no rank is left waiting. Yields this rank."""
    import os

    if not launched_by_torchrun():
        raise RuntimeError(
            "context parallelism needs one process per rank: launch with `torchrun --nproc-per-node N svdq ...` "
            "(or python -m torch.distributed.run)"
        )
    cuda = str(device).startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            raise RuntimeError(
                f"rank {os.environ['RANK']} has LOCAL_RANK {local} but this node has {torch.cuda.device_count()} "
                "GPU(s): use --nproc-per-node ≤ the number of GPUs"
            )
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield dist.get_rank()
        dist.barrier()
    finally:
        dist.destroy_process_group()
