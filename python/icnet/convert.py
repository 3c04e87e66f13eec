"""Converting the authors' released Caffe ICNet (icnet_cityscapes*.caffemodel) into a checkpoint of this project.

The model follows the released network layer for layer, so every released convolution, BN layer and the
classifier maps to one module of ICNet (docs/CAFFE.md has the table). Both released variants convert:
"bnnomerge" (convolutions without bias, each followed by a `<conv>/bn` layer with the blobs slope, bias,
mean, variance) and "merged" (BatchNorm folded into the convolutions, which carry a bias).
"""

from dataclasses import dataclass, field

import numpy as np
import torch

from icnet import cityscapes
from icnet.caffe import CaffeLayer, CaffeModelError, read_caffemodel
from icnet.checkpoint import save_checkpoint
from icnet.model import STAGES, ICNet
from icnet.preprocessing import RELEASED_PREPROCESSING

# ICNet's bottleneck stages as the release numbers them: module name -> (stage, number of its first block)
CAFFE_STAGES = {"conv2": (2, 1), "conv3_1": (3, 1), "conv3_rest": (3, 2), "conv4": (4, 1), "conv5": (5, 1)}
BOTTLENECK_PARTS = {"reduce": "1x1_reduce", "conv3x3": "3x3", "increase": "1x1_increase", "proj": "1x1_proj"}
# the Scale layer on the input image, and the convolutions that read the image (directly or through an Interp)
INPUT_SCALE = "data_sub1"
IMAGE_CONVS = ("conv1_1_3x3_s2", "conv1_sub1")
BN_SUFFIX = "/bn"
CAFFE_BN_EPS = 1e-5  # PSPNet-Caffe's BNParameter default; the released prototxts set none


@dataclass(frozen=True)
class ConvMapping:
    """A released convolution and the parameters it becomes."""

    caffe: str
    weight: str            # state_dict key of the convolution's weight
    bn: str | None = None  # state_dict prefix of the BatchNorm after it; None: a classifier with its own bias
    bias: str | None = None


def released_convolutions(model: ICNet) -> list[ConvMapping]:
    """Every convolution of the released network, in its order, with the module of model it maps to."""
    def conv_bn(caffe, prefix):
        return ConvMapping(caffe, f"{prefix}.conv.weight", f"{prefix}.bn")

    def cff(caffe, prefix, branch):
        return ConvMapping(caffe, f"{prefix}.conv_{branch}.weight", f"{prefix}.bn_{branch}")

    table = [conv_bn(name, f"conv1.{i}") for i, name in enumerate(("conv1_1_3x3_s2", "conv1_2_3x3", "conv1_3_3x3"))]
    for stage, *_ in STAGES:
        number, first = CAFFE_STAGES[stage]
        for i, block in enumerate(getattr(model, stage)):
            for part, suffix in BOTTLENECK_PARTS.items():
                if getattr(block, part) is not None:
                    table.append(conv_bn(f"conv{number}_{first + i}_{suffix}", f"{stage}.{i}.{part}"))
    table.append(conv_bn("conv5_4_k1", "conv5_4"))
    table += [cff("conv_sub4", "cff_sub24", "low"), cff("conv3_1_sub2_proj", "cff_sub24", "high")]
    table += [conv_bn(f"conv{i + 1}_sub1", f"sub1.{i}") for i in range(3)]
    table += [cff("conv_sub2", "cff_sub12", "low"), cff("conv3_sub1_proj", "cff_sub12", "high")]
    table.append(ConvMapping("conv6_cls", "cls_sub124.weight", bias="cls_sub124.bias"))
    return table


