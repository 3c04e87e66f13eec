"""Semantic segmentation evaluation: multi-scale and flip test-time averaging into a confusion matrix."""

import math
import sys
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from icnet.metrics import ConfusionMatrix


def multi_scale_probabilities(model, images: torch.Tensor, size: Sequence[int], scales: Sequence[float] = (1.0,),
                              flip: bool = False) -> torch.Tensor:
    """Class probabilities [N, classes, *size] for images [N, 3, H, W], averaged over test-time views.

    Each scale resizes the images (bilinear, align_corners=True: Caffe's Interp, which ICNet's own
    resizes follow), and flip adds each view mirrored; every view's logits are resized to size and
    softmaxed before averaging, so views vote with calibrated probabilities rather than raw logits.
    """
    bad = [scale for scale in scales if not 0 < scale < math.inf]
    if bad or not scales:
        raise ValueError(f"scales must be positive finite numbers, got {list(scales)}")
    height, width = images.shape[-2:]
    total, views = None, 0
    for scale in scales:
        scaled_size = (max(1, round(height * scale)), max(1, round(width * scale)))
        scaled = images if scaled_size == (height, width) else F.interpolate(
            images, size=scaled_size, mode="bilinear", align_corners=True)
        for mirrored in ((False, True) if flip else (False,)):
            logits = model(scaled.flip(-1) if mirrored else scaled)
            if tuple(logits.shape[-2:]) != tuple(size):
                logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=True)
            probabilities = logits.float().softmax(dim=1)
            probabilities = probabilities.flip(-1) if mirrored else probabilities
            total = probabilities if total is None else total + probabilities
            views += 1
    return total / views


def _device_of(model) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def evaluate(model, samples: Iterable, device=None, flip: bool = False, scales: Sequence[float] = (1.0,),
             num_classes: Optional[int] = None, progress: bool = True) -> ConfusionMatrix:
    """Confusion matrix of model's argmax predictions over samples.

    samples yields (image, labels): float32 [3, H, W] or [N, 3, H, W], preprocessed as the model
    expects, and int64 [H, W] or [N, H, W] with 255 = ignore. The labels may be larger than the image
    (e.g. full-resolution ground truth): predictions are made at the labels' size. device defaults to
    the model's; num_classes to its number of output channels. The model runs in eval mode and is put
    back in its previous mode afterwards. In distributed evaluation over sharded samples, call
    all_reduce() on the result.
    """
    device = torch.device(device) if device is not None else _device_of(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    matrix = ConfusionMatrix(num_classes) if num_classes is not None else None
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for image, labels in tqdm(samples, desc="evaluate", unit="batch", file=sys.stderr, disable=not progress):
                images = (image[None] if image.dim() == 3 else image).to(device, dtype, non_blocking=True)
                labels = (labels[None] if labels.dim() == 2 else labels).to(device, non_blocking=True)
                probabilities = multi_scale_probabilities(model, images, labels.shape[-2:], scales, flip)
                if matrix is None:
                    matrix = ConfusionMatrix(probabilities.shape[1])
                matrix.update(probabilities.argmax(dim=1), labels)
    finally:
        model.train(was_training)
    if matrix is None:
        raise ValueError("samples was empty and num_classes was not given: the number of classes is unknown")
    return matrix


def _maybe(value: float) -> Optional[float]:
    return None if math.isnan(value) else value


def report_dict(matrix: ConfusionMatrix, class_names: Sequence[str]) -> dict:
    """The scores as plain JSON types; a NaN (class absent from ground truth and predictions) is None."""
    _check_names(matrix, class_names)
    iou, accuracy = matrix.iou().tolist(), matrix.class_accuracy().tolist()
    return {
        "mean_iou": _maybe(matrix.mean_iou()),
        "pixel_accuracy": _maybe(matrix.pixel_accuracy()),
        "pixels": int(matrix.matrix.sum()),
        "classes": {name: {"iou": _maybe(i), "accuracy": _maybe(a)}
                    for name, i, a in zip(class_names, iou, accuracy)},
    }


def percent(value: float) -> str:
    """A score (a fraction, as ConfusionMatrix and the files hold it) as people read it: 58.20%."""
    return "n/a" if math.isnan(value) else f"{100 * value:.2f}%"


def format_report(matrix: ConfusionMatrix, class_names: Sequence[str]) -> str:
    """A per-class IoU / accuracy table in percent, then mIoU and pixel accuracy."""
    _check_names(matrix, class_names)
    width = max(len("pixel accuracy"), *(len(name) for name in class_names))
    lines = [f"{'class':<{width}}  {'IoU':>8}  {'acc':>8}", "-" * (width + 20)]
    for name, i, a in zip(class_names, matrix.iou().tolist(), matrix.class_accuracy().tolist()):
        lines.append(f"{name:<{width}}  {percent(i):>8}  {percent(a):>8}")
    lines.append("-" * (width + 20))
    lines.append(f"{'mIoU':<{width}}  {percent(matrix.mean_iou()):>8}")
    lines.append(f"{'pixel accuracy':<{width}}  {percent(matrix.pixel_accuracy()):>8}")
    return "\n".join(lines)


def _check_names(matrix: ConfusionMatrix, class_names: Sequence[str]) -> None:
    if len(class_names) != matrix.num_classes:
        raise ValueError(f"class_names has {len(class_names)} names for a matrix of {matrix.num_classes} classes")
