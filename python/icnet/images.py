"""Image I/O and the released model's preprocessing (RGB means subtracted, BGR order, no std)."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

RGB_MEAN = (123.68, 116.779, 103.939)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
INDEX_MODES = ("L", "P", "1", *SIXTEEN_BIT_MODES)  # single-channel: each pixel's value is its label


class ImageError(ValueError):
    """A file that cannot be read as an image, or holds pixels this project cannot take correctly."""


def find_images(paths) -> list[Path]:
    """Image files among paths, folders searched recursively, in a stable order; a folder without any is
    an error, as are paths that do not exist."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                raise FileNotFoundError(f"no images in folder {path} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
            found += inside
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"no such image or folder: {path}")
    return found


def _open(path) -> Image.Image:
    """The decoded image at path; any failure (not an image, truncated, damaged) is an ImageError."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except FileNotFoundError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{path} is not an image file that can be read") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ImageError(f"{path} is a damaged or truncated image ({reason})") from None


def read_rgb(path) -> np.ndarray:
    """HxWx3 uint8 RGB. 16-bit images are scaled to 8 bits (value / 257, rounded): the model takes 8-bit
    colour, and clipping would turn most of a 16-bit image white."""
    image = _open(path)
    if image.mode in SIXTEEN_BIT_MODES or (image.mode == "I" and image.format == "PNG"):
        grey = np.asarray(image, dtype=np.float64)  # PNG holds at most 16 bits, whatever mode it opens in
        eight = np.clip(np.round(grey / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(eight[..., None], 3, axis=2)
    if image.mode in ("I", "F"):
        raise ImageError(f"{path} holds {'floating-point' if image.mode == 'F' else '32-bit integer'} pixels; "
                         "convert it to an 8- or 16-bit image")
    return np.asarray(image.convert("RGB"))


def read_label_image(path, class_indices: bool) -> np.ndarray:
    """A mask as an HxW integer array. class_indices: each pixel's value is its class (single-channel
    images only: grey, palette or 16-bit; a palette image's values are its indices, not their colours);
    otherwise any non-zero value is the foreground (1) and the rest background (0)."""
    image = _open(path)
    if image.mode in INDEX_MODES or (image.mode == "I" and image.format == "PNG"):
        values = np.asarray(image).astype(np.int64)
    elif class_indices:
        raise ImageError(f"{path} is a {image.mode} image; class-index masks must be single-channel "
                         "(greyscale, palette or 16-bit)")
    else:
        values = np.asarray(image.convert("L")).astype(np.int64)
    return (values > 0).astype(np.int64) if not class_indices else values


def preprocess(rgb: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 RGB -> 3xHxW float32 as the released model expects: mean-subtracted, BGR."""
    x = torch.from_numpy(rgb.astype(np.float32)) - torch.tensor(RGB_MEAN)
    return x.flip(-1).permute(2, 0, 1).contiguous()


def write_label_map(path, labels: np.ndarray) -> None:
    Image.fromarray(labels.astype(np.uint8), mode="L").save(path)
