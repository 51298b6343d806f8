"""svdq's native libraries: typed wrappers for their ops, their fakes, and the backends they provide.

Importing this module loads the libraries when they were built (`svdq._library`: ``_C.so`` registers the
torch ops ``svdq::*`` — schemas in csrc/registration.cpp, CPU kernels in csrc/cpu — and ``_C_cuda.so`` the
CUDA kernels, in a CUDA torch). It then registers a fake (meta) implementation per op, right below its
wrapper, so ``torch.compile`` can trace through, and the ``"cpu"`` backend (and ``"cuda"`` when the CUDA
kernels loaded and a GPU is visible; ``"cuda-sm90"``, the Hopper FP8-wgmma kernels, registered always for its
layout and available on sm_90) with ``svdq.ops.register_backend``.

Without the libraries this module still imports: ``AVAILABLE`` is False, ``build_info()`` says
``native=False`` and only the reference backend exists.
"""

from __future__ import annotations

import functools
import os

import torch

from . import _library
from . import ops as _ops
from .ops import sm90_layout as _sm90_layout
from .version import __version__

try:
    _C: _library.NativeLibrary | None = _library.load()
    AVAILABLE = True
    IMPORT_ERROR: ImportError | None = None
except _library.NativeLibraryError as e:  # not built (pure-Python install), or a torch without its stable ABI
    _C = None
    AVAILABLE = False
    IMPORT_ERROR = e

if AVAILABLE:
    from .ops import w4a8_cpu as _w4a8_cpu

    _w4a8_cpu.register()  # the W4A8 ops' CPU kernels are torch ops (svdq/ops/w4a8_cpu.py)


def _fix_hint(error: BaseException | None) -> str:
    """What to do about native libraries that did not load, from the error's text."""
    text = str(error)
    if "install torch >=" in text:
        return "upgrade torch (the message above names the version needed)"
    if "not built" in text:
        return "build them with `pip install --no-build-isolation -e .` (docs/building.md)"
    return "rebuild them with `pip install --no-build-isolation -e .` (docs/building.md)"


def _warn_if_missing() -> None:
    """Warn once per process that the native kernels did not load, with the reason and the fix: without them
    every layer silently runs the reference backend, about 10x slower. Warns too when the CUDA kernels were
    built but did not load into a CUDA torch. ``SVDQ_NO_NATIVE_WARNING=1`` silences it (pure-Python use on
    purpose)."""
    if os.environ.get("SVDQ_NO_NATIVE_WARNING") == "1":
        return
    import warnings

    if not AVAILABLE:
        warnings.warn(
            f"svdq: the native library svdq/_C.so did not load ({type(IMPORT_ERROR).__name__}: {IMPORT_ERROR}); "
            f"every layer runs the slow PyTorch reference backend. Fix: {_fix_hint(IMPORT_ERROR)}. `svdq doctor` "
            "shows the build and the environment.",
            RuntimeWarning,
            stacklevel=3,
        )
    elif _C.info["cuda"] and not _C.info["cuda_loaded"] and torch.version.cuda:
        warnings.warn(
            f"svdq: the CUDA kernels did not load ({_C.info['cuda_not_loaded_because']}); CUDA layers run the "
            "reference backend. `svdq doctor` shows the build and the environment.",
            RuntimeWarning,
            stacklevel=3,
        )


_warn_if_missing()  # module import runs once per process, so this warns once


def build_info() -> dict:
    """What the native extension was built with.

    Keys: ``version``, ``native`` (libraries loaded), ``cuda`` (CUDA kernels compiled in), ``cuda_loaded``
    (and ``cuda_not_loaded_because``), ``cuda_major``, ``cuda_archs``, ``cuda_toolkit_root``, ``nvcc_version``,
    ``cxx_compiler``, ``torch_version`` (built with), ``torch_abi_min`` (the oldest torch it loads into),
    ``torch_version_runtime``, ``cpu_isas_compiled``, ``cpu_isa`` (variant in use), and more.
    """
    if not AVAILABLE:
        return {
            "version": __version__,
            "native": False,
            "cuda": False,
            "cuda_archs": [],
            "torch_version_runtime": torch.__version__,
            "import_error": str(IMPORT_ERROR),
        }
    info = dict(_C.info)
    info["native"] = True
    info["cpu_isas_supported"] = _C.cpu_isas()
    info["cpu_isa"] = _C.active_cpu_isa()
    info["torch_version_runtime"] = torch.__version__
    return info


