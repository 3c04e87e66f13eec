"""icnet segment: run ICNet on images and write class maps (trainIds) and colour overlays."""

import sys
import time
from itertools import groupby
from pathlib import Path

import torch
from tqdm import tqdm

from PIL import Image

from icnet import cityscapes
from icnet.api import Segmenter, best_device
from icnet.checkpoint import load_checkpoint, preprocessing_of
from icnet.images import ImageError, find_images, read_rgb, write_label_map
from icnet.model import ICNet
from icnet.preprocessing import DEFAULT_PREPROCESSING
from icnet.visualize import colorize, overlay

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_device(name) -> torch.device:
    """The device name ("cpu", "cuda", "cuda:1") denotes, if this machine has it."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {name!r} is not a device name (expected cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {name!r} is not available: this machine has no CUDA GPU that torch can use")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r} is not available: this machine has {count} CUDA GPU(s), "
                             f"cuda:0 to cuda:{count - 1}")
    elif device.type != "cpu":
        raise ValueError(f"device {name!r} is not supported (expected cpu, cuda or cuda:N)")
    return device


def build_segmenter(weights, mode: str, device, dtype, channels_last: bool, batch_size: int = 1) -> Segmenter:
    """The checkpoint's model with its class names and preprocessing, or an untrained model without one."""
    if weights is None:
        print("icnet: no --weights given: the model is untrained and its output is meaningless "
              "(useful only to check the pipeline and measure speed)", file=sys.stderr)
        model, class_names, preprocessing = ICNet(mode=mode), cityscapes.CLASS_NAMES, DEFAULT_PREPROCESSING
    else:
        model, payload = load_checkpoint(weights, mode=mode)
        class_names = payload["class_names"] or cityscapes.CLASS_NAMES
        preprocessing = preprocessing_of(payload, weights)
    return Segmenter(model, class_names, preprocessing, device, dtype, channels_last, batch_size)


def _check_inputs(files) -> None:
    """No two files write the same outputs (named by the file's stem), and every one decodes."""
    by_stem = {}
    for path in files:
        if path.stem in by_stem:
            raise ValueError(f"{by_stem[path.stem]} and {path} would both write {path.stem}_trainIds.png: "
                             "segment them into separate output folders")
        by_stem[path.stem] = path
    errors = []
    for path in files:
        try:
            read_rgb(path)
        except ImageError as error:
            errors.append(str(error))
    if len(files) == 1 and errors:
        raise ImageError(errors[0])
    if errors:
        shown = "; ".join(errors[:3]) + ("; ..." if len(errors) > 3 else "")
        raise ImageError(f"{len(errors)} of {len(files)} images cannot be read, so none was segmented: {shown}")


def write_pictures(out_dir: Path, stem: str, rgb, labels, segmenter: Segmenter) -> None:
    """<stem>_overlay.png (the colour mask over the image, with a legend of the classes present) and
    <stem>_color.png (the colour mask alone)."""
    pictures = {"overlay": overlay(rgb, labels, segmenter.palette, segmenter.class_names),
                "color": colorize(labels, segmenter.palette)}
    for kind, picture in pictures.items():
        Image.fromarray(picture).save(out_dir / f"{stem}_{kind}.png")


def _batches(images, batch_size):
    """Consecutive images of one size, at most batch_size at a time."""
    for _, same_size in groupby(images, key=lambda item: item[1].shape):
        same_size = list(same_size)
        for i in range(0, len(same_size), batch_size):
            yield same_size[i:i + batch_size]


def segment(paths, out_dir, weights=None, mode="sub124", device=None, dtype="float32", batch_size=1,
            channels_last=False) -> list[tuple[Path, float]]:
    """Segments every image under paths; returns (image, milliseconds of model time per image).

    Every input is read before anything is written: unreadable images, or two inputs that would write the
    same output files, stop the run with an error that names them, and nothing is written."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = parse_device(device) if device else best_device()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} is a file, not a folder")
    files = find_images(paths)
    _check_inputs(files)
    segmenter = build_segmenter(weights, mode, device, DTYPES[dtype], channels_last, batch_size)
    model = segmenter.model
    out_dir.mkdir(parents=True, exist_ok=True)
    latencies = []
    with tqdm(total=len(files), desc="segment", unit="image", file=sys.stderr) as progress:
        for batch in _batches(((path, read_rgb(path)) for path in files), batch_size):
            x = torch.stack([segmenter.preprocessing(rgb) for _, rgb in batch]).to(device=device, dtype=DTYPES[dtype])
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            with torch.inference_mode():
                labels = model(x).argmax(1)
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
