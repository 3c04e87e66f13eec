"""Weights in the layout a Triton kernel reads, made once per weight tensor and kept on it.

A module that folds its BatchNorm keeps the folded tensor between inference calls (nn.InferenceCache), so
keeping the re-laid-out copy on that tensor makes a cached call launch the kernels alone. The copy is made
again when the tensor changes in place (its version moves) and dies with the tensor. An inference tensor
keeps no version counter, so its copy is made on every call.
"""

import torch


def laid_out(weight: torch.Tensor, name: str, make) -> torch.Tensor:
    """make(weight), remembered on weight under name until weight changes."""
    if torch.compiler.is_compiling() or torch.is_grad_enabled() and weight.requires_grad or weight.is_inference():
        return make(weight)
    layouts = weight.__dict__.setdefault("_icnet_layouts", {})
    kept = layouts.get(name)
    if kept is None or kept[0] != weight._version:
        kept = (weight._version, make(weight))
        layouts[name] = kept
    return kept[1]
