"""Fast wire codecs of the HTTP front-ends: JSON ↔ numpy, and the V2 binary tensor extension.

JSON is parsed with orjson and nested number lists become numpy arrays in one C call each; the
slow, exact walk that names the offending element (`inputs[2][5]: expected 32 features, got 31`)
runs only after the fast path has failed. Outputs are serialised straight from numpy by orjson.

A large body is first counted (`json_values`, byte counts in C) and refused when it holds more
values than the limit: orjson builds every value as a Python object while holding the GIL, so
the parse itself is what a hostile body costs (a 64 MiB body of one-step rows: 16 M lists,
~2 GB and seconds of a frozen event loop; `python -m bench.edge`, bench/RESULTS.md).

The V2 binary extension (Triton's `Inference-Header-Content-Length`): the body is a JSON header
followed by raw tensors in the order of the header's tensors that carry
`parameters.binary_data_size`; numbers are little-endian, BYTES elements each carry a 4-byte
little-endian length prefix.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from service import validation
from service.errors import InvalidInput, PayloadTooLarge

JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY
HEADER_LENGTH = "Inference-Header-Content-Length"

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
_INT64 = np.iinfo(np.int64)


# NOTE: with more strings than this, a body's values are bounded by its raw byte counts (the
# commas and brackets inside strings counted too); no acceptable request comes near it (at most
# max_sequences_per_request texts and a few keys), and walking the strings stays cheap below it.
MAX_COUNTED_STRINGS = 65536
# Above this size a body is parsed with the garbage collector paused: orjson allocates every list
# and object while the collector runs again and again over the growing heap: time grows faster
# than the body (`python -m bench.probes parse-costs`).
GC_PAUSE_BYTES = 1 << 20


def _separators(text: bytes, start: int = 0, end: int | None = None) -> int:
    return sum(text.count(sep, start, end) for sep in (b"[", b"{", b","))


def json_values(body: bytes) -> int:
    """An upper bound of the values (numbers, strings, literals, lists, objects) in a JSON text:
    its `[`, `{` and `,` outside strings, plus one. Byte counts only; never parses."""
    everywhere = _separators(body)
    text = body
    if b"\\" in text:
        # NOTE: left to right, escaped backslashes first; then every `\"` left is an escaped quote.
        # Neither holds a separator, so the count above stands.
        text = text.replace(b"\\\\", b"").replace(b'\\"', b"")
    if text.count(b'"') > 2 * MAX_COUNTED_STRINGS:
        return everywhere + 1
    inside = 0
    start = text.find(b'"')
    while start != -1:
        end = text.find(b'"', start + 1)
        if end == -1:
            break
        inside += _separators(text, start + 1, end)
        start = text.find(b'"', end + 1)
    return everywhere - inside + 1


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def loads(body: bytes, field_name: str = "body", max_values: int | None = None) -> Any:
    """Parse a JSON body; malformed JSON is an InvalidInput naming `field_name`, a body of more
    than `max_values` values (`json_values`) a PayloadTooLarge, refused before parsing."""
    # NOTE: a value takes at least one byte, so a body no longer than the limit is not counted.
    if max_values is not None and len(body) > max_values:
        values = json_values(body)
        if values > max_values:
            raise PayloadTooLarge(
                field_name,
                f"about {values:,} JSON values (numbers, strings, lists, objects); the limit is "
                f"{max_values:,} (--max-request-values): send large inputs as V2 binary "
                "tensors or over gRPC",
            )
    try:
        if len(body) > GC_PAUSE_BYTES:
            with _collector_paused():
                return orjson.loads(body)
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(field_name, f"invalid JSON: {exc}") from None


def dumps(value: Any) -> bytes:
    """Serialise a JSON value; numpy arrays are written directly (no `.tolist()`)."""
    return orjson.dumps(value, option=JSON_OPTIONS)


# ---------------------------------------------------------------- rnnserve API: JSON → numpy


def _check_steps(seq: Any, where: str, max_steps: int | None) -> None:
    # NOTE: before numpy walks the lists: a refused sequence costs no conversion.
    if max_steps is not None and isinstance(seq, list) and len(seq) > max_steps:
        raise validation.too_many_steps(where, len(seq), max_steps)


def features_from_json(
    value: Any, field_name: str = "inputs", max_steps: int | None = None
) -> list[np.ndarray]:
    """`[[[float, …], …], …]` → a float32 [T, F] array per sequence (types, finiteness checked;
    sequences over `max_steps` refused before conversion)."""
    sequences = _require_list(value, field_name, "a list of sequences")
    out: list[np.ndarray] = []
    for i, seq in enumerate(sequences):
        where = f"{field_name}[{i}]"
        _check_steps(seq, where, max_steps)
        try:
            raw = np.array(seq)
        except (ValueError, TypeError, OverflowError):
            raise _features_error(seq, where) from None
        if raw.ndim != 2 or raw.dtype.kind not in "iuf":
            raise _features_error(seq, where)
        if raw.shape[0] == 0:
            raise InvalidInput(where, "a sequence needs at least 1 step, got 0")
        if raw.shape[1] == 0:
            raise InvalidInput(f"{where}[0]", "a step needs at least 1 feature, got 0")
        with np.errstate(over="ignore", invalid="ignore"):
            arr = raw.astype(np.float32)
        _require_finite(arr, where)
        out.append(arr)
    return out


def tokens_from_json(
    value: Any, field_name: str = "tokens", max_steps: int | None = None
) -> list[np.ndarray]:
    """`[[int, …], …]` → one int64 [T] array per sequence (nesting and integer type checked;
    sequences over `max_steps` refused before conversion)."""
    sequences = _require_list(value, field_name, "a list of token sequences")
    out: list[np.ndarray] = []
    for i, seq in enumerate(sequences):
        where = f"{field_name}[{i}]"
        _check_steps(seq, where, max_steps)
        try:
            raw = np.array(seq)
        except (ValueError, TypeError, OverflowError):
            raise _tokens_error(seq, where) from None
        if raw.ndim == 1 and raw.shape[0] == 0:
            raise InvalidInput(where, "a sequence needs at least 1 token, got 0")
        if raw.ndim != 1 or raw.dtype.kind not in "iu":
            raise _tokens_error(seq, where)
        if raw.dtype.kind == "u" and raw.max() > _INT64.max:
            raise _tokens_error(seq, where)
        out.append(raw.astype(np.int64, copy=False))
    return out


def texts_from_json(value: Any, field_name: str = "texts") -> list[str]:
    """`[str, …]` → list of strings (each element's type checked)."""
    texts = _require_list(value, field_name, "a list of strings")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidInput(f"{field_name}[{i}]", f"expected a string, got {_kind(text)}")
    return texts


def _require_list(value: Any, where: str, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidInput(where, f"expected {what}, got {_kind(value)}")
    if not value:
        raise InvalidInput(where, "expected at least 1 sequence, got 0")
    return value


def _require_finite(arr: np.ndarray, where: str) -> None:
    if np.isfinite(arr).all():
        return
    bad = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
    index = "".join(f"[{i}]" for i in bad)
    raise InvalidInput(f"{where}{index}", "value is NaN, infinite or outside the float32 range")


def _kind(value: Any) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _features_error(seq: Any, where: str) -> InvalidInput:
    """The exact first problem of a feature sequence the fast path rejected (slow; errors only)."""
    if not isinstance(seq, list):
        return InvalidInput(where, f"expected a list of steps, got {_kind(seq)}")
    if not seq:
        return InvalidInput(where, "a sequence needs at least 1 step, got 0")
    width: int | None = None
    for t, step in enumerate(seq):
        here = f"{where}[{t}]"
        if not isinstance(step, list):
            return InvalidInput(here, f"expected a list of features, got {_kind(step)}")
        if width is None:
            width = len(step)
        elif len(step) != width:
            return InvalidInput(here, f"expected {width} features, got {len(step)}")
        for f, x in enumerate(step):
            if not _is_number(x):
                return InvalidInput(f"{here}[{f}]", f"expected a number, got {_kind(x)}")
    return InvalidInput(where, "expected a list of steps, each a list of numbers")


def _tokens_error(seq: Any, where: str) -> InvalidInput:
    """The exact first problem of a token sequence the fast path rejected (slow; errors only)."""
    if not isinstance(seq, list):
        return InvalidInput(where, f"expected a list of token ids, got {_kind(seq)}")
    for t, tok in enumerate(seq):
        here = f"{where}[{t}]"
        if isinstance(tok, bool) or not isinstance(tok, int):
            return InvalidInput(here, f"expected an integer token id, got {_kind(tok)}")
        if not _INT64.min <= tok <= _INT64.max:
            return InvalidInput(here, "token id is outside the int64 range")
    return InvalidInput(where, "expected a list of integer token ids")


# ---------------------------------------------------------------- Open Inference Protocol (V2)


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


def parameters_of(spec: dict[str, Any]) -> Any:
    """`spec["parameters"]`, {} when absent or null; any other non-object stays to be refused."""
    params = spec.get("parameters")
    return {} if params is None else params


def split_v2_body(
    body: bytes, header_length: str | None, max_values: int | None = None
) -> tuple[dict[str, Any], bytes]:
    """Split a V2 request body into its JSON header (an object) and the binary tail; a header of
    more than `max_values` JSON values is refused before parsing."""
    if header_length is None:
        head, tail = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            n = -1
        if not 0 <= n <= len(body):
            raise InvalidInput(
                HEADER_LENGTH, f"must be an integer between 0 and the body size ({len(body)})"
            )
        head, tail = body[:n], body[n:]
    header = loads(head, max_values=max_values)
    if not isinstance(header, dict):
        raise InvalidInput("body", f"expected a JSON object, got {_kind(header)}")
    return header, tail


def decode_v2_inputs(header: dict[str, Any], tail: bytes) -> list[V2Tensor]:
    """Decode the `inputs` of a V2 request header, reading binary data from `tail` in order."""
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("inputs", "expected a non-empty list of input tensors")
    offset = 0
    out: list[V2Tensor] = []
    for i, spec in enumerate(inputs):
        where = f"inputs[{i}]"
        if not isinstance(spec, dict):
            raise InvalidInput(where, f"expected an object, got {_kind(spec)}")
        name = spec.get("name")
        datatype = spec.get("datatype")
        shape = spec.get("shape")
        params = parameters_of(spec)
        if not isinstance(name, str):
            raise InvalidInput(f"{where}.name", "expected a string")
        if not isinstance(datatype, str) or (datatype not in V2_DTYPES and datatype != "BYTES"):
            raise InvalidInput(
                f"{where}.datatype", f"expected one of {[*V2_DTYPES, 'BYTES']}, got {datatype!r}"
            )
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape
        ):
            raise InvalidInput(f"{where}.shape", "expected a list of integers")
        count = tensor_elements(shape, where)
        if not isinstance(params, dict):
            raise InvalidInput(f"{where}.parameters", "expected an object")
        size = params.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise InvalidInput(
                    f"{where}.parameters.binary_data_size", "expected a non-negative integer"
                )
            if offset + size > len(tail):
                raise InvalidInput(
                    f"{where}.parameters.binary_data_size",
                    f"{size} bytes announced, only {len(tail) - offset} left in the body",
                )
            raw = tail[offset : offset + size]
            offset += size
            data = functools.partial(_from_binary, raw, datatype, shape, count, where)
        elif "data" in spec:
            data = functools.partial(
                _from_json_data, spec["data"], datatype, shape, count, f"{where}.data"
            )
        else:
            raise InvalidInput(where, "has neither 'data' nor 'parameters.binary_data_size'")
        out.append(V2Tensor(name, datatype, shape, data, params))
    if offset != len(tail):
        raise InvalidInput("body", f"{len(tail) - offset} bytes of binary data were not claimed")
    return out


def _from_binary(
    raw: bytes, datatype: str, shape: list[int], count: int, where: str
) -> np.ndarray | list[bytes]:
    if datatype == "BYTES":
        items = unpack_bytes(raw, f"{where}.parameters.binary_data_size", count)
        if len(items) != count:
            raise InvalidInput(where, f"shape {shape} holds {count} elements, got {len(items)}")
        return items
    dtype = V2_DTYPES[datatype]
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput(
            f"{where}.parameters.binary_data_size",
            f"shape {shape} of {datatype} needs {count * dtype.itemsize} bytes, got {len(raw)}",
        )
    # NOTE: a copy, so that the array owns writable memory (torch.from_numpy warns otherwise).
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def _from_json_data(
    data: Any, datatype: str, shape: list[int], count: int, where: str
) -> np.ndarray | list[bytes]:
    # Triton accepts row-major flattened or nested data; both are flattened here.
    if not isinstance(data, list):
        raise InvalidInput(where, f"expected a list, got {_kind(data)}")
    if datatype == "BYTES":
        flat = _flatten(data, where)
        if len(flat) != count:
            raise InvalidInput(where, f"shape {shape} holds {count} elements, got {len(flat)}")
        out: list[bytes] = []
        for j, item in enumerate(flat):
            if not isinstance(item, str):
                raise InvalidInput(f"{where}[{j}]", f"expected a string, got {_kind(item)}")
            out.append(item.encode())
        return out
    try:
        arr = np.array(data)
    except (ValueError, TypeError, OverflowError):
        raise InvalidInput(where, "nested lists are ragged or hold non-numbers") from None
    allowed = "b" if datatype == "BOOL" else ("iu" if datatype[0] in "IU" else "iuf")
    if arr.size and arr.dtype.kind not in allowed:
        raise InvalidInput(where, f"expected {datatype} values, got {arr.dtype.kind!r} data")
    if arr.size != count:
        raise InvalidInput(where, f"shape {shape} holds {count} elements, got {arr.size}")
    dtype = V2_DTYPES[datatype]
    if dtype.kind in "iu":
        check_int_range(arr, datatype, where)
    # NOTE: floats are cast as they are: one out of FP16's range becomes inf, which the
    # engine refuses (features must be finite).
    with np.errstate(over="ignore", invalid="ignore"):
        return arr.astype(dtype).reshape(shape)


def _flatten(data: list[Any], where: str) -> list[Any]:
    flat: list[Any] = []
    stack: list[Any] = [iter(data)]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            if len(stack) > 8:
                raise InvalidInput(where, "nested deeper than 8 levels")
            stack.append(iter(item))
        else:
            flat.append(item)
    return flat


_END = object()
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


def encode_v2_response(
    header: dict[str, Any], outputs: list[V2Output], binary: set[str]
) -> tuple[bytes, int | None]:
    """Build a V2 response body; outputs named in `binary` go to the binary tail.

    Returns (body, header length) — the header length is None when nothing is binary (plain JSON).
    """
    specs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for out in outputs:
        spec: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        if out.name in binary:
            if isinstance(out.data, list):
                blob = pack_bytes(out.data)
            else:
                blob = np.ascontiguousarray(out.data, dtype=V2_DTYPES[out.datatype]).tobytes()
            spec["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif isinstance(out.data, list):
            spec["data"] = [b.decode("utf-8", errors="replace") for b in out.data]
        else:
            spec["data"] = out.data.reshape(-1)
        specs.append(spec)
    head = dumps({**header, "outputs": specs})
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)
