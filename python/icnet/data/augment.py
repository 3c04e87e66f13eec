"""Joint augmentation of an image and its labels, as in the paper's training: random scale, random crop,
horizontal flip. Images resize bilinearly; labels always by nearest neighbour, so no class is invented at
a boundary; padding of a crop larger than the scaled image is the ignore label."""

import numpy as np
import torch
import torch.nn.functional as F

from icnet.cityscapes import IGNORE_INDEX


def resize_pair(image: torch.Tensor, labels: torch.Tensor, size: tuple[int, int]):
    """image [3, H, W] float, labels [H, W] integer -> both at size (bilinear / nearest)."""
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    labels = F.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0].to(labels.dtype)
    return image, labels


def random_scale_crop_flip(image: torch.Tensor, labels: torch.Tensor, crop: tuple[int, int],
                           scale_range: tuple[float, float], rng: np.random.Generator,
                           ignore_index: int = IGNORE_INDEX):
    """One training sample: scale by a factor drawn from scale_range, crop (padding with the image's zero
    and the ignore label where the scaled image is smaller), flip with probability 1/2."""
    height, width = labels.shape
    factor = rng.uniform(*scale_range)
    size = (max(1, round(height * factor)), max(1, round(width * factor)))
    image, labels = resize_pair(image, labels, size)
    pad_h, pad_w = max(0, crop[0] - size[0]), max(0, crop[1] - size[1])
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
        labels = F.pad(labels, (0, pad_w, 0, pad_h), value=ignore_index)
    top = rng.integers(0, labels.shape[0] - crop[0] + 1)
    left = rng.integers(0, labels.shape[1] - crop[1] + 1)
    image = image[:, top:top + crop[0], left:left + crop[1]]
    labels = labels[top:top + crop[0], left:left + crop[1]]
    if rng.random() < 0.5:
        image, labels = image.flip(-1), labels.flip(-1)
    return image.contiguous(), labels.contiguous()
