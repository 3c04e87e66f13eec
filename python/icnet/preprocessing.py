"""How a model expects its input image: channel order, per-channel means subtracted, division by a std.

Checkpoints record it (checkpoint.py), so that segment, evaluate and the Python API feed each model what it
was trained on. The authors' released ICNet takes BGR with the ImageNet means subtracted and no std
division; this project trains the same way, so that is also the default of checkpoints that predate the
record.
"""

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from icnet.images import RGB_MEAN

CHANNEL_ORDERS = ("RGB", "BGR")


@dataclass(frozen=True)
class Preprocessing:
    """channel_order of the model's input; mean and std per channel, given in RGB order, on 0-255 values."""

    channel_order: str = "BGR"
    mean: tuple[float, float, float] = RGB_MEAN
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self):
        if self.channel_order not in CHANNEL_ORDERS:
            raise ValueError(f"channel_order must be one of {CHANNEL_ORDERS}, got {self.channel_order!r}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != 3 or not all(isinstance(v, (int, float)) for v in values):
                raise ValueError(f"{name} must be three numbers, got {values!r}")
            object.__setattr__(self, name, tuple(float(v) for v in values))
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")

    def to_dict(self) -> dict:
        return {"channel_order": self.channel_order, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, record: dict) -> "Preprocessing":
        if not isinstance(record, dict) or set(record) - {"channel_order", "mean", "std"}:
            raise ValueError(f"a preprocessing record holds channel_order, mean and std, got {record!r}")
        return cls(**record)

    def tensor(self, rgb: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] RGB values 0-255 (any dtype, any device) -> the model's float32 input there."""
        mean = torch.tensor(self.mean, device=rgb.device).reshape(1, 3, 1, 1)
        std = torch.tensor(self.std, device=rgb.device).reshape(1, 3, 1, 1)
        x = (rgb.float() - mean) / std
        return x.flip(1) if self.channel_order == "BGR" else x

    def __call__(self, rgb: np.ndarray) -> torch.Tensor:
        """[H, W, 3] uint8 RGB -> [3, H, W] float32 model input."""
        return self.tensor(torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None])[0].contiguous()


RELEASED_PREPROCESSING = Preprocessing()
DEFAULT_PREPROCESSING = RELEASED_PREPROCESSING


class Preprocessed(Dataset):
    """A segmentation dataset's images (its sample(index): RGB uint8, trainIds) with another preprocessing."""

    def __init__(self, dataset, preprocessing: Preprocessing):
        self.dataset, self.preprocessing = dataset, preprocessing
        self.class_names = dataset.class_names

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        return (self[index] for index in range(len(self)))

    def __getitem__(self, index: int):
        rgb, labels = self.dataset.sample(index)
        return self.preprocessing(rgb), torch.from_numpy(labels.astype(np.int64))
