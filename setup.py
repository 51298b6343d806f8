"""Build glue: one extension, ``svdq._C``, compiled by CMake (CMakeLists.txt owns every compiler flag).

    pip install --no-build-isolation -e .     # development
    pip install --no-build-isolation .        # install

`--no-build-isolation` makes the build use the torch already installed in the environment (the extension
must be compiled against the torch it is loaded into). Environment variables passed through:

    MAX_JOBS=N            parallel compile jobs (default: number of CPUs)
    CMAKE_ARGS="..."      extra arguments for the CMake configure step (e.g. -DCMAKE_BUILD_TYPE=Debug)
    SVDQ_NO_CUDA=1        build the CPU-only extension even when a CUDA toolkit is present
    SVDQ_CUDA_ARCHS="80;89;90"   GPU architectures (default: the GPU present, else all shipped)
    CUDA_HOME / CUDAToolkit_ROOT  which CUDA toolkit to use (default /usr/local/cuda)
    SVDQ_BUILD_DIR=path   CMake build tree (default: build/cmake-<python tag>, reused: incremental)

The approach follows vLLM's setup.py: an Extension with no sources whose build step runs CMake + Ninja.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension built by CMake: no sources for setuptools to compile."""

    def __init__(self, name: str, source_dir: Path = ROOT) -> None:
        super().__init__(name, sources=[], py_limited_api=False)
        self.source_dir = str(source_dir)


def _num_jobs() -> int:
    if os.environ.get("MAX_JOBS"):
        return max(1, int(os.environ["MAX_JOBS"]))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


def check_build_torch(torch_file: str, env: dict) -> None:
    """Stop the build when the torch it would compile against lives in pip's temporary build environment.

    With build isolation pip installs a second torch (whatever version is newest) into a throw-away
    environment and the extension is compiled against it; your environment keeps its own torch, which then
    cannot load the extension (undefined symbols) or, worse, loads it with a mismatched ABI.
    ``SVDQ_ALLOW_BUILD_ISOLATION=1`` builds anyway (e.g. when the isolated torch is known to be the same).
    """
    if "pip-build-env-" in torch_file and env.get("SVDQ_ALLOW_BUILD_ISOLATION") != "1":
        raise RuntimeError(
            f"svdq: refusing to build against the torch in pip's temporary build environment ({torch_file}): the "
            "extension must be compiled against the torch installed in your environment. Build with\n"
            "    pip install --no-build-isolation .      (or -e . for development)\n"
            "after installing torch (docs/building.md); SVDQ_ALLOW_BUILD_ISOLATION=1 overrides this check."
        )


class CMakeBuild(build_ext):
    def build_extensions(self) -> None:
        import torch  # the torch this build compiles against (setup.py runs in the build environment)

        check_build_torch(str(Path(torch.__file__).resolve()), dict(os.environ))
        subprocess.check_call(["cmake", "--version"], stdout=subprocess.DEVNULL)
        for ext in self.extensions:
            self._build_one(ext)

    def _build_one(self, ext: CMakeExtension) -> None:
        out_file = Path(self.get_ext_fullpath(ext.name)).resolve()
        # A fixed build tree in the checkout (not setuptools' per-run temp dir) so rebuilds are incremental.
        default_dir = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}"
        build_dir = Path(os.environ.get("SVDQ_BUILD_DIR") or default_dir).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if self.debug else "Release"
        configure = [
            "cmake",
            "-S", ext.source_dir,
            "-B", str(build_dir),
            "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DPython_EXECUTABLE={sys.executable}",
            # put _C.<abi>.so exactly where setuptools expects it (the package dir for -e installs)
            f"-DSVDQ_OUTPUT_DIR={out_file.parent}",
            f"-DSVDQ_OUTPUT_NAME={out_file.name}",
        ]
        configure += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        jobs = _num_jobs()
        t0 = time.time()
        subprocess.check_call(configure)
        t1 = time.time()
        subprocess.check_call(["cmake", "--build", str(build_dir), "--target", "_C", "-j", str(jobs)])
        t2 = time.time()
        print(f"svdq: configure {t1 - t0:.1f} s, build {t2 - t1:.1f} s with {jobs} jobs -> {out_file}")


setup(
    ext_modules=[CMakeExtension("svdq._C")],
    cmdclass={"build_ext": CMakeBuild},
)
