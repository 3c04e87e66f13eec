"""icnet segment: run ICNet on images and write class maps (trainIds) and colour overlays."""

import sys
import time
from itertools import groupby
from pathlib import Path

import torch
from tqdm import tqdm

from PIL import Image

from icnet.api import Segmenter, best_device, load, parse_device
from icnet.images import ImageError, find_images, read_rgb, write_label_map
from icnet.plan_tuning import read_choices
from icnet.visualize import colorize, overlay

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The decoded images (RGB, 3 bytes a pixel) that checking the inputs keeps for segmenting them: about 170
# Cityscapes frames. Images past it are decoded again when their turn comes.
KEPT_DECODED_BYTES = 1 << 30


def build_segmenter(weights, mode: str, device, dtype, channels_last: bool, batch_size: int = 1,
                    plan: bool | None = None, plan_choices=None) -> Segmenter:
    """icnet.load's segmenter of the checkpoint, or of an untrained model without one (and a warning)."""
    segmenter = load(weights, device, mode, dtype, batch_size, channels_last, plan, plan_choices)
    if weights is None:
        print("icnet: no --weights given: the model is untrained and its output is meaningless "
              "(useful only to check the pipeline and measure speed)", file=sys.stderr)
    return segmenter


def _check_inputs(files, kept_bytes: int) -> list:
    """No two files write the same outputs (named by the file's stem), and every one decodes; returns each
    file's decoded image where the images so far fit in kept_bytes, else None (to be decoded again)."""
    by_stem = {}
    for path in files:
        if path.stem in by_stem:
            raise ValueError(f"{by_stem[path.stem]} and {path} would both write {path.stem}_trainIds.png: "
                             "segment them into separate output folders")
        by_stem[path.stem] = path
    errors, decoded, total = [], [], 0
    for path in files:
        try:
            rgb = read_rgb(path)
        except ImageError as error:
            errors.append(str(error))
            continue
        total += rgb.nbytes
        decoded.append(rgb if total <= kept_bytes else None)
    if len(files) == 1 and errors:
        raise ImageError(errors[0])
    if errors:
        shown = "; ".join(errors[:3]) + ("; ..." if len(errors) > 3 else "")
        raise ImageError(f"{len(errors)} of {len(files)} images cannot be read, so none was segmented: {shown}")
    return decoded


def write_pictures(out_dir: Path, stem: str, rgb, labels, segmenter: Segmenter) -> None:
    """<stem>_overlay.png (the colour mask over the image, with a legend of the classes present) and
    <stem>_color.png (the colour mask alone)."""
    pictures = {"overlay": overlay(rgb, labels, segmenter.palette, segmenter.class_names),
                "color": colorize(labels, segmenter.palette)}
    for kind, picture in pictures.items():
        Image.fromarray(picture).save(out_dir / f"{stem}_{kind}.png")


def _images(files, decoded: list):
    """(path, RGB image) of each file in turn: the decoded image kept for it (which decoded then lets go
    of), or the file decoded again."""
    for index, path in enumerate(files):
        rgb, decoded[index] = decoded[index], None
        yield path, read_rgb(path) if rgb is None else rgb


def _batches(images, batch_size):
    """Consecutive images of one size, at most batch_size at a time."""
    for _, same_size in groupby(images, key=lambda item: item[1].shape):
        same_size = list(same_size)
        for i in range(0, len(same_size), batch_size):
            yield same_size[i:i + batch_size]


def segment(paths, out_dir, weights=None, mode="sub124", device=None, dtype="float32", batch_size=1,
            channels_last=False, plan: bool | None = None, plan_choices=None) -> list[tuple[Path, float]]:
    """Segments every image under paths; returns (image, milliseconds of model time per image).

    Every input is read before anything is written: unreadable images, or two inputs that would write the
    same output files, stop the run with an error that names them, and nothing is written. The images read
    for that check are kept for segmenting up to KEPT_DECODED_BYTES; later ones are decoded again.

    plan (default: on CUDA devices) runs the labels through inference plans, one per batch shape, built
    when the shape first comes (outside the time reported), so the last, shorter batch of a size gets a plan
    of its own; plan_choices: a results file with tuned choices for them (see icnet.api.Segmenter)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = parse_device(device) if device else best_device()
    plan_choices = read_choices(plan_choices)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} is a file, not a folder")
    files = find_images(paths)
    decoded = _check_inputs(files, KEPT_DECODED_BYTES)
    segmenter = build_segmenter(weights, mode, device, DTYPES[dtype], channels_last, batch_size, plan, plan_choices)
    out_dir.mkdir(parents=True, exist_ok=True)
    latencies = []
    with tqdm(total=len(files), desc="segment", unit="image", file=sys.stderr) as progress:
        for batch in _batches(_images(files, decoded), batch_size):
            x = segmenter.model_input(torch.stack([segmenter.preprocessing(rgb) for _, rgb in batch]))
            segmenter.prepare(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            labels = segmenter.input_labels(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            per_image_ms = (time.perf_counter() - start) * 1e3 / len(batch)
            for (path, rgb), label in zip(batch, labels.to(torch.uint8).cpu().numpy()):
                write_label_map(out_dir / f"{path.stem}_trainIds.png", label)
                write_pictures(out_dir, path.stem, rgb, label, segmenter)
                latencies.append((path, per_image_ms))
                print(f"{path}\t{per_image_ms:.1f} ms")
            progress.update(len(batch))
    return latencies
