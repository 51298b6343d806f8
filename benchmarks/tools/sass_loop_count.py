#!/usr/bin/env python3
"""Count SASS instructions by opcode inside a kernel's loops (no GPU needed).

    python3 sass_loop_count.py FILE.sass FUNC_SUBSTRING [LO_HEX HI_HEX]
    python3 sass_loop_count.py --hot [--containing=IMMA] FILE.sass FUNC_SUBSTRING
                                        # outermost loop (or largest with that opcode), cold blocks removed

FILE.sass: `cuobjdump -sass x.cubin` output. The toolkit on the build machine has no cuobjdump; the one in the
triton wheel works: .venv/lib/python3.*/site-packages/triton/backends/nvidia/bin/cuobjdump (13.1).
Without LO/HI every backward branch (a loop) of the function is listed with its body's opcode counts (static:
both sides of branches inside the body are counted). Predicates (@P0/@!P0) are stripped.

`--hot` (and `hot_loop_count`, used by tests/test_sass_budgets.py): the outermost loop of the function minus
its *cold* basic blocks — a block that ends in a CALL (the out-of-line rare paths of quantize_act: exact
groups, near-ties, K tails; their argument moves included) and the block that starts at the call's return
address (the result moves). What is left is the fast path a warp executes every iteration (plus both sides
of any branch that is not a call), which is what the budgets bound.
Used for docs/kernels.md §10 (2026-11-26) and §11.
"""
from __future__ import annotations

import collections
import re
import sys


def load(path_or_text, func, text=False):
    """[(address, instruction text)] of the first function whose name contains `func`."""
    lines = path_or_text.splitlines() if text else open(path_or_text).read().splitlines()
    ins, on, done = [], False, False
    for line in lines:
        if "Function :" in line:
            if on:
                done = True
            on = (func in line) and not done
            continue
        if not on:
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), re.sub(r"\s+", " ", m.group(2)).strip()))
    return ins


def opcode(t):
    return re.sub(r"^@!?U?P\w+ ", "", t).split()[0]


def count(ins, lo, hi):
    c = collections.Counter()
    for a, t in ins:
        if lo <= a <= hi:
            c[opcode(t)] += 1
    return c


def loops(ins):
    """(start, end) of every backward branch."""
    out = []
    for a, t in ins:
        m = re.search(r"BRA (?:`\()?(0x[0-9a-f]+)", t)
        if m and int(m.group(1), 16) < a:
            out.append((int(m.group(1), 16), a))
    return out


def hot_loop_count(ins, containing=None):
    """Opcode counts of the outermost loop (or the largest loop with an opcode starting with `containing`,
    e.g. "IMMA" for the GEMM's k-loop) without its cold (call) blocks; None when there is no such loop."""
    ls = loops(ins)
    if containing:
        ls = [(lo, hi) for lo, hi in ls if any(lo <= a <= hi and opcode(t).startswith(containing) for a, t in ins)]
    if not ls:
        return None
    lo, hi = max(ls, key=lambda r: r[1] - r[0])
    body = [(a, t) for a, t in ins if lo <= a <= hi]
    targets = set()
    for _, t in ins:
        for m in re.finditer(r"(?:BRA|BSSY B\d+,|CALL\.REL\.NOINC|CALL\.REL) (?:`\()?(0x[0-9a-f]+)", t):
            targets.add(int(m.group(1), 16))
    # split into basic blocks: a new block at every target and after every branch / call
    blocks, cur = [], []
    for i, (a, t) in enumerate(body):
        if cur and a in targets:
            blocks.append(cur)
            cur = []
        cur.append((a, t))
        op = opcode(t)
        if op.startswith(("BRA", "CALL", "EXIT", "RET", "BRX", "JMP")):
            blocks.append(cur)
            cur = []
    if cur:
        blocks.append(cur)
    c = collections.Counter()
    after_call = False
    for b in blocks:
        has_call = any(opcode(t).startswith("CALL") for _, t in b)
        cold = has_call or after_call
        after_call = has_call
        if not cold:
            for _, t in b:
                c[opcode(t)] += 1
    return c


def main():
    args = sys.argv[1:]
    hot = args and args[0] == "--hot"
    containing = None
    if hot:
        args = args[1:]
        if args and args[0].startswith("--containing="):
            containing = args[0].split("=", 1)[1]
            args = args[1:]
    path, func = args[0], args[1]
    ins = load(path, func)
    if not ins:
        sys.exit(f"no function matching {func!r} in {path}")
    if hot:
        c = hot_loop_count(ins, containing)
        if c is None:
            sys.exit("no loop")
        print(f"hot loop: {sum(c.values())} instructions")
        for op, n in c.most_common():
            print(f"  {n:5d} {op}")
        return
    if len(args) >= 4:
        lps = [(int(args[2], 16), int(args[3], 16))]
    else:
        lps = loops(ins)
    for lo, hi in lps:
        c = count(ins, lo, hi)
        print(f"loop {lo:#06x}-{hi:#06x}: {sum(c.values())} instructions")
        for op, n in c.most_common():
            print(f"  {n:5d} {op}")


if __name__ == "__main__":
    main()
