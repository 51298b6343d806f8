#!/usr/bin/env python3
"""Count SASS instructions by opcode inside a kernel's loops (no GPU needed).

    python3 sass_loop_count.py FILE.sass FUNC_SUBSTRING [LO_HEX HI_HEX]

FILE.sass: `cuobjdump -sass x.cubin` output. The toolkit on the build machine has no cuobjdump; the one in the
triton wheel works: .venv/lib/python3.11/site-packages/triton/backends/nvidia/bin/cuobjdump (13.1).
Without LO/HI every backward branch (a loop) of the function is listed with its body's opcode counts (static:
both sides of branches inside the body are counted). Predicates (@P0/@!P0) are stripped.
Used for docs/kernels.md §10 (2026-11-26).
"""
import collections
import re
import sys


def load(path, func):
    ins, on = [], False
    for line in open(path):
        if "Function :" in line:
            on = func in line
            continue
        if not on:
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), re.sub(r"\s+", " ", m.group(2)).strip()))
    return ins


def count(ins, lo, hi):
    c = collections.Counter()
    for a, t in ins:
        if lo <= a <= hi:
            op = re.sub(r"^@!?U?P\w+ ", "", t).split()[0]
            c[op] += 1
    return c


def main():
    path, func = sys.argv[1], sys.argv[2]
    ins = load(path, func)
    if not ins:
        sys.exit(f"no function matching {func!r} in {path}")
    if len(sys.argv) >= 5:
        loops = [(int(sys.argv[3], 16), int(sys.argv[4], 16))]
    else:
        loops = []
        for a, t in ins:
            m = re.search(r"BRA (0x[0-9a-f]+)", t)
            if m and int(m.group(1), 16) < a:
                loops.append((int(m.group(1), 16), a))
    for lo, hi in loops:
        c = count(ins, lo, hi)
        print(f"loop {lo:#06x}-{hi:#06x}: {sum(c.values())} instructions")
        for op, n in c.most_common():
            print(f"  {n:5d} {op}")


if __name__ == "__main__":
    main()
