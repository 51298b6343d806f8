"""Opcode counts of the innermost wgmma loop of each kernel in a cuobjdump --dump-sass listing.

The sm_90a GEMMs' main loop (one 64-K group per iteration) is the innermost backward-branch loop that
contains a QGMMA; its instruction count is "SASS per warp per group", the budget next to the kernel
(csrc/cuda/w4a4_gemm_sm90.cuh). Used by tests/test_sass_sm90.py and the device check.
    python3 benchmarks/probes/sass_loops.py FILE.sass [--json]
"""
from __future__ import annotations

import collections
import json
import re
import sys

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_TARGET = re.compile(r"BRA\s.*?0x([0-9a-f]+)")


def functions(text: str) -> dict[str, list[tuple[int, str]]]:
    out = {}
    for chunk in re.split(r"\n\s*Function : ", text)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        out[name] = [(int(m.group(1), 16), m.group(2).strip()) for m in _INSTR.finditer(chunk)]
    return out


def opcode(text: str) -> str:
    parts = text.split()
    op = parts[1] if parts[0].startswith("@") and len(parts) > 1 else parts[0]
    return op.split(".")[0]


def innermost_loop(ins: list[tuple[int, str]], marker: str = "QGMMA") -> dict | None:
    """The smallest [target, branch] range closed by a backward BRA that contains `marker`, with its counts."""
    best = None
    for addr, text in ins:
        if opcode(text) != "BRA":
            continue
        m = _TARGET.search(text)
        if not m or int(m.group(1), 16) >= addr:
            continue
        lo = int(m.group(1), 16)
        body = [t for a, t in ins if lo <= a <= addr]
        if not any(marker in t for t in body):
            continue
        if best is None or len(body) < len(best[2]):
            best = (lo, addr, body)
    if best is None:
        return None
    counts = collections.Counter(opcode(t) for t in best[2])
    return {"start": hex(best[0]), "end": hex(best[1]), "instructions": sum(counts.values()), "opcodes": dict(counts.most_common())}


def report(text: str) -> dict[str, dict | None]:
    return {name: innermost_loop(ins) for name, ins in functions(text).items()}


if __name__ == "__main__":
    res = report(open(sys.argv[1]).read())
    if "--json" in sys.argv:
        print(json.dumps(res, indent=2))
    else:
        for name, r in res.items():
            if r:
                print(f"{name}: {r['instructions']} SASS/warp/group ({r['start']}-{r['end']})")
                print("   ", ", ".join(f"{k} {v}" for k, v in r["opcodes"].items()))
