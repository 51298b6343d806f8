"""`svdq.quantize`: replace a model's `nn.Linear` layers by `SVDQLinear`, in place.

Steps per model: pick layers by name pattern → (optional) run the user's calibration callable once with
hooks that record, per layer, the per-channel max |x| and a bounded random sample of input rows → per
layer, search the smoothing exponent α on that sample, scoring each candidate by the layer's output error
*with* the low-rank branch and both quantizers (docs/numerics.md §2) → swap the module.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .decompose import (
    Decomposition,
    allocate_ranks,
    branch_bytes,
    decompose,
    fake_quant_forward,
    padded_rank,
    rank_error_curve,
    smoothing_factors,
)
from .gptq import layers_within_memory
from ._transaction import ModuleSnapshot, deferred_interrupts, model_transaction
from .conv import SVDQConv1x1, check_conv1x1
from .linear import SVDQLinear
from .models.split_input import SplitInputLinear, split_linear
from .parallel import gather_input_stats, row_keys
from . import ops
from .ops import ACT_FORMATS
from .ops.reference import MAX_RANK, RANK_MULTIPLE, check_act_shift
from .weight_only import SVDQWeightOnlyLinear

log = logging.getLogger("svdq")

METHODS = ("svdquant", "smoothquant", "naive")
ROUNDINGS = ("nearest", "gptq")  # how the residual's INT4 codes are chosen (svdq.gptq); same stored format
CONFIG_VERSION = 1
TARGETS = ("nunchaku",)  # `QuantizeConfig.target`: runtimes whose format a model can be quantized in exactly

# Kept 16-bit by default: embeddings and input projections (they see raw, unnormalized inputs and are tiny
# in FLOPs), AdaLN modulation linears (their outputs scale whole activations: small errors are amplified),
# and the final projection (its error lands directly on the predicted noise).
DEFAULT_EXCLUDE = (
    "*embed*",  # x_embedder, context_embedder, time_text_embed, pos_embed, time_embedding, add_embedding
    "proj_out",  # the final projection (top level only: blocks' own proj_out layers are quantized)
    "norm_out*",
    "*norm*.linear",  # AdaLN modulation: norm1.linear, norm1_context.linear, norm.linear
    "adaln_single*",
    "caption_projection*",
)


@dataclass
class QuantizeConfig:
    """How `svdq.quantize` quantizes a model; saved (as JSON) with every checkpoint.

    rank: low-rank branch rank (padded to a multiple of 16). method: "svdquant" (smoothing search +
    low-rank), "smoothquant" (smoothing search, rank 0), "naive" (neither). include / exclude: fnmatch
    patterns on module names (``include=None`` means every ``nn.Linear``). alphas: the smoothing exponent grid.
    calib_tokens: input rows kept per layer for the search (bounded memory). weight_only: fnmatch patterns of
    layers to make weight-only 4-bit (W4A16, `SVDQWeightOnlyLinear`), chosen among the `nn.Linear` layers that
    include / exclude keep 16-bit (e.g. a family's ``svdq.models.FAMILIES[...].adaln``); default none.
    rounding: "gptq" (default; `svdq.gptq`: codes chosen against the calibration inputs' Hessian, then the
    low-rank branch refit to them — needs calibration, data-free layers round to nearest; kept per layer only
    where it lowers the output error on the calibration sample; the Hessians take K²·4 bytes per layer during
    calibration, see `svdq.gptq.layers_within_memory`) or "nearest" (docs/numerics.md §2.4).
    rank_budget: total bytes of all W4A4 layers' low-rank branches (lora_down + lora_up), spent per layer in
    ranks of multiples of 16 (0 … 4·rank) where the calibration error drops most (`allocate_layer_ranks`);
    ``None`` (default) → every layer gets `rank`. Needs calibration and method "svdquant".
    """

    rank: int = 32
    method: str = "svdquant"
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    alphas: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))
    calib_tokens: int = 256
    version: int = CONFIG_VERSION
    weight_only: tuple[str, ...] = ()  # added after version 1 shipped: configs without it load as ()
    rounding: str = "gptq"  # added after version 1 shipped: configs without it load as "nearest" (from_dict)
    # Activation format the layers run with (docs/numerics.md §8); a run-time choice that reads the same weights,
    # recorded so a checkpoint says how it was meant (and evaluated) to run. Added after version 1 shipped:
    # configs without it load as "int4".
    act_format: str = "int4"
    rank_budget: int | None = None  # added after version 1 shipped: configs without it load as None
    # Shifted unsigned activations (docs/numerics.md §10): 0 = off (default); δ > 0 = for each layer whose
    # calibration sample is ≥ −δ (the layer after GELU: δ = 0.171875), keep the shifted layer where its output
    # error on the sample is lower than the signed one's (`choose_act_shift`). Added after version 1 shipped:
    # configs without it load as 0.
    act_shift: float = 0.0
    # A runtime whose own format the model is quantized in, layer for layer, so that exporting to it is exact
    # (`svdq.formats.nunchaku_target`): None (default, svdq's choices) or "nunchaku". It fixes include / exclude /
    # weight_only and which layers are shifted. Added after version 1 shipped: configs without it load as None.
    target: str | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.rank < 0:
            raise ValueError(f"rank must be >= 0, got {self.rank}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.rank_budget is not None and (self.rank_budget < 0 or self.method != "svdquant"):
            raise ValueError(f"rank_budget must be >= 0 bytes and needs method 'svdquant', got {self.rank_budget} "
                             f"with method {self.method!r}")
        if self.act_format not in ACT_FORMATS:
            raise ValueError(f"act_format must be one of {ACT_FORMATS}, got {self.act_format!r}")
        if self.calib_tokens < 1:
            raise ValueError(f"calib_tokens must be >= 1, got {self.calib_tokens}")
        self.act_shift = check_act_shift(self.act_shift)
        if self.target not in (None,) + TARGETS:
            raise ValueError(f"target must be None or one of {TARGETS}, got {self.target!r}")
        if not self.alphas or any(not 0.0 <= a <= 1.0 for a in self.alphas):
            raise ValueError(f"alphas must be a non-empty grid within [0, 1], got {self.alphas}")
        self.include = None if self.include is None else tuple(self.include)
        self.exclude = tuple(self.exclude)
        self.alphas = tuple(self.alphas)
        if isinstance(self.weight_only, str):
            raise ValueError(f"weight_only must be a sequence of patterns, got the string {self.weight_only!r}")
        self.weight_only = tuple(self.weight_only)
        if self.method != "svdquant":
            self.rank = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantizeConfig":
        """The config saved by `to_dict`. A newer version or a field this svdq does not know raises
        ValueError naming it (a checkpoint written by a newer svdq must not half-load: svdq.load checks this
        before touching the model)."""
        if not isinstance(d, dict):
            raise ValueError(f"quantize config must be a JSON object, got {type(d).__name__}")
        version = d.get("version")
        if version != CONFIG_VERSION:
            raise ValueError(
                f"quantize config field 'version' is {version!r}; this svdq reads version {CONFIG_VERSION}"
                + (" (written by a newer svdq: upgrade svdq)" if isinstance(version, int) and version > CONFIG_VERSION else "")
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"quantize config has field(s) {unknown} that this svdq does not know (config version {version}; "
                f"known fields: {sorted(known)}); it was probably written by a newer svdq"
            )
        if "rounding" not in d:  # written before GPTQ existed: its codes were rounded to nearest
            d = {**d, "rounding": "nearest"}
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"quantize config is invalid: {e}") from e


def matches(name: str, include: Iterable[str] | None, exclude: Iterable[str]) -> bool:
    """Whether module `name` is selected by the include / exclude patterns."""
    if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in exclude)


def select_linears(model: nn.Module, config: QuantizeConfig) -> dict[str, nn.Linear]:
    """The `nn.Linear` modules `config` selects, by qualified name (SVDQLinear layers are left alone); a 1×1
    convolution `select_convs` chose, once wrapped (`SVDQConv1x1.wrapping`), as its ``<conv>.linear``."""
    out = {}
    for name, m in model.named_modules():
        if type(m) is nn.Linear and matches(name, config.include, config.exclude):
            out[name] = m
        elif (isinstance(m, SVDQConv1x1) and type(m.linear) is nn.Linear and config.include is not None
              and matches(name, config.include, config.exclude)):
            out[f"{name}.linear"] = m.linear
    return out


def select_convs(model: nn.Module, config: QuantizeConfig) -> dict[str, nn.Conv2d]:
    """The 1×1 `nn.Conv2d` modules (`svdq.conv.check_conv1x1`: kernel 1×1, stride 1, no padding, one group) whose
    name an explicit ``include`` pattern matches, by qualified name. Never by default (``include=None`` selects
    none: svdq's default choices are linear layers, as measured); other convolutions are not linear layers and
    are left alone."""
    if config.include is None:
        return {}
    out = {}
    for name, m in model.named_modules():
        if type(m) is nn.Conv2d and matches(name, config.include, config.exclude):
            try:
                check_conv1x1(m, name)
            except ValueError:
                continue
            out[name] = m
    return out


def select_weight_only(model: nn.Module, config: QuantizeConfig) -> dict[str, nn.Linear]:
    """The `nn.Linear` modules to make W4A16: those `select_linears` leaves 16-bit that match
    ``config.weight_only`` (W4A4 selection wins when a layer matches both)."""
    if not config.weight_only:
        return {}
    return {
        name: m
        for name, m in model.named_modules()
        if type(m) is nn.Linear
        and not matches(name, config.include, config.exclude)
        and any(fnmatch.fnmatchcase(name, p) for p in config.weight_only)
    }


@dataclass
class InputStats:
    """Per-layer calibration record: per-channel max |x| and a bounded uniform sample of the distinct input rows."""

    absmax: torch.Tensor | None = None
    sample: torch.Tensor | None = None  # [≤ capacity, K] on CPU, input dtype
    seen: int = 0
    keys: torch.Tensor | None = None  # content keys of the kept rows, ascending (svdq.parallel.row_keys)
    xtx: torch.Tensor | None = None  # Σ xᵀx over *all* rows, fp32 [K, K] on the input's device (GPTQ only)

    def update(self, x: torch.Tensor, capacity: int, xtx: bool = False) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if x.shape[0] == 0:
            return
        if xtx:  # raw inputs: λ is not chosen yet; svdq.gptq.smoothed_hessian applies it later
            xf = x.to(torch.float32)
            self.xtx = xf.T @ xf if self.xtx is None else self.xtx.addmm_(xf.T, xf)
        cur = x.abs().amax(dim=0).to(torch.float32)
        self.absmax = cur if self.absmax is None else torch.maximum(self.absmax, cur)
        # Bottom-k sample: keep the `capacity` distinct rows with the smallest keys, in key order. The keys hash each
        # row's bytes (uniform, but not random): the sample does not depend on the order or the split of the
        # tokens, so ranks of a context-parallel run can merge theirs into one process's (svdq.parallel).
        keys, idx = _smallest_distinct(row_keys(x).cpu(), capacity)
        rows = x[idx.to(x.device)].to("cpu", copy=True)
        if self.sample is not None:
            keys, idx = _smallest_distinct(torch.cat([self.keys, keys]), capacity)
            rows = torch.cat([self.sample, rows.to(self.sample.dtype)])[idx]
        self.sample, self.keys = rows, keys
        self.seen += x.shape[0]


def _smallest_distinct(keys: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the ``capacity`` smallest *distinct* keys ascending, their positions in ``keys``).

    Why distinct: identical rows share one key (it hashes the bytes), so keeping every copy made the sample
    all-or-nothing copies of a few rows. Text embeddings repeat every sampling step, and under classifier-free
    guidance SDXL's empty negative prompt is all zeros — half the rows of its cross-attention inputs are one
    row; on the tiny SDXL pipeline the k/v and output projections of cross-attention got samples of zero rows
    only, so their α search and the GPTQ guard measured no error at all. Each distinct row counts once."""
    keys, idx = keys.sort(stable=True)
    first = torch.ones_like(keys, dtype=torch.bool)
    first[1:] = keys[1:] != keys[:-1]
    return keys[first][:capacity], idx[first][:capacity]


def collect_input_stats(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    calibration: Callable[[nn.Module], object],
    capacity: int,
    xtx: Iterable[str] = (),
    process_group=None,
) -> dict[str, InputStats]:
    """Run `calibration(model)` once under no_grad, recording each selected layer's inputs (and, for the
    layers named in `xtx`, Σ xᵀx: K²·4 bytes each, for GPTQ). With ``process_group`` (a torch.distributed group,
    or ``"auto"``: the default group when the model runs under diffusers' context parallelism), the statistics
    are then merged over its ranks (`svdq.parallel.gather_input_stats`)."""
    xtx = set(xtx)
    stats = {name: InputStats() for name in layers}
    handles = []
    for name, layer in layers.items():
        def hook(_mod, args, _name=name):
            stats[_name].update(args[0], capacity, _name in xtx)

        handles.append(layer.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            calibration(model)
    finally:
        for h in handles:
            h.remove()
    if process_group == "auto":
        process_group = None if getattr(model, "_parallel_config", None) is None else dist.group.WORLD
    if process_group is not None:
        gather_input_stats(stats, capacity, process_group)
    unseen = [n for n, s in stats.items() if s.seen == 0]
    if unseen:
        log.warning("calibration never ran %d selected layers (quantized data-free): %s", len(unseen), unseen[:5])
    return stats


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def quantize_layer(
    linear: nn.Linear, stats: InputStats | None, config: QuantizeConfig, rank: int | None = None
) -> tuple[Decomposition, dict]:
    """Quantize one layer; with calibration data, search α and keep the candidate of least output error.
    rank: this layer's rank (`allocate_layer_ranks`); ``None`` → ``config.rank``."""
    weight = linear.weight
    rank = (config.rank if rank is None else rank) if config.method == "svdquant" else 0
    if config.method == "naive" or stats is None or stats.sample is None:
        dec = decompose(weight, rank, None)
        info = {"alpha": None}
        if stats is not None and stats.sample is not None:
            x = stats.sample.to(weight.device)
            info["rel_error"] = _score(linear, dec, x)
        return dec, info
    x = stats.sample.to(weight.device)
    absmax = stats.absmax.to(weight.device)
    # λ = 1 competes too, so calibrated quantization is never worse on the sample than data-free.
    best = decompose(weight, rank, None)
    best_err, best_alpha = _score(linear, best, x), None
    for alpha in config.alphas:
        dec = decompose(weight, rank, smoothing_factors(absmax, weight, alpha))
        err = _score(linear, dec, x)
        if err < best_err:
            best, best_err, best_alpha = dec, err, alpha
    info = {"alpha": best_alpha, "rel_error": best_err}
    if config.rounding == "gptq" and stats.xtx is None:
        info["rounding"] = "nearest"  # no Hessian: over the memory budget (svdq.gptq.layers_within_memory)
    elif config.rounding == "gptq":
        # α is searched with round-to-nearest (fast); GPTQ then re-rounds the chosen λ's residual and is
        # kept only where it lowers the error on the sample, so no layer gets worse than "nearest" there.
        lam = None if best_alpha is None else smoothing_factors(absmax, weight, best_alpha)
        dec = decompose(weight, rank, lam, xtx=stats.xtx)
        err = _score(linear, dec, x)
        info["rel_error_nearest"] = best_err
        info["rounding"] = "gptq" if err < best_err else "nearest"
        if err < best_err:
            best, info["rel_error"] = dec, err
    return best, info


def allocate_layer_ranks(
    layers: dict[str, nn.Linear], stats: dict[str, InputStats] | None, config: QuantizeConfig, progress: bool = False
) -> dict[str, int]:
    """Per-layer ranks under ``config.rank_budget`` bytes: per layer, α is searched at ``config.rank`` (round
    to nearest), the output-error curve on the calibration sample is measured at ranks 0, 16, … 4·rank with that
    α (`rank_error_curve`), and `allocate_ranks` spends the budget where the error drops most per byte."""
    if stats is None:
        raise ValueError("rank_budget needs calibration: ranks go where the calibration error drops most")
    top = min(MAX_RANK, max(RANK_MULTIPLE, 4 * config.rank))
    nearest = replace(config, rounding="nearest")
    curves, unit = {}, {}
    for name, linear in tqdm(layers.items(), desc="svdq rank search", unit="layer", disable=not progress):
        n, k = linear.weight.shape
        unit[name] = branch_bytes(n, k, 1, linear.weight.dtype)
        s = stats.get(name)
        if s is None or s.sample is None:  # never ran during calibration: it keeps the uniform rank
            curves[name] = {padded_rank(min(config.rank, n, k)): 0.0}
            continue
        with torch.no_grad():
            _, info = quantize_layer(linear, s, nearest)
            lam = None if info["alpha"] is None else smoothing_factors(s.absmax.to(linear.weight.device),
                                                                       linear.weight, info["alpha"])
            ranks = list(range(0, min(top, n, k) + 1, RANK_MULTIPLE))
            curves[name] = rank_error_curve(linear.weight, lam, s.sample.to(linear.weight.device), ranks)
    return allocate_ranks(curves, unit, config.rank_budget)


def _score(linear: nn.Linear, dec: Decomposition, x: torch.Tensor) -> float:
    x = x.to(dec.wscales.dtype)
    ref = x.to(torch.float32) @ linear.weight.detach().to(torch.float32).T
    return relative_error(fake_quant_forward(x, dec), ref)


def quantize(
    model: nn.Module,
    *,
    calibration: Callable[[nn.Module], object] | None = None,
    rank: int = 32,
    method: str = "svdquant",
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    weight_only: Iterable[str] | None = None,
    rounding: str = "gptq",
    act_format: str = "int4",
    rank_budget: int | None = None,
    act_shift: float = 0.0,
    target: str | None = None,
    progress: bool = True,
    config: QuantizeConfig | None = None,
    process_group="auto",
    streaming: bool = False,
    state_dir=None,
    device=None,
    propagate: str = "quantized",
) -> nn.Module:
    """Replace the selected `nn.Linear` layers of `model` with `SVDQLinear`, in place; returns `model`.

    calibration: a callable run once as ``calibration(model)`` (e.g. ``lambda m: pipe(prompts)``); during it
    every selected layer records input statistics. ``None`` → data-free (λ = 1, low-rank + INT4 only).
    method: "svdquant" | "smoothquant" | "naive". include / exclude: fnmatch patterns on module names;
    ``exclude=None`` keeps the defaults (embeddings, AdaLN modulation and final projections stay 16-bit).
    weight_only: fnmatch patterns of layers (among those kept 16-bit) made weight-only 4-bit instead
    (`SVDQWeightOnlyLinear`, W4A16), e.g. ``svdq.models.FAMILIES["flux"].adaln`` for the AdaLN modulation;
    ``None`` → none. rounding: "gptq" (default) | "nearest" (`QuantizeConfig.rounding`). rank_budget: bytes
    of all low-rank branches, spread per layer where the error drops most (`QuantizeConfig.rank_budget`).
    act_shift: 0 (default) or δ > 0 — shifted unsigned activations (docs/numerics.md §10) for the layers whose
    calibration inputs are ≥ −δ, kept per layer where they lower the error (`QuantizeConfig.act_shift`;
    0.171875 for the layers after GELU, Nunchaku's choice).
    target: None (default) or "nunchaku" — quantize in Nunchaku's own form, layer for layer (which layers are
    W4A4 / W4A16 / shifted, FLUX.1's split single-block proj_out, AdaNorm biases whose + 1 is exact), so that
    `svdq export --format nunchaku` writes only copies and exact permutations (`svdq.formats.nunchaku_target`);
    chooses the layers itself, so include / exclude / weight_only must stay None.
    process_group: under torch.distributed, the ranks whose calibration statistics are merged so that every
    rank quantizes from all ranks' tokens (`svdq.parallel`); ``"auto"`` (default) = all ranks when the model
    runs under diffusers' context parallelism, else none; ``None`` = none.
    streaming: quantize block by block (`svdq.streaming`, docs/streaming.md): calibration inputs are
    captured at the first repeated block, then each block in turn is moved to ``device``, calibrated on them,
    quantized, and run to give the next block's inputs (``propagate``: "quantized" — GPTQ's sequential order,
    default — or "16bit", which equals the non-streaming result); memory = one block + the captured activations.
    state_dir: with streaming, a directory where finished blocks are kept, so that a rerun with the same
    arguments resumes after an interruption (never a loadable checkpoint on its own).
    Per-layer results (chosen α, relative output error on the calibration sample) end up in
    ``model.svdq_report`` and the config in ``model.svdq_config``.
    """
    # Known diffusers families (svdq/models) keep their own set of 16-bit layers by default.
    from .models import family_of

    family = family_of(model)
    if config is None:
        if target is not None and (include is not None or exclude is not None or weight_only is not None):
            raise ValueError(f"svdq.quantize: target={target!r} chooses the quantized layers itself; drop include / "
                             f"exclude / weight_only")
        config = QuantizeConfig(
            rank=rank,
            method=method,
            include=None if include is None else tuple(include),
            exclude=(family.exclude if family else DEFAULT_EXCLUDE) if exclude is None else tuple(exclude),
            weight_only=() if weight_only is None else weight_only,
            rounding=rounding,
            act_format=act_format,
            rank_budget=rank_budget,
            act_shift=act_shift,
            target=target,
        )
    if config.target is None:
        return _quantize(model, calibration, config, None, progress, process_group, streaming, state_dir, device,
                         propagate)
    from .formats import nunchaku_target

    nunchaku_target.check_config(config)
    rules = nunchaku_target.rules_for(model)
    rules.check(model)
    config = replace(config, include=rules.w4a4, exclude=(), weight_only=tuple(rules.adanorm))
    snapshot = ModuleSnapshot(model)  # the splits below are undone if quantization fails (all or nothing)
    try:
        for name, sizes in rules.splits(model).items():
            if not isinstance(model.get_submodule(name), SplitInputLinear):
                split_linear(model, name, sizes)
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] + list(select_convs(model, config))
        missing = [alt for alt in rules.required() if not any(fnmatch.fnmatchcase(n, p) for n in linears for p in alt)]
        if missing:
            raise ValueError(f"svdq.quantize: target={config.target!r}: no 16-bit linear of {type(model).__name__} "
                             f"matches {' or '.join(map(repr, missing[0]))}, a layer Nunchaku's {rules.label} file "
                             f"quantizes (is the model fused as svdq fuses it, and not quantized yet?)")
        return _quantize(model, calibration, config, nunchaku_target.layer_adjuster(rules), progress, process_group,
                         streaming, state_dir, device, propagate)
    except BaseException:
        with deferred_interrupts():
            snapshot.restore()
        raise


def _quantize(model, calibration, config, adjust, progress, process_group, streaming, state_dir, device, propagate):
    """`quantize` once the config is settled; ``adjust``: a per-layer step for `build_layers` (or None). The 1×1
    convolutions `select_convs` names are first wrapped as `SVDQConv1x1` holding a 16-bit ``nn.Linear`` view of
    their weight (calibrated on their input pixels' channels, quantized as ``<conv>.linear``); undone on failure."""
    convs = select_convs(model, config)
    if not convs:
        return _quantize_linears(model, calibration, config, adjust, progress, process_group, streaming, state_dir,
                                 device, propagate)
    snapshot = ModuleSnapshot(model)
    try:
        for name, conv in convs.items():
            _set_submodule(model, name, SVDQConv1x1.wrapping(conv, name))
        return _quantize_linears(model, calibration, config, adjust, progress, process_group, streaming, state_dir,
                                 device, propagate)
    except BaseException:
        with deferred_interrupts():
            snapshot.restore()
        raise


def _quantize_linears(model, calibration, config, adjust, progress, process_group, streaming, state_dir, device,
                      propagate):
    layers = select_linears(model, config)
    wo_layers = select_weight_only(model, config)
    if config.weight_only and not wo_layers:
        log.warning("svdq.quantize: weight_only=%s matched no 16-bit nn.Linear", config.weight_only)
    if not layers:
        log.warning("svdq.quantize: no nn.Linear matched include=%s exclude=%s", config.include, config.exclude)
    # Check every selected layer before the slow part: a non-finite weight fails here, naming the layer
    # (otherwise the SVD fails deep inside LAPACK, with no layer name, after minutes of work).
    for name, linear in {**layers, **wo_layers}.items():
        _check_finite(name, {"weight": linear.weight, "bias": linear.bias})
    if streaming:
        from .streaming import quantize_streaming

        return quantize_streaming(model, calibration, config, layers, wo_layers, state_dir=state_dir, device=device,
                                  propagate=propagate, progress=progress, process_group=process_group, adjust=adjust)
    stats = None
    if calibration is not None:  # naive ignores the statistics for λ but still reports its error
        hessian_layers = layers_within_memory(layers) if config.rounding == "gptq" and config.method != "naive" else ()
        stats = collect_input_stats(model, {**layers, **wo_layers}, calibration, config.calib_tokens, hessian_layers,
                                    process_group)
    # Build every new layer first, without touching the model; then swap them all in one step
    # (svdq._transaction: all or nothing, also on Ctrl-C).
    report = dict(getattr(model, "svdq_report", {}) or {})
    layer_ranks = {} if config.rank_budget is None else allocate_layer_ranks(layers, stats, config, progress)
    new_layers = build_layers(layers, wo_layers, stats, config, report, layer_ranks, progress, adjust)
    with model_transaction(model):
        for name, new in new_layers.items():
            _set_submodule(model, name, new)
        model.svdq_report = report
        model.svdq_config = config
    from .integrations.diffusers_quantizer import attach

    attach(model)  # diffusers' save_pretrained / LoRA API work on it (no-op for non-diffusers models)
    return model


def build_layers(
    layers: dict[str, nn.Linear],
    wo_layers: dict[str, nn.Linear],
    stats: dict[str, InputStats] | None,
    config: QuantizeConfig,
    report: dict,
    layer_ranks: dict[str, int] | None = None,
    progress: bool = False,
    adjust: Callable | None = None,
) -> dict[str, nn.Module]:
    """The quantized replacements of ``layers`` (W4A4) and ``wo_layers`` (W4A16), by name, built without
    touching the model; each layer's entry is added to ``report`` and its statistics popped from ``stats``
    (freed as soon as used). Shared by `quantize` and the block-by-block `svdq.streaming`. ``adjust``:
    ``adjust(name, layer, decomposition or None, linear, info) → layer``, run on each new layer (a target's rules,
    `svdq.formats.nunchaku_target.layer_adjuster`)."""
    new_layers, layer_ranks = {}, layer_ranks or {}
    for name, linear in tqdm(layers.items(), desc="svdq quantize", unit="layer", disable=not progress):
        layer_stats = None if stats is None else stats.pop(name, None)
        with torch.no_grad():
            dec, info = quantize_layer(linear, layer_stats, config, layer_ranks.get(name))
        _check_finite(name, {"smooth": dec.smooth, "wscales": dec.wscales, "lora_down": dec.lora_down,
                             "lora_up": dec.lora_up})
        new = new_layers[name] = SVDQLinear.from_decomposition(dec, linear.bias)
        if config.act_shift:
            with torch.no_grad():
                new = new_layers[name] = choose_act_shift(linear, dec, new, layer_stats, config.act_shift, info)
        if adjust is not None:
            with torch.no_grad():
                new = new_layers[name] = adjust(name, new, dec, linear, info)
        new.act_format = config.act_format
        report[name] = {"in_features": new.in_features, "out_features": new.out_features, "rank": new.rank, **info}
    for name, linear in wo_layers.items():
        with torch.no_grad():
            new = new_layers[name] = SVDQWeightOnlyLinear.from_linear(linear)
            info = _weight_only_info(linear, new, None if stats is None else stats.pop(name, None))
            if adjust is not None:
                new = new_layers[name] = adjust(name, new, None, linear, info)
        _check_finite(name, {"wscales": new.wscales})
        report[name] = {"in_features": new.in_features, "out_features": new.out_features, "precision": "w4a16",
                        **info}
    return new_layers


def _check_finite(layer: str, tensors: dict) -> None:
    """ValueError naming the layer and tensor when one holds NaN or ±inf."""
    for what, t in tensors.items():
        if t is None:
            continue
        bad = int((~torch.isfinite(t.detach())).sum())
        if bad:
            raise ValueError(
                f"svdq.quantize: layer {layer!r} has {bad} non-finite value(s) (NaN/inf) in its {what} "
                f"{tuple(t.shape)}; the model was not changed"
            )


def choose_act_shift(
    linear: nn.Linear, dec: Decomposition, signed: SVDQLinear, stats: InputStats | None, act_shift: float, info: dict
) -> SVDQLinear:
    """``signed`` or the same decomposition as a shifted layer (spec §10, ``act_shift``), whichever has the lower
    output error (bias included: a shifted layer's bias carries the shift's correction) on the calibration
    sample, both run by the reference ops. Only layers whose sample is ≥ −act_shift are candidates (below it
    codes would clamp); no sample → signed. Records ``act_shift`` (and both errors when measured) in ``info``.
    The sample bounds the choice, not a guarantee: an unseen input below −δ clamps to code 0 (error ≤ its
    distance to −δ)."""
    info["act_shift"] = 0.0
    if stats is None or stats.sample is None or float(stats.sample.min()) < -act_shift:
        return signed
    shifted = SVDQLinear.from_decomposition(dec, linear.bias, act_shift=act_shift)
    x = stats.sample.to(device=linear.weight.device, dtype=dec.wscales.dtype)
    want = torch.nn.functional.linear(
        x.float(), linear.weight.detach().float(), None if linear.bias is None else linear.bias.detach().float()
    )
    with ops.use_backend("reference"):
        err_signed, err_shifted = relative_error(signed(x).float(), want), relative_error(shifted(x).float(), want)
    info["rel_error_signed"], info["rel_error_shifted"] = err_signed, err_shifted
    if err_shifted < err_signed:
        info["act_shift"] = act_shift
        return shifted
    return signed


def _weight_only_info(linear: nn.Linear, layer: SVDQWeightOnlyLinear, stats: InputStats | None) -> dict:
    """Relative weight error ‖W − Ŵ‖/‖W‖ and, with calibration data, the output error on the sample."""
    w = linear.weight.detach().to(torch.float32)
    w_hat = layer.dequantize(torch.float32)
    info = {"weight_rel_error": relative_error(w_hat, w)}
    if stats is not None and stats.sample is not None:
        x = stats.sample.to(device=w.device, dtype=torch.float32)
        info["rel_error"] = relative_error(x @ w_hat.T, x @ w.T)
    return info


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quantized_layers(model: nn.Module) -> dict[str, SVDQLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SVDQLinear)}
