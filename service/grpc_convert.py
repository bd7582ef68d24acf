"""Converters at the gRPC edge: protobuf ↔ the core's typed requests and results.

Three parts: the error table (core error → gRPC status code), rnnserve.v1 messages, and Open
Inference Protocol (V2) tensors — typed contents or raw little-endian bytes, BYTES elements with
4-byte little-endian length prefixes. Only wire structure is checked here (shapes, counts,
datatypes); what V2 tensors mean is decided in service/v2_common.py (shared with V2 REST), and
sequence contents are validated by the engine.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Iterable
from typing import Any, Literal, cast

import grpc
import numpy as np
from google.protobuf import struct_pb2

from models.config import ModelConfig
from rnnserve_client.proto.inference import grpc_service_pb2 as v2
from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2 as pb
from service import errors, v2_common, validation
from service.codecs import (
    V2_DTYPES,
    TensorData,
    V2Output,
    V2Tensor,
    check_int_range,
    pack_bytes,
    tensor_elements,
)
from service.types import (
    AnswerLimit,
    EncodeRequest,
    EncodeResult,
    GenerateRequest,
    GenerateResult,
    InputKind,
    ModelInfo,
    Protocol,
    TokenEvent,
)
from service.types import Sequence as Seq

# --- errors -----------------------------------------------------------------------------------

# NOTE: chosen from gRPC's own code semantics, not derived from the HTTP table.
GRPC_STATUS: dict[type[errors.ServiceError], grpc.StatusCode] = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotReady: grpc.StatusCode.UNAVAILABLE,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Draining: grpc.StatusCode.UNAVAILABLE,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Conflict: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ComputeError: grpc.StatusCode.INTERNAL,
}


def grpc_status(error: errors.ServiceError) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and client-safe message of a core error."""
    for cls in type(error).__mro__:
        code = GRPC_STATUS.get(cast(type[errors.ServiceError], cls))
        if code is not None:
            return code, error.message
    return grpc.StatusCode.INTERNAL, error.message


# --- rnnserve.v1 ------------------------------------------------------------------------------

_POOLINGS = validation.POOLINGS
PoolingName = Literal["last", "mean", "max", "none"]


