"""svdq — 4-bit (W4A4) SVDQuant inference for diffusion models.

Public API: `SVDQLinear`, `quantize`, `QuantizeConfig`, `save`, `load`, `ops`, `build_info`.
"""

from . import ops
from .checkpoint import CheckpointError, load, read_metadata, save
from .linear import SVDQLinear
from .quantize import QuantizeConfig, quantize, quantized_layers
from .version import __version__

try:  # the native extension registers the "cpu" / "cuda" backends when it is built
    from . import _native
    from ._native import build_info
except ImportError:  # pure-Python install: only the reference backend

    def build_info() -> dict:
        """What the native extension was built with; here: no extension."""
        return {"version": __version__, "native": False, "cuda": False}


__all__ = [
    "CheckpointError",
    "QuantizeConfig",
    "SVDQLinear",
    "__version__",
    "build_info",
    "load",
    "ops",
    "quantize",
    "quantized_layers",
    "read_metadata",
    "save",
]
