"""Datasets of (image, labels) pairs: the Cityscapes layout, a folder of images and masks, and synthetic
street scenes. Every dataset yields the released preprocessing (python/icnet/images.py) as float32
[3, H, W] and trainIds as int64 [H, W] with 255 = ignore; Augmented wraps one for training."""

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from icnet.cityscapes import CLASS_NAMES, IGNORE_INDEX, label_id_to_train_id
from icnet.data.augment import random_scale_crop_flip
from icnet.data.synthetic import street_scene
from icnet.images import IMAGE_SUFFIXES, ImageError, preprocess, read_label_image, read_rgb


class SegmentationDataset(Dataset):
    """Base: subclasses give len, class_names and sample(index) -> (RGB uint8 [H,W,3], trainIds [H,W])."""

    class_names: tuple[str, ...]

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rgb, labels = self.sample(index)
        return preprocess(rgb), torch.from_numpy(labels.astype(np.int64))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def numbered_class_names(count: int) -> tuple[str, ...]:
    """Names for count classes known only by their index."""
    return tuple(f"class {i}" for i in range(count))


def _pair(image_path, mask_path, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The image at image_path with its labels, which must be of the image's size: a mask of another size
    would be scored against a resized prediction, or trained on misaligned."""
    rgb = read_rgb(image_path)
    if rgb.shape[:2] != labels.shape:
        raise ImageError(f"mask {mask_path} is {labels.shape[0]}x{labels.shape[1]} but its image {image_path} is "
                         f"{rgb.shape[0]}x{rgb.shape[1]}: masks must be of their image's size")
    return rgb, labels


class Cityscapes(SegmentationDataset):
    """root/leftImg8bit/<split>/<city>/*_leftImg8bit.png with root/gtFine/<split>/<city>/*_gtFine_labelIds.png;
    labelIds map to the 19 trainIds by the official label table, every other id to ignore."""

    class_names = CLASS_NAMES

    def __init__(self, root, split: str = "train"):
        root = Path(root)
        images_dir = root / "leftImg8bit" / split
        if not images_dir.is_dir():
            raise FileNotFoundError(f"no Cityscapes images at {images_dir} (expected leftImg8bit/{split}/<city>/)")
        self.images = sorted(images_dir.glob("*/*_leftImg8bit.png"))
        if not self.images:
            raise FileNotFoundError(f"no *_leftImg8bit.png files under {images_dir}")
        self.labels = [root / "gtFine" / split / path.parent.name /
                       path.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png") for path in self.images]
        missing = [str(path) for path in self.labels if not path.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} Cityscapes label files are missing, e.g. {missing[0]}")
        self.to_train_id = label_id_to_train_id()

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, index):
        label_ids = read_label_image(self.labels[index], class_indices=True)
        if label_ids.max(initial=0) >= len(self.to_train_id) or label_ids.min(initial=0) < 0:
            raise ImageError(f"{self.labels[index]} holds label id {int(label_ids.max())}: Cityscapes labelIds "
                             f"are below {len(self.to_train_id)}")
        return _pair(self.images[index], self.labels[index], self.to_train_id[label_ids])


class Folder(SegmentationDataset):
    """root/images/<name>.<ext> with root/masks/<name>.<ext> or <name>_mask.<ext> (e.g. Carvana).

    binary=True: any non-zero mask value is the foreground (classes background, foreground); otherwise mask
    values are class indices (single-channel masks: greyscale, palette or 16-bit) and values >=
    len(class_names) other than 255 are an error. A mask must be of its image's size.
    """

    def __init__(self, root, binary: bool = True, class_names: tuple[str, ...] | None = None):
        root = Path(root)
        images_dir, masks_dir = root / "images", root / "masks"
        for folder in (images_dir, masks_dir):
            if not folder.is_dir():
                raise FileNotFoundError(f"no folder {folder} (expected {root}/images and {root}/masks)")
        masks = {}
        for path in masks_dir.iterdir():
            if path.suffix.lower() in IMAGE_SUFFIXES | {".gif"}:
                masks[path.stem.removesuffix("_mask")] = path
        self.images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        unmatched = [p.name for p in self.images if p.stem not in masks]
        if unmatched:
            raise FileNotFoundError(f"{len(unmatched)} images in {images_dir} have no mask, e.g. {unmatched[0]}")
        if not self.images:
            raise FileNotFoundError(f"no images in {images_dir}")
        self.masks = [masks[p.stem] for p in self.images]
        self.binary = binary
        self.class_names = class_names or (("background", "foreground") if binary else None)
        if self.class_names is None:
            raise ValueError("class_names is required for a folder dataset that is not binary")

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, index):
        labels = read_label_image(self.masks[index], class_indices=not self.binary)
        if not self.binary:
            bad = (labels >= len(self.class_names)) & (labels != IGNORE_INDEX)
            if bad.any():
                raise ImageError(f"mask {self.masks[index]} holds class {int(labels[bad][0])}, "
                                 f"but there are {len(self.class_names)} classes")
        return _pair(self.images[index], self.masks[index], labels)


