"""Benchmark cases and providers for the segmentation head: ICNet's classifier and 8x zoom to the image,
as logits and as uint8 labels. On the CPU its C++ kernel against eager ATen; on a GPU the Triton kernel
(there is no CUDA C++ one) against eager and torch.compile."""

from functools import partial

import torch
import torch.nn.functional as F

from benchmarks.case import Case, Provider, ProviderBuilder, case_grid, gpu_case_grid, standard_providers
from icnet_kernels import segmentation_head, segmentation_head_labels, segmentation_head_reference

NAME = "segmentation_head"
CHANNELS, CLASSES, ZOOM = 128, 19, 8
ICNET_MAP = (129, 257)  # cff_sub12's output at 1025x2049, zoomed 8x to the image


def eager_head(features, weight, bias, zoom: int, labels: bool) -> torch.Tensor:
    """In ATen ops: the classifier on the small map, then the bilinear resize (the fused build's GPU eager path)."""
    h, w = features.shape[-2:]
    logits = F.interpolate(F.conv2d(features, weight[:, :, None, None], bias),
                           size=((h - 1) * zoom + 1, (w - 1) * zoom + 1), mode="bilinear", align_corners=True)
    return logits.argmax(1).to(torch.uint8) if labels else logits


def _case(variant: str, batch: int, dtype: torch.dtype) -> Case:
    labels = variant.startswith("labels")
    h, w = ICNET_MAP
    height, width = (h - 1) * ZOOM + 1, (w - 1) * ZOOM + 1
    out_bytes = batch * height * width * (1 if labels else CLASSES * dtype.itemsize)
    in_bytes = (batch * CHANNELS * h * w + CLASSES * (CHANNELS + 1)) * dtype.itemsize
    # the definition resizes the 128 channels (a 4-tap blend, 7 flops) and classifies every output pixel
    flops = batch * height * width * (7 * CHANNELS + 2 * CHANNELS * CLASSES)
    return Case(op=NAME, variant=variant, shape=(batch, CHANNELS, h, w), dtype=dtype,
                params={"zoom": ZOOM, "labels": labels, "channels_last": variant.endswith("channels_last")},
                min_bytes=in_bytes + out_bytes, flops=flops, dense_flops=2 * batch * CHANNELS * CLASSES * h * w)


def cases(device: torch.device, quick: bool) -> list[Case]:
    grid = gpu_case_grid(quick) if device.type == "cuda" else \
        case_grid(quick, (1, 4), (torch.float32, torch.bfloat16), quick_dtypes=(torch.float32,))
    return [_case(variant, batch, dtype) for dtype, batch in grid
            for variant in ("logits-channels_last", "logits-nchw", "labels-channels_last")]


def make_inputs(case: Case, device: torch.device) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator(device=device).manual_seed(0)
    features = torch.randn(case.shape, generator=generator, device=device).to(case.dtype)
    if case.params["channels_last"]:
        features = features.contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(CLASSES, CHANNELS, generator=generator, device=device) / CHANNELS**0.5).to(case.dtype)
    bias = torch.randn(CLASSES, generator=generator, device=device).to(case.dtype)
    return features, weight, bias


def reference(case: Case, inputs) -> torch.Tensor:
    features, weight, bias = (t.double() for t in inputs)
    logits = segmentation_head_reference(features, weight, bias, case.params["zoom"])
    return logits.argmax(1).double() if case.params["labels"] else logits


def _eager(case: Case) -> Provider:
    return partial(eager_head, zoom=case.params["zoom"], labels=case.params["labels"])


def _icnet(backend: str) -> ProviderBuilder:
    def build(case: Case) -> Provider:
        head = segmentation_head_labels if case.params["labels"] else segmentation_head
        return partial(head, zoom=case.params["zoom"], backend=backend)
    return build


def providers(device: torch.device) -> dict[str, ProviderBuilder]:
    found = standard_providers(device, _eager, _icnet)
    if device.type == "cuda":
        found.pop("icnet-native")  # the head's compiled kernel is the CPU's alone
    return found
