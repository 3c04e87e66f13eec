"""Which implementation runs an op.

"native" is the compiled C++ (CPU) or CUDA kernel behind torch.ops.icnet, "triton" the Triton kernel,
"reference" the plain-PyTorch definition. The default is native when the extension is loaded, else Triton
on a GPU, else the reference; ICNET_BACKEND overrides the default for every call.
"""

import os

import torch

from icnet_kernels._native import native_available, native_cuda_available

BACKENDS = ("native", "triton", "reference")


def triton_interpreted() -> bool:
    """Whether Triton runs its kernels in its interpreter, on CPU tensors (TRITON_INTERPRET=1, which must be
    set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_usable(device: torch.device) -> bool:
    if device.type in ("cuda", "meta"):  # on meta tensors only the ops' fake kernels run (shapes, FLOP counts)
        return True
    return device.type == "cpu" and triton_interpreted()


def choose_backend(backend: str | None, x: torch.Tensor) -> str:
    if backend is None:
        backend = os.environ.get("ICNET_BACKEND") or None
    if backend is None:
        # meta tensors run the ops' fake kernels, which every build of the extension has
        native_ok = native_available() and (x.device.type in ("cpu", "meta") or native_cuda_available())
        if native_ok:
            return "native"
        return "triton" if x.device.type == "cuda" else "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "native" and not native_available():
        raise RuntimeError("backend='native' needs the compiled extension icnet_kernels._C, which is not loaded")
    if backend == "native" and x.device.type == "cuda" and not native_cuda_available():
        raise RuntimeError("backend='native' on a CUDA tensor needs icnet_kernels._C built with CUDA")
    if backend == "triton" and not triton_usable(x.device):
        raise RuntimeError(
            f"backend='triton' runs on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1 set before "
            f"triton is imported; got a tensor on {x.device}")
    return backend


def choose_cpu_native_triton_or_reference(backend: str | None, x: torch.Tensor, op: str) -> str:
    """The backend of an op whose compiled kernel is C++ for the CPU only (on a GPU its kernel is Triton's): by
    default native on the CPU (and meta) where the extension is loaded, else Triton wherever it runs, else the
    reference. ICNET_BACKEND=native means Triton on a GPU; an explicit backend='native' there is refused."""
    explicit = backend is not None
    if backend is None:
        backend = os.environ.get("ICNET_BACKEND") or None
    cpu_native = x.device.type in ("cpu", "meta") and native_available()
    if backend is None or (backend == "native" and not explicit and not cpu_native):
        backend = "native" if cpu_native else "triton" if triton_usable(x.device) else "reference"
    elif backend == "native" and x.device.type == "cuda":
        raise ValueError(f"backend: {op} has no CUDA C++ kernel (on a GPU it runs Triton's); use 'triton', "
                         f"'reference' or None")
    return choose_backend(backend, x)


def choose_triton_or_reference(backend: str | None, x: torch.Tensor, op: str) -> str:
    """The backend of an op with a Triton kernel and no compiled one: by default Triton wherever it runs (a
    GPU, or the interpreter) unless ICNET_BACKEND says "reference", else the reference."""
    if backend is None:
        backend = os.environ.get("ICNET_BACKEND") or None
        if backend != "reference":
            backend = "triton" if triton_usable(x.device) else "reference"
    elif backend == "native":
        raise ValueError(f"backend: {op} has no native kernel; use 'triton', 'reference' or None")
    return choose_backend(backend, x)
