"""Cost of svdq's per-tensor checksums (CRC-32, `svdq.checkpoint.checksums`) at FLUX.1-dev sizes.

Prediction (before measuring): zlib's CRC-32 runs at ~1 GB/s per core on x86 without a special build, and
releases the GIL, so `checksums` over many tensors scales with cores; a FLUX.1-dev W4A4 checkpoint (~6.7 GB,
docs/models.md) then costs ~7 s on one core, ~1 s on 8.

    python benchmarks/checksum_cost.py            # prints one JSON line
"""

from __future__ import annotations

import json
import os
import time

import torch

from svdq.checkpoint import _crc32, checksums


def best_of(fn, n: int = 3) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    g = torch.Generator().manual_seed(0)
    # One FLUX.1-dev MLP weight as int8 [12288, 3072] (the brief's size; the packed 4-bit qweight of that layer
    # is [12288, 1536], half of it).
    big = torch.randint(-128, 128, (12288, 3072), dtype=torch.int8, generator=g)
    t_one = best_of(lambda: _crc32(big))
    # A batch of such tensors (~0.9 GB) through the threaded `checksums`, as svdq.save / svdq.load run it.
    many = {f"t{i}": torch.randint(-128, 128, (12288, 3072), dtype=torch.int8, generator=g) for i in range(24)}
    nbytes = sum(t.numel() for t in many.values())
    t_many = best_of(lambda: checksums(many), 2)
    flux_dev_bytes = 6.7e9  # W4A4 FLUX.1-dev transformer state dict (docs/models.md, 16-bit AdaLN: ~6.2 GiB)
    print(json.dumps({
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "one_tensor": {"shape": [12288, 3072], "dtype": "int8", "bytes": big.numel(), "ms": round(1e3 * t_one, 1),
                       "GB_per_s": round(big.numel() / t_one / 1e9, 2)},
        "threaded": {"tensors": len(many), "bytes": nbytes, "s": round(t_many, 3),
                     "GB_per_s": round(nbytes / t_many / 1e9, 2)},
        "flux_dev_checkpoint_estimate_s": round(flux_dev_bytes / (nbytes / t_many), 1),
    }))


if __name__ == "__main__":
    main()
