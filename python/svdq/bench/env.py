"""Where a benchmark ran: device, driver, torch, CUDA, svdq version and build, git commit, date."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:  # noqa: BLE001  (missing binary, not a git checkout, timeout)
        return ""


def git_commit() -> str:
    """The svdq commit a benchmark ran: ``$SVDQ_GIT_COMMIT`` when set, else HEAD (with "+dirty" when tracked files
    differ) of the svdq checkout in the working directory (the repository root, as benchmarks/device_check.sh
    runs); "unknown" otherwise — an installed wheel has no repository around it, so the package never looks for
    one beside itself."""
    if os.environ.get("SVDQ_GIT_COMMIT"):
        return os.environ["SVDQ_GIT_COMMIT"]
    cwd = Path.cwd()
    if not ((cwd / ".git").exists() and (cwd / "python" / "svdq").is_dir()):
        return "unknown"
    commit = _run(["git", "rev-parse", "HEAD"], cwd)
    if not commit:
        return "unknown"
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd)
    return commit + ("+dirty" if dirty else "")


def driver_version() -> str:
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0] if out else "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """Everything a result needs to be compared with another one later."""
    import svdq

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "svdq_version": svdq.__version__,
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "svdq_backends": svdq.ops.available_backends(),
    }
    try:
        info["svdq_build"] = svdq.build_info()
    except Exception as e:  # noqa: BLE001  (no native extension)
        info["svdq_build"] = {"unavailable": str(e)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            mode="gpu",
            device=torch.cuda.get_device_name(device),
            sm=f"{props.major}{props.minor}",
            num_sms=props.multi_processor_count,
            gpu_memory_bytes=props.total_memory,
            driver=driver_version(),
        )
    else:
        info.update(mode="cpu", device=f"cpu ({info['host']['cpu']})", driver="n/a")
    return info


def device_slug(info: dict) -> str:
    """Short tag for file names: "cpu", "NVIDIA_H200", ..."""
    if info["mode"] == "cpu":
        return "cpu"
    return "".join(c if c.isalnum() else "_" for c in info["device"]).strip("_")


def write_results(path: str | os.PathLike, results: dict, device: torch.device, **meta) -> Path:
    """A results file as benchmarks/results/ keeps them: ``{"meta": environment(device) + meta, "results": …}``."""
    path = Path(path)
    path.write_text(json.dumps({"meta": {**environment(device), **meta}, "results": results}, indent=1) + "\n")
    return path
