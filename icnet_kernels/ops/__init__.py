"""The ops' Python side, one module per op (see docs/ARCHITECTURE.md). Importing this package registers the
Triton ops and every op's fake kernel and autograd."""

from icnet_kernels.ops.cascade_feature_fusion import cascade_feature_fusion
from icnet_kernels.ops.conv2d_epilogue import conv2d_epilogue
from icnet_kernels.ops.max_pool import max_pool
from icnet_kernels.ops.pyramid_pool_sum import Pair, pyramid_pool_sum
from icnet_kernels.ops.segmentation_head import segmentation_head, segmentation_head_labels

__all__ = ["Pair", "cascade_feature_fusion", "conv2d_epilogue", "max_pool", "pyramid_pool_sum", "segmentation_head",
           "segmentation_head_labels"]
