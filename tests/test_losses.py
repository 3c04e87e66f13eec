"""Segmentation losses against their formulas, and cascade label guidance."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from icnet.losses import (LOSSES, bce_dice, cascade_label_guidance, cross_entropy, focal, generalized_dice,
                          resize_labels)

IGNORE = 255


def random_case(seed, classes=4, shape=(2, 5, 7), ignore_fraction=0.2):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape[0], classes, *shape[1:], generator=generator, dtype=torch.float64)
    labels = torch.randint(0, classes, shape, generator=generator)
    labels[torch.rand(shape, generator=generator) < ignore_fraction] = IGNORE
    return logits, labels


@given(st.integers(0, 10_000))
def test_focal_with_gamma_zero_is_cross_entropy_and_down_weights_easy_pixels(seed):
    logits, labels = random_case(seed)
    assert torch.allclose(focal(logits, labels, gamma=0.0), cross_entropy(logits, labels), atol=1e-9)
    valid = labels != IGNORE
    p = F.softmax(logits, 1).gather(1, labels.clamp(max=3).unsqueeze(1)).squeeze(1)[valid]
    expected = (-(1 - p) ** 2 * p.log()).mean()
    assert torch.allclose(focal(logits, labels), expected, atol=1e-9)


@given(st.integers(0, 10_000), st.sampled_from([1, 2]))
def test_bce_dice_matches_its_formula(seed, channels):
    logits, labels = random_case(seed, classes=2)
    logits = logits[:, :channels]
    foreground = logits[:, -1] - (logits[:, 0] if channels == 2 else 0)
    valid = labels != IGNORE
    target = (labels == 1).double()
    bce = -(target * F.logsigmoid(foreground) + (1 - target) * F.logsigmoid(-foreground))[valid].mean()
    p = torch.sigmoid(foreground)[valid]
    dice = (2 * (p * target[valid]).sum() + 1) / (p.sum() + target[valid].sum() + 1)
    assert torch.allclose(bce_dice(logits, labels), bce - dice.log(), atol=1e-9)


def test_generalized_dice_matches_its_formula_and_is_zero_for_a_perfect_prediction():
    logits, labels = random_case(3, classes=3)
    labels[labels == 2] = 0  # class 2 absent: weight 0
    valid = (labels != IGNORE)
    p = F.softmax(logits, 1)
    numerator = denominator = 0
    for c in range(2):
        t = ((labels == c) & valid).double()
        w = 1 / t.sum() ** 2
        numerator += w * (p[:, c] * t * valid).sum()
        denominator += w * ((p[:, c] * valid).sum() + t.sum())
    assert torch.allclose(generalized_dice(logits, labels), 1 - 2 * numerator / denominator, atol=1e-9)
    perfect = F.one_hot(labels.clamp(max=2), 3).permute(0, 3, 1, 2).double() * 100
    assert generalized_dice(perfect, labels).item() < 1e-4


def test_losses_ignore_ignored_pixels_and_reject_bad_labels():
    logits, labels = random_case(5, classes=2)
    for name, loss in LOSSES.items():
        base = loss(logits, labels)
        moved = logits.clone()
        moved.permute(0, 2, 3, 1)[labels == IGNORE] = torch.randn(2, dtype=torch.float64) * 10
        assert torch.allclose(loss(moved, labels), base, atol=1e-5), name
    with pytest.raises(ValueError, match="labels"):
        bce_dice(logits, torch.full_like(labels, 3))
    with pytest.raises(ValueError, match="labels"):
        generalized_dice(logits, torch.full_like(labels, 7))
    with pytest.raises(ValueError, match="1 or 2 channels"):
        bce_dice(torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))


def test_cascade_label_guidance_weights_each_branch_at_its_resolution():
    labels = torch.randint(0, 3, (2, 33, 65))
    outputs = [torch.randn(2, 3, 9, 17), torch.randn(2, 3, 17, 33), torch.randn(2, 3, 33, 65)]
    total, parts = cascade_label_guidance(outputs, labels, (0.16, 0.4, 1.0))
    expected = [F.cross_entropy(out, F.interpolate(labels[:, None].float(), size=out.shape[-2:],
                                                   mode="nearest")[:, 0].long(), ignore_index=IGNORE)
                for out in outputs]
    assert all(torch.allclose(a, b) for a, b in zip(parts, expected))
    assert torch.allclose(total, 0.16 * expected[0] + 0.4 * expected[1] + expected[2])
    with pytest.raises(ValueError, match="weights"):
        cascade_label_guidance(outputs, labels, (1.0, 1.0))


def test_labels_resize_by_nearest_never_invent_a_class():
    labels = torch.tensor([[[0, 0, 5, 5], [0, 0, 5, 5], [IGNORE, IGNORE, 7, 7]]])
    small = resize_labels(labels, (2, 2))
    assert set(small.unique().tolist()) <= {0, 5, 7, IGNORE} and small.dtype == torch.long
