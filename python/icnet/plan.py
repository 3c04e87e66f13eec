"""A fixed-shape inference plan for ICNet: built once from a model and an example input, replayed per frame.

At build time every BatchNorm is folded into its convolution (in float32, then cast to the example's
dtype), every weight is stored in the dtype and memory format its convolution runs in, and the geometry
of the example decides which of ICNet's exact shortcuts apply:

- Caffe's shrink-2 of an odd-sized map with align_corners samples every other pixel exactly (source
  position 2y, weight 0 on the neighbour), so conv3_1's shrink is a strided read instead of a bilinear
  resize, and conv1_1 on the half-resolution image is a convolution of the image itself with twice the
  stride, dilation and padding (stride 4, dilation 2): that image is never made;
- the head, classifier(resize(features, s)) resized to the image, is one exact integer zoom of the
  classified features whenever the intermediate size s keeps every input sample (an align_corners
  resize reproduces the input's piecewise-linear interpolant, so resizing through s changes nothing)
  and the image's size is (h-1)*zoom+1: icnet_kernels.segmentation_head then classifies and zooms in one
  kernel, and the labels variant writes uint8 labels without writing logits.

The network runs on the fused ops (pyramid pooling, cascade feature fusion on pre-folded weights, max
pooling without indices where Triton runs) and the convolutions' fused epilogues (oneDNN post-ops on the
CPU, cuDNN conv + bias + residual + ReLU on a GPU), chosen once per layer at build: a layer whose fused
call raises keeps the plain path. On CUDA the full-resolution branch runs on a second stream, beside the
trunk and the sub4 branch, and the plan captures one CUDA graph (icnet.graphs.CudaGraphRunner) that each
call replays; on the CPU the same plan runs eagerly, which is how its arithmetic is tested without a GPU.
The CUDA path has not yet run on a GPU.

Pyramid pooling and the fusion units run the library's default implementation, one named by backend, or
the fastest measured on the plan's own inputs (icnet.plan_tuning). On a GPU the pyramid pooling by default
folds into conv5_4 (PlanPyramidConv): the 1x1 convolution commutes with the pooling and the expansion, so
the pyramid sum over conv5_4's 1024 input channels is never written.

The plan is a snapshot of the model's weights: after changing them, build a new plan.
"""

import logging
import os
from collections import OrderedDict
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

import icnet_kernels
from icnet.graphs import CudaGraphRunner
from icnet.layers import Bottleneck, ConvBN, caffe_resize, epilogue_fallbacks, fused_epilogue, odd_sides, shrink2
from icnet import plan_tuning
from icnet.model import ICNet, PyramidPooling, _zoom2, exact_head_zoom, pyramid_pooling_geometry
from icnet_kernels.backends import triton_usable
from icnet_kernels.cff_geometry import memory_format_of
from icnet_kernels.nn import folded_batch_norm
from icnet_kernels.ops.cascade_feature_fusion import (cascade_feature_fusion_folded, flat_weight_high, fold_bias,
                                                      fold_scale)
from icnet_kernels.ops.conv2d_epilogue import conv_output_size

log = logging.getLogger(__name__)


def conv_on_the_unshrunk_map(conv) -> SimpleNamespace:
    """The hyper-parameters under which a convolution of x itself equals conv of x[::2, ::2] (x's sides odd):
    twice the stride, dilation and padding. Its taps 2(s*o + d*k - p) are the strided read's pixels, and the
    zero padding on either side covers exactly the taps that fall outside the shrunk map."""
    return SimpleNamespace(stride=tuple(2 * v for v in conv.stride), padding=tuple(2 * v for v in conv.padding),
                           dilation=tuple(2 * v for v in conv.dilation), groups=conv.groups)


