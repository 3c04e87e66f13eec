"""The Python API: a checkpoint as a segmenter, in one line.

    import icnet
    labels = icnet.load("icnet.pt").predict("street.png")    # [H, W] uint8 trainIds
"""

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from icnet import cityscapes
from icnet.checkpoint import load_checkpoint, preprocessing_of
from icnet.images import read_rgb
from icnet.model import ICNet
from icnet.preprocessing import Preprocessing
from icnet.visualize import colorize, overlay, palette_for


class Segmenter:
    """An ICNet in inference, with the preprocessing and class names of its checkpoint.

    predict takes images as a path, a PIL image, an [H, W, 3] numpy array, a [3, H, W] tensor, a list of
    these, an [N, H, W, 3] array or an [N, 3, H, W] tensor: RGB values 0-255 (uint8, or floats on that
    scale), channels last in arrays and first in tensors as torchvision has them.
    """

    def __init__(self, model: ICNet, class_names, preprocessing: Preprocessing, device: torch.device,
                 dtype: torch.dtype, channels_last: bool, batch_size: int = 4):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.device, self.dtype, self.channels_last, self.batch_size = device, dtype, channels_last, batch_size
        self.model = model.eval().to(device=device, dtype=dtype)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.class_names = tuple(class_names)
        self.preprocessing = preprocessing
        self.palette = palette_for(len(self.class_names))

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def predict(self, images):
        """Class maps of images: [H, W] (uint8 for up to 256 classes) for one image, [N, H, W] for an array
        or tensor batch, a list of maps for a list (whose images of one size run in batches together).
        Tensors in, tensors out (on the input's device); numpy arrays otherwise."""
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("images is an empty list")
            return self._predict(list(images))
        return self._predict([images])[0]

    def _predict(self, images: list) -> list:
        inputs = [_rgb_batch(image) for image in images]
        groups = {}
        for index, (batch, _, _) in enumerate(inputs):
            groups.setdefault((tuple(batch.shape[1:]), batch.dtype, batch.device), []).append(index)
        results = [None] * len(images)
        for indices in groups.values():
            batch = torch.cat([inputs[i][0] for i in indices])
            labels = torch.cat([self.labels(batch[i:i + self.batch_size]) for i in range(0, len(batch), self.batch_size)])
            for i, part in zip(indices, labels.split([len(inputs[i][0]) for i in indices])):
                _, single, as_tensor = inputs[i]
                part = part[0] if single else part
                results[i] = part.to(images[i].device) if as_tensor else part.cpu().numpy()
        return results

    def labels(self, rgb: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] RGB 0-255 (any dtype, any device) -> [N, H, W] class indices on the model's device."""
        x = self.preprocessing.tensor(rgb.to(self.device, non_blocking=True)).to(self.dtype)
        x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        with torch.inference_mode():
            labels = self.model(x).argmax(1)
        return labels.to(torch.uint8 if self.num_classes <= 256 else torch.int32)

    def colorize(self, labels) -> np.ndarray:
        """[H, W] class map -> [H, W, 3] uint8 colour mask in this model's palette."""
        return colorize(_numpy(labels), self.palette)

    def overlay(self, image, labels, alpha: float = 0.5, legend: bool = True) -> np.ndarray:
        """The class map blended over the image, with a legend of the classes present."""
        rgb = _rgb_batch(image)[0][0].cpu().permute(1, 2, 0).float().round().clamp(0, 255).to(torch.uint8)
        return overlay(rgb.numpy(), _numpy(labels), self.palette, self.class_names, alpha, legend)


def best_settings(device: torch.device) -> tuple[torch.dtype, bool]:
    """The fastest (dtype, channels_last) of the fused build on device: float16 channels_last on GPUs (their
    tensor cores, cuDNN's fused convolutions), float32 on CPUs (the fused build goes channels_last by itself
    where oneDNN gains)."""
    if device.type == "cuda":
        return torch.float16, True
    return torch.float32, False


def load(checkpoint, device=None, mode: str | None = None, dtype: torch.dtype | None = None,
         batch_size: int = 4) -> Segmenter:
    """The checkpoint's ICNet (fused build) as a Segmenter, on device (default: a GPU if there is one), in
    dtype (default: the fastest for the device). mode overrides the checkpoint's sub4 / sub24 / sub124."""
    try:
        device = torch.device(device) if device is not None else best_device()
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device name (expected cpu, cuda or cuda:N)") from None
    model, payload = load_checkpoint(checkpoint, mode=mode)
    fastest_dtype, channels_last = best_settings(device)
    names = payload["class_names"] or _default_names(model.num_classes)
    return Segmenter(model, names, preprocessing_of(payload, checkpoint), device, dtype or fastest_dtype,
                     channels_last, batch_size)


def best_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _default_names(num_classes: int) -> tuple[str, ...]:
    if num_classes == len(cityscapes.CLASS_NAMES):
        return cityscapes.CLASS_NAMES
    return tuple(f"class {i}" for i in range(num_classes))


def _rgb_batch(image) -> tuple[torch.Tensor, bool, bool]:
    """(images as an [N, 3, H, W] RGB tensor, whether image was a single one, whether it was a tensor)."""
    if isinstance(image, (str, Path)):
        image = read_rgb(image)
    elif isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim not in (3, 4) or image.shape[-1] != 3:
            raise ValueError(f"image arrays must be [H, W, 3] or [N, H, W, 3] RGB, got shape {image.shape}")
        if not (image.flags.writeable and image.flags.c_contiguous):  # e.g. a PIL image's read-only buffer
            image = np.array(image)
        tensor, as_tensor = torch.from_numpy(image).movedim(-1, -3), False
    elif isinstance(image, torch.Tensor):
        if image.dim() not in (3, 4) or image.shape[-3] != 3:
            raise ValueError(f"image tensors must be [3, H, W] or [N, 3, H, W] RGB, got shape {tuple(image.shape)}")
        tensor, as_tensor = image, True
    else:
        raise ValueError(f"image must be a path, a PIL image, a numpy array or a tensor, got {type(image).__name__}")
    if not (tensor.dtype == torch.uint8 or tensor.is_floating_point()):
        raise ValueError(f"image values must be uint8 or floating point (0-255), got {tensor.dtype}")
    if min(tensor.shape[-2:]) < 1 or tensor.numel() == 0:
        raise ValueError(f"image is empty (shape {tuple(tensor.shape)})")
    if tensor.is_floating_point() and tensor.numel() and float(tensor.max()) <= 1.0:
        warnings.warn("image holds floats no larger than 1: predict expects values 0-255, not 0-1", stacklevel=3)
    single = tensor.dim() == 3
    return (tensor[None] if single else tensor), single, as_tensor


def _numpy(labels) -> np.ndarray:
    return labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
