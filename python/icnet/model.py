"""ICNet, as released by its authors (icnet_cityscapes.prototxt), in two builds sharing one state_dict:
"reference" (plain PyTorch layers) and "fused" (icnet_kernels' pyramid pooling and cascade feature
fusion ops, BatchNorm folded into the convolutions in inference)."""

import math
import numbers

import torch
from torch import nn

import icnet_kernels
from icnet_kernels.cff_geometry import memory_format_of
from icnet_kernels.ops.segmentation_head import MAX_LABEL_CLASSES, MAX_ZOOM
from icnet_kernels.layout import to_memory_format
from icnet_kernels.memory import reused_cpu_memory
from icnet.layers import Bottleneck, ConvBN, ReferenceCascadeFeatureFusion, caffe_resize, shrink2

MODES = ("sub4", "sub24", "sub124")
PPM_BINS = (1, 2, 3, 6)
# The released model's pyramid pooling for its 33x65 map (1025x2049 input); other sizes pool adaptively.
RELEASED_PPM_MAP = (33, 65)
RELEASED_PPM_KERNELS = ((33, 65), (17, 33), (13, 25), (8, 15))
RELEASED_PPM_STRIDES = ((33, 65), (16, 32), (10, 20), (5, 10))


# Channel groups: every set of tensors that must keep one channel numbering (a conv's output, its BN, the
# convs that read it, and every branch summed into the same residual stream). The model is built from one
# width per group, so filter pruning can narrow any group and the checkpoint can say how.
# The bottleneck stages: (name, bottlenecks, the channel group it reads, the residual stream it writes,
# PSPNet50's bottleneck width, stride, dilation).
STAGES = (("conv2", 3, "conv1.2", "conv2", 64, 1, 1), ("conv3_1", 1, "conv2", "conv3", 128, 2, 1),
          ("conv3_rest", 3, "conv3", "conv3", 128, 1, 1), ("conv4", 6, "conv3", "conv4", 256, 1, 2),
          ("conv5", 3, "conv4", "conv5", 512, 1, 4))


def _pspnet50_channels() -> dict[str, int]:
    channels = {"conv1.0": 64, "conv1.1": 64, "conv1.2": 128, "conv2": 256, "conv3": 512, "conv4": 1024,
                "conv5": 2048, "conv5_4": 512, "sub1.0": 64, "sub1.1": 64, "sub1.2": 128, "cff_sub24": 256,
                "cff_sub12": 256}
    for stage, blocks, _, _, mid, _, _ in STAGES:
        for i in range(blocks):
            channels |= {f"{stage}.{i}.reduce": mid, f"{stage}.{i}.conv3x3": mid}
    return channels


PSPNET50_CHANNELS = _pspnet50_channels()


def default_channels(width: float) -> dict[str, int]:
    """PSPNet50's channel counts scaled by width (0.5: the released half-width ICNet)."""
    return {group: max(1, int(round(count * width))) for group, count in PSPNET50_CHANNELS.items()}


def _stage(channels, name, blocks, cin, cout, stride, dilation, fused):
    layers = []
    for i in range(blocks):
        groups = (cin if i == 0 else cout, f"{name}.{i}.reduce", f"{name}.{i}.conv3x3", cout)
        layers.append(Bottleneck(channels, groups, stride if i == 0 else 1, dilation, fused))
    return nn.Sequential(*layers)


class PyramidPooling(nn.Module):
    """Summed pyramid pooling with the released geometry on a 33x65 map, adaptive pooling elsewhere
    (on maps smaller than a bin, that bin shrinks to the map's shorter side)."""

    def __init__(self, fused: bool):
        super().__init__()
        self.backend = None if fused else "reference"

    def forward(self, x):
        bins, kernel_sizes, strides = pyramid_pooling_geometry(*x.shape[-2:])
        return icnet_kernels.pyramid_pool_sum(x, bins, kernel_sizes, strides, align_corners=True, backend=self.backend)


