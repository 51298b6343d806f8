# Context parallelism on CUDA (issue 17; docs/parallel.md): tests/parallel_worker.py under torchrun with the
# model on the GPU — NCCL with one GPU per rank when the machine has ≥ 2, else both ranks on GPU 0 talking
# through gloo (diffusers needs a degree ≥ 2; NCCL refuses two ranks on one GPU). Writes each rank's outputs
# and a summary (Ulysses / ring output vs one process, calibration factors vs one process) to $OUT/parallel/.
parallel_cuda() {
  mkdir -p "$OUT/parallel"
  SVDQ_PARALLEL_DEVICE=cuda SVDQ_PARALLEL_OUT="$OUT/parallel" OMP_NUM_THREADS=4 \
    $PY -m torch.distributed.run --standalone --nproc-per-node=2 --max-restarts=0 tests/parallel_worker.py || return $?
  $PY - "$OUT/parallel" <<'PYEOF'
import json, sys, pathlib
from safetensors.torch import load_file
d = pathlib.Path(sys.argv[1])
r = load_file(d / "rank0.safetensors")
rel = lambda a, b: float((r[a] - r[b]).norm() / r[b].norm())
smooth = [k.split("/", 1)[1] for k in r if k.startswith("smooth_single/")]
worst = lambda v: max(float(((r[f"smooth_{v}/{n}"] - r[f"smooth_single/{n}"]) / r[f"smooth_single/{n}"]).abs().max()) for n in smooth)
summary = {"ulysses_rel_err": rel("ulysses_parallel", "ulysses_single"), "ring_rel_err": rel("ring_parallel", "ring_single"),
           "smooth_rel_err_merged": worst("parallel"), "smooth_rel_err_unmerged": worst("unmerged")}
json.dump(summary, open(d / "summary.json", "w"), indent=2)
print(json.dumps(summary, indent=2))
PYEOF
}
export -f parallel_cuda
stage parallel_cuda 90 parallel_cuda