# NOTE: FloatArray's floats go through their packed wire bytes (proto3 packs repeated scalars:
# a length-delimited field of little-endian float32s) instead of one Python float per element,
# ~30x faster; any other layout falls back to the element-wise path.
_VALUES_TAG = 2 << 3 | 2  # field 2 (values), wire type 2 (length-delimited)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def float_values(array: pb.FloatArray) -> np.ndarray:
    """`array.values` as a flat, writable float32 array."""
    data = array.SerializeToString()
    pos = 0
    while pos < len(data):
        tag, pos = _varint(data, pos)
        if tag & 7 != 2:
            return np.array(array.values, dtype=np.float32)
        length, pos = _varint(data, pos)
        if tag == _VALUES_TAG and length % 4 == 0:
            return np.frombuffer(data, "<f4", length // 4, pos).astype(np.float32)
        pos += length
    return np.array(array.values, dtype=np.float32)


def float_array(array: np.ndarray) -> pb.FloatArray:
    """A FloatArray of a numpy array (shape and row-major float32 values)."""
    shape = b"".join(_encode_varint(int(d)) for d in array.shape)
    values = np.ascontiguousarray(array, dtype="<f4").tobytes()
    data = b"\x0a" + _encode_varint(len(shape)) + shape if shape else b""
    if values:
        data += bytes([_VALUES_TAG]) + _encode_varint(len(values)) + values
    return pb.FloatArray.FromString(data)


def _feature_sequence(index: int, array: pb.FloatArray) -> np.ndarray:
    field = f"inputs[{index}]"
    if len(array.shape) != 2:
        raise errors.InvalidInput(
            f"{field}.shape", f"must be [time, features], got {list(array.shape)}"
        )
    if array.shape[0] * array.shape[1] != len(array.values):
        raise errors.InvalidInput(
            f"{field}.values",
            f"has {len(array.values)} numbers but shape {list(array.shape)} needs "
            f"{array.shape[0] * array.shape[1]}",
        )
    return float_values(array).reshape(array.shape[0], array.shape[1])


def _sequences(message: pb.EncodeRequest | pb.GenerateRequest) -> tuple[list[Seq], InputKind]:
    which = message.WhichOneof("input")
    if which == "inputs":
        return [_feature_sequence(i, a) for i, a in enumerate(message.inputs.sequences)], "features"
    if which == "tokens":
        seqs: list[Seq] = [np.array(s.ids, dtype=np.int64) for s in message.tokens.sequences]
        return seqs, "tokens"
    if which == "texts":
        return list(message.texts.texts), "text"
    raise errors.InvalidInput("input", "one of 'inputs', 'tokens' or 'texts' is required")


def optional_version(message: Any, field: str = "version") -> int | None:
    """A v1 message's `optional uint32 version`: None when unset (the newest READY version);
    an explicit 0 is refused, as REST refuses the path version 0."""
    if not message.HasField("version"):
        return None
    if message.version < 1:
        raise errors.InvalidInput(field, "must be a positive integer, got 0")
    return int(message.version)


def request_timeout(timeout_ms: int, deadline_s: float | None) -> float | None:
    """Seconds: the tighter of a message's timeout_ms (0: unset, as proto3 sends it; else within
    the wires' one limit) and the call's remaining gRPC deadline."""
    if timeout_ms:
        validation.check_timeout_ms(timeout_ms)
    return validation.tighter_timeout(timeout_ms / 1000.0 if timeout_ms else None, deadline_s)


def encode_request_from_proto(
    message: pb.EncodeRequest,
    deadline_s: float | None = None,
    protocol: Protocol = "grpc",
    answer_limit: AnswerLimit | None = None,
) -> EncodeRequest:
    """Build the core's EncodeRequest; `deadline_s` is the call's remaining gRPC deadline,
    `answer_limit` the largest answer the call may send."""
    if message.pooling and message.pooling not in _POOLINGS:
        raise errors.InvalidInput(
            "pooling", f"{errors.shown(message.pooling)} is not one of {', '.join(_POOLINGS)}"
        )
    sequences, kind = _sequences(message)
    return EncodeRequest(
        model=message.model,
        sequences=sequences,
        kind=kind,
        version=optional_version(message),
        pooling=cast(PoolingName, message.pooling) if message.pooling else None,
        timeout_s=request_timeout(message.timeout_ms, deadline_s),
        protocol=protocol,
        answer_limit=answer_limit,
    )


def encode_result_to_proto(result: EncodeResult) -> pb.EncodeResponse:
    """The EncodeResponse of a core EncodeResult."""
    encodings = result.encodings if isinstance(result.encodings, list) else list(result.encodings)
    return pb.EncodeResponse(
        model=result.model,
        version=result.version,
        encodings=[float_array(np.asarray(e)) for e in encodings],
        labels=result.labels or [],
        scores=[] if result.scores is None else [float_array(row) for row in result.scores],
    )


def generate_request_from_proto(
    message: pb.GenerateRequest,
    deadline_s: float | None = None,
    protocol: Protocol = "grpc",
    endpoint: str = "generate",
) -> GenerateRequest:
    """Build the core's GenerateRequest (beam_size 0 means greedy, max_length 0 the default)."""
    sequences, kind = _sequences(message)
    return GenerateRequest(
        model=message.model,
        sequences=sequences,
        kind=kind,
        version=optional_version(message),
        max_length=message.max_length or None,
        beam_size=max(1, message.beam_size),
        timeout_s=request_timeout(message.timeout_ms, deadline_s),
        protocol=protocol,
        endpoint=endpoint,
    )


def generate_result_to_proto(result: GenerateResult) -> pb.GenerateResponse:
    """The GenerateResponse of a core GenerateResult."""
    return pb.GenerateResponse(
        model=result.model,
        version=result.version,
        outputs=[pb.GeneratedSequence(tokens=o.tokens, text=o.text) for o in result.outputs],
    )


def stream_event_to_proto(event: TokenEvent | GenerateResult) -> pb.GenerateStreamResponse:
    """One GenerateStream message: a token as produced, or the final result."""
    if isinstance(event, TokenEvent):
        token = pb.TokenEvent(index=event.index, token=event.token, text=event.text)
        return pb.GenerateStreamResponse(token=token)
    return pb.GenerateStreamResponse(result=generate_result_to_proto(event))


def model_info_to_proto(info: ModelInfo) -> pb.ModelInfo:
    """The ModelInfo message of the core's ModelInfo (architecture as a Struct)."""
    architecture = struct_pb2.Struct()
    architecture.update(info.architecture)
    return pb.ModelInfo(
        name=info.name,
        versions=[
            pb.VersionInfo(
                version=v.version, state=v.state, reason=v.reason or "", load_seconds=v.load_seconds
            )
            for v in info.versions
        ],
        architecture=architecture,
    )


# --- Open Inference Protocol (V2) tensors -----------------------------------------------------

# The InferTensorContents field of each datatype (FP16 has none: raw contents only).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_LENGTH = struct.Struct("<I")


def decode_bytes(raw: bytes, count: int, field: str) -> list[bytes]:
    """Split raw BYTES contents: `count` elements, each a 4-byte LE length and its bytes."""
    items: list[bytes] = []
    offset = 0
    view = memoryview(raw)
    for i in range(count):
        if offset + 4 > len(raw):
            raise errors.InvalidInput(field, f"BYTES contents end before element {i} of {count}")
        (size,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise errors.InvalidInput(field, f"BYTES element {i} claims {size} bytes past the end")
        items.append(bytes(view[offset : offset + size]))
        offset += size
    if offset != len(raw):
        raise errors.InvalidInput(field, f"{len(raw) - offset} bytes left after {count} elements")
    return items


def encode_bytes(items: Iterable[bytes]) -> bytes:
    """Raw BYTES contents: each element prefixed by its 4-byte little-endian length."""
    return pack_bytes(items)


def decode_v2_inputs(request: v2.ModelInferRequest) -> list[V2Tensor]:
    """Every input tensor of a V2 request (raw or typed contents) in the request's order; shapes
    and sizes are checked here, the data is decoded on first use (`V2Tensor.data`)."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise errors.InvalidInput(
            "raw_input_contents",
            f"has {len(raw)} entries but the request has {len(request.inputs)} inputs",
        )
    tensors: list[V2Tensor] = []
    for i, tensor in enumerate(request.inputs):
        field = f"inputs[{i}]"
        shape = tuple(tensor.shape)
        count = tensor_elements(shape, field)
        datatype = tensor.datatype
        if datatype != "BYTES" and datatype not in V2_DTYPES:
            raise errors.InvalidInput(
                f"{field}.datatype", f"unknown datatype {errors.shown(datatype)}"
            )
        data: Callable[[], TensorData]
        if raw:
            data = _raw_decoder(raw[i], datatype, shape, count, i)
        else:
            data = _contents_decoder(tensor.contents, datatype, shape, count, field)
        tensors.append(V2Tensor(tensor.name, datatype, list(shape), data))
    return tensors


def _raw_decoder(
    data: bytes, datatype: str, shape: tuple[int, ...], count: int, index: int
) -> Callable[[], TensorData]:
    field = f"raw_input_contents[{index}]"
    if datatype == "BYTES":
        return functools.partial(decode_bytes, data, count, field)
    dtype = V2_DTYPES[datatype]
    if len(data) != count * dtype.itemsize:
        raise errors.InvalidInput(
            field,
            f"has {len(data)} bytes but {datatype} {list(shape)} needs {count * dtype.itemsize}",
        )
    return functools.partial(_from_raw, data, dtype, shape)


def _from_raw(data: bytes, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
    # NOTE: copy so the array is writable and native-endian (torch refuses read-only buffers).
    return (
        np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("="), copy=True).reshape(shape)
    )


def _contents_decoder(
    contents: v2.InferTensorContents, datatype: str, shape: tuple[int, ...], count: int, field: str
) -> Callable[[], TensorData]:
    name = _CONTENTS_FIELD.get(datatype)
    if name is None:
        raise errors.InvalidInput(f"{field}.datatype", f"{datatype} needs raw_input_contents")
    values = getattr(contents, name)
    if len(values) != count:
        raise errors.InvalidInput(
            f"{field}.contents.{name}",
            f"has {len(values)} elements but shape {list(shape)} needs {count}",
        )
    return functools.partial(_from_contents, values, name, datatype, shape, field)


def _from_contents(
    values: Any, name: str, datatype: str, shape: tuple[int, ...], field: str
) -> TensorData:
    if datatype == "BYTES":
        return list(values)
    dtype = V2_DTYPES[datatype].newbyteorder("=")
    if dtype.kind in "iu":
        # NOTE: INT8/16 and UINT8/16 travel in 32-bit fields: read them wide, check, then narrow.
        wide = np.array(values, dtype=np.uint64 if name == "uint64_contents" else np.int64)
        check_int_range(wide, datatype, f"{field}.data")
        return wide.astype(dtype, copy=False).reshape(shape)
    return np.array(values, dtype=dtype).reshape(shape)


def v2_parameters(request: v2.ModelInferRequest) -> dict[str, Any]:
    """The request's parameters as plain values (bool, int, float or str)."""
    values: dict[str, Any] = {}
    for name, param in request.parameters.items():
        which = param.WhichOneof("parameter_choice")
        if which is not None:
            values[name] = getattr(param, which)
    return values


def v2_infer_request(
    request: v2.ModelInferRequest,
    config: ModelConfig,
    version: int,
    deadline_s: float | None,
    *,
    limit: int,
    protocol: Protocol = "v2-grpc",
    endpoint: str = "infer",
    answer_limit: AnswerLimit | None = None,
) -> EncodeRequest | GenerateRequest:
    """The engine's request of a V2 infer request (at most `limit` sequences; parameters and
    `answer_limit` as `v2_common.infer_request`)."""
    kind, sequences = v2_common.infer_sequences(decode_v2_inputs(request), config, limit)
    return v2_common.infer_request(
        request.model_name,
        version,
        config,
        kind,
        sequences,
        v2_parameters(request),
        protocol,
        endpoint=endpoint,
        deadline_s=deadline_s,
        answer_limit=answer_limit,
    )


def v2_infer_response(
    request: v2.ModelInferRequest, version: int, outputs: list[V2Output]
) -> v2.ModelInferResponse:
    """A V2 response with the requested outputs (all when none named), as raw contents."""
    chosen = v2_common.requested_outputs(outputs, [o.name for o in request.outputs])
    response = v2.ModelInferResponse(
        model_name=request.model_name, model_version=str(version), id=request.id
    )
    for output in chosen:
        if isinstance(output.data, list):
            data = encode_bytes(output.data)
        else:
            data = np.ascontiguousarray(output.data, dtype=V2_DTYPES[output.datatype]).tobytes()
        response.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
        response.raw_output_contents.append(data)
    return response


def decode_v2_outputs(response: v2.ModelInferResponse) -> dict[str, V2Tensor]:
    """Decode a V2 response's outputs (raw or typed) by name; the inverse of
    `v2_infer_response`."""
    request = v2.ModelInferRequest(raw_input_contents=response.raw_output_contents)
    for output in response.outputs:
        request.inputs.add(
            name=output.name, datatype=output.datatype, shape=output.shape, contents=output.contents
        )
    return {tensor.name: tensor for tensor in decode_v2_inputs(request)}
