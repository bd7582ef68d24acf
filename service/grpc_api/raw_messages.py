"""The hot RPCs' messages without protobuf objects: an EncodeRequest of feature sequences read
from its wire bytes (each FloatArray's packed floats copied straight into numpy), and the
EncodeResponse and ModelInferResponse written as wire bytes.

The writers produce exactly the bytes protobuf's serializer produces for the same message (fields
in number order, repeated scalars packed, default values left out). The reader takes the layouts
protobuf writes for such a request and returns None for anything else (token or text inputs,
unknown fields, a singular field sent twice, an unpacked float, a shape of more than two
dimensions): the caller then parses with protobuf, so both paths read every message alike
(tests/grpc_api/test_raw_messages.py).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import numpy as np

from service.core import types
from service.grpc_api.protobuf_wire import (
    LENGTH_DELIMITED,
    VARINT,
    Malformed,
    read_varint,
    tag,
    write_varint,
)
from service.inference_protocol.tensors import V2Output, raw_contents

_UINT32_MAX = 2**32 - 1
_UINT64_MASK = 2**64 - 1

# -- reading an EncodeRequest -------------------------------------------------------------------


class RawEncodeRequest:
    """The fields of an EncodeRequest of feature sequences, as read from its wire bytes: each
    sequence's shape, and where its float32 values lie in `data` (offset, count)."""

    __slots__ = ("data", "model", "pooling", "sequences", "timeout_ms", "version")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.model = ""
        self.version: int | None = None
        self.sequences: list[tuple[list[int], int, int]] = []
        self.pooling = ""
        self.timeout_ms = 0


# Top-level fields of EncodeRequest read here (others: left to protobuf).
_MODEL, _VERSION, _INPUTS, _POOLING, _TIMEOUT = 1, 2, 3, 6, 7


def read_encode_request(data: bytes) -> RawEncodeRequest | None:
    """An EncodeRequest with feature inputs read from `data`, or None when its layout is not one
    read here (protobuf parses those)."""
    try:
        return _read_encode_request(data)
    except (Malformed, UnicodeDecodeError):
        return None


def _read_encode_request(data: bytes) -> RawEncodeRequest | None:
    request = RawEncodeRequest(data)
    seen = 0
    pos, end = 0, len(data)
    while pos < end:
        key, pos = read_varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if number > _TIMEOUT or seen & (1 << number):
            return None
        seen |= 1 << number
        if wire == VARINT and number in (_VERSION, _TIMEOUT):
            value, pos = read_varint(data, pos, end)
            if value > _UINT32_MAX:
                return None
            if number == _VERSION:
                request.version = value
            else:
                request.timeout_ms = value
            continue
        if wire != LENGTH_DELIMITED:
            return None
        length, pos = read_varint(data, pos, end)
        stop = pos + length
        if stop > end:
            return None
        if number == _MODEL:
            request.model = data[pos:stop].decode()
        elif number == _POOLING:
            request.pooling = data[pos:stop].decode()
        elif number == _INPUTS:
            if not _read_feature_inputs(data, pos, stop, request.sequences):
                return None
        else:
            return None
        pos = stop
    return request if seen & (1 << _INPUTS) else None


def _read_feature_inputs(
    data: bytes, pos: int, end: int, sequences: list[tuple[list[int], int, int]]
) -> bool:
    """FeatureInputs: its FloatArrays appended to `sequences`; False for a layout not read."""
    while pos < end:
        key, pos = read_varint(data, pos, end)
        if key != _SEQUENCE:
            return False
        length, pos = read_varint(data, pos, end)
        stop = pos + length
        if stop > end:
            return False
        array = _read_float_array(data, pos, stop)
        if array is None:
            return False
        sequences.append(array)
        pos = stop
    return True


_SEQUENCE = tag(1, LENGTH_DELIMITED)
_SHAPE_PACKED = tag(1, LENGTH_DELIMITED)
_SHAPE_ONE = tag(1, VARINT)
_VALUES_PACKED = tag(2, LENGTH_DELIMITED)


