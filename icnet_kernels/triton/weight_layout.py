"""Weights in the layout a Triton kernel reads, made once per weight tensor and kept on it.

A module that folds its BatchNorm keeps the folded tensor between inference calls (nn.InferenceCache), so
keeping the re-laid-out copy on that tensor makes a cached call launch the kernels alone. A view (a 1x1
convolution's weight flattened on every call, say) keeps its copy on the tensor it views, under its own
geometry, so a new view of the same weight finds it. The copy is made again when the tensor changes in
place (its version moves, which a view shares with its base) and dies with the tensor. An inference tensor
keeps no version counter, so its copy is made on every call.
"""

import torch


def laid_out(weight: torch.Tensor, name: str, make) -> torch.Tensor:
    """make(weight), remembered on weight (on the tensor it views, if a view) under name until it changes."""
    if torch.compiler.is_compiling() or torch.is_grad_enabled() and weight.requires_grad or weight.is_inference():
        return make(weight)
    owner = weight if weight._base is None else weight._base
    key = (name, weight.dtype, tuple(weight.shape), weight.stride(), weight.storage_offset())
    layouts = owner.__dict__.setdefault("_icnet_layouts", {})
    kept = layouts.get(key)
    if kept is None or kept[0] != weight._version:
        kept = (weight._version, make(weight))
        layouts[key] = kept
    return kept[1]
