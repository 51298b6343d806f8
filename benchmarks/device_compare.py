"""What the Nunchaku device stages share (benchmarks/device_check.d/81, 82, 84, 85-*.sh): one tiny FLUX.1 step's
inputs on a device, and the report comparing a model loaded from an exported file with the svdq model it came
from on the same backend (bit-exact? max |diff|, relative error) written to the stage's check.json."""

from __future__ import annotations

import json
import sys

import torch


def tiny_flux_inputs(dev: torch.device) -> dict:
    """One denoising step's inputs for svdq.testing.tiny's FLUX.1 transformer (bf16, 16 image + 8 text tokens)."""
    g = torch.Generator().manual_seed(1)
    inp = dict(hidden_states=torch.randn(1, 16, 16, generator=g), encoder_hidden_states=torch.randn(1, 8, 64, generator=g),
               pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
               img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3))
    return {k: v.to(dev, torch.bfloat16) if k not in ("img_ids", "txt_ids", "timestep") else v.to(dev)
            for k, v in inp.items()}


def report(want: torch.Tensor, got: torch.Tensor, dev: torch.device, path: str, **extra) -> int:
    """Write {backend, bit_exact, max_abs_diff, rel_err, **extra} to ``path``, print it; the exit status (0 when
    the relative error is below 1e-2: the stage fails on a wrong layout, not on a last-bit difference)."""
    import svdq

    res = {"backend": svdq.ops.select_backend(dev).name, "bit_exact": bool(torch.equal(want, got)),
           "max_abs_diff": float((want.float() - got.float()).abs().max()),
           "rel_err": float((want.float() - got.float()).norm() / want.float().norm()), **extra}
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(res)
    return 0 if res["rel_err"] < 1e-2 else 1


if __name__ == "__main__":
    sys.exit("a module for the device stages; nothing to run")
