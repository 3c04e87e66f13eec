"""CUDA caps a launch grid at 65535 programs along y and z: the Triton launchers split a larger batch into
launches that fit, and say which input is too large where nothing can be split.

Under the interpreter, which has no such cap, the caps are lowered: a launcher that does not split its batch
then meets launch_grid's error, and one that splits it wrongly leaves NaN (every output starts as NaN) or
other values than one launch of the whole batch, which the comparisons catch bit for bit."""

import pytest
import torch

import icnet_kernels
from tests.helpers import TRITON_INTERPRETED
from tests.test_kernel_paths import TRITON_CFF, cff_inputs

needs_interpreter = pytest.mark.skipif(not TRITON_INTERPRETED, reason="lowers the caps under the Triton interpreter")


@pytest.fixture
def index_math():
    return pytest.importorskip("icnet_kernels.triton.index_math")


def test_batch_slices_cover_the_batch_once_within_the_cap(index_math):
    for n, per_item, along in ((1, 1, "z"), (65535, 1, "z"), (65536, 1, "z"), (200000, 4, "z"), (16384, 4, "z"),
                               (10, 7, "x"), (0, 1, "z")):
        slices = index_math.batch_slices(n, per_item, along)
        limit = index_math.GRID_X_LIMIT if along == "x" else index_math.GRID_YZ_LIMIT
        covered = [i for s in slices for i in range(s.start, s.stop)]
        assert covered == list(range(n)), (n, per_item)
        assert all(0 < (s.stop - s.start) * per_item <= limit for s in slices), (n, per_item)
    assert len(index_math.batch_slices(16384, 4)) == 2  # 16383 items of four programs fit one launch


def test_launch_grid_names_what_is_too_large(index_math):
    assert index_math.launch_grid("op", (2**31 - 1, 65535, 65535), ("a", "b", "c")) == (2**31 - 1, 65535, 65535)
    with pytest.raises(ValueError, match=r"op: too many output channels for one launch: 65536 programs along "
                                         r"the grid's y dimension, over CUDA's limit of 65535"):
        index_math.launch_grid("op", (1, 65536, 1), ("pixels", "output channels", "batch items"))
    with pytest.raises(ValueError, match="grid's x dimension"):
        index_math.launch_grid("op", (2**31, 1, 1), ("pixels", "", ""))


def _randn(*shape, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=torch.float32)


# Each case: make(n, device, backend) -> (the op's batched inputs, the op on such inputs). The batch of
# every input can be cut to any part, so a part run alone (in one launch) is what the whole batch's launches
# must give for that part.

