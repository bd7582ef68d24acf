"""The Open Inference Protocol's tensors, as both wires carry them: input tensors decoded on
first use (`V2Tensor`), output tensors (`V2Output`), datatypes, shape bounds, and raw contents
(little-endian numbers; BYTES elements each after a 4-byte little-endian length).

How a wire carries a tensor (JSON `data` or a binary tail over HTTP; typed or raw contents over
gRPC) is its front-end's; what tensors mean for a model is service/inference_protocol/requests.py.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.core.errors import InvalidInput

# V2 datatype → little-endian numpy dtype (BYTES is handled apart).
V2_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}


TensorData = np.ndarray | list[bytes]


@dataclass(slots=True)
class V2Tensor:
    """One V2 input tensor: numeric data as an ndarray of `shape`, BYTES as a list.

    `source` is the data or a function that decodes it on first use of `data`: a request's
    names, datatypes and shapes are checked against the model before its contents cost anything.
    """

    name: str
    datatype: str
    shape: list[int]
    source: TensorData | Callable[[], TensorData]
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def data(self) -> TensorData:
        """The decoded contents (decoding errors are InvalidInput naming the tensor)."""
        if callable(self.source):
            self.source = self.source()
        return self.source


@dataclass(slots=True)
class V2Output:
    """One output tensor to send: numeric ndarray, or a list of bytes for BYTES."""

    name: str
    datatype: str
    data: np.ndarray | list[bytes]
    shape: list[int]


# NOTE: a V2 tensor's shape is checked before numpy sees it: numpy refuses to shape even an empty
# array whose other dimensions multiply past its index range ([0, 2**62, 4]), or one of over 64
# dimensions. 2**31 elements is far beyond what a request under the default size limits carries.
MAX_TENSOR_DIMS = 8
MAX_TENSOR_ELEMENTS = 2**31


def tensor_elements(shape: Sequence[int], where: str) -> int:
    """The element count of a V2 tensor of `shape`; `InvalidInput(where.shape)` when the shape has
    over MAX_TENSOR_DIMS dimensions, a negative one, or non-zero ones multiplying past
    MAX_TENSOR_ELEMENTS."""
    field_name = f"{where}.shape"
    if len(shape) > MAX_TENSOR_DIMS:
        raise InvalidInput(field_name, f"at most {MAX_TENSOR_DIMS} dimensions, got {len(shape)}")
    if any(d < 0 for d in shape):
        raise InvalidInput(field_name, f"dimensions must be >= 0, got {list(shape)}")
    if math.prod(d for d in shape if d) > MAX_TENSOR_ELEMENTS:
        raise InvalidInput(
            field_name,
            f"the non-zero dimensions must multiply to at most {MAX_TENSOR_ELEMENTS}, "
            f"got {list(shape)}",
        )
    return math.prod(shape)


def check_int_range(values: np.ndarray, datatype: str, where: str) -> None:
    """`InvalidInput(where[k])` for the first integer of `values` (row-major) that `datatype`
    cannot hold: numpy's cast would wrap it around (300 as UINT8 is 44)."""
    if not values.size:
        return
    info = np.iinfo(V2_DTYPES[datatype])
    if info.min <= int(values.min()) and int(values.max()) <= info.max:
        return
    for k, value in enumerate(values.ravel().tolist()):
        if not info.min <= value <= info.max:
            raise InvalidInput(
                f"{where}[{k}]", f"{value} is outside the {datatype} range [{info.min}, {info.max}]"
            )


_LEN = struct.Struct("<I")


def unpack_bytes(raw: bytes, where: str, count: int | None = None) -> list[bytes]:
    """Split a BYTES tensor's raw data: each element is a 4-byte LE length, then its bytes.

    With `count`, data holding more than `count` elements is refused without reading the rest.
    """
    items: list[bytes] = []
    pos = 0
    end = len(raw)
    while pos < end:
        if count is not None and len(items) == count:
            raise InvalidInput(where, f"more than {count} BYTES elements (the shape's count)")
        if pos + 4 > end:
            raise InvalidInput(where, f"truncated BYTES element length at byte {pos}")
        (n,) = _LEN.unpack_from(raw, pos)
        pos += 4
        if pos + n > end:
            raise InvalidInput(where, f"BYTES element at byte {pos - 4} claims {n} bytes, too many")
        items.append(raw[pos : pos + n])
        pos += n
    return items


def pack_bytes(items: Iterable[bytes]) -> bytes:
    """Join BYTES elements, each prefixed with its 4-byte little-endian length."""
    return b"".join(_LEN.pack(len(b)) + b for b in items)


def raw_array(data: bytes, datatype: str, shape: Sequence[int]) -> np.ndarray:
    """Raw little-endian contents as a writable, native-endian array of `shape` (a copy: torch
    refuses read-only buffers). The caller has checked the size."""
    dtype = V2_DTYPES[datatype]
    return (
        np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("="), copy=True).reshape(shape)
    )


def bytes_elements(raw: bytes, field: str, shape: Sequence[int], count: int) -> list[bytes]:
    """A BYTES tensor's raw contents split into its `count` elements (`InvalidInput(field)`
    unless the framing holds exactly that many)."""
    items = unpack_bytes(raw, field, count)
    if len(items) != count:
        raise InvalidInput(field, f"shape {list(shape)} holds {count} elements, got {len(items)}")
    return items


def raw_contents(output: V2Output) -> bytes:
    """An output tensor's raw contents (BYTES framed, numbers little-endian)."""
    if isinstance(output.data, list):
        return pack_bytes(output.data)
    return np.ascontiguousarray(output.data, dtype=V2_DTYPES[output.datatype]).tobytes()
