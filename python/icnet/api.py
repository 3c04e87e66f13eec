"""The Python API: a checkpoint as a segmenter, in one line.

    import icnet
    labels = icnet.load("icnet.pt").predict("street.png")    # [H, W] uint8 trainIds
"""

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from icnet.checkpoint import load_checkpoint, preprocessing_of
from icnet.cityscapes import default_class_names
from icnet.images import read_rgb
from icnet.model import ICNet
from icnet.plan import LabelPlans
from icnet.preprocessing import DEFAULT_PREPROCESSING, Preprocessing
from icnet.visualize import colorize, overlay, palette_for


class Segmenter:
    """An ICNet in inference, with the preprocessing and class names of its checkpoint.

    predict takes images as a path, a PIL image, an [H, W, 3] numpy array, a [3, H, W] tensor, a list of
    these, an [N, H, W, 3] array or an [N, 3, H, W] tensor: RGB values 0-255 (uint8, or floats on that
    scale), channels last in arrays and first in tensors as torchvision has them.

    plan: whether the labels come from inference plans (icnet.plan.LabelPlans: one fixed-shape plan per
    batch shape, built when that shape first comes, uint8 labels without logits) instead of the model
    itself; None: on CUDA devices (see uses_plan). On the CPU a plan runs eagerly, its arithmetic tested
    against the model's. plan_choices: the per-layer backends for the plans, as InferencePlan's choices
    takes them (e.g. the end-to-end benchmark's results file).
    """

    def __init__(self, model: ICNet, class_names, preprocessing: Preprocessing, device: torch.device,
                 dtype: torch.dtype, channels_last: bool, batch_size: int = 4, plan: bool | None = None,
                 plan_choices=None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.device, self.dtype, self.channels_last, self.batch_size = device, dtype, channels_last, batch_size
        self.model = model.eval().to(device=device, dtype=dtype)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.class_names = tuple(class_names)
        self.preprocessing = preprocessing
        self.palette = palette_for(len(self.class_names))
        if plan_choices is not None and not (plan or plan is None and uses_plan(device, model.num_classes)):
            why = "plan=False" if plan is False else "plans run by default on CUDA devices only"
            raise ValueError(f"plan_choices: the choices are for inference plans, which this segmenter on {device} "
                             f"does not run ({why})")
        if plan is None:
            plan = uses_plan(device, model.num_classes)
        if plan and model.num_classes > 256:
            raise ValueError(f"plan: a plan's labels are uint8, for up to 256 classes; this model has "
                             f"{model.num_classes}")
        self.plans = LabelPlans(self.model, plan_choices) if plan else None

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
        return self.input_labels(self.preprocessing.tensor(rgb.to(self.device, non_blocking=True)))

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """A preprocessed batch [N, 3, H, W] on the model's device, in its dtype and layout."""
        x = x.to(device=self.device, dtype=self.dtype, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def prepare(self, x: torch.Tensor) -> None:
        """Builds the plan for a preprocessed batch like x where plans are used, so that the first batch of
        a shape is not timed with its plan's build."""
        if self.plans is not None:
            self.plans.plan_for(self.model_input(x))

    def input_labels(self, x: torch.Tensor) -> torch.Tensor:
        """A preprocessed batch [N, 3, H, W] -> [N, H, W] class indices on the model's device (uint8 for up
        to 256 classes), through the plans or the model."""
        x = self.model_input(x)
        if self.plans is not None:
            return self.plans(x)
        with torch.inference_mode():
            labels = model_labels(self.model, x)
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


def uses_plan(device: torch.device, num_classes: int) -> bool:
    """Whether a segmenter on device runs inference plans by default: on CUDA devices, where a plan replays
    one CUDA graph, for models whose labels fit the plan's uint8."""
    return device.type == "cuda" and num_classes <= 256


def model_labels(model: ICNet, x: torch.Tensor) -> torch.Tensor:
    """The model's class map of a preprocessed batch: [N, H, W] argmax of its logits (ICNet.predict_labels:
    where the fused head runs, it writes the class map without storing the logits)."""
    return model.predict_labels(x)


def load(checkpoint, device=None, mode: str | None = None, dtype: torch.dtype | None = None,
         batch_size: int = 4, channels_last: bool | None = None, plan: bool | None = None,
         plan_choices=None) -> Segmenter:
    """The checkpoint's ICNet (fused build) as a Segmenter, on device (default: a GPU if there is one), in
    dtype and layout (default: the fastest for the device). mode overrides the checkpoint's sub4 / sub24 /
    sub124. checkpoint None: an untrained ICNet (random weights, Cityscapes' 19 classes, the default
    preprocessing), whose output means nothing but which exercises a pipeline. plan and plan_choices: see
    Segmenter."""
    device = best_device() if device is None else parse_device(device)
    if checkpoint is None:
        model, names, preprocessing = ICNet(mode=mode or "sub124"), None, DEFAULT_PREPROCESSING
    else:
        model, payload = load_checkpoint(checkpoint, mode=mode)
        names, preprocessing = payload["class_names"], preprocessing_of(payload, checkpoint)
    fastest_dtype, fastest_layout = best_settings(device)
    return Segmenter(model, names or default_class_names(model.num_classes), preprocessing, device,
                     dtype or fastest_dtype, fastest_layout if channels_last is None else channels_last,
                     batch_size, plan, plan_choices)


def best_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_device(name) -> torch.device:
    """The device name ("cpu", "cuda", "cuda:1", or a torch.device) denotes, if this machine has it;
    ValueError naming it otherwise."""
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
