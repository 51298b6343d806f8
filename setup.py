"""Build glue: svdq's native libraries (``svdq/_C.so``, ``svdq/_C_cuda.so``), compiled by CMake (CMakeLists.txt
owns every compiler flag).

    pip install --no-build-isolation -e .     # development (builds against the torch you have: fastest)
    pip install .                             # install; build isolation works too (stable ABI, see below)
    pip wheel --no-build-isolation -w dist .  # a wheel: svdq-<version>+cu13-py3-none-linux_x86_64.whl

The libraries use only PyTorch's stable C ABI and no Python headers, so one build runs on every torch >= 2.10
and every CPython 3: the wheel is tagged ``py3-none-<platform>``. Its local version label names what the CUDA
kernels need: ``+cu13`` (built with CUDA 13: a torch built for CUDA 13 and a driver for it) or ``+cpu``.
Environment variables passed through:

    MAX_JOBS=N            parallel compile jobs (default: number of CPUs)
    CMAKE_ARGS="..."      extra arguments for the CMake configure step (e.g. -DCMAKE_BUILD_TYPE=Debug)
    SVDQ_NO_CUDA=1        build without CUDA kernels even when a CUDA toolkit is present
    SVDQ_CUDA_ARCHS="80;89;90"   GPU architectures (default: the GPU present, else all shipped)
    CUDA_HOME / CUDAToolkit_ROOT  which CUDA toolkit to use (default /usr/local/cuda)
    SVDQ_BUILD_DIR=path   CMake build tree (default: build/cmake, reused: incremental)

The approach follows vLLM's setup.py: an Extension with no sources whose build step runs CMake + Ninja.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.bdist_wheel import bdist_wheel
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


def _version() -> str:
    text = (ROOT / "python" / "svdq" / "version.py").read_text()
    return re.search(r'__version__\s*=\s*"([^"]+)"', text).group(1)


def _toolkit_root(env: dict) -> Path:
    """The CUDA toolkit CMake will use (the same rule as svdq_find_cuda_toolkit in cmake/svdq_utils.cmake)."""
    return Path(env.get("CUDA_HOME") or env.get("CUDAToolkit_ROOT") or "/usr/local/cuda")


def cuda_label(env: dict, torch_cuda: str | None) -> str:
    """The wheel's local version label: "cu<major>" when CUDA kernels will be built, else "cpu". Built when
    SVDQ_NO_CUDA is unset, torch is a CUDA build and the toolkit has nvcc (CMakeLists.txt's rule); the major is
    nvcc's. `CMakeBuild` checks the label against what CMake actually built (_C.json)."""
    if env.get("SVDQ_NO_CUDA", "").lower() in ("1", "on", "yes", "true") or not torch_cuda:
        return "cpu"
    nvcc = _toolkit_root(env) / "bin" / "nvcc"
    if not nvcc.exists():
        return "cpu"
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+)\.", out)
    return f"cu{m.group(1)}" if m else "cpu"


def _torch_cuda() -> str | None:
    try:
        import torch
    except ImportError:
        return None  # metadata only (e.g. an sdist): the build step imports torch and fails clearly there
    return torch.version.cuda


class CMakeBuild(build_ext):
    def build_extensions(self) -> None:
        try:
            import torch  # noqa: F401  (CMake asks this interpreter's torch for its headers and libraries)
        except ImportError as e:
            raise RuntimeError(
                "svdq: building needs torch >= 2.10 importable by the Python running the build "
                f"({sys.executable}): {e}. Install torch first, then `pip install --no-build-isolation .`, or "
                "build with isolation (plain `pip install .`), which installs one into the build environment."
            ) from e
        subprocess.check_call(["cmake", "--version"], stdout=subprocess.DEVNULL)
        for ext in self.extensions:
            self._build_one(ext)

    def _build_one(self, ext: CMakeExtension) -> None:
        out_file = Path(self.get_ext_fullpath(ext.name)).resolve()
        # A fixed build tree in the checkout (not setuptools' per-run temp dir) so rebuilds are incremental.
        # One build tree for every Python: nothing built depends on the Python version.
        default_dir = ROOT / "build" / "cmake"
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
            # the libraries go exactly where setuptools expects the extension (the package dir for -e installs)
            f"-DSVDQ_OUTPUT_DIR={out_file.parent}",
        ]
        configure += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        jobs = _num_jobs()
        t0 = time.time()
        subprocess.check_call(configure)
        t1 = time.time()
        subprocess.check_call(["cmake", "--build", str(build_dir), "--target", "_C", "-j", str(jobs)])
        t2 = time.time()
        print(f"svdq: configure {t1 - t0:.1f} s, build {t2 - t1:.1f} s with {jobs} jobs -> {out_file}")
        built = json.loads((out_file.parent / "_C.json").read_text())
        label = f"cu{built['cuda_major']}" if built["cuda"] else "cpu"
        expected = self.distribution.get_version().partition("+")[2]
        if label != expected:
            raise RuntimeError(
                f"svdq: the package version says +{expected} but CMake built {label} kernels "
                f"({built.get('cuda_not_built_because') or 'CUDA ' + built.get('nvcc_version', '')}); "
                "setup.py's cuda_label() and CMakeLists.txt disagree"
            )

    # CMake writes _C_cuda.so (CUDA builds) and _C.json beside _C.so; setuptools knows only the extension's own
    # file, so for -e installs (built elsewhere, then copied into python/svdq) they are copied here too.
    SIBLINGS = ("_C_cuda.so", "_C.json")

    def _sibling_pairs(self):
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            for name in self.SIBLINGS:
                yield (os.path.join(os.path.dirname(regular_file), name),
                       os.path.join(os.path.dirname(inplace_file), name))

    def copy_extensions_to_source(self) -> None:
        super().copy_extensions_to_source()
        for src, dst in self._sibling_pairs():
            if os.path.exists(src):
                self.copy_file(src, dst, level=self.verbose)
            elif os.path.exists(dst):
                os.remove(dst)  # a CPU-only rebuild must not leave the previous build's CUDA library behind

    def _get_output_mapping(self):
        yield from super()._get_output_mapping()
        if self.inplace:
            yield from ((src, dst) for src, dst in self._sibling_pairs() if os.path.exists(src))

    def get_ext_filename(self, fullname: str) -> str:
        # svdq/_C.so: not a Python extension module (no PyInit, no Python ABI tag), loaded by torch.ops.load_library.
        return os.path.join(*fullname.split(".")) + ".so"


class PlatformWheel(bdist_wheel):
    """py3-none-<platform>: the libraries need a platform, not a Python version or ABI."""

    def get_tag(self) -> tuple[str, str, str]:
        return ("py3", "none", super().get_tag()[2])


def package_version(argv: list[str]) -> str:
    """The version with the wheel's CUDA label (`cuda_label`); an sdist has none (it is built where installed)."""
    if "sdist" in argv:
        return _version()
    return f"{_version()}+{cuda_label(dict(os.environ), _torch_cuda())}"


setup(
    version=package_version(sys.argv),
    ext_modules=[CMakeExtension("svdq._C")],
    cmdclass={"build_ext": CMakeBuild, "bdist_wheel": PlatformWheel},
)
