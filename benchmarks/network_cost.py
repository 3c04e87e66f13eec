"""What a network has to compute and move at the least, for the roofline floor of its inference
(benchmarks.roofline divides these by the device's peaks).

FLOPs are torch's FlopCounterMode count: convolutions and matrix products, 2 per multiply-add; pooling,
resizing, BatchNorm and elementwise work are not counted. A cascade feature fusion unit is counted at the
arithmetic of its cheapest exact evaluation (benchmarks.cascade_feature_fusion.dense_flops) in "dense", so
that the floor does not ask for arithmetic the fused kernel skips.

Bytes: the strict lower bound reads the input once, writes the output once and reads every weight once.
The "layerwise" traffic adds, for every intermediate activation a layer hands to the next, one write and
one read: what a network run as one fused kernel per layer cannot avoid. A layer ("unit") is a
conv+BN(+residual)+ReLU block, a fusion unit, or any module without children; the functions called between
units (ICNet's resizes) count as layers of their own.
"""

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

import icnet_kernels
from benchmarks import cascade_feature_fusion
from icnet import ICNet
from icnet.layers import ConvBN, ReferenceCascadeFeatureFusion

FUSION_UNITS = (icnet_kernels.CascadeFeatureFusion, ReferenceCascadeFeatureFusion)
UNITS = (ConvBN, *FUSION_UNITS)


def count_flops(model: nn.Module, *inputs: torch.Tensor) -> dict[str, int]:
    """{"total", "convolution", "dense"} FLOPs of model(*inputs) in inference.

    total and convolution are what FlopCounterMode sees run (nothing, for ops it has no formula for, such
    as icnet's fused ones); dense is total with every fusion unit replaced by its cheapest exact arithmetic.
    Run it on the meta device: nothing is computed there, and a fused build's convolutions take the plain
    F.conv2d path FlopCounterMode knows (on the CPU they are oneDNN ops it does not count).
    """
    fusion_counts: list[tuple[int, int]] = []  # (counted, cheapest exact) per fusion unit call
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=_head_flop_formulas()) as counter:
        def before(module, args):
            low, high = args[:2]
            exact = cascade_feature_fusion.dense_flops(low.shape, high.shape, module.conv_low.out_channels,
                                                       module.conv_low.dilation[0],
                                                       getattr(module, "align_corners", True))
            fusion_counts.append((counter.get_total_flops(), exact))

        def after(module, args, output):
            started, exact = fusion_counts[-1]
            fusion_counts[-1] = (counter.get_total_flops() - started, exact)

        handles = [hook for module in model.modules() if isinstance(module, FUSION_UNITS)
                   for hook in (module.register_forward_pre_hook(before), module.register_forward_hook(after))]
        try:
            model(*inputs)
        finally:
            for handle in handles:
                handle.remove()
    by_op = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    total = counter.get_total_flops()
    return {"total": total, "convolution": by_op.get("aten.convolution", 0),
            "dense": total + sum(exact - counted for counted, exact in fusion_counts)}


def _head_flops(features_shape, weight_shape, *args, **kwargs) -> int:
    """The segmentation head's classifier, a [classes, K] matrix on every low-resolution pixel (its zoom is
    interpolation, which is not counted)."""
    n, k, h, w = features_shape
    return 2 * n * h * w * k * weight_shape[0]


def _head_flop_formulas() -> dict:
    """FlopCounterMode formulas for the segmentation head ops: the fused build classifies inside them."""
    names = ("segmentation_head", "segmentation_head_labels", "segmentation_head_triton",
             "segmentation_head_labels_triton")
    return {getattr(torch.ops.icnet, name): _head_flops for name in names if hasattr(torch.ops.icnet, name)}


class _ReadsOutsideUnits(TorchFunctionMode):
    """Records the tensors read by torch functions called between units (depth 0) that make a tensor."""

    def __init__(self, reads: dict[int, torch.Tensor]):
        super().__init__()
        self.reads, self.depth = reads, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if self.depth == 0 and isinstance(result, torch.Tensor):
            _record(self.reads, (args, kwargs))
        return result


