"""`svdq bench`: what 16-bit, FP8, weight-only 4-bit and svdq W4A4 cost, measured in one run on this machine.

    layers.py   FLUX.1 linear shapes: bf16 cuBLAS, fp8, svdq fused / low-rank unfused / r = 0
    model.py    one denoising step of a full-size architecture (synthetic weights) per variant
    report.py   JSON + markdown table + PNG bar chart
    env.py      device, driver, torch, CUDA, svdq version, git commit, date

Without a GPU both modes run a scaled-down CPU configuration, labelled as such (`CPU_MODE_NOTE`).
"""

CPU_MODE_NOTE = "CPU mode: scaled-down shapes/model, not representative of GPU speed"