class PlanConv(nn.Module):
    """A ConvBN with its BatchNorm folded: conv + bias (+ residual) (+ ReLU)."""

    def __init__(self, module: ConvBN, dtype: torch.dtype, memory_format: torch.memory_format, device,
                 residual: bool = False, linear: bool = False):
        """residual: whether a residual joins this convolution's epilogue (a bottleneck's increase). linear:
        whether it is also called for the convolution alone (forward's linear; conv5_4, for the pyramid fold)."""
        super().__init__()
        weight, shift = module._fold()
        self.register_buffer("weight", weight.to(device=device, dtype=dtype).contiguous(memory_format=memory_format))
        self.register_buffer("bias", shift.to(device=device, dtype=dtype))
        if linear:  # the Triton convolution always adds a bias
            self.register_buffer("zero_bias", torch.zeros_like(self.bias))
        conv = module.conv  # its hyper-parameters only: the plan keeps no reference to the model's tensors
        self.conv = SimpleNamespace(stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                                    groups=conv.groups)
        self.relu = module.relu
        self.epilogue = fused_epilogue(torch.device(device).type, dtype, lambda: memory_format == torch.channels_last,
                                       self.relu, residual)
        self.epilogue_fallback: str | None = None
        # "library": cuDNN or oneDNN (with the fused epilogue where there is one); "triton": conv2d_epilogue
        self.backend = "library"

    @staticmethod
    def backend_candidates(device: torch.device) -> list[str]:
        return ["library", "triton"] if device.type == "cuda" and triton_usable(device) else ["library"]

    def _split_k(self, x: torch.Tensor) -> int:
        """Enough programs per output tile for two per multiprocessor where the map's tiles are fewer."""
        if x.device.type != "cuda":
            return 1
        oh, ow = conv_output_size(*x.shape[2:], self.weight.shape[2], self.conv.stride[0], self.conv.padding[0],
                                  self.conv.dilation[0])
        tiles = x.shape[0] * -(-oh * ow // 64) * -(-self.weight.shape[0] // 64)
        return max(1, min(8, 2 * torch.cuda.get_device_properties(x.device).multi_processor_count // tiles))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, linear: bool = False) -> torch.Tensor:
        """linear: the convolution alone, without its bias and ReLU (a fold adds them in its epilogue)."""
        if self.backend == "triton":
            return icnet_kernels.conv2d_epilogue(x, self.weight, self.zero_bias if linear else self.bias, residual,
                                                 self.conv.stride[0], self.conv.padding[0], self.conv.dilation[0],
                                                 self.relu and not linear, self._split_k(x), backend="triton")
        if linear:
            return F.conv2d(x, self.weight, None, self.conv.stride, self.conv.padding, self.conv.dilation)
        if self.epilogue is not None:
            try:
                return self.epilogue(x, self.weight, self.bias, self.conv, self.relu, residual)
            except RuntimeError as error:  # no fused implementation for this layer: the plain path from now on
                self.epilogue_fallback = f"{self.epilogue.__name__}: {str(error).strip().splitlines()[0]}"
                log.info("icnet plan: a convolution (%s) falls back to the plain path (%s)", self.conv,
                         self.epilogue_fallback)
                self.epilogue = None
        y = F.conv2d(x, self.weight, self.bias, self.conv.stride, self.conv.padding, self.conv.dilation)
        if residual is not None:
            y = y + residual
        return F.relu(y, inplace=True) if self.relu else y


class PlanBottleneck(nn.Module):
    def __init__(self, block: Bottleneck, dtype, memory_format, device):
        super().__init__()
        self.reduce, self.conv3x3 = (PlanConv(m, dtype, memory_format, device) for m in (block.reduce, block.conv3x3))
        self.increase = PlanConv(block.increase, dtype, memory_format, device, residual=True)
        self.proj = None if block.proj is None else PlanConv(block.proj, dtype, memory_format, device)

    def forward(self, x):
        shortcut = x if self.proj is None else self.proj(x)
        return self.increase(self.conv3x3(self.reduce(x)), residual=shortcut)


class PlanCascadeFeatureFusion(nn.Module):
    """A cascade feature fusion unit (fused or reference build: same parameter names) with both
    BatchNorms folded into the fused op's weight_low, weight_high [Co, Ch] and one bias."""

    def __init__(self, unit: nn.Module, dtype, device, backend: str | None):
        super().__init__()
        scale_low, shift_low = folded_batch_norm(unit.bn_low)
        scale_high, shift_high = folded_batch_norm(unit.bn_high)
        weight_low = fold_scale(unit.conv_low.weight, scale_low)
        weight_high = fold_scale(flat_weight_high(unit.conv_high.weight), scale_high)
        bias = fold_bias(weight_low.shape[0], shift_low, shift_high, unit.conv_low.weight)
        for name, t in (("weight_low", weight_low), ("weight_high", weight_high), ("bias", bias)):
            self.register_buffer(name, t.detach().to(device=device, dtype=dtype).contiguous())
        self.dilation, self.backend = unit.conv_low.dilation[0], backend

    def forward(self, low, high):
        return cascade_feature_fusion_folded(low, high, self.weight_low, self.weight_high, self.bias, self.dilation,
                                             True, self.backend)


class PlanPyramidConv(nn.Module):
    """conv5_4(pyramid pooling(x)), ICNet's pyramid pooling and the 1x1 convolution after it.

    backend None, "native", "triton" or "reference" runs the pyramid op on that backend (None: the library's
    default), then the convolution. "fold" (Triton) never writes the pyramid sum: the 1x1 convolution
    commutes with the pooling and the per-channel expansion, so conv5_4 runs on x itself without its bias
    and ReLU (y = W x, on the convolution's own backend), the bins pool y (a few dozen pixels per image), and
    one epilogue kernel writes relu(y + their expansion + bias)
    (icnet_kernels.triton.pyramid_expansion_epilogue)."""

    fold_backends = ("fold",)  # beyond the pyramid op's backends; plan_tuning times it beside them

    def __init__(self, conv: PlanConv, backend: str | None):
        super().__init__()
        self.pooling = PyramidPooling(fused=True)
        self.conv = conv
        self.backend = backend
        self.fold_tables = {}  # per map size, made by the first call (the plan's build runs one)

    @property
    def backend(self) -> str | None:
        return self._backend

    @backend.setter
    def backend(self, backend: str | None) -> None:
        self._backend = backend
        if backend not in self.fold_backends:
            self.pooling.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend not in self.fold_backends:
            return self.conv(self.pooling(x))
        from icnet_kernels.triton.pyramid_expansion_epilogue import (pooled_grids, pyramid_expansion_epilogue_triton,
                                                                     pyramid_fold_tables)
        size = tuple(x.shape[-2:])
        tables = self.fold_tables.get(size)
        if tables is None:
            tables = self.fold_tables[size] = pyramid_fold_tables(*size, *pyramid_pooling_geometry(*size),
                                                                  align_corners=True, device=x.device)
        y = self.conv(x, linear=True)
        return pyramid_expansion_epilogue_triton(y, pooled_grids(y, tables), self.conv.bias, tables, self.conv.relu)


class PlanHead(nn.Module):
    """classifier(resize(features, size)) resized to the image, as logits or uint8 labels: one
    segmentation_head kernel where the geometry is an exact integer zoom, ATen's resizes elsewhere."""

    def __init__(self, classifier: nn.Conv2d, dtype, device, labels: bool):
        super().__init__()
        weight = classifier.weight.detach().flatten(1)
        self.register_buffer("weight", weight.to(device=device, dtype=dtype).contiguous())
        self.register_buffer("bias", classifier.bias.detach().to(device=device, dtype=dtype))
        self.labels = labels

    def forward(self, features, size, image_size):
        zoom = exact_head_zoom(features.shape[-2:], size, image_size)
        if zoom is not None and triton_usable(features.device):
            head = icnet_kernels.segmentation_head_labels if self.labels else icnet_kernels.segmentation_head
            return head(features, self.weight, self.bias, zoom, backend="triton")
        classifier = self.weight[:, :, None, None]
        if zoom is not None:  # no Triton here: classify the small map, then the same single zoom in ATen
            logits = caffe_resize(F.conv2d(features, classifier, self.bias), zoom=zoom)
        else:
            logits = caffe_resize(F.conv2d(caffe_resize(features, size=size), classifier, self.bias), size=image_size)
        return logits.argmax(1).to(torch.uint8) if self.labels else logits


def _stage(stage: nn.Sequential, dtype, memory_format, device) -> nn.Sequential:
    return nn.Sequential(*(PlanBottleneck(block, dtype, memory_format, device) for block in stage))


class PlanNetwork(nn.Module):
    """ICNet's inference forward pass on folded, laid-out weights (what ICNet.forward computes in eval
    mode for its mode), for one input dtype, layout and device."""

    def __init__(self, model: ICNet, example: torch.Tensor, labels: bool, backend: str | None,
                 concurrent: bool):
        super().__init__()
        dtype, device = example.dtype, example.device
        self.mode, self.layout = model.mode, memory_format_of(example)
        # The largest maps (trunk up to conv3_1, sub1) run channels_last on the CPU, as in the fused build.
        self.stem = torch.channels_last if device.type == "cpu" else self.layout

        def convs(seq, memory_format):
            return nn.ModuleList(PlanConv(m, dtype, memory_format, device) for m in seq)

        self.conv1 = convs(model.conv1, self.stem)
        # conv1_1 reads the image itself where the half-resolution image would be a strided read of it
        self.conv1_on_image = odd_sides(example)
        if self.conv1_on_image:
            self.conv1[0].conv = conv_on_the_unshrunk_map(self.conv1[0].conv)
        self.conv2 = _stage(model.conv2, dtype, self.stem, device)
        self.conv3_1 = _stage(model.conv3_1, dtype, self.stem, device)
        self.conv3_rest, self.conv4, self.conv5 = (_stage(s, dtype, self.layout, device)
                                                   for s in (model.conv3_rest, model.conv4, model.conv5))
        # ATen's CUDA max pooling also writes int64 indices for a backward; the Triton op writes values only
        self.pool_kernel = triton_usable(device)
        # conv5_4 first, so that it keeps its own name among the tunable layers; on a GPU the pyramid pooling
        # folds into it by default
        self.conv5_4 = PlanConv(model.conv5_4, dtype, self.layout, device, linear=True)
        self.ppm = PlanPyramidConv(self.conv5_4, "fold" if backend is None and device.type == "cuda" else backend)
        classifier = {"sub4": model.cls_sub4, "sub24": model.cls_sub24, "sub124": model.cls_sub124}[self.mode]
        self.head = PlanHead(classifier, dtype, device, labels)
        if self.mode != "sub4":
            self.cff_sub24 = PlanCascadeFeatureFusion(model.cff_sub24, dtype, device, backend)
        if self.mode == "sub124":
            self.sub1 = convs(model.sub1, self.stem)
            self.cff_sub12 = PlanCascadeFeatureFusion(model.cff_sub12, dtype, device, backend)
        # On a GPU the full-resolution branch runs on a second stream, beside the trunk and the sub4 branch,
        # whose small maps leave most of the GPU idle; a CUDA graph captures both streams.
        self.side_stream = torch.cuda.Stream(device) if concurrent and self.mode == "sub124" else None

    def _sub1(self, image_stem: torch.Tensor) -> torch.Tensor:
        x = image_stem
        for conv in self.sub1:
            x = conv(x)
        return x.contiguous(memory_format=self.layout)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        image_stem = image.contiguous(memory_format=self.stem)
        sub1 = None
        if self.side_stream is not None:
            main = torch.cuda.current_stream(image.device)
            self.side_stream.wait_stream(main)
            with torch.cuda.stream(self.side_stream):
                sub1 = self._sub1(image_stem)
            # each tensor crossing streams is kept from reuse until the stream that did not allocate it is done
            image_stem.record_stream(self.side_stream)
            sub1.record_stream(main)
        x = image_stem if self.conv1_on_image else shrink2(image).contiguous(memory_format=self.stem)
        for conv in self.conv1:
            x = conv(x)
        x = icnet_kernels.max_pool(x, 3, 2, 1, backend="triton") if self.pool_kernel else F.max_pool2d(x, 3, 2, 1)
        x = self.conv2(x)
        conv3_1 = self.conv3_1(x).contiguous(memory_format=self.layout)
        x = self.conv5(self.conv4(self.conv3_rest(shrink2(conv3_1))))
        x = self.ppm(x)  # conv5_4 included
        image_size = tuple(image.shape[-2:])
        if self.mode == "sub4":
            return self.head(x, _zoom2(x), image_size)
        sub24 = self.cff_sub24(x, conv3_1)
        if self.mode == "sub24":
            return self.head(sub24, ICNet._eighth(image), image_size)
        if sub1 is None:
            sub1 = self._sub1(image_stem)
        else:
            torch.cuda.current_stream(image.device).wait_stream(self.side_stream)
        sub12 = self.cff_sub12(sub24, sub1)
        return self.head(sub12, _zoom2(sub12), image_size)


class InferencePlan:
    """ICNet inference for one input shape, dtype, layout and device, built once.

    plan = InferencePlan(model, example, labels=False); out = plan(image)
    returns the logits [N, classes, H, W] in the image's dtype and layout, or with labels=True the argmax
    [N, H, W] as uint8. On CUDA (cuda_graph=True, the default there) the output is the graph's static
    buffer, overwritten by the next call: clone it to keep it. backend chooses the implementation of the
    ops that have both a compiled and a Triton kernel, pyramid pooling and the fusion units (None: the
    library's default, with the pyramid pooling folded into conv5_4 on CUDA; "native", "triton" or
    "reference", the pyramid op unfolded; plan.choices' "ppm" is "fold" where it is folded). concurrent
    (default: on CUDA) runs the full-resolution branch on a second CUDA stream. tune=True times those
    layers with every implementation that runs here and keeps the fastest of each (timings: the medians,
    ms); choices takes such a choice without measuring: {layer: backend} as plan.choices gives it, or the
    end-to-end benchmark's results file (a path, or plan_tuning.TunedChoices), whose tuned row for this
    device, mode, dtype, layout and shape it applies; without such a row the plan is untuned (and says so
    in one log line).
    """

    def __init__(self, model: ICNet, example: torch.Tensor, labels: bool = False, cuda_graph: bool | None = None,
                 backend: str | None = None, concurrent: bool | None = None, tune: bool = False,
                 choices: "dict[str, str] | plan_tuning.TunedChoices | str | os.PathLike | None" = None):
        if not isinstance(model, ICNet):
            raise ValueError(f"model must be an ICNet, got {type(model).__name__}")
        if not isinstance(example, torch.Tensor) or example.dim() != 4 or example.shape[1] != 3:
            raise ValueError(f"example must be an image batch [N, 3, H, W], got "
                             f"{tuple(example.shape) if isinstance(example, torch.Tensor) else type(example).__name__}")
        if not example.is_floating_point():
            raise ValueError(f"example must be floating point, got {example.dtype}")
        if model.training:
            raise ValueError("model must be in eval mode: the plan folds BatchNorm's running statistics")
        for name, flag in (("cuda_graph", cuda_graph), ("concurrent", concurrent)):
            if flag and example.device.type != "cuda":
                raise ValueError(f"{name} needs a CUDA example, got one on {example.device}")
        concurrent = example.device.type == "cuda" if concurrent is None else concurrent
        if tune and choices is not None:
            raise ValueError("choices: give either tune=True (measure here) or choices (measured before), not both")
        choices = plan_tuning.read_choices(choices)
        if isinstance(choices, plan_tuning.TunedChoices):
            choices = choices.lookup(model.mode, example)
        self.shape, self.dtype, self.device = tuple(example.shape), example.dtype, example.device
        self.layout, self.labels = memory_format_of(example), labels
        # Ordinary tensors even when built under inference mode (a benchmark's): a CUDA graph and the Triton
        # weight layouts check their weights' version counters, which inference tensors do not have.
        with torch.inference_mode(False), torch.no_grad():
            self.network = PlanNetwork(model, example, labels, backend, concurrent).eval()
            if choices is not None:
                plan_tuning.apply_choices(self.network, choices)
        self.timings = plan_tuning.measure(self.network, example) if tune else None
        self.choices = {name: layer.backend for name, layer in plan_tuning.tunable_layers(self.network).items()}
        self.runner = None
        if cuda_graph or (cuda_graph is None and example.device.type == "cuda"):
            self.runner = CudaGraphRunner(self.network, example, recapture=False)
        else:
            with torch.inference_mode():  # the epilogue fallbacks and weight layouts settle here, not per frame
                self.network(example)

    def check(self, image) -> None:
        """ValueError naming image unless it has the example's shape, dtype, layout and device."""
        if not isinstance(image, torch.Tensor):
            raise ValueError(f"image must be a tensor, got {type(image).__name__}")
        got = (tuple(image.shape), image.dtype, image.device, memory_format_of(image))
        if got != (self.shape, self.dtype, self.device, self.layout):
            raise ValueError(f"image must match the plan's example {self.shape} {self.dtype} on {self.device} "
                             f"({self.layout}), got {got[0]} {got[1]} on {got[2]} ({got[3]})")

    def epilogue_fallbacks(self) -> dict[str, str]:
        return epilogue_fallbacks(self.network)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        self.check(image)
        if self.runner is not None:
            return self.runner(image)
        with torch.inference_mode():
            return self.network(image)


class LabelPlans:
    """Labels of image batches through labels plans of one model, one per input (shape, dtype, layout,
    device), each built when its first batch comes and reused for every later batch like it; at most
    max_plans are kept, the least recently used going first (each holds its own weights and buffers).

    labels = LabelPlans(model, choices=...)(x)  # [N, H, W] uint8, a tensor of the caller's own
    plan_options go to every InferencePlan (e.g. cuda_graph, concurrent); choices as InferencePlan takes
    them (a results file's are looked up per plan)."""

    def __init__(self, model: ICNet, choices=None, max_plans: int = 4, **plan_options):
        choices = plan_tuning.read_choices(choices)
        self.model, self.choices, self.max_plans, self.plan_options = model, choices, max_plans, plan_options
        self.plans: OrderedDict[tuple, InferencePlan] = OrderedDict()

    def plan_for(self, x: torch.Tensor) -> InferencePlan:
        key = (tuple(x.shape), x.dtype, x.device, memory_format_of(x))
        if key in self.plans:
            self.plans.move_to_end(key)
        else:
            while len(self.plans) >= self.max_plans:
                self.plans.popitem(last=False)
            self.plans[key] = InferencePlan(self.model, x, labels=True, choices=self.choices, **self.plan_options)
        return self.plans[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # a CUDA plan's output is its graph's static buffer, which the next call overwrites
        return self.plan_for(x)(x).clone()
