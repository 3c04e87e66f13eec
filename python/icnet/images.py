"""Image I/O and the released model's preprocessing (RGB means subtracted, BGR order, no std)."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

RGB_MEAN = (123.68, 116.779, 103.939)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def find_images(paths) -> list[Path]:
    """Image files among paths, folders searched recursively, in a stable order."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"no such image or folder: {path}")
    return found


def read_rgb(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def preprocess(rgb: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 RGB -> 3xHxW float32 as the released model expects: mean-subtracted, BGR."""
    x = torch.from_numpy(rgb.astype(np.float32)) - torch.tensor(RGB_MEAN)
    return x.flip(-1).permute(2, 0, 1).contiguous()


def write_label_map(path, labels: np.ndarray) -> None:
    Image.fromarray(labels.astype(np.uint8), mode="L").save(path)


def write_overlay(path, rgb: np.ndarray, labels: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> None:
    colours = palette[np.clip(labels, 0, len(palette) - 1)]
    blended = (1 - alpha) * rgb.astype(np.float32) + alpha * colours.astype(np.float32)
    Image.fromarray(blended.round().astype(np.uint8)).save(path)
