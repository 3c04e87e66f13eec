"""nn.Modules over the fused ops."""

from collections.abc import Sequence

import torch
from torch import nn

from icnet_kernels.ops import Pair, pyramid_pool_sum


class PyramidPoolingSum(nn.Module):
    """x + sum_b resize(avgpool_b(x)): PSPNet's pyramid pooling without per-bin convolutions, as in ICNet.

    Holds no parameters. kernel_sizes/strides None selects adaptive pooling (any input size); explicit
    values reproduce the released ICNet for its 33x65 map.
    """

    def __init__(self, bins: Sequence[int] = (1, 2, 3, 6), kernel_sizes: Sequence[int | Pair] | None = None,
                 strides: Sequence[int | Pair] | None = None, align_corners: bool = True,
                 backend: str | None = None):
        super().__init__()
        self.bins = tuple(bins)
        self.kernel_sizes = None if kernel_sizes is None else tuple(kernel_sizes)
        self.strides = None if strides is None else tuple(strides)
        self.align_corners = align_corners
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pyramid_pool_sum(x, self.bins, self.kernel_sizes, self.strides, self.align_corners, self.backend)

    def extra_repr(self) -> str:
        geometry = "adaptive" if self.kernel_sizes is None else f"kernel_sizes={self.kernel_sizes}, strides={self.strides}"
        return f"bins={self.bins}, {geometry}, align_corners={self.align_corners}"
