"""On a GPU: both ops at ICNet's own shapes and channel counts (the benchmark's cases: CFF sub24 256/256 ->
128 and sub12 128/64 -> 128 on the exact 2x zoom and with align_corners=False; pyramid pooling of 1024
channels at 33x65 with the released and the adaptive geometry), native CUDA and Triton, NCHW and
channels_last, against the float64 reference within the same-precision budget."""

import pytest
import torch

import icnet_kernels
from benchmarks import cascade_feature_fusion as cff_bench
from benchmarks import pyramid_pool_sum as ppm_bench
from tests.helpers import ATOL, assert_within_budget

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"),
              pytest.mark.usefixtures("nan_device_memory")]

CUDA = torch.device("cuda")
BACKENDS = [pytest.param("native", marks=pytest.mark.skipif(
                not (torch.cuda.is_available() and icnet_kernels.native_cuda_available()),
                reason="_C built without CUDA")),
            "triton"]
LAYOUTS = [torch.contiguous_format, torch.channels_last]


def _case_id(case):
    return f"{case.variant}-{str(case.dtype).removeprefix('torch.')}"


def _laid_out(tensors, layout, count):
    return tuple(t.contiguous(memory_format=layout) if i < count else t for i, t in enumerate(tensors))


CFF_CASES = cff_bench.cases(CUDA, quick=True) if torch.cuda.is_available() else []
PPM_CASES = ppm_bench.cases(CUDA, quick=True) if torch.cuda.is_available() else []


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CFF_CASES, ids=_case_id)
def test_cascade_feature_fusion_at_icnet_shapes(case, backend, layout):
    inputs = _laid_out(cff_bench.make_inputs(case, CUDA), layout, 2)  # low and high
    exact = cff_bench.reference(case, inputs)
    same_precision = cff_bench.eager_cascade_feature_fusion(*inputs, **case.params)
    out = icnet_kernels.cascade_feature_fusion(*inputs, **case.params, backend=backend)
    assert out.shape == exact.shape and out.dtype == case.dtype
    assert out.is_contiguous(memory_format=layout)
    assert_within_budget(out, exact, same_precision, ATOL[case.dtype] * exact.abs().max().item(),
                         f"{case.variant} {case.dtype} {backend}")


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", PPM_CASES, ids=_case_id)
def test_pyramid_pool_sum_at_icnet_shapes(case, backend, layout):
    inputs = _laid_out(ppm_bench.make_inputs(case, CUDA), layout, 1)
    exact = ppm_bench.reference(case, inputs)
    same_precision = ppm_bench.eager_pyramid_pool_sum(*inputs, **case.params)
    out = icnet_kernels.pyramid_pool_sum(*inputs, **case.params, backend=backend)
    assert out.shape == exact.shape and out.dtype == case.dtype
    assert out.is_contiguous(memory_format=layout)
    assert_within_budget(out, exact, same_precision, ATOL[case.dtype] * exact.abs().max().item(),
                         f"{case.variant} {case.dtype} {backend}")
