"""Segmentation head, `bilinear_zoom(conv1x1(features, weight) + bias, zoom)` with ICNet's exact integer zoom
(align_corners, output (h-1)*zoom+1): everything of the op that lives in Python.

- `segmentation_head` and `segmentation_head_labels`: the public functions (logits, or their argmax as
  uint8 without the logits ever being written). They pick a backend: on the CPU the C++ kernel
  (csrc/cpu/segmentation_head.cpp) where the extension is loaded, on a GPU the Triton kernel (there is no
  CUDA C++ kernel), else the reference.
- `check_segmentation_head_args`: the checks, raising ValueError naming the argument; the twin of
  csrc/common/segmentation_head_args.cpp (same messages). The Triton ops, every fake kernel and the
  reference path run them.
- `icnet::segmentation_head_triton` and `icnet::segmentation_head_labels_triton`: the Triton ops (the
  kernel is in icnet_kernels/triton/segmentation_head.py); the fake kernels of these and of the C++ ops
  `icnet::segmentation_head` and `icnet::segmentation_head_labels`.
- Inference only: the logits op's backward raises an error that says so (train through
  segmentation_head_reference's ATen ops); the labels are integers and have no gradient.
"""

from functools import partial

import torch

from icnet_kernels import reference
from icnet_kernels._native import native_available
from icnet_kernels.backends import choose_cpu_native_triton_or_reference
from icnet_kernels.cff_geometry import memory_format_of
from icnet_kernels.ops.arguments import exact_int, require, require_feature_map, tensor_argument
from icnet_kernels.ops.inference_only import register_inference_only
from icnet_kernels.ops.cascade_feature_fusion import flat_weight_high

INT32_MAX = 2**31 - 1
MAX_ZOOM = 64  # the kernel unrolls its loop over a program's zoom output rows
MAX_LABEL_CLASSES = 256  # labels are uint8


def zoomed_size(features, zoom) -> tuple[int, int]:
    """The output's spatial size: (h-1)*zoom+1 by (w-1)*zoom+1."""
    h, w = features.shape[-2:]
    return (h - 1) * zoom + 1, (w - 1) * zoom + 1


def check_segmentation_head_args(features, weight, bias, zoom: int, labels: bool, kernel: bool = True) -> None:
    """Raises ValueError naming the argument. kernel: the Triton kernel's dtypes only (float64 is the
    reference's alone)."""
    op = "segmentation_head_labels" if labels else "segmentation_head"
    require_feature_map(op, "features", features, "N, K, h, w", kernel)
    for name, t in (("weight", weight), ("bias", bias)):
        require(t.dtype == features.dtype, f"{op}: {name} must have features' dtype {features.dtype}, got {t.dtype}")
        require(t.device == features.device,
                f"{op}: {name} must be on features' device {features.device}, got {t.device}")
    _, k, h, w = features.shape
    require(k > 0, f"{op}: features need at least one channel")
    require(h > 0 and w > 0, f"{op}: features must have a non-empty spatial size, got {h}x{w}")
    require(weight.dim() == 2 and weight.shape[1] == k,
            f"{op}: weight must be [C, {k}] (K = features' channels), got {list(weight.shape)}")
    c = weight.shape[0]
    require(c > 0, f"{op}: weight must have at least one class")
    require(bias.dim() == 1 and bias.shape[0] == c, f"{op}: bias must be [{c}], got {list(bias.shape)}")
    require(1 <= zoom <= MAX_ZOOM, f"{op}: zoom must be in [1, {MAX_ZOOM}], got {zoom}")
    height, width = zoomed_size(features, zoom)
    require(height * width <= INT32_MAX, f"{op}: the zoomed size {height}x{width} is too large")
    if labels:
        require(c <= MAX_LABEL_CLASSES,
                f"{op}: labels are uint8, so weight may have at most {MAX_LABEL_CLASSES} classes, got {c}")


