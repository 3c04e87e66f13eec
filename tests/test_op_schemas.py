"""Each Triton op has the schema of its C++ op (csrc/registration.cpp): one meaning, two implementations."""

import pytest
import torch

import icnet_kernels

PAIRS = [("pyramid_pool_sum", "pyramid_pool_sum_triton"),
         ("pyramid_pool_sum_backward", "pyramid_pool_sum_backward_triton"),
         ("cascade_feature_fusion", "cascade_feature_fusion_triton"),
         ("segmentation_head", "segmentation_head_triton"),
         ("segmentation_head_labels", "segmentation_head_labels_triton")]


def arguments(name: str) -> list[tuple[str, str]]:
    schema = getattr(torch.ops.icnet, name).default._schema
    return [(a.name, str(a.type)) for a in schema.arguments] + [("->", str(r.type)) for r in schema.returns]


@pytest.mark.skipif(not icnet_kernels.native_available(), reason="_C not built")
@pytest.mark.parametrize("native,triton", PAIRS)
def test_triton_op_schema_equals_the_native_one(native, triton):
    assert arguments(triton) == arguments(native)