def pyramid_pooling_geometry(height: int, width: int) -> tuple:
    """(bins, kernel_sizes, strides) of the pyramid pooling on a height x width map: the released windows on
    the 33x65 map, adaptive pooling elsewhere (kernel_sizes and strides None), each bin at most the map's
    shorter side."""
    if (height, width) == RELEASED_PPM_MAP:
        return PPM_BINS, RELEASED_PPM_KERNELS, RELEASED_PPM_STRIDES
    return tuple(min(b, height, width) for b in PPM_BINS), None, None


class ICNet(nn.Module):
    """ICNet for semantic segmentation.

    width: channel multiplier relative to PSPNet50 (0.5 is the released "half compressed" model).
    mode: "sub4", "sub24" or "sub124" (the paper's ablation), the branch whose logits eval returns.
    channels: the width of every channel group (see PSPNET50_CHANNELS), overriding width; pruned models.
    fused: run icnet_kernels' fused ops and fold BatchNorm in inference; False builds plain layers.
    In training mode forward returns the cascade outputs (logits at 1/16, 1/8, 1/4 of the input) for
    cascade label guidance; in eval mode the chosen mode's logits resized to the input size.
    """

    def __init__(self, num_classes: int = 19, width: float = 0.5, mode: str = "sub124", fused: bool = True,
                 channels: dict[str, int] | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if isinstance(width, bool) or not isinstance(width, numbers.Real) or not 0 < width < math.inf:
            raise ValueError(f"width must be a positive number, got {width!r}")
        num_classes = int(num_classes)
        self.num_classes, self.width, self.mode, self.fused = num_classes, width, mode, fused
        self.channels = _checked_channels(channels) if channels is not None else default_channels(width)
        ch, f = self.channels, fused
        sizes = {**ch, "image": 3}  # the image's channels are a group no pruning narrows

        def conv_bn(cin, cout, kernel, stride=1):
            return ConvBN(sizes[cin], sizes[cout], kernel, stride, fused=f, channel_groups=(cin, cout))

        # shared trunk on the half-resolution image, up to conv3_1 (1/16)
        self.conv1 = nn.Sequential(conv_bn("image", "conv1.0", 3, 2), conv_bn("conv1.0", "conv1.1", 3),
                                   conv_bn("conv1.1", "conv1.2", 3))
        self.pool1 = nn.MaxPool2d(3, 2, 1)
        # conv2, conv3_1; then the 1/32 branch on conv3_1's features resized by 1/2: conv3_rest, conv4, conv5
        for name, blocks, cin, cout, _, stride, dilation in STAGES:
            setattr(self, name, _stage(ch, name, blocks, cin, cout, stride, dilation, f))
        self.ppm = PyramidPooling(fused)
        self.conv5_4 = conv_bn("conv5", "conv5_4", 1)
        # full-resolution branch (1/8)
        self.sub1 = nn.Sequential(conv_bn("image", "sub1.0", 3, 2), conv_bn("sub1.0", "sub1.1", 3, 2),
                                  conv_bn("sub1.1", "sub1.2", 3, 2))
        cff = icnet_kernels.CascadeFeatureFusion if fused else ReferenceCascadeFeatureFusion
        self.cff_sub24 = cff(ch["conv5_4"], ch["conv3"], ch["cff_sub24"], 2)
        self.cff_sub12 = cff(ch["cff_sub24"], ch["sub1.2"], ch["cff_sub12"], 2)
        # (low, high, out) channel groups of each fusion unit, for filter pruning
        self.cff_sub24.channel_groups = ("conv5_4", "conv3", "cff_sub24")
        self.cff_sub12.channel_groups = ("cff_sub24", "sub1.2", "cff_sub12")
        self.cls_sub4 = nn.Conv2d(ch["conv5_4"], num_classes, 1)      # on up(conv5_4), 1/16: training, mode sub4
        self.cls_sub24 = nn.Conv2d(ch["cff_sub24"], num_classes, 1)   # on up(sub24), 1/8: training, mode sub24
        self.cls_sub124 = nn.Conv2d(ch["cff_sub12"], num_classes, 1)  # on up(sub12), 1/4
        self.cls_sub4.channel_groups = ("conv5_4", "classes")
        self.cls_sub24.channel_groups = ("cff_sub24", "classes")
        self.cls_sub124.channel_groups = ("cff_sub12", "classes")

    def forward(self, image: torch.Tensor):
        return self._run(image, labels=False)

    def predict_labels(self, image: torch.Tensor) -> torch.Tensor:
        """The class map [N, H, W] of an eval-mode forward: its logits' argmax, uint8 for up to 256 classes
        (else int64). Where the fused build's head kernel runs (C++ on the CPU, Triton on a GPU), its labels
        variant writes the class map alone and the logits are never stored."""
        if self.training:
            raise ValueError("predict_labels needs eval mode: in training the model returns the cascade outputs")
        return self._run(image, labels=True)

    def _run(self, image: torch.Tensor, labels: bool):
        """The network, in a CPU memory reuse scope (icnet_kernels.memory) in the fused build's CPU inference,
        where taking fresh pages for every activation is a large share of a call's time."""
        if (self.fused and not self.training and image.device.type == "cpu" and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling()):
            with reused_cpu_memory():
                return self._forward(image, labels)
        return self._forward(image, labels)

    def _forward(self, image: torch.Tensor, labels: bool):
        stem, layout = self._stem_layout(image), self._body_layout(image)
        x = self.conv2(self.pool1(self.conv1(to_memory_format(self._shrink2(image), stem))))
        conv3_1 = to_memory_format(self.conv3_1(x), layout)
        x = self.conv3_rest(self._shrink2(conv3_1))
        x = self.conv5_4(self.ppm(self.conv5(self.conv4(x))))
        if self.mode == "sub4" and not self.training:
            return self._logits(self.cls_sub4, x, _zoom2(x), image, labels)
        sub24, up_sub4 = self._fuse(self.cff_sub24, x, conv3_1)
        if self.mode == "sub24" and not self.training:
            return self._logits(self.cls_sub24, sub24, self._eighth(image), image, labels)
        sub1 = to_memory_format(self.sub1(to_memory_format(image, stem)), layout)
        sub12, up_sub24 = self._fuse(self.cff_sub12, sub24, sub1)
        if not self.training:
            return self._logits(self.cls_sub124, sub12, _zoom2(sub12), image, labels)
        return self.cls_sub4(up_sub4), self.cls_sub24(up_sub24), self.cls_sub124(caffe_resize(sub12, zoom=2))

    def _shrink2(self, x: torch.Tensor) -> torch.Tensor:
        """Caffe's shrink by 2; in the fused build's inference the strided read of every other pixel where it
        is exact (both sides odd, as at 1025x2049), instead of a bilinear resize."""
        if self.fused and not self.training:
            return shrink2(x)
        return caffe_resize(x, shrink=2)

    def _stem_layout(self, image: torch.Tensor) -> torch.memory_format:
        """The layout of the convolutions over the largest maps (the trunk up to conv3_1, and sub1).

        In inference on the CPU the fused build runs them channels_last whatever the image's layout: oneDNN
        convolves these few-channel, many-pixel maps faster in it than in NCHW (which it reorders into blocks
        and back, a pass over each large map), and max pooling much faster (the README has the figures).
        Their outputs return to the image's layout after conv3_1, where returning measured best, so the rest
        of the network and the result keep it."""
        if self.fused and not self.training and image.device.type == "cpu":
            return torch.channels_last
        return memory_format_of(image)

    def _body_layout(self, image: torch.Tensor) -> torch.memory_format:
        """The layout of everything after the stem, up to the classifier's output.

        The image's own, but channels_last in bfloat16 CPU inference of the fused build: oneDNN fuses a
        bfloat16 convolution's residual sum only channels_last, and in NCHW its bfloat16 convolutions pass
        through layout copies (the README has the measurement). The logits return to the image's layout
        before the final resize, at a sixteenth of the image's pixels."""
        if self.fused and not self.training and image.device.type == "cpu" and image.dtype == torch.bfloat16:
            return torch.channels_last
        return memory_format_of(image)

    def _fuse(self, cff, low, high):
        """A CFF unit's output and, in training only, up(low) for the label-guidance classifier: inference
        does not compute or store the upsampled map."""
        if self.training:
            return cff(low, high, return_upsampled=True)
        return cff(low, high), None

    def _logits(self, classifier, features, size, image, labels: bool):
        """classifier(resize(features, size)) resized to the image (with labels, its argmax).

        The fused build classifies first when size is the exact 2x zoom: a 1x1 conv commutes with bilinear
        resizing (its weights sum to one), and the exact zoom followed by a resize to the image equals one
        resize to the image (both are piecewise-linear interpolation through the same samples, align_corners),
        so the result is the same with the classifier run on a quarter of the pixels and one resize less.
        Where both resizes together are one exact integer zoom of the features (exact_head_zoom: the natural
        1025x2049 input, 8x from the 1/8 map in sub124), inference runs classifier and zoom as one pass,
        icnet_kernels.segmentation_head (C++ on the CPU, Triton on a GPU), which writes the full-resolution
        logits once.
        """
        layout = memory_format_of(image)
        # the sizes are read only where the head can run: in a trace with symbolic sizes they would specialise
        if (self.fused and classifier.bias is not None and not torch.is_grad_enabled()
                and (zoom := exact_head_zoom(features.shape[-2:], size, image.shape[-2:])) is not None):
            head = icnet_kernels.segmentation_head_labels if labels else icnet_kernels.segmentation_head
            if not labels or self.num_classes <= MAX_LABEL_CLASSES:
                return head(to_memory_format(features, layout), classifier.weight, classifier.bias, zoom)
        if self.fused and tuple(size) == _zoom2(features):
            logits = caffe_resize(classifier(features).contiguous(memory_format=layout), size=image.shape[-2:])
        else:
            logits = classifier(caffe_resize(features, size=size)).contiguous(memory_format=layout)
            logits = caffe_resize(logits, size=image.shape[-2:])
        if not labels:
            return logits
        label_map = logits.argmax(1)
        return label_map.to(torch.uint8) if self.num_classes <= MAX_LABEL_CLASSES else label_map

    @staticmethod
    def _eighth(image):
        """Size of the 1/8 maps: three stride-2 3x3 convs with padding 1 on the full image."""
        h, w = image.shape[-2:]
        for _ in range(3):
            h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        return h, w


def _checked_channels(channels: dict[str, int]) -> dict[str, int]:
    missing, unknown = PSPNET50_CHANNELS.keys() - channels.keys(), channels.keys() - PSPNET50_CHANNELS.keys()
    if missing or unknown:
        raise ValueError(f"channels must give every channel group of ICNet: missing {sorted(missing)[:5]}, "
                         f"unknown {sorted(unknown)[:5]}")
    bad = {group: count for group, count in channels.items() if not (isinstance(count, int) and count >= 1)}
    if bad:
        raise ValueError(f"channels must be positive integers, got {bad}")
    return dict(channels)


def exact_head_zoom(features_size, intermediate_size, image_size) -> int | None:
    """The integer zoom z with image = (features - 1) * z + 1 on both sides when resizing the features to
    intermediate_size and then to image_size equals that one zoom (intermediate - 1 a positive multiple
    of features - 1 on both sides, so that it keeps every input sample), else None."""
    zooms = set()
    for f, s, i in zip(features_size, intermediate_size, image_size):
        if f < 2 or s < f or (s - 1) % (f - 1) or (i - 1) % (f - 1):
            return None
        zooms.add((i - 1) // (f - 1))
    zoom = zooms.pop() if len(zooms) == 1 else None
    return zoom if zoom is not None and 1 <= zoom <= MAX_ZOOM else None


def _zoom2(x) -> tuple[int, int]:
    """Size of Caffe's exact 2x zoom of x: 2H-1 x 2W-1."""
    h, w = x.shape[-2:]
    return 2 * h - 1, 2 * w - 1


def icnet_cityscapes(fused: bool = True, mode: str = "sub124") -> ICNet:
    """The released configuration: 19 Cityscapes classes, half width."""
    return ICNet(num_classes=19, width=0.5, mode=mode, fused=fused)
