"""Segmentation losses and cascade label guidance.

Every loss takes logits [N, C, H, W] and labels [N, H, W] (int64, ignore_index marks pixels that count for
nothing) and returns a scalar. Cross-entropy is ICNet's own; the others come from reports of ICNet on other
tasks: BCE + Dice for binary masks (Carvana), focal + generalised Dice for many classes with imbalance.
"""

import torch
import torch.nn.functional as F

from icnet.cityscapes import IGNORE_INDEX


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32: losses of float16/bfloat16 (mixed-precision) logits accumulate in float32."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def cross_entropy(logits, labels, ignore_index: int = IGNORE_INDEX):
    """Softmax cross-entropy averaged over the labelled pixels."""
    return F.cross_entropy(_wide(logits), labels, ignore_index=ignore_index)


def _valid_one_hot(logits, labels, ignore_index):
    """(valid mask [N,1,H,W], one-hot targets [N,C,H,W] zero at ignored pixels)."""
    valid = (labels != ignore_index).unsqueeze(1)
    classes = logits.shape[1]
    safe = labels.masked_fill(~valid.squeeze(1), 0)
    if ((safe < 0) | (safe >= classes)).any():
        raise ValueError(f"labels must be class indices below {classes} or ignore_index {ignore_index}")
    one_hot = F.one_hot(safe, classes).permute(0, 3, 1, 2).to(logits.dtype) * valid
    return valid, one_hot


def bce_dice(logits, labels, ignore_index: int = IGNORE_INDEX, eps: float = 1.0):
    """Binary tasks: BCE - ln(Dice) with the soft Dice 2|X∩Y| / (|X|+|Y|) of the foreground.

    logits has one channel (the foreground logit) or two (background, foreground: the foreground logit is
    their difference, the same as the softmax's foreground probability).
    """
    if logits.shape[1] not in (1, 2):
        raise ValueError(f"bce_dice needs logits with 1 or 2 channels, got {logits.shape[1]}")
    logit = _wide(logits[:, -1]) - (_wide(logits[:, 0]) if logits.shape[1] == 2 else 0)
    valid = labels != ignore_index
    if ((labels[valid] != 0) & (labels[valid] != 1)).any():
        raise ValueError("bce_dice needs labels 0 (background), 1 (foreground) or ignore_index")
    target = (labels == 1).float()
    bce = F.binary_cross_entropy_with_logits(logit[valid], target[valid]) if valid.any() else logit.sum() * 0
    probability = torch.sigmoid(logit) * valid
    dice = (2 * (probability * target).sum() + eps) / (probability.sum() + (target * valid).sum() + eps)
    return bce - torch.log(dice)


def focal(logits, labels, ignore_index: int = IGNORE_INDEX, alpha: float = 1.0, gamma: float = 2.0):
    """Focal loss -alpha (1 - p_t)^gamma ln p_t, averaged over the labelled pixels."""
    log_p = F.log_softmax(_wide(logits), dim=1)
    valid = labels != ignore_index
    log_pt = log_p.gather(1, labels.masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)[valid]
    if log_pt.numel() == 0:
        return log_p.sum() * 0
    return (-alpha * (1 - log_pt.exp()) ** gamma * log_pt).mean()


def generalized_dice(logits, labels, ignore_index: int = IGNORE_INDEX, eps: float = 1e-6):
    """1 - 2 sum_c w_c sum_i p_ic t_ic / sum_c w_c sum_i (p_ic + t_ic), w_c = 1 / (sum_i t_ic)^2.

    A class absent from the batch's labels gets weight 0 (its 1/0^2 would swamp every other class)."""
    valid, target = _valid_one_hot(logits, labels, ignore_index)
    probability = F.softmax(_wide(logits), dim=1) * valid
    dims = (0, 2, 3)
    volume = target.sum(dims)
    weight = torch.where(volume > 0, 1 / volume.clamp(min=1) ** 2, torch.zeros_like(volume))
    intersection = (weight * (probability * target).sum(dims)).sum()
    total = (weight * (probability + target).sum(dims)).sum()
    return 1 - 2 * intersection / (total + eps)


def focal_generalized_dice(logits, labels, ignore_index: int = IGNORE_INDEX):
    return focal(logits, labels, ignore_index) + generalized_dice(logits, labels, ignore_index)


LOSSES = {"cross_entropy": cross_entropy, "bce_dice": bce_dice, "focal_dice": focal_generalized_dice}


def resize_labels(labels: torch.Tensor, size) -> torch.Tensor:
    """Labels [N, H, W] at size by nearest neighbour: a label is never blended into another class."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


def cascade_label_guidance(outputs, labels, weights=(0.4, 0.4, 1.0), loss=cross_entropy,
                           ignore_index: int = IGNORE_INDEX, pixel_share=None):
    """ICNet's training loss: sum_k weights[k] * loss(outputs[k], labels resized to outputs[k]).

    outputs: the model's training-mode logits at 1/16, 1/8 and 1/4. pixel_share(labels), when given,
    multiplies each branch's loss (distributed training: this process's share of the labelled pixels).
    Returns (total, [per-branch losses]).
    """
    if len(outputs) != len(weights):
        raise ValueError(f"weights must give one weight per output: {len(weights)} weights, {len(outputs)} outputs")
    parts = []
    for out in outputs:
        target = resize_labels(labels, out.shape[-2:])
        part = loss(out, target, ignore_index)
        parts.append(part if pixel_share is None else part * pixel_share(target).to(part.dtype))
    return sum(w * part for w, part in zip(weights, parts)), parts


# Losses that average over labelled pixels; distributed training rescales them to the global batch's mean.
PIXEL_MEAN_LOSSES = ("cross_entropy",)
