"""Which inputs make the CUDA activation quantizer differ from the reference?"""
import torch
import svdq  # noqa: F401
from svdq.ops import reference as ref

torch.manual_seed(0)
def check(tag, x, smooth, down, scales):
    qa, sa, la = torch.ops.svdq.quantize_act(x, smooth, down, scales)
    rqa, rsa, rla = ref.quantize_act(x, smooth, down, scales)
    bad_s = (sa != rsa)
    bad_q = (qa != rqa)
    msg = f"{tag}: ascales mismatches {int(bad_s.sum())}/{sa.numel()} qact bytes {int(bad_q.sum())}/{qa.numel()}"
    if bad_s.any():
        i = bad_s.nonzero()[0].tolist()
        msg += f" first at {i}: cuda {sa[i[0], i[1]].item():.9g} ref {rsa[i[0], i[1]].item():.9g}"
        rows = bad_s.any(1).nonzero().flatten().tolist()
        cols = bad_s.any(0).nonzero().flatten().tolist()
        msg += f" rows {rows[:8]}..({len(rows)}) groups {cols[:8]}..({len(cols)})"
    print(msg)

K, r = 3072, 32
for m in (37, 64, 154):
    x = torch.randn(m, K, dtype=torch.bfloat16, device="cuda")
    down = (torch.randn(K, r, device="cuda") * 0.02).to(torch.bfloat16)
    ones = torch.ones(K, dtype=torch.bfloat16, device="cuda")
    check(f"M={m} smooth=1 bf16 scales=None", x, ones, down, None)
    check(f"M={m} smooth=1 bf16 scales=ones", x, ones, down, torch.ones(r, device="cuda"))
    check(f"M={m} smooth=1 fp32", x, ones.float(), down, None)
    check(f"M={m} smooth=rand bf16", x, (torch.rand(K, device="cuda") + 0.5).to(torch.bfloat16), down, None)
    check(f"M={m} r=0", x, ones, down[:, :0].contiguous(), None)
    check(f"M={m} x*3", (x.float() * 3).to(torch.bfloat16), ones, down, None)
