"""Builds icnet_kernels._C with CMake and Ninja against the installed torch.

CPU kernels are always built. CUDA kernels are built when torch is a CUDA build and nvcc is found, whether
or not a GPU is present; ICNET_WITH_CUDA=0/1 forces the choice. TORCH_CUDA_ARCH_LIST ("8.0;9.0",
"9.0a", "8.6+PTX") picks the GPU architectures; the default is 8.0 and 9.0. ICNET_CPU_ARCH is the -march of
the C++ kernels: "native" (the default) targets the building machine's vector units; set a portable level
such as x86-64-v2 when the build is to run elsewhere.
"""

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    on_path = shutil.which("nvcc")
    if on_path:
        # Wrappers on PATH confuse CMake's compiler detection; hand it the real binary.
        return os.path.realpath(on_path)
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default.resolve()) if default.exists() else None


def find_cmake():
    """The cmake of the pip package when installed (recent enough for CUDA 13), else the one on PATH."""
    try:
        import cmake

        return os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
    except ImportError:
        return shutil.which("cmake") or "cmake"


def want_cuda(torch, nvcc):
    forced = os.environ.get("ICNET_WITH_CUDA")
    if forced is not None:
        if forced not in ("0", "1"):
            raise RuntimeError(f"ICNET_WITH_CUDA must be 0 or 1, got {forced!r}")
        if forced == "1" and (torch.version.cuda is None or nvcc is None):
            raise RuntimeError("ICNET_WITH_CUDA=1 needs a CUDA build of torch and nvcc (set CUDA_HOME)")
        return forced == "1"
    return torch.version.cuda is not None and nvcc is not None


def cmake_cuda_architectures(arch_list):
    """Turns torch's TORCH_CUDA_ARCH_LIST notation into CMAKE_CUDA_ARCHITECTURES."""
    archs = []
    for item in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        if not item:
            continue
        ptx = item.endswith("+PTX")
        number = item.removesuffix("+PTX").replace(".", "")
        archs.append(f"{number}-real")
        if ptx:
            archs.append(f"{number}-virtual")
    if not archs:
        raise RuntimeError(f"TORCH_CUDA_ARCH_LIST={arch_list!r} names no architecture")
    return ";".join(archs)


def pip_cuda_include_dir():
    """Folder of the CUDA headers (cuBLAS, cuSPARSE) that a pip-installed CUDA torch ships beside itself."""
    for site in sys.path:
        for candidate in sorted(glob.glob(os.path.join(site, "nvidia", "*", "include", "cusparse.h"))):
            return os.path.dirname(candidate)
        candidate = os.path.join(site, "nvidia", "cusparse", "include", "cusparse.h")
        if os.path.exists(candidate):
            return os.path.dirname(candidate)
    return ""


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import torch
        import torch.utils.cpp_extension as cpp_extension

        nvcc = find_nvcc()
        with_cuda = want_cuda(torch, nvcc)
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('ICNET_BUILD_TYPE', 'Release')}",
            "-DTORCH_INCLUDE_DIRS=" + ";".join(cpp_extension.include_paths()),
            f"-DTORCH_LIBRARY_DIR={Path(torch.__file__).parent / 'lib'}",
            f"-DTORCH_VERSION={torch.__version__}",
            f"-DTORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DICNET_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
            f"-DICNET_CPU_ARCH={os.environ.get('ICNET_CPU_ARCH', 'native')}",
            "-G", "Ninja",
        ]
        if with_cuda:
            archs = os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
            args += [
                f"-DCMAKE_CUDA_COMPILER={nvcc}",
                f"-DCMAKE_CUDA_ARCHITECTURES={cmake_cuda_architectures(archs)}",
                f"-DCUDA_EXTRA_INCLUDE_DIR={pip_cuda_include_dir()}",
            ]
        print(f"icnet_kernels: building with CUDA={'on' if with_cuda else 'off'}", file=sys.stderr)
        cmake = find_cmake()
        subprocess.run([cmake, str(ROOT), *args], cwd=build_dir, check=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run([cmake, "--build", ".", "-j", jobs], cwd=build_dir, check=True)


setup(
    ext_modules=[CMakeExtension("icnet_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
)