def _cff(path):
    # the path's smallest case: the interpreter runs every program in Python
    c = min((c for c in TRITON_CFF if c.kernel_path == path), key=lambda c: c.cl * c.co * c.H * c.W)
    base = cff_inputs(c, torch.float32, seed=1)

    def make(n, device, backend):
        low, high = (t.repeat(n // t.shape[0] + 1, 1, 1, 1)[:n].to(device) for t in (base["low"], base["high"]))
        low = low + _randn(*low.shape, seed=2, device=device)  # no two items alike
        weights = {k: v.to(device) for k, v in base.items() if k not in ("low", "high")}
        return (low, high), lambda low, high: icnet_kernels.cascade_feature_fusion(
            low, high, **weights, dilation=c.dilation, align_corners=c.align_corners, backend=backend)
    return make


def _conv(split_k):
    def make(n, device, backend):
        weight, bias = _randn(8, 6, 3, 3, seed=1, device=device) / 8, _randn(8, seed=2, device=device)
        return (_randn(n, 6, 7, 9, device=device), _randn(n, 8, 7, 9, seed=3, device=device)), \
            lambda x, residual: icnet_kernels.conv2d_epilogue(x, weight, bias, residual, 1, 1, 1, True, split_k,
                                                              backend=backend)
    return make


def _head(labels):
    head = icnet_kernels.segmentation_head_labels if labels else icnet_kernels.segmentation_head

    def make(n, device, backend):
        weight, bias = _randn(19, 16, seed=1, device=device), _randn(19, seed=2, device=device)
        return (_randn(n, 16, 6, 4, device=device),), lambda f: head(f, weight, bias, 4, backend=backend)
    return make


def _fold(n, device, backend):
    from icnet_kernels.triton.pyramid_expansion_epilogue import (pooled_grids, pyramid_expansion_epilogue_triton,
                                                                 pyramid_fold_tables)
    bias, tables = _randn(4, seed=1, device=device), pyramid_fold_tables(7, 9, (1, 2, 3), device=device)
    return (_randn(n, 4, 7, 9, device=device),), \
        lambda y: pyramid_expansion_epilogue_triton(y, pooled_grids(y, tables), bias, tables, True)


def _max_pool(n, device, backend):
    return (_randn(n, 3, 9, 11, device=device),), lambda x: icnet_kernels.max_pool(x, 3, 2, 1, backend=backend)


def _pyramid(n, device, backend):
    return (_randn(n, 3, 7, 9, device=device),), \
        lambda x: icnet_kernels.pyramid_pool_sum(x, (1, 2, 3), backend=backend)


# (name, make, the y and z cap to lower to under the interpreter, the x cap, the backends on a GPU): with a
# batch of 5 one launch passes the lowered caps, so launch_grid refuses it (the CFF border kernel runs four
# programs per item along z, a split-K convolution split_k, the pyramid kernel one per channel plane along x)
CASES = [
    ("cff general", _cff("general"), 2, None, ("triton", "native")),
    ("cff shortcut", _cff("shortcut"), 8, None, ("triton", "native")),
    ("conv2d_epilogue", _conv(1), 2, None, ("triton",)),
    ("conv2d_epilogue split-K", _conv(3), 6, None, ("triton",)),
    ("segmentation_head", _head(False), 2, None, ("triton",)),
    ("segmentation_head_labels", _head(True), 2, None, ("triton",)),
    ("pyramid fold epilogue", _fold, 2, None, ("triton",)),
    ("max_pool", _max_pool, 2, None, ("triton",)),
    ("pyramid_pool_sum", _pyramid, 65535, 7, ("triton", "native")),
]


@needs_interpreter
@pytest.mark.parametrize("name,make,yz_cap,x_cap", [c[:4] for c in CASES], ids=[c[0] for c in CASES])
def test_a_batch_over_the_grid_cap_runs_in_launches_that_equal_one(name, make, yz_cap, x_cap, index_math,
                                                                   monkeypatch):
    inputs, run = make(5, "cpu", "triton")
    whole = run(*inputs)
    monkeypatch.setattr(index_math, "GRID_YZ_LIMIT", yz_cap)
    if x_cap is not None:
        monkeypatch.setattr(index_math, "GRID_X_LIMIT", x_cap)
    assert not whole.isnan().any()
    torch.testing.assert_close(run(*inputs), whole, rtol=0, atol=0, msg=name)


GPU_CASES = [pytest.param(name, make, backend, id=f"{name}-{backend}") for name, make, _, _, backends in CASES
             for backend in backends]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("name,make,backend", GPU_CASES)
def test_a_batch_past_the_cuda_grid_cap_on_a_gpu(name, make, backend):
    """65537 items: the items on either side of the launches' seam equal the same items run alone."""
    if backend == "native" and not icnet_kernels.native_cuda_available():
        pytest.skip("_C built without CUDA")
    n = 65537
    inputs, run = make(n, "cuda", backend)
    whole = run(*inputs)
    assert not whole.isnan().any(), name
    for part in (slice(0, 3), slice(65532, n)):
        torch.testing.assert_close(whole[part], run(*(t[part] for t in inputs)), rtol=0, atol=0, msg=name)


@needs_interpreter
def test_a_launch_past_the_caps_names_the_input(index_math, monkeypatch):
    """Along y nothing is split: too many output channels for one launch is an error that says so."""
    monkeypatch.setattr(index_math, "GRID_YZ_LIMIT", 1)
    with pytest.raises(ValueError, match="max_pool: too many channels for one launch"):
        icnet_kernels.max_pool(_randn(1, 200, 5, 5), 3, 2, 1, backend="triton")
