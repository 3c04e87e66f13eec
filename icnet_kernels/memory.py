"""Reuse of CPU memory across inference calls.

torch's CPU allocator hands every freed block back to the system, so each inference call takes fresh pages
for its activations and the kernel zeroes them on first touch. Inside `reused_cpu_memory()` blocks of at
least 1 MiB come from a cache kept by the extension (installed as torch's CPU allocator the first time a
scope opens; everything outside scopes still goes to the allocator before it) and return to that cache
when their tensors are freed, whenever that is. A tensor made inside a scope is an ordinary tensor: it
keeps its memory as long as it lives.

The cache holds what freed blocks it has (at most 4 GiB); `release_cpu_memory()` gives them back.
ICNET_CPU_MEMORY_REUSE=0 turns reuse off, and without the compiled extension the scope does nothing.
"""

import os
from contextlib import contextmanager

from icnet_kernels import _native


def reuse_enabled() -> bool:
    return _native.native_available() and os.environ.get("ICNET_CPU_MEMORY_REUSE", "1") != "0"


@contextmanager
def reused_cpu_memory():
    """A scope on this thread in which large CPU allocations reuse freed blocks (scopes nest)."""
    entered = reuse_enabled() and _native._C.arena_enter()
    try:
        yield
    finally:
        if entered:
            _native._C.arena_exit()


def release_cpu_memory() -> int:
    """Frees the cached blocks; returns how many bytes that was."""
    return _native._C.arena_release() if _native.native_available() else 0


def cached_cpu_bytes() -> int:
    """Bytes of freed blocks the cache holds for reuse."""
    return _native._C.arena_cached_bytes() if _native.native_available() else 0
