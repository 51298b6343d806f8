"""`svdq doctor`: what svdq was built with, what this machine has, and which backend each device / dtype runs
on and why — the first thing to run when svdq is slow or a layer refuses to run.

Problems it names (each with the fix): the native extension not loading (not built, or built against another
torch — pip's build isolation does that), a torch other than the one it was built against, a GPU whose
architecture the build has no code for, an fp32 model on a GPU (the CUDA kernels run bf16/fp16).
Exit status 1 when a problem was found, else 0.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess

EXAMPLES = """examples:
  svdq doctor          # human-readable report
  svdq doctor --json   # the same as JSON (attach it to bug reports)
"""


def add_parser(sub):
    import argparse

    p = sub.add_parser(
        "doctor",
        help="build info, torch/CUDA/driver/GPU versions, which backend runs each dtype/device and why",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def _driver_version() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0] if out else None


def _arch_covered(major: int, minor: int, archs: list[str]) -> tuple[bool, str]:
    """Whether a build for ``archs`` (CMake CUDA_ARCHITECTURES entries: "90", "120", "90-real", "90-virtual")
    runs on sm_<major><minor>: its own cubin, a cubin of the same major with a lower minor, or PTX of an older
    arch (JIT-compiled by the driver)."""
    sm = major * 10 + minor
    cubins, ptx = [], []
    for a in archs:
        num, _, kind = str(a).partition("-")
        if not num.isdigit():
            continue
        if kind in ("", "real"):
            cubins.append(int(num))
        if kind in ("", "virtual"):
            ptx.append(int(num))
    if sm in cubins:
        return True, f"cubin for sm_{sm}"
    same_major = [c for c in cubins if c // 10 == major and c <= sm]
    if same_major:
        return True, f"cubin for sm_{max(same_major)} (binary compatible)"
    older_ptx = [p for p in ptx if p <= sm]
    if older_ptx:
        return True, f"PTX of compute_{max(older_ptx)}, JIT-compiled by the driver on first use"
    return False, f"no cubin or PTX for sm_{sm} in the build ({', '.join(archs) or 'none'})"


def report() -> dict:
    """Everything `svdq doctor` prints, as a dict; ``problems`` lists what is wrong, each with its fix."""
    import torch

    import svdq
    from svdq import _native, ops

    info = svdq.build_info()
    problems: list[str] = []
    env = {
        "svdq": svdq.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "driver": _driver_version(),
    }
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:
        env["diffusers"] = None
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            ok, how = _arch_covered(major, minor, info.get("cuda_archs", [])) if info.get("cuda") else (False, "")
            gpus.append({"index": i, "name": torch.cuda.get_device_name(i), "capability": f"{major}.{minor}",
                         "svdq_code": how if info.get("cuda") else "no CUDA kernels in this build"})
            if info.get("cuda") and not ok:
                problems.append(
                    f"GPU {i} ({torch.cuda.get_device_name(i)}, sm_{major}{minor}): {how}; rebuild with "
                    f"SVDQ_CUDA_ARCHS including {major}{minor} (docs/building.md)"
                )
    if not info["native"]:
        problems.append(f"svdq's native library does not load ({info.get('import_error')}): "
                        f"{_native._fix_hint(_native.IMPORT_ERROR)}")
    elif info.get("cuda") and not info.get("cuda_loaded") and torch.version.cuda:
        problems.append(f"svdq's CUDA kernels did not load: {info.get('cuda_not_loaded_because')}")
    if torch.cuda.is_available() and info["native"] and not info.get("cuda"):
        problems.append(
            "a GPU is present but this build has no CUDA kernels "
            f"({info.get('cuda_not_built_because') or 'built without CUDA'}): layers on the GPU run the slow "
            "reference backend; rebuild with the CUDA toolkit visible (docs/building.md)"
        )

    backends = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            row = {"device": device, "dtype": str(dtype).removeprefix("torch.")}
            try:
                be = ops.select_backend(torch.device(device))
            except ValueError as e:
                row.update(backend=None, why=str(e))
                backends.append(row)
                continue
            row["backend"] = be.name
            if be.name in ("cuda", "cuda-sm90") and dtype == torch.float32:
                row["why"] = "the CUDA kernels run bf16/fp16 layers: convert fp32 models with model.to(torch.bfloat16)"
                row["runs"] = False
            elif be.name == "reference":
                if not info["native"]:
                    why = "svdq's native library is not loaded"
                elif device == "cuda" and info.get("cuda") and not info.get("cuda_loaded"):
                    why = f"the CUDA kernels did not load ({info.get('cuda_not_loaded_because')})"
                else:
                    why = f"no native kernels for {device} in this build"
                row["why"] = why + " — PyTorch reference (slow)"
                row["runs"] = True
            else:
                row["why"] = f"native {be.name} kernels (the fastest backend for {device})"
                if be.name == "cpu":
                    row["why"] += f", ISA variant {info.get('cpu_isa')}"
                row["runs"] = True
            backends.append(row)
    return {"problems": problems, "environment": env, "gpus": gpus, "build": info, "backends": backends,
            "available_backends": ops.available_backends()}


def run(args) -> int:
    rep = report()
    if args.json:
        print(json.dumps(rep, indent=2, default=str))
        return 1 if rep["problems"] else 0
    env, b = rep["environment"], rep["build"]
    print("svdq doctor")
    print(f"  svdq {env['svdq']}, python {env['python']}, {env['platform']}")
    print(f"  torch {env['torch']} (CUDA {env['torch_cuda']}), diffusers {env['diffusers']}, "
          f"driver {env['driver'] or 'none found'}")
    for g in rep["gpus"]:
        print(f"  GPU {g['index']}: {g['name']} (sm {g['capability']}): {g['svdq_code']}")
    if not rep["gpus"]:
        print("  GPU: none visible to torch")
    print("build (svdq/_C.so):")
    if b["native"]:
        print(f"  built with torch {b.get('torch_version')} for torch >= {b.get('torch_abi_min')} (stable ABI), "
              f"{b.get('cxx_compiler')}, {b.get('build_type')}")
        if b.get("cuda"):
            loaded = "loaded" if b.get("cuda_loaded") else f"not loaded: {b.get('cuda_not_loaded_because')}"
            print(f"  CUDA kernels: archs {', '.join(b.get('cuda_archs', []))}, nvcc {b.get('nvcc_version')} ({loaded})")
        else:
            print(f"  CUDA kernels: not built ({b.get('cuda_not_built_because') or 'no CUDA toolkit'})")
        print(f"  CPU kernels: {', '.join(b.get('cpu_isas_compiled', []))}; using {b.get('cpu_isa')}")
    else:
        print(f"  not loaded: {b.get('import_error')}")
    print("backends (device, dtype -> backend: why):")
    for r in rep["backends"]:
        flag = "" if r.get("runs", True) else "  [does not run]"
        print(f"  {r['device']:4s} {r['dtype']:8s} -> {r['backend']}: {r['why']}{flag}")
    if rep["problems"]:
        print("problems:")
        for p in rep["problems"]:
            print(f"  - {p}")
        return 1
    print("no problems found")
    return 0
