"""icnet_kernels: fused C++, CUDA and Triton operators for ICNet-style real-time segmentation.

Importing the package registers torch.ops.icnet.* (from the compiled extension when it loads) and
exposes plain functions and nn.Modules over them.
"""

from icnet_kernels._native import native_available, native_cuda_available
from icnet_kernels.nn import CascadeFeatureFusion, PyramidPoolingSum
from icnet_kernels.ops import (cascade_feature_fusion, conv2d_epilogue, max_pool, pyramid_pool_sum,
                               segmentation_head, segmentation_head_labels)
from icnet_kernels.reference import (cascade_feature_fusion_reference, conv2d_epilogue_reference, max_pool_reference,
                                     pyramid_pool_sum_reference, segmentation_head_reference)

__all__ = [
    "CascadeFeatureFusion",
    "cascade_feature_fusion",
    "cascade_feature_fusion_reference",
    "conv2d_epilogue",
    "conv2d_epilogue_reference",
    "max_pool",
    "max_pool_reference",
    "PyramidPoolingSum",
    "native_available",
    "native_cuda_available",
    "pyramid_pool_sum",
    "pyramid_pool_sum_reference",
    "segmentation_head",
    "segmentation_head_labels",
    "segmentation_head_reference",
]
