"""Layout switches between NCHW and channels_last.

x.contiguous(memory_format=...) between the two layouts is slow on the CPU: ATen's copy walks the output in
order and reads the input at the channel stride. to_memory_format gives the same tensor with a cache-blocked
transpose (the internal C++ op icnet::_relayout) where it can, and is x.contiguous(memory_format=...)
everywhere else: on other devices, without the extension, under autograd or torch.compile (where the ATen
op is differentiable and traceable), for inputs in neither layout and for maps of few channels (an image).
"""

import torch

from icnet_kernels._native import native_available

# Below this many channels ATen's copy is as fast (a tile would hold only a few channel planes).
MIN_CHANNELS = 8


def to_memory_format(x: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """x.contiguous(memory_format=memory_format): x itself where it already is, else a copy."""
    if x.is_contiguous(memory_format=memory_format):
        return x
    channels_last = memory_format == torch.channels_last
    other = torch.contiguous_format if channels_last else torch.channels_last
    if (memory_format in (torch.channels_last, torch.contiguous_format) and x.device.type == "cpu" and x.dim() == 4
            and x.shape[1] >= MIN_CHANNELS and x.is_contiguous(memory_format=other) and native_available() and not x.is_complex()
            and not (torch.is_grad_enabled() and x.requires_grad) and not torch.compiler.is_compiling()):
        return torch.ops.icnet._relayout(x, channels_last)
    return x.contiguous(memory_format=memory_format)
