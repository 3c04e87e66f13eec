"""The interpreted Triton kernels touch no memory outside their tensor arguments: the CPU's stand-in for
compute-sanitizer memcheck.

Under TRITON_INTERPRET every load and store of a kernel goes through the interpreter's load and store with
its addresses and mask; here each active address is checked against the storages of the tensors the kernel
was called with. Masked comparisons of values cannot see an out-of-bounds read of memory that happens to
hold a plausible value, or a stray write into another tensor; this can. Random geometries and layouts reach
every kernel: cascade feature fusion (general path, shortcut with its border GEMMs), the convolution with
split-K, max pooling, the segmentation head and its labels, the pyramid fold epilogue and pyramid pooling.
"""

import random

import numpy as np
import pytest
import torch

import icnet_kernels
from tests.cascade_feature_fusion_cases import Geometry, make_inputs
from tests.helpers import LAYOUTS, in_layout

interpreter = pytest.importorskip("triton.runtime.interpreter")
pytestmark = pytest.mark.skipif(not icnet_kernels.backends.triton_usable(torch.device("cpu")),
                                reason="Triton is interpreted only on CPU-only machines")


class BoundsChecker:
    """Wraps the interpreter's load and store: every address a kernel reads or writes must lie in a storage
    of one of the tensors it was called with."""

    def __init__(self, monkeypatch):
        self.ranges: list[tuple[int, int]] = []
        self.accesses = 0
        run, memory = interpreter.GridExecutor.__call__, interpreter._interpreter
        checker = self

        def call(executor, *args, **kwargs):
            checker.ranges = [(t.untyped_storage().data_ptr(), t.untyped_storage().data_ptr()
                               + t.untyped_storage().nbytes())
                              for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
            return run(executor, *args, **kwargs)

        class Memory:
            def __getattr__(self, name):
                return getattr(memory, name)

            @staticmethod
            def load(pointers, mask, other, dtype):
                checker.check(pointers, mask, np.dtype(dtype).itemsize, "load")
                return memory.load(pointers, mask, other, dtype)

            @staticmethod
            def store(pointers, value, mask):
                checker.check(pointers, mask, value.dtype.itemsize, "store")
                return memory.store(pointers, value, mask)

        monkeypatch.setattr(interpreter.GridExecutor, "__call__", call)
        monkeypatch.setattr(interpreter, "_interpreter", Memory())

    def check(self, pointers, mask, size, what):
        active = pointers[mask.astype(bool)]
        self.accesses += active.size
        inside = np.zeros(active.shape, dtype=bool)
        for start, end in self.ranges:
            inside |= (active >= start) & (active + size <= end)
        assert inside.all(), f"an out-of-bounds {what} at {int(active[~inside][0]):#x}, tensors at " \
                             f"{[(hex(s), hex(e)) for s, e in self.ranges]}"


def test_the_checker_sees_an_access_outside_the_tensors(monkeypatch):
    checker = BoundsChecker(monkeypatch)
    x = torch.randn(1, 4, 5, 5)
    checker.ranges = [(x.untyped_storage().data_ptr(), x.untyped_storage().data_ptr() + 4)]  # one element only
    with pytest.raises(AssertionError, match="out-of-bounds load"):
        checker.check(np.array([x.data_ptr() + 4], dtype=np.uint64), np.array([True]), 4, "load")
    checker.check(np.array([x.data_ptr() + 4], dtype=np.uint64), np.array([False]), 4, "load")  # masked off


@pytest.mark.parametrize("seed", range(4))
def test_interpreted_kernels_stay_inside_their_tensors(monkeypatch, seed):
    from icnet_kernels.triton.pyramid_expansion_epilogue import (pooled_grids, pyramid_expansion_epilogue_triton,
                                                                 pyramid_fold_tables)
    checker = BoundsChecker(monkeypatch)
    rng = random.Random(seed)
    for case in range(6):
        dtype = rng.choice((torch.float32, torch.float16))  # 16-bit elements: other strides and tiles

        def randn(*shape):
            return torch.randn(*shape).to(dtype)

        h, w = rng.randint(2, 6), rng.randint(2, 6)
        shortcut = case % 2 == 0
        height, width = (2 * h - 1, 2 * w - 1) if shortcut else (rng.randint(h, 2 * h + 2), rng.randint(w, 2 * w + 2))
        g = Geometry(rng.randint(1, 2), rng.randint(1, 18), rng.randint(1, 18), rng.randint(1, 18), h, w, height,
                     width, 2 if shortcut else rng.randint(1, 3), shortcut or rng.random() < 0.5)
        inputs = make_inputs(g, dtype, seed=case)
        for name in ("low", "high"):
            inputs[name] = in_layout(inputs[name], rng.choice(LAYOUTS))
        icnet_kernels.cascade_feature_fusion(**inputs, dilation=g.dilation, align_corners=g.align_corners,
                                             backend="triton")

        k, dilation, stride = rng.choice([1, 3]), rng.randint(1, 3), rng.randint(1, 2)
        padding = rng.randint(0, dilation * (k // 2) + 1)
        span = dilation * (k - 1) + 1
        n, ci, co = rng.randint(1, 2), rng.randint(1, 20), rng.randint(1, 20)
        size = (rng.randint(max(1, span - 2 * padding), 9), rng.randint(max(1, span - 2 * padding), 9))
        out_size = tuple((s + 2 * padding - span) // stride + 1 for s in size)
        x = in_layout(randn(n, ci, *size), rng.choice(LAYOUTS))
        residual = randn(n, co, *out_size) if rng.random() < 0.5 else None
        icnet_kernels.conv2d_epilogue(x, randn(co, ci, k, k), randn(co), residual, stride, padding,
                                      dilation, True, rng.randint(1, 4), backend="triton")
        icnet_kernels.max_pool(in_layout(randn(n, ci, *size), rng.choice(LAYOUTS)), 3, 2, 1, backend="triton")
        features = in_layout(randn(n, ci, *size), rng.choice(("contiguous", "channels_last")))
        zoom = rng.randint(1, 4)
        icnet_kernels.segmentation_head(features, randn(co, ci), randn(co), zoom, backend="triton")
        icnet_kernels.segmentation_head_labels(features, randn(co, ci), randn(co), zoom, backend="triton")
        bins = tuple(sorted({min(b, *size) for b in (1, 2, 3, 6)}))
        y = in_layout(randn(n, ci, *size), rng.choice(LAYOUTS))
        tables = pyramid_fold_tables(*size, bins, align_corners=True)
        pyramid_expansion_epilogue_triton(y, pooled_grids(y, tables), randn(ci), tables, True)
        icnet_kernels.pyramid_pool_sum(y, bins, None, None, align_corners=True, backend="triton")
    assert checker.accesses > 0  # the kernels ran through the checked load and store
