"""Reading caffemodels: the protobuf wire format decoded by hand gives back each layer's name, type and
blobs however they are encoded, and anything that is not a caffemodel is a CaffeModelError naming the file."""

import numpy as np
import pytest
import torch

from icnet.caffe import CaffeModelError, parse_net, read_caffemodel
from tests.caffe_helpers import Layer, encode_layer, encode_net

def layers():
    """A few layers with random blobs (the same ones on every call)."""
    rng = np.random.default_rng(0)
    return [Layer("conv1", "Convolution", ["data"], ["conv1"], {},
                  [rng.normal(size=(4, 3, 3, 3)).astype(np.float32), rng.normal(size=4).astype(np.float32)]),
            Layer("conv1/bn", "BN", ["conv1"], ["conv1"], {},
                  [rng.normal(size=(1, 4, 1, 1)).astype(np.float32) for _ in range(4)]),
            Layer("conv1/relu", "ReLU", ["conv1"], ["conv1"]),
            Layer("pool", "Pooling", ["conv1"], ["pool"])]


def assert_same(read, written, legacy_shape=False):
    assert [(l.name, l.type) for l in read] == [(l.name, l.type) for l in written]
    for a, b in zip(read, written):
        assert len(a.blobs) == len(b.blobs)
        for x, y in zip(a.blobs, b.blobs):
            expected = y.reshape((1,) * (4 - y.ndim) + y.shape) if legacy_shape else y
            assert x.dtype == np.float32 and x.shape == expected.shape and np.array_equal(x, expected)


@pytest.mark.parametrize("legacy_shape", [False, True], ids=["BlobShape", "num-channels-height-width"])
@pytest.mark.parametrize("unpacked", [False, True], ids=["packed", "unpacked"])
def test_layers_and_blobs_read_back(tmp_path, legacy_shape, unpacked):
    written = layers()
    path = tmp_path / "net.caffemodel"
    path.write_bytes(encode_net(written, legacy_shape=legacy_shape, unpacked=unpacked))
    assert_same(read_caffemodel(path), written, legacy_shape)


def test_legacy_v1_layers_read_back():
    written = [l for l in layers() if l.type != "BN"]  # V1 has no BN type
    assert_same(parse_net(encode_net(written, v1=True)), written)


def test_double_data_reads_as_float32():
    values = np.random.default_rng(1).normal(size=(2, 3))
    blob = (bytes([7 << 3 | 2, 4, 1 << 3 | 2, 2, 2, 3])                 # shape {dim: [2, 3]}, packed
            + bytes([8 << 3 | 2, 48]) + values.astype("<f8").tobytes())  # double_data
    layer = bytes([1 << 3 | 2, 1]) + b"c" + bytes([7 << 3 | 2, len(blob)]) + blob
    net = _varint(100 << 3 | 2) + _varint(len(layer)) + layer
    (read,) = parse_net(net)
    assert read.name == "c" and np.array_equal(read.blobs[0], values.astype(np.float32))


def test_unknown_fields_of_every_wire_type_are_skipped():
    layer = encode_layer(layers()[0])
    extras = bytes([9 << 3 | 0, 0x96, 0x01, 10 << 3 | 1]) + bytes(8) + bytes([11 << 3 | 5]) + bytes(4)
    net = extras + _varint(100 << 3 | 2) + _varint(len(layer)) + layer
    assert_same(parse_net(net), layers()[:1])


def _varint(n):
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


@pytest.mark.parametrize("kind", ["empty", "text", "random bytes", "a PNG", "a torch checkpoint", "truncated",
                                  "no layers", "a blob of the wrong size"])
def test_what_is_not_a_caffemodel_is_a_clear_error(tmp_path, kind):
    path = tmp_path / "file.caffemodel"
    if kind == "empty":
        data = b""
    elif kind == "text":
        data = b'name: "ICNet"\nlayer { name: "conv1" type: "Convolution" }\n'  # a prototxt, not a caffemodel
    elif kind == "random bytes":
        data = np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    elif kind == "a PNG":
        from PIL import Image
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
        data = (tmp_path / "x.png").read_bytes()
    elif kind == "a torch checkpoint":
        torch.save({"state_dict": {"w": torch.zeros(10)}}, tmp_path / "x.pt")
        data = (tmp_path / "x.pt").read_bytes()
    elif kind == "truncated":
        data = encode_net(layers())[:-7]
    elif kind == "no layers":
        data = bytes([1 << 3 | 2, 5]) + b"ICNet"
    else:
        bad = Layer("conv1", "Convolution", [], [], {}, [np.zeros((2, 3), np.float32)])
        shape_2x3, shape_2x4 = bytes([7 << 3 | 2, 4, 1 << 3 | 2, 2, 2, 3]), bytes([7 << 3 | 2, 4, 1 << 3 | 2, 2, 2, 4])
        data = encode_net([bad]).replace(shape_2x3, shape_2x4)
    path.write_bytes(data)
    with pytest.raises(CaffeModelError, match="file.caffemodel is not a caffemodel"):
        read_caffemodel(path)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(CaffeModelError, match="absent.caffemodel does not exist"):
        read_caffemodel(tmp_path / "absent.caffemodel")
