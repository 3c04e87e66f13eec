"""The build: the CUDA kernels are compiled in wherever the toolchain allows, even without a GPU."""

import os
import shutil
from pathlib import Path

import pytest
import torch

import icnet_kernels


def nvcc_present() -> bool:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc", cuda_home and str(Path(cuda_home) / "bin" / "nvcc")]
    return any(c and Path(c).exists() for c in candidates)


def test_extension_loads():
    assert icnet_kernels.native_available()


@pytest.mark.skipif(os.environ.get("ICNET_WITH_CUDA") == "0", reason="CUDA kernels switched off for this build")
@pytest.mark.skipif(torch.version.cuda is None or not nvcc_present(), reason="needs a CUDA build of torch and nvcc")
def test_cuda_kernels_are_compiled_in():
    assert icnet_kernels.native_cuda_available()
    for op in ("pyramid_pool_sum", "pyramid_pool_sum_backward", "cascade_feature_fusion"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"icnet::{op}", "CUDA"), op


def test_the_install_holds_only_the_project_packages():
    """benchmarks/ and scripts/ are tools of the repository, run from a checkout (python -m benchmarks.run),
    not top-level packages for site-packages."""
    import tomllib

    from setuptools import find_packages

    root = Path(__file__).resolve().parents[1]
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = [p for where in config["where"] for p in find_packages(str(root / where), include=config["include"])]
    assert packages and all(p.split(".")[0] in ("icnet_kernels", "icnet") for p in packages), packages
