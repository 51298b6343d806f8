"""svdq under diffusers' context parallelism: 2 CPU processes with gloo (tests/parallel_worker.py under torchrun).

- Ulysses: the quantized (fused) tiny FLUX model gives the output of one process (activations are quantized
  per token, so splitting the sequence changes no quantized value; attention sums its keys in another order).
- The same for a quantized tiny video model (Wan 2.x) under Ulysses.
- Ring attention (svdq's CPU log-sum-exp path for diffusers' dispatcher): equal to one process within the
  rounding of the softmax merge.
- Calibration under Ulysses: every rank ends with the smoothing exponents one process chooses from all tokens
  and the same factors up to fp32 rounding; without the merge they differ.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("diffusers")

WORKER = Path(__file__).with_name("parallel_worker.py")
WORLD = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel")
    env = {**os.environ, "SVDQ_PARALLEL_OUT": str(out), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
        "--max-restarts=0", str(WORKER),
    ]
    # Bounded: a hung collective must fail the test, not CI (torchrun's SIGTERM then reaches every rank).
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    if proc.returncode != 0:
        pytest.fail(f"torchrun exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return [unflatten(load_file(out / f"rank{r}.safetensors")) for r in range(WORLD)]


def unflatten(flat: dict) -> dict:
    result: dict = {}
    for key, t in flat.items():
        head, _, sub = key.partition("/")
        if sub:
            result.setdefault(head, {})[sub] = t
        else:
            result[head] = t
    return result


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_ulysses_output_equals_one_process(ranks):
    for r in ranks:
        assert int(r["world"]) == WORLD
        single, parallel = r["ulysses_single"], r["ulysses_parallel"]
        assert single.shape == parallel.shape
        # Every quantized value is the same (activations are quantized per token); what differs is the order in
        # which attention sums over the keys (Ulysses gathers [txt₀ img₀ txt₁ img₁], one process [txt img]):
        # fp32 rounding. A shard quantized with another shard's scales, or a lost shard, is off by ≥ 1e-2.
        assert rel(parallel, single) < 1e-6


def test_video_model_under_ulysses_equals_one_process(ranks):
    for r in ranks:  # tiny Wan 2.x: tokens are frames × patches; the same argument as for FLUX
        single, parallel = r["wan_single"], r["wan_parallel"]
        assert single.shape == parallel.shape and single.shape[2] == 2  # [B, C, frames, H, W]
        assert rel(parallel, single) < 1e-6


def test_ring_output_equals_one_process_within_merge_rounding(ranks):
    for r in ranks:
        # The ring merges two partial softmaxes (sigmoid/logsigmoid of the log-sum-exps) in fp32: rounding only.
        # A ring step that dropped a KV chunk or mis-weighted it would be off by O(1).
        assert rel(r["ring_parallel"], r["ring_single"]) < 1e-5


def test_calibration_under_context_parallelism_equals_one_process(ranks):
    for r in ranks:
        single, parallel, unmerged = r["smooth_single"], r["smooth_parallel"], r["smooth_unmerged"]
        assert single.keys() == parallel.keys() == unmerged.keys() and len(single) > 0
        # the same smoothing exponent chosen for every layer ...
        assert r["alpha_single"].keys() == r["alpha_parallel"].keys()
        assert all(torch.equal(a, r["alpha_parallel"][n]) for n, a in r["alpha_single"].items())
        # ... and the same factors, up to the fp32 rounding of the inputs (attention's summation order)
        worst = max(float(((parallel[n] - s) / s).abs().max()) for n, s in single.items())
        assert worst < 1e-5, worst
        # without the merge each rank sees half the tokens: its factors are measurably different
        worst_unmerged = max(float(((unmerged[n] - s) / s).abs().max()) for n, s in single.items())
        assert worst_unmerged > 1e-3, worst_unmerged
        assert any(not torch.all(s == 1) for s in single.values())  # calibration smoothed something


def test_every_rank_quantized_the_same_model(ranks):
    a, b = ranks
    for name in a["smooth_parallel"]:
        assert torch.equal(a["smooth_parallel"][name], b["smooth_parallel"][name]), name


def test_generate_cli_under_torchrun(tmp_path):
    """`torchrun --nproc-per-node 2 -m svdq generate --ulysses 2` writes one image (rank 0), the one a single
    process writes up to attention's rounding; a degree that does not match the world size is one error line."""
    import numpy as np
    from PIL import Image

    from svdq import cli
    from svdq.testing import tiny

    tiny.tiny_flux_full_pipeline(0).save_pretrained(tmp_path / "flux")
    assert cli.main(["quantize", "--model", str(tmp_path / "flux"), "--out", str(tmp_path / "q"), "--data-free"]) == 0
    args = ["generate", "--model", str(tmp_path / "flux"), "--quantized", str(tmp_path / "q"), "--prompt", "a fox",
            "--steps", "2", "--height", "32", "--width", "32"]
    assert cli.main([*args, "--out", str(tmp_path / "one.png")]) == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "svdq"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*torchrun, *args, "--ulysses", "2", "--out", str(tmp_path / "two.png")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("wrote ") == 1  # rank 0 only
    one = np.asarray(Image.open(tmp_path / "one.png"), dtype=np.float32)
    two = np.asarray(Image.open(tmp_path / "two.png"), dtype=np.float32)
    assert one.shape == two.shape and np.abs(one - two).max() <= 2, np.abs(one - two).max()

    bad = subprocess.run([*torchrun, *args, "--ulysses", "3", "--out", str(tmp_path / "bad.png")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "error: ulysses (3) × ring (1) = 3 must equal the world size 2" in bad.stderr
    # each rank printed one error line and no traceback (the launcher's own report of failed ranks follows)
    assert "/svdq/" not in bad.stderr and not (tmp_path / "bad.png").exists()
