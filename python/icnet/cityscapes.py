"""Cityscapes' 19 training classes, from the official label definitions (cityscapesscripts)."""

import numpy as np
from cityscapesscripts.helpers.labels import labels as _labels

IGNORE_INDEX = 255
TRAIN_LABELS = sorted((label for label in _labels if 0 <= label.trainId < IGNORE_INDEX), key=lambda l: l.trainId)
CLASS_NAMES = tuple(label.name for label in TRAIN_LABELS)
PALETTE = np.array([label.color for label in TRAIN_LABELS], dtype=np.uint8)


def default_class_names(num_classes: int) -> tuple[str, ...]:
    """The names of a model's classes when its checkpoint records none: Cityscapes' for 19 classes (the
    released model's), "class 0" to "class N-1" for any other count."""
    if num_classes == len(CLASS_NAMES):
        return CLASS_NAMES
    return tuple(f"class {i}" for i in range(num_classes))


def label_id_to_train_id() -> np.ndarray:
    """A 256-entry lookup from Cityscapes labelIds to trainIds (255 = ignore)."""
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label in _labels:
        if label.id >= 0:
            table[label.id] = label.trainId if 0 <= label.trainId < IGNORE_INDEX else IGNORE_INDEX
    return table
