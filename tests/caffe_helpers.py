"""The released ICNet as Caffe describes it, for the conversion tests, written independently of icnet.caffe
and icnet.convert: the layer graph of icnet_cityscapes[_bnnomerge].prototxt with random blobs, a protobuf
encoder that writes it as a caffemodel, and an interpreter of the graph's layer semantics (Convolution, BN,
Scale, Pooling, Interp, Eltwise SUM, ReLU) as PSPNet's Caffe computes them."""

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

BN_EPS = 1e-5  # PSPNet-Caffe's BNParameter default; the released prototxts set none
RELEASED_MAP = (33, 65)
RELEASED_POOLS = {1: ((33, 65), (33, 65)), 2: ((17, 33), (16, 32)), 3: ((13, 25), (10, 20)), 6: ((8, 15), (5, 10))}


@dataclass
class Layer:
    name: str
    type: str
    bottoms: list[str]
    tops: list[str]
    params: dict = field(default_factory=dict)
    blobs: list[np.ndarray] = field(default_factory=list)


def pool_geometry(map_size: tuple[int, int]) -> dict[int, tuple[tuple[int, int], tuple[int, int]]]:
    """bin -> (kernel, stride) of the pyramid pooling: the release's on its 33x65 map; on a map divisible by
    every bin, the windows of adaptive pooling (kernel = stride = size / bin)."""
    if tuple(map_size) == RELEASED_MAP:
        return RELEASED_POOLS
    height, width = map_size
    assert height % 6 == 0 and width % 6 == 0, map_size
    return {b: ((height // b, width // b), (height // b, width // b)) for b in (1, 2, 3, 6)}


def released_graph(rng: np.random.Generator, merged: bool, map_size=RELEASED_MAP, classes: int = 19,
                   input_scale: bool = True) -> list[Layer]:
    """The layers of the released network, in prototxt order, with random blobs. merged=False: the
    bnnomerge variant (convolutions without bias, a BN layer after each but conv6_cls)."""
    layers = []

    def conv(name, bottom, cout, cin, kernel, stride=1, pad=0, dilation=1, bn=True, relu=True):
        weight = rng.normal(0, math.sqrt(1.0 / (cin * kernel * kernel)), (cout, cin, kernel, kernel))
        blobs = [weight.astype(np.float32)]
        if merged or not bn:
            blobs.append(rng.normal(0, 0.1, cout).astype(np.float32))
        params = dict(kernel=kernel, stride=stride, pad=pad, dilation=dilation)
        layers.append(Layer(name, "Convolution", [bottom], [name], params, blobs))
        if bn and not merged:
            shape = (1, cout, 1, 1)
            layers.append(Layer(f"{name}/bn", "BN", [name], [name], {}, [
                rng.uniform(0.5, 1.5, shape).astype(np.float32),    # slope
                rng.normal(0, 0.2, shape).astype(np.float32),       # bias
                rng.normal(0, 0.2, shape).astype(np.float32),       # mean
                rng.uniform(0.5, 2.0, shape).astype(np.float32)]))  # variance
        if relu:
            layers.append(Layer(f"{name}/relu", "ReLU", [name], [name]))
        return name

    def interp(name, bottom, **params):
        layers.append(Layer(name, "Interp", [bottom], [name], params))
        return name

    def eltwise(name, bottoms, relu=True):
        layers.append(Layer(name, "Eltwise", bottoms, [name], {"operation": "SUM"}))
        if relu:
            layers.append(Layer(f"{name}/relu", "ReLU", [name], [name]))
        return name

    def bottleneck(stage, block, bottom, cin, mid, cout, stride=1, dilation=1, proj=False):
        prefix = f"conv{stage}_{block}"
        x = conv(f"{prefix}_1x1_reduce", bottom, mid, cin, 1, stride)
        x = conv(f"{prefix}_3x3", x, mid, mid, 3, 1, dilation, dilation)
        x = conv(f"{prefix}_1x1_increase", x, cout, mid, 1, relu=False)
        shortcut = conv(f"{prefix}_1x1_proj", bottom, cout, cin, 1, stride, relu=False) if proj else bottom
        return eltwise(prefix, [shortcut, x])

    scale = [rng.uniform(0.5, 1.5, 3).astype(np.float32)] if input_scale else []
    layers.append(Layer("data_sub1", "Scale", ["data"], ["data_sub1"], {}, scale))
    x = interp("data_sub2", "data_sub1", shrink_factor=2)
    x = conv("conv1_1_3x3_s2", x, 32, 3, 3, 2, 1)
    x = conv("conv1_2_3x3", x, 32, 32, 3, 1, 1)
    x = conv("conv1_3_3x3", x, 64, 32, 3, 1, 1)
    layers.append(Layer("pool1_3x3_s2", "Pooling", [x], ["pool1_3x3_s2"],
                        dict(pool="MAX", kernel=(3, 3), stride=(2, 2), pad=1)))
    x = "pool1_3x3_s2"
    for block in (1, 2, 3):
        x = bottleneck(2, block, x, 64 if block == 1 else 128, 32, 128, proj=block == 1)
    conv3_1 = bottleneck(3, 1, x, 128, 64, 256, stride=2, proj=True)
    x = interp("conv3_1_sub4", conv3_1, shrink_factor=2)
    for block in (2, 3, 4):
        x = bottleneck(3, block, x, 256, 64, 256)
    for block in range(1, 7):
        x = bottleneck(4, block, x, 256 if block == 1 else 512, 128, 512, dilation=2, proj=block == 1)
    for block in (1, 2, 3):
        x = bottleneck(5, block, x, 512 if block == 1 else 1024, 256, 1024, dilation=4, proj=block == 1)
    pooled = []
    for b, (kernel, stride) in pool_geometry(map_size).items():
        layers.append(Layer(f"conv5_3_pool{b}", "Pooling", [x], [f"conv5_3_pool{b}"],
                            dict(pool="AVE", kernel=kernel, stride=stride, pad=0)))
        pooled.append(interp(f"conv5_3_pool{b}_interp", f"conv5_3_pool{b}", height=map_size[0], width=map_size[1]))
    x = eltwise("conv5_3_sum", [x, *reversed(pooled)], relu=False)
    x = conv("conv5_4_k1", x, 256, 1024, 1)
    x = interp("conv5_4_interp", x, zoom_factor=2)
    low = conv("conv_sub4", x, 128, 256, 3, 1, 2, 2, relu=False)
    high = conv("conv3_1_sub2_proj", conv3_1, 128, 256, 1, relu=False)
    x = eltwise("sub24_sum", [high, low])
    x = interp("sub24_sum_interp", x, zoom_factor=2)
    low = conv("conv_sub2", x, 128, 128, 3, 1, 2, 2, relu=False)
    y = conv("conv1_sub1", "data_sub1", 32, 3, 3, 2, 1)
    y = conv("conv2_sub1", y, 32, 32, 3, 2, 1)
    y = conv("conv3_sub1", y, 64, 32, 3, 2, 1)
    high = conv("conv3_sub1_proj", y, 128, 64, 1, relu=False)
    x = eltwise("sub12_sum", [high, low])
    x = interp("sub12_sum_interp", x, zoom_factor=2)
    x = conv("conv6_cls", x, classes, 128, 1, bn=False, relu=False)
    interp("conv6_interp", x, zoom_factor=4)
    return layers


# --- the protobuf wire format ------------------------------------------------------------------------------

def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _bytes(number: int, payload: bytes) -> bytes:
    return _key(number, 2) + _varint(len(payload)) + payload


def _text(number: int, text: str) -> bytes:
    return _bytes(number, text.encode())


def encode_blob(array: np.ndarray, legacy_shape: bool = False, unpacked: bool = False) -> bytes:
    """A BlobProto: shape (BlobShape, field 7) or the legacy num/channels/height/width (1-4); data (5) packed,
    or as one fixed32 field per value."""
    array = np.asarray(array, dtype="<f4")
    if legacy_shape:
        dims = (1,) * (4 - array.ndim) + array.shape
        message = b"".join(_key(n, 0) + _varint(d) for n, d in zip((1, 2, 3, 4), dims))
    else:
        message = _bytes(7, _bytes(1, b"".join(_varint(d) for d in array.shape)))
    if unpacked:
        return message + b"".join(_key(5, 5) + value.tobytes() for value in array.ravel())
    return message + _bytes(5, array.tobytes())


def encode_layer(layer: Layer, v1: bool = False, **blob_options) -> bytes:
    """A LayerParameter (name 1, type 2, bottom 3, top 4, blobs 7) or a legacy V1LayerParameter (bottom 2,
    top 3, name 4, type 5 as an enum, blobs 6)."""
    blobs = [encode_blob(blob, **blob_options) for blob in layer.blobs]
    if v1:
        types = {"Convolution": 4, "Pooling": 17, "ReLU": 18, "Eltwise": 25}
        return (b"".join(_text(2, b) for b in layer.bottoms) + b"".join(_text(3, t) for t in layer.tops)
                + _text(4, layer.name) + _key(5, 0) + _varint(types[layer.type]) + b"".join(_bytes(6, b) for b in blobs))
    return (_text(1, layer.name) + _text(2, layer.type) + b"".join(_text(3, b) for b in layer.bottoms)
            + b"".join(_text(4, t) for t in layer.tops) + b"".join(_bytes(7, b) for b in blobs))


def encode_net(layers: list[Layer], v1: bool = False, **blob_options) -> bytes:
    """A NetParameter: name (1), input (3), input_dim (4), then layer (100) or the legacy layers (2)."""
    header = _text(1, "ICNet") + _text(3, "data") + b"".join(_key(4, 0) + _varint(d) for d in (1, 3, 1025, 2049))
    return header + b"".join(_bytes(2 if v1 else 100, encode_layer(layer, v1, **blob_options)) for layer in layers)


# --- the layers' semantics ------------------------------------------------------------------------------

def run_graph(layers: list[Layer], data: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every top of the graph for the input blob "data" (in place layers overwrite their top), in data's dtype."""
    blobs = {"data": data}
    for layer in layers:
        inputs = [blobs[name] for name in layer.bottoms]
        weights = [torch.from_numpy(b).to(data.dtype) for b in layer.blobs]
        blobs[layer.tops[0]] = LAYERS[layer.type](inputs, weights, layer.params)
    return blobs


def _convolution(inputs, weights, p):
    bias = weights[1] if len(weights) > 1 else None
    return F.conv2d(inputs[0], weights[0], bias, p["stride"], p["pad"], p["dilation"])


def _bn(inputs, weights, p):
    slope, bias, mean, variance = weights
    return (inputs[0] - mean) / torch.sqrt(variance + BN_EPS) * slope + bias


def _scale(inputs, weights, p):
    return inputs[0] * weights[0].reshape(1, -1, 1, 1) if weights else inputs[0]


def _relu(inputs, weights, p):
    return inputs[0].clamp_min(0)


def _eltwise(inputs, weights, p):
    assert p["operation"] == "SUM"
    return sum(inputs[1:], inputs[0])


def _pooling(inputs, weights, p):
    """Caffe's pooling: output size rounded up, the last window clipped to the padded map; AVE divides by the
    window's size within the padded map, MAX takes the maximum within the map."""
    x = inputs[0]
    (kh, kw), (sh, sw), pad = p["kernel"], p["stride"], p["pad"]
    starts, areas = [], []
    for size, k, s in ((x.shape[-2], kh, sh), (x.shape[-1], kw, sw)):
        pooled = -(-(size + 2 * pad - k) // s) + 1
        if pad and (pooled - 1) * s >= size + pad:
            pooled -= 1
        start = torch.arange(pooled) * s - pad
        starts.append(start)
        areas.append((torch.clamp(start + k, max=size + pad) - start).to(x.dtype))
    # pad so that every window is whole: with -inf for MAX (windows clipped to the map), zeros for AVE
    bottom = int(starts[0][-1]) + kh - x.shape[-2]
    right = int(starts[1][-1]) + kw - x.shape[-1]
    filler = float("-inf") if p["pool"] == "MAX" else 0.0
    padded = F.pad(x, (pad, max(right, 0), pad, max(bottom, 0)), value=filler)
    windows = padded.unfold(-2, kh, sh).unfold(-2, kw, sw)
    if p["pool"] == "MAX":
        return windows.amax((-2, -1))
    return windows.sum((-2, -1)) / (areas[0][:, None] * areas[1][None, :])


def _interp(inputs, weights, p):
    """PSPNet's Interp: the output size from zoom_factor, shrink_factor or height/width; bilinear with the
    corners of input and output aligned (caffe_cpu_interp2)."""
    x = inputs[0]
    h1, w1 = x.shape[-2:]
    if "zoom_factor" in p:
        h2, w2 = h1 + (h1 - 1) * (p["zoom_factor"] - 1), w1 + (w1 - 1) * (p["zoom_factor"] - 1)
    elif "shrink_factor" in p:
        h2, w2 = (h1 - 1) // p["shrink_factor"] + 1, (w1 - 1) // p["shrink_factor"] + 1
    else:
        h2, w2 = p["height"], p["width"]
    if (h1, w1) == (h2, w2):
        return x.clone()

    def taps(n1, n2):
        ratio = (n1 - 1) / (n2 - 1) if n2 > 1 else 0.0
        position = torch.arange(n2, dtype=torch.float64) * ratio
        first = position.long()
        step = (first < n1 - 1).long()
        weight = (position - first).to(x.dtype)
        return first, first + step, weight

    r0, r1, rw = taps(h1, h2)
    c0, c1, cw = taps(w1, w2)
    rows = x[..., r0, :] * (1 - rw)[:, None] + x[..., r1, :] * rw[:, None]
    return rows[..., c0] * (1 - cw) + rows[..., c1] * cw


LAYERS = {"Convolution": _convolution, "BN": _bn, "Scale": _scale, "ReLU": _relu, "Eltwise": _eltwise,
          "Pooling": _pooling, "Interp": _interp}