@dataclass
class ConversionReport:
    """What a conversion read and wrote."""

    variant: str                                      # "bnnomerge" or "merged"
    mapped: list[tuple[str, list[str]]] = field(default_factory=list)  # caffe layer -> state_dict keys
    input_scale: list[float] | None = None            # the data_sub1 factors folded into the image convs
    untrained: list[str] = field(default_factory=list)  # parameters the caffemodel holds nothing for
    ignored: list[str] = field(default_factory=list)  # layers with blobs that were left out (allow_extra)

    def summary(self, verbose: bool = False) -> str:
        convs = sum(1 for name, _ in self.mapped if not name.endswith(BN_SUFFIX) and name != INPUT_SCALE)
        bns = sum(1 for name, _ in self.mapped if name.endswith(BN_SUFFIX))
        lines = [f"variant {self.variant}: {convs} convolutions and {bns} BN layers mapped"]
        if self.input_scale is not None:
            factors = ", ".join(f"{v:g}" for v in self.input_scale)
            lines.append(f"{INPUT_SCALE} scale ({factors}) folded into {' and '.join(IMAGE_CONVS)}")
        if verbose:
            lines += [f"  {name} -> {', '.join(keys)}" for name, keys in self.mapped]
        if self.untrained:
            modules = sorted({key.rsplit(".", 1)[0] for key in self.untrained})
            lines.append(f"not in the caffemodel, left untrained: {', '.join(modules)} "
                         "(the training-time classifiers of modes sub4 and sub24)")
        if self.ignored:
            lines.append(f"ignored layers: {', '.join(self.ignored)}")
        return "\n".join(lines)


def convert_caffemodel(path, allow_extra: bool = False) -> tuple[ICNet, ConversionReport]:
    """The released ICNet in path as an ICNet of this project (eval mode), and the report.

    Raises CaffeModelError for a file that is not a caffemodel, a missing layer, a layer with blobs the
    released network does not have (unless allow_extra), or a blob of the wrong shape or number."""
    layers = _layers_by_name(read_caffemodel(path))
    classifier = layers.get("conv6_cls")
    if classifier is None or not classifier.blobs or classifier.blobs[0].ndim != 4:
        raise CaffeModelError(f"{path} has no classifier layer conv6_cls with a 4-D weight: not the released ICNet")
    model = ICNet(num_classes=classifier.blobs[0].shape[0], width=0.5, mode="sub124").eval()
    expected = model.state_dict()
    table = released_convolutions(model)
    variant = "bnnomerge" if any(name.endswith(BN_SUFFIX) for name in layers) else "merged"
    report = ConversionReport(variant)

    missing = [m.caffe for m in table if m.caffe not in layers]
    if variant == "bnnomerge":
        missing += [m.caffe + BN_SUFFIX for m in table if m.bn is not None and m.caffe + BN_SUFFIX not in layers]
    if missing:
        raise CaffeModelError(f"{path} lacks {len(missing)} layer(s) of the released ICNet ({variant}): "
                              f"{', '.join(missing[:8])}")
    known = {m.caffe for m in table} | {m.caffe + BN_SUFFIX for m in table} | {INPUT_SCALE}
    extra = [name for name, layer in layers.items() if layer.blobs and name not in known]
    if extra and not allow_extra:
        raise CaffeModelError(f"{path} has {len(extra)} layer(s) with weights that the released ICNet does not "
                              f"have: {', '.join(extra[:8])}")
    report.ignored = extra

    values = {}
    for mapping in table:
        values.update(_convolution(layers, mapping, model, expected, variant, report))
    report.input_scale = _fold_input_scale(layers.get(INPUT_SCALE), values, table)
    report.untrained = [key for key in expected if key not in values and not key.endswith("num_batches_tracked")]
    model.load_state_dict({**expected, **{key: torch.from_numpy(value) for key, value in values.items()}})
    return model, report


def convert(path, out, allow_extra: bool = False) -> ConversionReport:
    """Converts the caffemodel at path and saves it as a checkpoint at out (with the release's preprocessing)."""
    model, report = convert_caffemodel(path, allow_extra)
    names = cityscapes.CLASS_NAMES if model.num_classes == len(cityscapes.CLASS_NAMES) else None
    save_checkpoint(out, model, class_names=names, preprocessing=RELEASED_PREPROCESSING)
    return report


def _layers_by_name(layers: list[CaffeLayer]) -> dict[str, CaffeLayer]:
    by_name = {}
    for layer in layers:
        if layer.name in by_name and (layer.blobs or by_name[layer.name].blobs):
            raise CaffeModelError(f"two layers with weights are named {layer.name!r}")
        if layer.name not in by_name or layer.blobs:
            by_name[layer.name] = layer
    return by_name