# ---- ops: one typed wrapper each, its fake right below -------------------------------------------------


def quantize_act(
    x: torch.Tensor,
    smooth: torch.Tensor,
    lora_down: torch.Tensor,
    lora_scales: torch.Tensor | None = None,
    act_shift: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] → (qact int8 [M, Kp/2], ascales fp32 [M, Kp/64], lora_act fp32 [M, r]) (spec §4.1); ``act_shift``
    δ > 0: shifted unsigned codes (spec §10, CPU kernels only)."""
    return torch.ops.svdq.quantize_act(x, smooth, lora_down, lora_scales, act_shift)


def prepare_weight(qweight: torch.Tensor, wscales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical qweight int8 [N, Kp/2] / wscales [N, Kp/64] → this device's GEMM layout (leading dim N)."""
    return torch.ops.svdq.prepare_weight(qweight, wscales)


# ---- the CUDA GEMM's weight layout, in torch (svdq.ops: layouts and the storage rules) ------------------

CUDA_LAYOUT = "cuda-g64"


def _check_canonical(op: str, qweight: torch.Tensor, wscales: torch.Tensor) -> tuple[int, int]:
    if qweight.dim() != 2 or qweight.dtype != torch.int8 or qweight.shape[1] % (_ops.GROUP_SIZE // 2):
        raise ValueError(f"{op}: qweight must be int8 [N, Kp/2] with Kp a multiple of 64, got "
                         f"{qweight.dtype} {tuple(qweight.shape)}")
    n, groups = qweight.shape[0], qweight.shape[1] // (_ops.GROUP_SIZE // 2)
    if tuple(wscales.shape) != (n, groups) or wscales.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"{op}: wscales must be bfloat16/float16 [N, Kp/64] = [{n}, {groups}] for the CUDA "
                         f"layout, got {wscales.dtype} {tuple(wscales.shape)}")
    return n, groups


