"""Loads the compiled extension icnet_kernels._C, which registers the C++ and CUDA kernels of torch.ops.icnet.

A missing or stale build is not fatal: the package warns with the fix, and the Triton and reference
backends keep working.
"""

import warnings

import torch

REBUILD_HINT = "rebuild it against the installed torch with: pip install --no-build-isolation -e ."


def _load():
    try:
        from icnet_kernels import _C
    except (ImportError, OSError) as error:
        return None, f"icnet_kernels._C could not be loaded ({error}); {REBUILD_HINT}"
    if _C.built_with_torch != torch.__version__:
        return None, (
            f"icnet_kernels._C was built against torch {_C.built_with_torch} but torch {torch.__version__} "
            f"is installed; {REBUILD_HINT}"
        )
    return _C, None


_C, LOAD_ERROR = _load()
if LOAD_ERROR is not None:
    warnings.warn(LOAD_ERROR + " Until then only the 'triton' and 'reference' backends work.", stacklevel=2)


def native_available() -> bool:
    """True when the C++ (and, if compiled in, CUDA) kernels are registered under torch.ops.icnet."""
    return _C is not None


def native_cuda_available() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return _C is not None and bool(_C.with_cuda)
