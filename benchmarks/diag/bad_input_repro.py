"""Reproduce the crash seen in test_bad_inputs_raise (rank 24 lora_down into the CUDA quantize_act)."""
import sys
import torch
import svdq  # noqa: F401

x = torch.randn(4, 128, dtype=torch.bfloat16, device="cuda")
s = torch.ones(128, dtype=torch.bfloat16, device="cuda")
d = torch.randn(128, 32, dtype=torch.bfloat16, device="cuda")
case = sys.argv[1] if len(sys.argv) > 1 else "all"
cases = {
    "cpu_smooth": lambda: torch.ops.svdq.quantize_act(x, s.cpu(), d, None),
    "rank24": lambda: torch.ops.svdq.quantize_act(x, s, d[:, :24].contiguous(), None),
    "dtype": lambda: torch.ops.svdq.quantize_act(x, s, d.half(), None),
    "wrong_k": lambda: torch.ops.svdq.quantize_act(x, s[:100], d, None),
}
for name, fn in cases.items():
    if case not in ("all", name):
        continue
    try:
        fn()
        print(name, "NO ERROR")
    except RuntimeError as e:
        print(name, "raised:", str(e).splitlines()[0][:200])
    sys.stdout.flush()
