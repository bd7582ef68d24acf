"""Fast wire codecs of the HTTP front-ends: JSON ↔ numpy, and the V2 binary tensor extension.

JSON is parsed with orjson and nested number lists become numpy arrays in one C call each; the
slow, exact walk that names the offending element (`inputs[2][5]: expected 32 features, got 31`)
runs only after the fast path has failed. Outputs are serialised straight from numpy by orjson.

A large body is first counted (`json_values`, byte counts in C) and refused when it holds more
values than the limit: orjson builds every value as a Python object while holding the GIL, so
the parse itself is what a hostile body costs, in memory and in time the event loop is frozen
(`python -m bench.edge`).

The V2 binary extension (Triton's `Inference-Header-Content-Length`): the body is a JSON header
followed by raw tensors in the order of the header's tensors that carry
`parameters.binary_data_size`; numbers are little-endian, BYTES elements each carry a 4-byte
little-endian length prefix.
"""

from __future__ import annotations

import contextlib
import functools
import gc
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import orjson

from service.core import validation
from service.core.errors import InvalidInput, PayloadTooLarge
from service.inference_protocol import tensors

JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY
HEADER_LENGTH = "Inference-Header-Content-Length"

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
    return _sequences(value, field_name, max_steps, "a list of sequences", _features)


def tokens_from_json(
    value: Any, field_name: str = "tokens", max_steps: int | None = None
) -> list[np.ndarray]:
    """`[[int, …], …]` → one int64 [T] array per sequence (nesting and integer type checked;
    sequences over `max_steps` refused before conversion)."""
    return _sequences(value, field_name, max_steps, "a list of token sequences", _tokens)


def _sequences(
    value: Any,
    field_name: str,
    max_steps: int | None,
    what: str,
    convert: Callable[[np.ndarray | None, Any, str], np.ndarray],
) -> list[np.ndarray]:
    """`convert(array, sequence, field)` of each sequence of a JSON batch; `array` is None when
    numpy cannot make one of it (ragged lists, strings, …)."""
    sequences = _require_list(value, field_name, what)
    out: list[np.ndarray] = []
    for i, seq in enumerate(sequences):
        where = f"{field_name}[{i}]"
        _check_steps(seq, where, max_steps)
        try:
            raw = np.array(seq)
        except (ValueError, TypeError, OverflowError):
            raw = None
        out.append(convert(raw, seq, where))
    return out


def _features(raw: np.ndarray | None, seq: Any, where: str) -> np.ndarray:
    if raw is None or raw.ndim != 2 or raw.dtype.kind not in "iuf":
        raise _features_error(seq, where)
    if raw.shape[0] == 0:
        raise InvalidInput(where, "a sequence needs at least 1 step, got 0")
    if raw.shape[1] == 0:
        raise InvalidInput(f"{where}[0]", "a step needs at least 1 feature, got 0")
    with np.errstate(over="ignore", invalid="ignore"):
        arr = raw.astype(np.float32)
    _require_finite(arr, where)
    return arr


def _tokens(raw: np.ndarray | None, seq: Any, where: str) -> np.ndarray:
    if raw is not None and raw.ndim == 1 and raw.shape[0] == 0:
        raise InvalidInput(where, "a sequence needs at least 1 token, got 0")
    if raw is None or raw.ndim != 1 or raw.dtype.kind not in "iu":
        raise _tokens_error(seq, where)
    if raw.dtype.kind == "u" and raw.max() > _INT64.max:
        raise _tokens_error(seq, where)
    return raw.astype(np.int64, copy=False)


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


def decode_v2_inputs(header: dict[str, Any], tail: bytes) -> list[tensors.V2Tensor]:
    """Decode the `inputs` of a V2 request header, reading binary data from `tail` in order."""
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("inputs", "expected a non-empty list of input tensors")
    offset = 0
    out: list[tensors.V2Tensor] = []
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
        if not isinstance(datatype, str) or (
            datatype not in tensors.V2_DTYPES and datatype != "BYTES"
        ):
            raise InvalidInput(
                f"{where}.datatype",
                f"expected one of {[*tensors.V2_DTYPES, 'BYTES']}, got {datatype!r}",
            )
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape
        ):
            raise InvalidInput(f"{where}.shape", "expected a list of integers")
        count = tensors.tensor_elements(shape, where)
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
        out.append(tensors.V2Tensor(name, datatype, shape, data, params))
    if offset != len(tail):
        raise InvalidInput("body", f"{len(tail) - offset} bytes of binary data were not claimed")
    return out


def _from_binary(
    raw: bytes, datatype: str, shape: list[int], count: int, where: str
) -> np.ndarray | list[bytes]:
    field_name = f"{where}.parameters.binary_data_size"
    if datatype == "BYTES":
        return tensors.bytes_elements(raw, field_name, shape, count)
    size = count * tensors.V2_DTYPES[datatype].itemsize
    if len(raw) != size:
        raise InvalidInput(
            field_name, f"shape {shape} of {datatype} needs {size} bytes, got {len(raw)}"
        )
    return tensors.raw_array(raw, datatype, shape)


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
    dtype = tensors.V2_DTYPES[datatype]
    if dtype.kind in "iu":
        tensors.check_int_range(arr, datatype, where)
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


def encode_v2_response(
    header: dict[str, Any], outputs: list[tensors.V2Output], binary: set[str]
) -> tuple[bytes, int | None]:
    """Build a V2 response body; outputs named in `binary` go to the binary tail.

    Returns (body, header length) — the header length is None when nothing is binary (plain JSON).
    """
    specs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for out in outputs:
        spec: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        if out.name in binary:
            blob = tensors.raw_contents(out)
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