def cuda_prepare_weight(qweight: torch.Tensor, wscales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical → the CUDA GEMM's layout (csrc/cuda/mma_layout.cuh §4): qweight group-major [G][N][32 B] kept
    as int8 [N, Kp/2], wscales fp32 [G][N] kept as [N, Kp/64]. CUDA tensors go through the native repack op;
    tensors elsewhere (weights waiting on the CPU for an offload hook to carry them) get the same bytes from
    torch, so that they travel prepared and the GPU never repacks them."""
    if qweight.is_cuda:
        return prepare_weight(qweight, wscales)
    n, groups = _check_canonical("svdq cuda_prepare_weight", qweight, wscales)
    rb = _ops.GROUP_SIZE // 2  # bytes per row and group
    q = qweight.reshape(n, groups, rb).transpose(0, 1).contiguous().view(n, groups * rb)
    s = wscales.to(torch.float32).t().contiguous().view(n, groups)
    return q, s


def cuda_unprepare_weight(
    qweight: torch.Tensor, wscales: torch.Tensor, dtype: torch.dtype, out_features: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CUDA layout → canonical, bit for bit (the fp32 scales came from ``dtype``, so they round back
    exactly). Plain torch on any device: a layer prepared on a GPU can be saved or moved to the CPU backend.
    ``out_features``, when given, must be N (this layout keeps N as the leading dimension)."""
    n, half = qweight.shape
    if out_features is not None and out_features != n:
        raise ValueError(f"svdq cuda_unprepare_weight: qweight {tuple(qweight.shape)} holds {n} channels, not "
                         f"out_features={out_features}")
    rb = _ops.GROUP_SIZE // 2
    groups = half // rb
    if qweight.dtype != torch.int8 or tuple(wscales.shape) != (n, groups) or wscales.dtype != torch.float32:
        raise ValueError(f"svdq cuda_unprepare_weight: expected int8 [N, Kp/2] and fp32 [N, Kp/64] in the CUDA "
                         f"layout, got {qweight.dtype} {tuple(qweight.shape)}, {wscales.dtype} "
                         f"{tuple(wscales.shape)}")
    q = qweight.reshape(groups, n, rb).transpose(0, 1).contiguous().view(n, half)
    s = wscales.reshape(groups, n).t().to(dtype).contiguous()
    return q, s


# ---- the Hopper (sm_90a) FP8-wgmma GEMMs' layout "cuda-sm90" (svdq/ops/sm90_layout.py, docs/kernels.md §12) -----

SM90_LAYOUT = _sm90_layout.LAYOUT


def prepare_weight_sm90(qweight: torch.Tensor, wscales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical qweight int8 [N, Kp/2] / wscales bf16|fp16 [N, Kp/64] → (uint8 [Np, Kp] e4m3, fp32 [Np, Kp/64])
    (the native op; CUDA on sm_90 only)."""
    return torch.ops.svdq.prepare_weight_sm90(qweight, wscales)


def w4a4_gemm_sm90(qact, ascales, qweight, wscales, lora_act, lora_up, bias, out_dtype) -> torch.Tensor:
    """Exact W4A4 on Hopper: qact uint8 [M, Kp] from `quantize_act_e4m3`, weights from `prepare_weight_sm90`;
    y [M, N] with N = lora_up.shape[0] (spec §4.2)."""
    return torch.ops.svdq.w4a4_gemm_sm90(qact, ascales, qweight, wscales, lora_act, lora_up, bias, out_dtype)


def _sm90_kernels() -> bool:
    """Whether this build registered the sm_90a ops' CUDA kernels (90 in the arch list, SVDQ_WITH_SM90)."""
    return _has_op("w4a4_gemm_sm90") and torch._C._dispatch_has_kernel_for_dispatch_key(
        "svdq::w4a4_gemm_sm90", "CUDA")


def _is_sm90(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)


def sm90_prepare_weight(qweight: torch.Tensor, wscales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical → the sm90 layout. On an sm_90 GPU the native op; elsewhere (weights waiting on the CPU for an
    offload hook, another GPU) the same bytes from torch, so they travel prepared."""
    if _is_sm90(qweight.device) and _sm90_kernels():
        return prepare_weight_sm90(qweight, wscales)
    return _sm90_layout.prepare(qweight, wscales)


def sm90_unprepare_weight(qweight, wscales, dtype, out_features=None):
    """The sm90 layout → canonical, bit for bit, in torch on any device (``out_features`` = N is required)."""
    return _sm90_layout.unprepare(qweight, wscales, dtype, out_features)


def w4a4_gemm(
    qact: torch.Tensor,
    ascales: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    lora_act: torch.Tensor,
    lora_up: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    act_unsigned: bool = False,
) -> torch.Tensor:
    """y [M, N] in ``out_dtype`` (spec §4.2); qweight/wscales as returned by `prepare_weight`; ``act_unsigned``:
    qact holds shifted unsigned codes (spec §10.2, CPU kernels only)."""
    return torch.ops.svdq.w4a4_gemm(qact, ascales, qweight, wscales, lora_act, lora_up, bias, out_dtype, act_unsigned)


def quantize_act_fp8(
    x: torch.Tensor, smooth: torch.Tensor, lora_down: torch.Tensor, lora_scales: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W4A8: x [M, K] → (qact uint8 [M, Kp] e4m3, ascales fp32 [M], lora_act fp32 [M, r]) (spec §8.1)."""
    return torch.ops.svdq.quantize_act_fp8(x, smooth, lora_down, lora_scales)


def w4a8_gemm(qact, ascales, qweight, wscales, lora_act, lora_up, bias, out_dtype) -> torch.Tensor:
    """W4A8: y [M, N] in ``out_dtype`` (spec §8.2); qweight/wscales as returned by `prepare_weight`."""
    return torch.ops.svdq.w4a8_gemm(qact, ascales, qweight, wscales, lora_act, lora_up, bias, out_dtype)


def _has_op(name: str) -> bool:
    return AVAILABLE and hasattr(torch.ops.svdq, name)


if _has_op("quantize_act_fp8"):

    @torch.library.register_fake("svdq::quantize_act_fp8")
    def _quantize_act_fp8_fake(x, smooth, lora_down, lora_scales):
        m, k = x.shape
        kp = (k + _ops.GROUP_SIZE - 1) // _ops.GROUP_SIZE * _ops.GROUP_SIZE
        return (
            x.new_empty((m, kp), dtype=torch.uint8),
            x.new_empty((m,), dtype=torch.float32),
            x.new_empty((m, lora_down.shape[1]), dtype=torch.float32),
        )

    @torch.library.register_fake("svdq::w4a8_gemm")
    def _w4a8_gemm_fake(qact, ascales, qweight, wscales, lora_act, lora_up, bias, out_dtype):
        # N from lora_up [N, r]: the sm90 layout's qweight has N rounded up to 128 rows.
        return qact.new_empty((qact.shape[0], lora_up.shape[0]), dtype=out_dtype)


if _has_op("w4a4_gemm_sm90"):

    @torch.library.register_fake("svdq::prepare_weight_sm90")
    def _prepare_weight_sm90_fake(qweight, wscales):
        np_, kp = _sm90_layout.padded_n(qweight.shape[0]), qweight.shape[1] * 2
        return (qweight.new_empty((np_, kp), dtype=torch.uint8),
                qweight.new_empty((np_, kp // _ops.GROUP_SIZE), dtype=torch.float32))

    @torch.library.register_fake("svdq::w4a4_gemm_sm90")
    def _w4a4_gemm_sm90_fake(qact, ascales, qweight, wscales, lora_act, lora_up, bias, out_dtype):
        return qact.new_empty((qact.shape[0], lora_up.shape[0]), dtype=out_dtype)


def quantize_act_e4m3(
    x: torch.Tensor, smooth: torch.Tensor, lora_down: torch.Tensor, lora_scales: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`quantize_act` with the INT4 codes as float8_e4m3fn bytes: (qact uint8 [M, Kp], ascales fp32 [M, Kp/64],
    lora_act fp32 [M, r]) — the same codes and scales (the Hopper FP8 GEMM's A operand)."""
    return torch.ops.svdq.quantize_act_e4m3(x, smooth, lora_down, lora_scales)


if _has_op("quantize_act_e4m3"):

    @torch.library.register_fake("svdq::quantize_act_e4m3")
    def _quantize_act_e4m3_fake(x, smooth, lora_down, lora_scales):
        m, k = x.shape
        kp = (k + _ops.GROUP_SIZE - 1) // _ops.GROUP_SIZE * _ops.GROUP_SIZE
        return (
            x.new_empty((m, kp), dtype=torch.uint8),
            x.new_empty((m, kp // _ops.GROUP_SIZE), dtype=torch.float32),
            x.new_empty((m, lora_down.shape[1]), dtype=torch.float32),
        )


def _w4a8_kernel(device_type: str, name: str):
    """The native W4A8 op for ``device_type`` when the extension registered one, else None (backend lacks it)."""
    if not _has_op(name):
        return None
    has = torch._C._dispatch_has_kernel_for_dispatch_key(f"svdq::{name}", device_type.upper())
    return {"quantize_act_fp8": quantize_act_fp8, "w4a8_gemm": w4a8_gemm}[name] if has else None


if AVAILABLE:

    @torch.library.register_fake("svdq::quantize_act")
    def _quantize_act_fake(x, smooth, lora_down, lora_scales, act_shift=0.0):
        m, k = x.shape
        groups = (k + _ops.GROUP_SIZE - 1) // _ops.GROUP_SIZE
        return (
            x.new_empty((m, groups * _ops.GROUP_SIZE // 2), dtype=torch.int8),
            x.new_empty((m, groups), dtype=torch.float32),
            x.new_empty((m, lora_down.shape[1]), dtype=torch.float32),
        )

    @torch.library.register_fake("svdq::prepare_weight")
    def _prepare_weight_fake(qweight, wscales):
        # Both devices keep qweight's shape [N, Kp/2] and return wscales as fp32 [N, Kp/64] (CUDA's are exactly
        # N * Kp/2 and N * Kp/64 * 4 bytes, no padding rows; shapes and dtypes are what a fake must get right).
        return torch.empty_like(qweight), torch.empty_like(wscales, dtype=torch.float32)

    @torch.library.register_fake("svdq::w4a4_gemm")
    def _w4a4_gemm_fake(qact, ascales, qweight, wscales, lora_act, lora_up, bias, out_dtype, act_unsigned=False):
        # N from qweight.shape[0] (every device's prepared layout keeps it), M from qact.
        return qact.new_empty((qact.shape[0], qweight.shape[0]), dtype=out_dtype)


# ---- backends ------------------------------------------------------------------------------------------


@functools.cache
def _cuda_available() -> bool:
    # Asked on every layer call (svdq.ops.select_backend): answer once, both facts are fixed for the process.
    return AVAILABLE and bool(_C.info["cuda_loaded"]) and torch.cuda.is_available()


if AVAILABLE:
    _ops.register_backend(
        _ops.Backend(
            name="cpu",
            devices=("cpu",),
            priority=10,
            quantize_act=quantize_act,
            w4a4_gemm=w4a4_gemm,
            # The CPU GEMM reads the canonical layout and converts the scales to fp32 per call (a transient of
            # N * Kp/64 * 4 bytes): no prepared copy, so a CPU layer holds its weights once (svdq.ops rule 1).
            # The svdq::prepare_weight op (a checked copy) stays for direct callers of the kernels.
            quantize_act_fp8=_w4a8_kernel("cpu", "quantize_act_fp8"),
            w4a8_gemm=_w4a8_kernel("cpu", "w4a8_gemm"),
            shifted_act=True,  # spec §10 in csrc/cpu/kernels_isa.cpp
        )
    )
    if _C.info["cuda_loaded"]:
        _ops.register_backend(
            _ops.Backend(
                name="cuda",
                devices=("cuda",),
                priority=20,
                quantize_act=quantize_act,
                w4a4_gemm=w4a4_gemm,
                is_available=_cuda_available,
                prepare_weight=cuda_prepare_weight,
                layout=CUDA_LAYOUT,
                unprepare_weight=cuda_unprepare_weight,
                # The CUDA W4A8 kernels are sm_90a ones on the sm90 layout: backend "cuda-sm90" below.
            )
        )

    def _sm90_available() -> bool:
        # Opt-in (SVDQ_SM90_FP8=1; read per call, like the ops' switches; under torch.compile once, when
        # tracing) until the device check has run it: its kernels have never executed on a GPU yet, and its FP8
        # weights take 2x the int4 bytes (docs/kernels.md §12.4, issue 12's memory goal). Otherwise "cuda" (int8
        # mma.sync, measured) runs on sm_90. Registered on every machine so that its layout converts anywhere
        # (offload preparation on the CPU, round trips in CI).
        return _sm90_ready() and os.environ.get("SVDQ_SM90_FP8", "0").strip().lower() in ("1", "true", "on", "yes")

    @functools.cache
    def _sm90_ready() -> bool:
        # Fixed for the process: the sm_90a kernels built and the current GPU (at the first call) is sm_90.
        return _cuda_available() and _sm90_kernels() and _is_sm90(torch.device("cuda", torch.cuda.current_device()))

    _ops.register_backend(
        _ops.Backend(
            name="cuda-sm90",
            devices=("cuda",),
            priority=30,
            quantize_act=quantize_act_e4m3,
            w4a4_gemm=w4a4_gemm_sm90,
            is_available=_sm90_available,
            prepare_weight=sm90_prepare_weight,
            layout=SM90_LAYOUT,
            unprepare_weight=sm90_unprepare_weight,
            quantize_act_fp8=quantize_act_fp8,
            w4a8_gemm=w4a8_gemm,
        )
    )


def set_cpu_isa(name: str) -> str:
    """Use CPU kernel variant ``name`` ("base", "avx2", "avx512"); returns the previous one (tests, benchmarks).

    The default is the best variant this CPU supports, or ``$SVDQ_CPU_ISA`` when set.
    """
    if not AVAILABLE:
        raise RuntimeError(f"svdq's native library is not loaded: {IMPORT_ERROR}")
    return _C.set_cpu_isa(name)


def require_native() -> None:
    """Raise unless the extension is loaded (used by tests; ``SVDQ_ALLOW_NO_NATIVE=1`` relaxes callers)."""
    if not AVAILABLE and os.environ.get("SVDQ_ALLOW_NO_NATIVE") != "1":
        raise RuntimeError(
            f"svdq's native library is not built or does not load ({IMPORT_ERROR}); build it with "
            "`pip install --no-build-isolation -e .` (docs/building.md)"
        )
