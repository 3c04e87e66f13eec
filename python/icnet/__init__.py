"""A faithful ICNet (Zhao et al., ECCV 2018) on the icnet_kernels fused operators.

The model follows the authors' released Caffe network (docs/NETWORK.md describes it):
shared trunk on the half-resolution image, a 1/32 branch with summed pyramid pooling, a full-resolution
three-conv branch, two cascade feature fusion units and a classifier.
"""

from icnet.api import load
from icnet.model import ICNet, icnet_cityscapes

__all__ = ["ICNet", "icnet_cityscapes", "load"]