def _read_float_array(data: bytes, pos: int, end: int) -> tuple[list[int], int, int] | None:
    """A FloatArray: (shape, offset of its values, number of values), or None."""
    shape: list[int] = []
    offset = count = 0
    values_seen = False
    while pos < end:
        key, pos = read_varint(data, pos, end)
        if key == _SHAPE_PACKED:
            length, pos = read_varint(data, pos, end)
            stop = pos + length
            if stop > end:
                return None
            # NOTE: a feature sequence has two dimensions; protobuf reads (and refuses) any
            # other number, in C, rather than this loop walking a megabyte of them.
            while pos < stop:
                dim, pos = read_varint(data, pos, stop)
                if dim > _UINT32_MAX or len(shape) == 2:
                    return None
                shape.append(dim)
        elif key == _SHAPE_ONE:
            dim, pos = read_varint(data, pos, end)
            if dim > _UINT32_MAX or len(shape) == 2:
                return None
            shape.append(dim)
        elif key == _VALUES_PACKED and not values_seen:
            length, pos = read_varint(data, pos, end)
            if pos + length > end or length % 4:
                return None
            values_seen = True
            offset, count = pos, length // 4
            pos += length
        else:
            return None
    return shape, offset, count


def float32_values(data: bytes, offset: int, count: int) -> np.ndarray:
    """`count` little-endian float32s at `offset` of `data`, as a writable array of their own."""
    return np.frombuffer(data, "<f4", count, offset).astype(np.float32)


# -- writing answers ----------------------------------------------------------------------------


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return bytes((tag(number, LENGTH_DELIMITED),)) + write_varint(len(payload)) + payload


def _float_array(array: np.ndarray) -> bytes:
    """A FloatArray's bytes: shape (packed), then row-major float32 values (packed)."""
    shape = b"".join(write_varint(int(d)) for d in array.shape)
    values = np.ascontiguousarray(array, dtype="<f4").tobytes()
    out = _field(1, shape) if shape else b""
    return out + _field(2, values) if values else out


@functools.lru_cache(maxsize=256)
def _encode_head(model: str, version: int) -> bytes:
    out = _field(1, model.encode()) if model else b""
    if version:
        out += bytes((tag(2, VARINT),)) + write_varint(version)
    return out


def encode_response(result: types.EncodeResult) -> bytes:
    """The EncodeResponse of a core EncodeResult, as wire bytes."""
    parts = [_encode_head(result.model, result.version)]
    parts.extend(_field(3, _float_array(np.asarray(e))) for e in result.encodings)
    parts.extend(_field(4, label.encode()) for label in result.labels or ())
    if result.scores is not None:
        parts.extend(_field(5, _float_array(row)) for row in result.scores)
    return b"".join(parts)


@functools.lru_cache(maxsize=256)
def _infer_head(model: str, version: str) -> bytes:
    return (_field(1, model.encode()) if model else b"") + _field(2, version.encode())


def _int64s(values: Iterable[int]) -> bytes:
    return b"".join(write_varint(v & _UINT64_MASK) for v in values)


@functools.lru_cache(maxsize=1024)
def _infer_output(name: str, datatype: str, shape: tuple[int, ...]) -> bytes:
    """An `outputs` entry of a ModelInferResponse: name, datatype, shape (packed int64)."""
    out = _field(1, name.encode()) if name else b""
    if datatype:
        out += _field(2, datatype.encode())
    packed = _int64s(shape)
    return _field(5, out + _field(3, packed) if packed else out)


def infer_response(model: str, version: int, request_id: str, outputs: list[V2Output]) -> bytes:
    """A ModelInferResponse with `outputs` as raw contents, as wire bytes."""
    parts = [_infer_head(model, str(version))]
    if request_id:
        parts.append(_field(3, request_id.encode()))
    parts.extend(_infer_output(o.name, o.datatype, tuple(o.shape)) for o in outputs)
    parts.extend(_field(6, raw_contents(o)) for o in outputs)
    return b"".join(parts)