def _record(reads: dict[int, torch.Tensor], tree) -> None:
    reads.update((id(leaf), leaf) for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor))


def _units(module: nn.Module) -> list[nn.Module]:
    """The outermost UNITS and childless modules under module."""
    found = []
    for child in module.children():
        if isinstance(child, UNITS) or next(child.children(), None) is None:
            found.append(child)
        else:
            found += _units(child)
    return found


def _storage(t: torch.Tensor) -> int:
    """Identifies t's storage, which its views share (on the meta device too, where there is no pointer)."""
    return t.untyped_storage()._cdata


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def count_bytes(model: nn.Module, image: torch.Tensor) -> dict[str, int]:
    """{"image", "logits", "weights", "activations"} bytes of model(image) in inference.

    weights: every convolution that runs, as it would be read folded: its weight plus one bias value per
    output channel (its own bias or its BatchNorm's shift). activations: the intermediate tensors layers
    read (the image excluded), each counted twice, for its one write and its one read.
    """
    reads: dict[int, torch.Tensor] = {}
    ran: list[nn.Module] = []
    mode = _ReadsOutsideUnits(reads)

    def enter(module, args, kwargs):
        _record(reads, (args, kwargs))
        mode.depth += 1

    def leave(module, args, output):
        mode.depth -= 1

    def mark(module, args):
        ran.append(module)

    handles = [module.register_forward_pre_hook(mark) for module in model.modules() if module is not model]
    for unit in _units(model):
        handles += [unit.register_forward_pre_hook(enter, with_kwargs=True), unit.register_forward_hook(leave)]
    try:
        with torch.inference_mode(), mode:
            logits = model(image)
    finally:
        for handle in handles:
            handle.remove()
    reads.pop(id(image), None)
    convs = {id(conv): conv for module in ran for conv in module.modules() if isinstance(conv, nn.Conv2d)}
    # a convolution whose weight (or a view of it) a function read between units, as the fused head reads
    # its classifier's: the parameters are weights, not activations
    read = {_storage(t) for t in reads.values()}
    convs |= {id(conv): conv for conv in model.modules()
              if isinstance(conv, nn.Conv2d) and _storage(conv.weight) in read}
    parameters = {_storage(p) for p in model.parameters()}
    reads = {key: t for key, t in reads.items() if _storage(t) not in parameters}
    weights = sum((conv.weight.numel() + conv.out_channels) * conv.weight.element_size() for conv in convs.values())
    return {"image": _nbytes(image), "logits": _nbytes(logits), "weights": weights,
            "activations": 2 * sum(_nbytes(t) for t in reads.values())}


def icnet_cost(mode: str, batch: int, dtype: torch.dtype, memory_format: torch.memory_format,
               input_size: tuple[int, int]) -> dict:
    """The roofline inputs of ICNet inference at input_size, counted on the meta device (no compute).

    flops, conv_flops: the reference build's arithmetic, the network's definition. dense_flops: the fused
    build's, the fusion units at their exact shortcut; the floor's compute term. min_bytes (image read,
    logits written, weights read once) and layerwise_bytes (plus each activation written and read once):
    the fused build's layers, which classify at 1/8 where the reference resizes to 1/4 first.
    """
    def build(fused: bool) -> tuple[nn.Module, torch.Tensor]:
        with torch.device("meta"):
            model = ICNet(mode=mode, fused=fused).eval().to(dtype=dtype, memory_format=memory_format)
            image = torch.empty(batch, 3, *input_size, dtype=dtype).contiguous(memory_format=memory_format)
        return model, image

    definition = count_flops(*build(False))
    fused = build(True)
    traffic = count_bytes(*fused)
    min_parts = {part: traffic[part] for part in ("image", "logits", "weights")}
    return {"flops": definition["total"], "conv_flops": definition["convolution"],
            "dense_flops": count_flops(*fused)["dense"], "min_bytes": sum(min_parts.values()),
            "min_bytes_parts": min_parts, "layerwise_bytes": sum(min_parts.values()) + traffic["activations"]}