def _run(features, weight, bias, zoom, labels: bool, backend):
    features, weight, bias = (tensor_argument(name, t) for name, t in
                              (("features", features), ("weight", weight), ("bias", bias)))
    zoom = exact_int("zoom", zoom)
    weight = flat_weight_high(weight)
    backend = choose_cpu_native_triton_or_reference(backend, features, "the segmentation head")
    if backend == "reference":
        check_segmentation_head_args(features, weight, bias, zoom, labels, kernel=False)
        return reference.segmentation_head_reference(features, weight, bias, zoom, labels)
    name = "segmentation_head_labels" if labels else "segmentation_head"
    return getattr(torch.ops.icnet, name if backend == "native" else f"{name}_triton")(features, weight, bias, zoom)


def segmentation_head(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, zoom: int,
                      backend: str | None = None) -> torch.Tensor:
    """Logits of a 1x1 classifier zoomed by an integer factor, bilinear with align_corners:

        bilinear_resize(conv1x1(features, weight) + bias, ((h-1)*zoom+1, (w-1)*zoom+1))

    which equals classifying the zoomed features (both steps are linear). features [N, K, h, w]; weight
    [C, K] or [C, K, 1, 1] and bias [C] in features' dtype. The logits have features' dtype and memory
    format. backend: None (Triton where it runs, else the reference), "triton" or "reference".
    """
    return _run(features, weight, bias, zoom, False, backend)


def segmentation_head_labels(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, zoom: int,
                             backend: str | None = None) -> torch.Tensor:
    """segmentation_head(...).argmax(1) as uint8 [N, (h-1)*zoom+1, (w-1)*zoom+1], without writing the logits.
    Ties go to the first class, and a NaN logit wins, as in torch.argmax. At most 256 classes."""
    return _run(features, weight, bias, zoom, True, backend)


def _run_triton(features, weight, bias, zoom, labels: bool) -> torch.Tensor:
    from icnet_kernels.triton.segmentation_head import segmentation_head_triton
    check_segmentation_head_args(features, weight, bias, zoom, labels)
    return segmentation_head_triton(features, weight, bias, zoom, labels)


@torch.library.custom_op("icnet::segmentation_head_triton", mutates_args=())
def segmentation_head_triton_op(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                zoom: int) -> torch.Tensor:
    return _run_triton(features, weight, bias, zoom, False)


@torch.library.custom_op("icnet::segmentation_head_labels_triton", mutates_args=())
def segmentation_head_labels_triton_op(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                       zoom: int) -> torch.Tensor:
    return _run_triton(features, weight, bias, zoom, True)


def segmentation_head_fake(features, weight, bias, zoom, kernel: bool = True):
    """Shape, dtype and layout of the logits, after the same checks as the kernel (kernel: the Triton
    kernel's dtypes; the C++ one also takes float64)."""
    check_segmentation_head_args(features, weight, bias, zoom, False, kernel)
    return torch.empty((features.shape[0], weight.shape[0], *zoomed_size(features, zoom)), dtype=features.dtype,
                       device=features.device, memory_format=memory_format_of(features))


def segmentation_head_labels_fake(features, weight, bias, zoom, kernel: bool = True):
    check_segmentation_head_args(features, weight, bias, zoom, True, kernel)
    return torch.empty((features.shape[0], *zoomed_size(features, zoom)), dtype=torch.uint8, device=features.device)


def _register():
    register_inference_only("segmentation_head_triton", segmentation_head_fake, "segmentation_head")
    torch.library.register_fake(torch.ops.icnet.segmentation_head_labels_triton.default)(segmentation_head_labels_fake)
    if native_available():
        register_inference_only("segmentation_head", partial(segmentation_head_fake, kernel=False),
                                "segmentation_head")
        torch.library.register_fake(torch.ops.icnet.segmentation_head_labels.default)(
            partial(segmentation_head_labels_fake, kernel=False))


_register()
