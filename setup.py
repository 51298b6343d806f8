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


class CMakeBuild(build_ext):
    def build_extensions(self) -> None:
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
