"""Synthetic street scenes and joint augmentation."""

import numpy as np
import pytest
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


def _write_png(path, array):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_cityscapes_layout_maps_label_ids_to_train_ids(tmp_path):
    from cityscapesscripts.helpers.labels import labels as official

    from icnet.data.datasets import Cityscapes

    rng = np.random.default_rng(0)
    label_ids = rng.choice([l.id for l in official if l.id >= 0], size=(8, 16)).astype(np.uint8)
    rgb = rng.integers(0, 256, (8, 16, 3), dtype=np.uint8)
    _write_png(tmp_path / "leftImg8bit/val/aachen/aachen_000000_000019_leftImg8bit.png", rgb)
    _write_png(tmp_path / "gtFine/val/aachen/aachen_000000_000019_gtFine_labelIds.png", label_ids)
    dataset = Cityscapes(tmp_path, "val")
    image, labels = dataset[0]
    by_id = {l.id: l.trainId for l in official if l.id >= 0}
    expected = np.vectorize(lambda i: by_id[i] if 0 <= by_id[i] < 255 else IGNORE_INDEX)(label_ids)
    assert len(dataset) == 1 and image.shape == (3, 8, 16) and labels.dtype == torch.int64
    assert np.array_equal(labels.numpy(), expected)
    with pytest.raises(FileNotFoundError, match="leftImg8bit"):
        Cityscapes(tmp_path, "train")


def test_folder_dataset_pairs_images_with_masks_and_binarises(tmp_path):
    from icnet.data.datasets import Folder, make_dataset

    rng = np.random.default_rng(1)
    for name in ("car_01", "car_02"):
        _write_png(tmp_path / "train/images" / f"{name}.png", rng.integers(0, 256, (6, 10, 3), dtype=np.uint8))
        _write_png(tmp_path / "train/masks" / f"{name}_mask.png", (rng.random((6, 10)) < 0.5).astype(np.uint8) * 255)
    dataset = make_dataset("folder", "train", tmp_path)
    assert isinstance(dataset, Folder) and dataset.num_classes == 2 and len(dataset) == 2
    image, labels = dataset[1]
    assert image.shape == (3, 6, 10) and set(labels.unique().tolist()) <= {0, 1}
    _write_png(tmp_path / "train/images/orphan.png", np.zeros((6, 10, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match="no mask"):
        make_dataset("folder", "train", tmp_path)
    with pytest.raises(ValueError, match="root"):
        make_dataset("folder", "train", None)


def test_synthetic_splits_are_disjoint_and_augmentation_depends_only_on_seed_epoch_index():
    from icnet.data.datasets import Augmented, SyntheticStreets

    train, val = SyntheticStreets("train", 3, (64, 128)), SyntheticStreets("val", 3, (64, 128))
    assert not any(torch.equal(train[i][1], val[j][1]) for i in range(3) for j in range(3))
    samples = Augmented(train, (33, 65), (0.5, 1.5), seed=7)
    first = samples[2]
    samples[0], samples[1]  # other draws in between must not change sample 2
    assert all(torch.equal(a, b) for a, b in zip(first, samples[2]))
    samples.set_epoch(1)
    assert not torch.equal(first[0], samples[2][0])
    with pytest.raises(IndexError):
        train.sample(3)