def _convolution(layers, mapping: ConvMapping, model: ICNet, expected, variant: str,
                 report: ConversionReport) -> dict:
    layer = layers[mapping.caffe]
    if layer.type not in ("Convolution", ""):
        raise CaffeModelError(f"layer {layer.name!r} is a {layer.type} layer, expected a Convolution")
    has_own_bias = mapping.bn is None or variant == "merged"
    if len(layer.blobs) not in (1, 2) or (has_own_bias and len(layer.blobs) != 2):
        wanted = "2 (weight, bias)" if has_own_bias else "1 (weight) or 2 (weight, bias)"
        raise CaffeModelError(f"layer {layer.name!r} has {len(layer.blobs)} blob(s), expected {wanted}")
    weight = _shaped(layer, 0, tuple(expected[mapping.weight].shape))
    channels = weight.shape[0]
    bias = _vector(layer, 1, channels) if len(layer.blobs) == 2 else np.zeros(channels, np.float32)
    values = {mapping.weight: weight}
    if mapping.bn is None:
        values[mapping.bias] = bias
        report.mapped.append((layer.name, [mapping.weight, mapping.bias]))
        return values
    bn = {name: f"{mapping.bn}.{name}" for name in ("weight", "bias", "running_mean", "running_var")}
    eps = model.get_submodule(mapping.bn).eps
    if variant == "merged":  # the bias alone, through a BatchNorm that is the identity
        values |= {bn["weight"]: np.ones(channels, np.float32), bn["bias"]: bias,
                   bn["running_mean"]: np.zeros(channels, np.float32),
                   bn["running_var"]: np.full(channels, 1 - eps, np.float32)}
        report.mapped.append((layer.name, [mapping.weight, *bn.values()]))
        return values
    norm = layers[mapping.caffe + BN_SUFFIX]
    if norm.type not in ("BN", "") or len(norm.blobs) != 4:
        raise CaffeModelError(f"layer {norm.name!r} is a {norm.type or 'typeless'} layer with {len(norm.blobs)} "
                              "blob(s), expected a BN layer with 4 (slope, bias, mean, variance)")
    slope, shift, mean, variance = (_vector(norm, i, channels) for i in range(4))
    if (variance < 0).any():
        raise CaffeModelError(f"layer {norm.name!r} has a negative variance")
    # a bias on the convolution before a BN layer moves the mean it subtracts; the variance carries the
    # difference of the two eps, so that variance + eps is Caffe's
    values |= {bn["weight"]: slope, bn["bias"]: shift, bn["running_mean"]: mean - bias,
               bn["running_var"]: variance + np.float32(CAFFE_BN_EPS - eps)}
    report.mapped.append((layer.name, [mapping.weight]))
    report.mapped.append((norm.name, list(bn.values())))
    return values


def _fold_input_scale(layer: CaffeLayer | None, values: dict, table: list[ConvMapping]) -> list[float] | None:
    """data_sub1 multiplies each image channel by a factor; the convolutions that read the image (zero padded,
    the Interp between being linear) give the same result with the factor in their weights."""
    if layer is None or not layer.blobs:
        return None
    if len(layer.blobs) != 1:
        raise CaffeModelError(f"layer {layer.name!r} has {len(layer.blobs)} blobs; a Scale layer with a bias on "
                              "the image cannot be folded into the zero-padded convolutions")
    factors = _vector(layer, 0, 3)
    for mapping in table:
        if mapping.caffe in IMAGE_CONVS:
            values[mapping.weight] = values[mapping.weight] * factors.reshape(1, 3, 1, 1)
    return factors.tolist()


def _shaped(layer: CaffeLayer, index: int, shape: tuple[int, ...]) -> np.ndarray:
    blob = layer.blobs[index]
    if blob.shape != shape:
        raise CaffeModelError(f"blob {index} of layer {layer.name!r} has shape {blob.shape}, expected {shape}")
    return blob.astype(np.float32)


def _vector(layer: CaffeLayer, index: int, channels: int) -> np.ndarray:
    """A per-channel blob, stored (1, C, 1, 1), (C,) or in the legacy (1, 1, 1, C)."""
    blob = layer.blobs[index]
    if blob.size != channels or sorted(blob.shape)[:-1] != [1] * (blob.ndim - 1):
        raise CaffeModelError(f"blob {index} of layer {layer.name!r} has shape {blob.shape}, expected "
                              f"{channels} values (shape (1, {channels}, 1, 1))")
    return blob.reshape(channels).astype(np.float32)
