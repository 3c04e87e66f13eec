"""ICNet as a standard ONNX graph, for ONNX Runtime, OpenVINO, TensorRT and other ONNX runtimes.

The fused ops decompose on export: the graph is traced from the reference build (plain PyTorch layers)
loaded with the model's state_dict, which both builds share, so it holds only standard ONNX operators
(Conv with the BatchNorm folded in, Relu, Add, Resize, MaxPool, Einsum for the pyramid pooling) and no
custom domain or function. The export is the inference graph: the image preprocessed as for ICNet.forward
in, the chosen mode's logits at the image's size out.
"""

import importlib.util
from pathlib import Path

import torch
from torch import nn

from icnet.model import ICNet, PPM_BINS, RELEASED_PPM_KERNELS, RELEASED_PPM_MAP, RELEASED_PPM_STRIDES
from icnet_kernels.reference import pyramid_pool_sum_reference

OPSET = 18
INPUT_NAME, OUTPUT_NAME = "image", "logits"
# The pyramid pooling's map is the image shrunk five times by (n - 1) // 2 + 1 (the 1/2 resize, conv1's
# stride, pool1, conv3_1's stride, the 1/2 resize), so about a 32nd of it. A dynamic-size graph pools that
# map adaptively into bins of up to 6x6, which needs a map of at least 6x6: an image of at least 161x161.
MIN_DYNAMIC_SIDE = 161


class ShapeSwitchedPyramidPooling(nn.Module):
    """The reference build's pyramid pooling with its choice of geometry made inside the graph.

    The PyTorch builds pick the released pooling windows for a 33x65 map and adaptive ones elsewhere by a
    Python test on the map's size, which a trace with symbolic sizes would freeze at the example's answer;
    torch.cond keeps both (an ONNX If), so a dynamic-size export pools exactly like the builds at every size.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        bins = tuple(min(b, height, width) for b in PPM_BINS)

        def released(x):
            return pyramid_pool_sum_reference(x, PPM_BINS, RELEASED_PPM_KERNELS, RELEASED_PPM_STRIDES, True)

        def adaptive(x):
            return pyramid_pool_sum_reference(x, bins, None, None, True)

        is_released = (height == RELEASED_PPM_MAP[0]) & (width == RELEASED_PPM_MAP[1])
        if isinstance(is_released, bool):  # fixed sizes: the graph needs only the branch they take
            return released(x) if is_released else adaptive(x)
        return torch.cond(is_released, released, adaptive, (x,))


def export_graph_model(model: ICNet) -> ICNet:
    """The reference build of model's network and weights, in inference, with the exportable pooling."""
    if not isinstance(model, ICNet):
        raise ValueError(f"model must be an ICNet, got {type(model).__name__}")
    graph_model = ICNet(num_classes=model.num_classes, width=model.width, mode=model.mode, fused=False,
                        channels=model.channels)
    graph_model.load_state_dict(model.state_dict())
    graph_model.ppm = ShapeSwitchedPyramidPooling()
    return graph_model.to(device="cpu", dtype=torch.float32).eval()


def export_onnx(model: ICNet, path, size: tuple[int, int] = (1025, 2049), batch: int = 1,
                dynamic_batch: bool = False, dynamic_size: bool = False, opset: int = OPSET,
                metadata: dict[str, str] | None = None) -> Path:
    """Writes model (either build) as a float32 ONNX graph of standard operators to path, one file.

    size and batch: the input the graph is traced with, [batch, 3, *size], and its fixed shape unless
    dynamic_batch / dynamic_size make the batch / height and width symbolic (dynamic sizes from
    MIN_DYNAMIC_SIDE up). metadata: key -> text, stored in the model's metadata_props (the command line
    stores the checkpoint's class names and input preprocessing there). Returns the path written.
    """
    size = tuple(size)
    if len(size) != 2 or not all(isinstance(s, int) and s >= 1 for s in size):
        raise ValueError(f"size must be two positive integers (height, width), got {size}")
    if not (isinstance(batch, int) and batch >= 1):
        raise ValueError(f"batch must be a positive integer, got {batch}")
    if dynamic_size and min(size) < MIN_DYNAMIC_SIDE:
        raise ValueError(f"size must be at least {MIN_DYNAMIC_SIDE}x{MIN_DYNAMIC_SIDE} for a dynamic-size "
                         f"export (the pyramid pooling needs a 6x6 map), got {size[0]}x{size[1]}")
    if not (isinstance(opset, int) and opset >= OPSET):
        raise ValueError(f"opset must be an integer of at least {OPSET} (torch's ONNX exporter), got {opset}")
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"path must name an .onnx file, got {str(path)!r}")
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(f"the ONNX export needs {' and '.join(missing)}: pip install {' '.join(missing)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    graph_model = export_graph_model(model)
    image = torch.zeros(batch, 3, *size)
    dims = {}
    if dynamic_batch:
        dims[0] = torch.export.Dim("batch", min=1)
    if dynamic_size:
        dims[2] = torch.export.Dim("height", min=MIN_DYNAMIC_SIDE)
        dims[3] = torch.export.Dim("width", min=MIN_DYNAMIC_SIDE)
    # An example batch of 1 lets the tracer specialise the batch even when it is meant to be dynamic.
    if dynamic_batch and batch == 1:
        image = torch.zeros(2, 3, *size)
    with torch.no_grad():
        program = torch.onnx.export(graph_model, (image,), dynamo=True, opset_version=opset, optimize=True,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes={"image": dims} if dims else None, external_data=False,
                                    verbose=False)
    program.model.metadata_props.update(metadata or {})
    program.save(path, external_data=False)
    return path
