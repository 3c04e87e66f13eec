"""Synthetic street scenes and joint augmentation."""

import numpy as np
import torch

from icnet.cityscapes import IGNORE_INDEX
from icnet.data.augment import random_scale_crop_flip, resize_pair
from icnet.data.synthetic import TRAIN_ID, street_scene


def test_street_scene_is_deterministic_and_labelled_with_train_ids():
    image, labels = street_scene(3, 128, 256)
    again, labels_again = street_scene(3, 128, 256)
    assert image.shape == (128, 256, 3) and image.dtype == np.uint8 and labels.shape == (128, 256)
    assert np.array_equal(image, again) and np.array_equal(labels, labels_again)
    assert labels.max() < 19
    present = set(np.unique(labels).tolist())
    assert {TRAIN_ID["sky"], TRAIN_ID["road"], TRAIN_ID["building"]} <= present
    assert not np.array_equal(street_scene(4, 128, 256)[1], labels)


def test_classes_vary_across_scenes():
    seen = set()
    for seed in range(20):
        seen |= set(np.unique(street_scene(seed, 96, 192)[1]).tolist())
    assert {TRAIN_ID[n] for n in ("road", "sidewalk", "building", "vegetation", "sky", "car", "pole")} <= seen


def test_labels_resize_by_nearest_only():
    labels = torch.from_numpy(street_scene(1, 64, 128)[1]).long()
    image = torch.rand(3, 64, 128)
    _, small = resize_pair(image, labels, (33, 61))
    assert set(torch.unique(small).tolist()) <= set(torch.unique(labels).tolist())


def test_random_scale_crop_flip_keeps_image_and_labels_aligned():
    rng = np.random.default_rng(0)
    labels = torch.arange(40 * 60).reshape(40, 60) % 19
    image = labels[None].repeat(3, 1, 1).float()  # the image carries its labels, so alignment is checkable
    for _ in range(20):
        img, lab = random_scale_crop_flip(image, labels, (32, 48), (1.0, 1.0), rng)
        assert img.shape == (3, 32, 48) and lab.shape == (32, 48)
        assert torch.equal(img[0].long(), lab)
    img, lab = random_scale_crop_flip(image, labels, (64, 96), (0.5, 0.5), rng)
    assert img.shape == (3, 64, 96) and (lab == IGNORE_INDEX).any()