class SyntheticStreets(SegmentationDataset):
    """count procedural street scenes (icnet.data.synthetic) with Cityscapes trainIds. Splits draw from
    disjoint seeds, so validation scenes are never trained on."""

    class_names = CLASS_NAMES
    SPLIT_SEEDS = {"train": 0, "val": 1_000_000, "test": 2_000_000}

    def __init__(self, split: str = "train", count: int = 400, size: tuple[int, int] = (256, 512)):
        if split not in self.SPLIT_SEEDS:
            raise ValueError(f"split must be one of {tuple(self.SPLIT_SEEDS)}, got {split!r}")
        if count < 1:
            raise ValueError(f"count must be positive, got {count}")
        self.first_seed, self.count, self.size = self.SPLIT_SEEDS[split], count, tuple(size)

    def __len__(self) -> int:
        return self.count

    def sample(self, index):
        if not 0 <= index < self.count:
            raise IndexError(f"index {index} out of range for {self.count} scenes")
        return street_scene(self.first_seed + index, *self.size)


class Augmented(Dataset):
    """Training samples from dataset: random scale, crop and flip (icnet.data.augment). The randomness of
    sample i in epoch e comes from the seed (seed, e, i) alone, so it does not depend on the number of
    loader workers or processes: distributed and single-process training see the same samples."""

    def __init__(self, dataset: SegmentationDataset, crop: tuple[int, int], scale_range=(0.5, 2.0), seed: int = 0):
        self.dataset, self.crop, self.scale_range, self.seed = dataset, tuple(crop), tuple(scale_range), seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, labels = self.dataset[index]
        rng = np.random.default_rng((self.seed, self.epoch, index))
        return random_scale_crop_flip(image, labels, self.crop, self.scale_range, rng)


def make_dataset(kind: str, split: str, root=None, binary: bool = True, synthetic_count: int | None = None,
                 synthetic_size: tuple[int, int] = (256, 512), num_classes: int | None = None) -> SegmentationDataset:
    """The dataset named on the command line: "synthetic", "cityscapes" (root: the Cityscapes folder) or
    "folder" (root/<split>/images and root/<split>/masks). num_classes, the model's: a folder of class-index
    masks (binary=False) needs it, and every other dataset must have that many classes."""
    dataset = _dataset(kind, split, root, binary, synthetic_count, synthetic_size, num_classes)
    if num_classes is not None and dataset.num_classes != num_classes:
        raise ValueError(f"the {kind} dataset has {dataset.num_classes} classes, the model {num_classes}")
    return dataset


def _dataset(kind, split, root, binary, synthetic_count, synthetic_size, num_classes) -> SegmentationDataset:
    if kind == "synthetic":
        count = synthetic_count if synthetic_count is not None else (400 if split == "train" else 100)
        return SyntheticStreets(split, count, synthetic_size)
    if root is None:
        raise ValueError(f"dataset {kind!r} needs a root folder (--root)")
    if kind == "cityscapes":
        return Cityscapes(root, split)
    if kind == "folder":
        if binary:
            return Folder(Path(root) / split, binary=True)
        if num_classes is None:
            raise ValueError("a folder dataset of class-index masks (--multiclass-masks) needs the number of "
                             "classes (--num-classes)")
        return Folder(Path(root) / split, binary=False, class_names=numbered_class_names(num_classes))
    raise ValueError(f"dataset must be 'synthetic', 'cityscapes' or 'folder', got {kind!r}")
