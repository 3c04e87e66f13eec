"""Pictures of class maps: the colour mask alone (colorize) and the mask blended over the image with a
legend of the classes present (overlay)."""

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from icnet import cityscapes

UNLABELLED = (0, 0, 0)  # the colour of labels the palette has no entry for (e.g. 255, ignore)


def colorize(labels: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
    """[H, W] class indices -> [H, W, 3] uint8 colours; palette [classes, 3] (default: Cityscapes')."""
    palette = _palette(palette)
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 2-D integer array, got shape {labels.shape} of {labels.dtype}")
    table = np.concatenate([palette, np.array([UNLABELLED], np.uint8)])
    index = np.where((labels >= 0) & (labels < len(palette)), labels, len(palette))
    return table[index]


def overlay(image: np.ndarray, labels: np.ndarray, palette: np.ndarray | None = None,
            class_names=None, alpha: float = 0.5, legend: bool = True) -> np.ndarray:
    """The colour mask blended over image ([H, W, 3] uint8 RGB) with weight alpha, and, where class_names are
    known (default: Cityscapes' when the palette is), a legend of the classes present in its top-left corner."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be an [H, W, 3] uint8 RGB array, got shape {image.shape} of {image.dtype}")
    if np.shape(labels) != image.shape[:2]:
        raise ValueError(f"labels must have the image's size {image.shape[:2]}, got {np.shape(labels)}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    colours = colorize(labels, palette)
    blended = ((1 - alpha) * image.astype(np.float32) + alpha * colours.astype(np.float32)).round().astype(np.uint8)
    if class_names is None and palette is None:
        class_names = cityscapes.CLASS_NAMES
    if not legend or class_names is None:
        return blended
    return draw_legend(blended, labels, _palette(palette), class_names)


def draw_legend(picture: np.ndarray, labels: np.ndarray, palette: np.ndarray, class_names) -> np.ndarray:
    """picture with a box listing the classes present in labels (most pixels first): a swatch and the name."""
    if len(class_names) != len(palette):
        raise ValueError(f"class_names has {len(class_names)} names for a palette of {len(palette)} colours")
    labels = np.asarray(labels)
    counts = np.bincount(labels[(labels >= 0) & (labels < len(palette))].astype(np.int64), minlength=len(palette))
    present = [c for c in np.argsort(-counts, kind="stable") if counts[c] > 0]
    if not present:
        return picture
    height = picture.shape[0]
    size = int(np.clip(height // 40, 10, 24))
    font = ImageFont.load_default(size=size)
    canvas = Image.fromarray(picture)
    draw = ImageDraw.Draw(canvas, "RGBA")
    row, pad = size + 4, 4
    width = max(draw.textlength(str(class_names[c]), font=font) for c in present) + size + 3 * pad
    draw.rectangle((0, 0, width, pad * 2 + row * len(present)), fill=(0, 0, 0, 160))
    for i, c in enumerate(present):
        top = pad + i * row
        draw.rectangle((pad, top + 2, pad + size, top + 2 + size), fill=tuple(int(v) for v in palette[c]))
        draw.text((2 * pad + size, top), str(class_names[c]), fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


def palette_for(num_classes: int) -> np.ndarray:
    """Cityscapes' colours for its 19 classes; for other class counts, the PASCAL VOC colour map (each class
    index's bits spread over the high bits of red, green and blue), which keeps neighbouring classes apart."""
    if num_classes == len(cityscapes.PALETTE):
        return cityscapes.PALETTE
    palette = np.zeros((num_classes, 3), np.uint8)
    for index in range(num_classes):
        value, shift = index, 7
        while value and shift >= 0:
            for channel in range(3):
                palette[index, channel] |= ((value >> channel) & 1) << shift
            value, shift = value >> 3, shift - 1
    return palette


def _palette(palette) -> np.ndarray:
    if palette is None:
        return cityscapes.PALETTE
    palette = np.asarray(palette)
    if palette.ndim != 2 or palette.shape[1] != 3:
        raise ValueError(f"palette must be [classes, 3] RGB colours, got shape {palette.shape}")
    return palette.astype(np.uint8)
