"""Reading Caffe's .caffemodel files without Caffe: each layer's name, type and weight blobs.

A caffemodel is a protobuf NetParameter; its wire format is read here directly (see docs/CAFFE.md for the
fields). Only what weight conversion needs is decoded; every other field is skipped by its wire type.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# protobuf wire types
VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5

# NetParameter: layer (LayerParameter) = 100, the legacy layers (V1LayerParameter) = 2
NET_LAYER, NET_LEGACY_LAYERS = 100, 2
# LayerParameter: name = 1, type = 2 (string), blobs = 7
LAYER_NAME, LAYER_TYPE, LAYER_BLOBS = 1, 2, 7
# V1LayerParameter: name = 4, type = 5 (enum), blobs = 6
V1_NAME, V1_TYPE, V1_BLOBS = 4, 5, 6
V1_TYPES = {4: "Convolution", 17: "Pooling", 18: "ReLU", 25: "Eltwise", 14: "InnerProduct"}
# BlobProto: num, channels, height, width = 1-4 (legacy shape), data = 5, shape = 7, double_data = 8
BLOB_LEGACY_DIMS, BLOB_DATA, BLOB_SHAPE, BLOB_DOUBLE_DATA = (1, 2, 3, 4), 5, 7, 8
SHAPE_DIM = 1  # BlobShape: dim = 1 (packed int64)


class CaffeModelError(ValueError):
    """A file that is not a caffemodel, or one whose layers do not fit the network it is converted to."""


@dataclass(frozen=True)
class CaffeLayer:
    name: str
    type: str
    blobs: tuple[np.ndarray, ...]  # float32, in the blob's own shape


def read_caffemodel(path) -> list[CaffeLayer]:
    """The layers of the caffemodel at path, in file order."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CaffeModelError(f"caffemodel {path} does not exist") from None
    except OSError as error:
        raise CaffeModelError(f"cannot read caffemodel {path}: {error}") from error
    try:
        return parse_net(data)
    except CaffeModelError as error:
        raise CaffeModelError(f"{path} is not a caffemodel: {error}") from None


def parse_net(data: bytes) -> list[CaffeLayer]:
    """The layers of a serialised NetParameter."""
    layers = []
    for field, wire, value in _fields(memoryview(data), "NetParameter"):
        if field == NET_LAYER and wire == LENGTH:
            layers.append(_layer(value, LAYER_NAME, LAYER_TYPE, LAYER_BLOBS))
        elif field == NET_LEGACY_LAYERS and wire == LENGTH:
            layers.append(_layer(value, V1_NAME, V1_TYPE, V1_BLOBS))
    if not layers:
        raise CaffeModelError("it holds no layers")
    return layers


def _layer(data: memoryview, name_field: int, type_field: int, blobs_field: int) -> CaffeLayer:
    name, kind, blobs = None, "", []
    for field, wire, value in _fields(data, "LayerParameter"):
        if field == name_field and wire == LENGTH:
            name = _text(value, "layer name")
        elif field == type_field and wire == LENGTH:
            kind = _text(value, "layer type")
        elif field == type_field and wire == VARINT:
            kind = V1_TYPES.get(value, f"V1 type {value}")
        elif field == blobs_field and wire == LENGTH:
            blobs.append(value)
    if name is None:
        raise CaffeModelError("a layer has no name")
    return CaffeLayer(name, kind, tuple(_blob(blob, name, i) for i, blob in enumerate(blobs)))


def _blob(data: memoryview, layer: str, index: int) -> np.ndarray:
    shape, legacy, values = None, {}, []
    for field, wire, value in _fields(data, f"blob {index} of layer {layer}"):
        if field == BLOB_SHAPE and wire == LENGTH:
            shape = [dim for f, w, v in _fields(value, "BlobShape") if f == SHAPE_DIM
                     for dim in (_varints(v) if w == LENGTH else [v])]
        elif field in BLOB_LEGACY_DIMS and wire == VARINT:
            legacy[field] = value
        elif field == BLOB_DATA:
            values.append(_floats(value, wire, "<f4"))
        elif field == BLOB_DOUBLE_DATA:
            values.append(_floats(value, wire, "<f8"))
    if shape is None:
        shape = [legacy.get(field, 0) for field in BLOB_LEGACY_DIMS] if legacy else [0]
    array = np.concatenate(values).astype(np.float32) if values else np.zeros(0, np.float32)
    if any(dim < 0 for dim in shape) or int(np.prod(shape)) != array.size:
        raise CaffeModelError(f"blob {index} of layer {layer!r} has shape {tuple(shape)} but {array.size} values")
    return array.reshape(shape)


def _floats(value, wire: int, dtype: str) -> np.ndarray:
    if wire == LENGTH:  # packed
        size = np.dtype(dtype).itemsize
        if len(value) % size:
            raise CaffeModelError(f"packed data of {len(value)} bytes is not a whole number of values")
        return np.frombuffer(value, dtype=dtype)
    if wire == (FIXED32 if np.dtype(dtype).itemsize == 4 else FIXED64):  # one unpacked value, its bits as read
        return np.array([value], dtype=np.uint32 if wire == FIXED32 else np.uint64).view(dtype)
    raise CaffeModelError(f"blob data of wire type {wire} for {np.dtype(dtype).name} values")


def _text(value: memoryview, what: str) -> str:
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise CaffeModelError(f"the {what} is not UTF-8 text") from None


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= len(data):
            raise CaffeModelError("it ends inside a number")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise CaffeModelError("a number is longer than 10 bytes")


def _varints(data: memoryview) -> list[int]:
    values, pos = [], 0
    while pos < len(data):
        value, pos = _varint(data, pos)
        values.append(value - (1 << 64) if value >= 1 << 63 else value)  # int64 two's complement
    return values


def _fields(data: memoryview, message: str):
    """(field number, wire type, value) for each field of a message: an int for varints and fixed-width
    fields, a memoryview for length-delimited ones."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise CaffeModelError(f"field number 0 in a {message}")
        if wire == VARINT:
            value, pos = _varint(data, pos)
        elif wire in (FIXED64, FIXED32):
            size = 8 if wire == FIXED64 else 4
            if pos + size > len(data):
                raise CaffeModelError(f"it ends inside a {message}")
            value = int.from_bytes(data[pos:pos + size], "little")
            pos += size
        elif wire == LENGTH:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise CaffeModelError(f"a field of a {message} runs past the end of the data")
            value = data[pos:pos + length]
            pos += length
        else:  # groups (3, 4) are not used by caffe.proto; 6 and 7 do not exist
            raise CaffeModelError(f"wire type {wire} in a {message}")
        yield field, wire, value
