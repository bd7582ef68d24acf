"""Converters at the gRPC edge: protobuf ↔ the core's typed requests and results.

rnnserve.v1 messages (FloatArray floats through their packed wire bytes), and Open Inference
Protocol (V2) tensors: typed contents or raw little-endian bytes. Only wire structure is checked
here (shapes, counts, datatypes); what V2 tensors mean is service/inference_protocol/requests.py's
(shared with V2 over HTTP), and sequence contents are validated by the engine.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from google.protobuf import struct_pb2

from rnnserve_client.proto.inference import grpc_service_pb2 as v2
from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2 as pb
from service.core import errors, limits, types
from service.grpc_api.protobuf_wire import (
    LENGTH_DELIMITED,
    Malformed,
    read_varint,
    tag,
    write_varint,
)
from service.grpc_api.raw_messages import RawEncodeRequest, float32_values
from service.inference_protocol.requests import requested_outputs
from service.inference_protocol.tensors import (
    V2_DTYPES,
    TensorData,
    V2Output,
    V2Tensor,
    bytes_elements,
    check_int_range,
    raw_array,
    raw_contents,
    tensor_elements,
)

# -- rnnserve.v1 --

# NOTE: FloatArray's floats go through their packed wire bytes (proto3 packs repeated scalars:
# a length-delimited field of little-endian float32s), copied in C instead of one Python float
# per element; any other layout falls back to the element-wise path.
_SHAPE_TAG = tag(1, LENGTH_DELIMITED)
_VALUES_TAG = tag(2, LENGTH_DELIMITED)


def float_values(array: pb.FloatArray) -> np.ndarray:
    """`array.values` as a flat, writable float32 array."""
    data = array.SerializeToString()
    pos, end = 0, len(data)
    try:
        while pos < end:
            key, pos = read_varint(data, pos, end)
            if key & 7 != LENGTH_DELIMITED:
                break
            length, pos = read_varint(data, pos, end)
            if key == _VALUES_TAG and length % 4 == 0:
                return np.frombuffer(data, "<f4", length // 4, pos).astype(np.float32)
            pos += length
    except Malformed:
        pass
    return np.array(array.values, dtype=np.float32)


def float_array(array: np.ndarray) -> pb.FloatArray:
    """A FloatArray of a numpy array (shape and row-major float32 values)."""
    shape = b"".join(write_varint(int(d)) for d in array.shape)
    values = np.ascontiguousarray(array, dtype="<f4").tobytes()
    data = bytes([_SHAPE_TAG]) + write_varint(len(shape)) + shape if shape else b""
    if values:
        data += bytes([_VALUES_TAG]) + write_varint(len(values)) + values
    return pb.FloatArray.FromString(data)


def _check_feature_shape(shape: Sequence[int], count: int, field: str) -> None:
    """InvalidInput unless `shape` is [time, features] and holds `count` numbers."""
    if len(shape) != 2:
        raise errors.InvalidInput(f"{field}.shape", f"must be [time, features], got {list(shape)}")
    if shape[0] * shape[1] != count:
        raise errors.InvalidInput(
            f"{field}.values",
            f"has {count} numbers but shape {list(shape)} needs {shape[0] * shape[1]}",
        )


def feature_sequence(array: pb.FloatArray, field: str) -> np.ndarray:
    """One feature sequence, float32 [time, features], of a FloatArray (`field` names it)."""
    _check_feature_shape(array.shape, len(array.values), field)
    return float_values(array).reshape(array.shape[0], array.shape[1])


def _sequences(
    message: pb.EncodeRequest | pb.GenerateRequest,
) -> tuple[list[types.SequenceData], types.InputKind]:
    which = message.WhichOneof("input")
    if which == "inputs":
        sequences = message.inputs.sequences
        return [feature_sequence(a, f"inputs[{i}]") for i, a in enumerate(sequences)], "features"
    if which == "tokens":
        ids: list[types.SequenceData] = [
            np.array(s.ids, dtype=np.int64) for s in message.tokens.sequences
        ]
        return ids, "tokens"
    if which == "texts":
        return list(message.texts.texts), "text"
    raise errors.InvalidInput("input", "one of 'inputs', 'tokens' or 'texts' is required")


def optional_version(message: Any, field: str = "version") -> int | None:
    """A v1 message's `optional uint32 version`: None when unset (the newest READY version);
    an explicit 0 is refused, as REST refuses the path version 0."""
    return _positive_version(int(message.version) if message.HasField("version") else None, field)


def _positive_version(version: int | None, field: str) -> int | None:
    if version is not None and version < 1:
        raise errors.InvalidInput(field, "must be a positive integer, got 0")
    return version


def request_timeout(timeout_ms: int, deadline_s: float | None) -> float | None:
    """Seconds: the tighter of a message's timeout_ms (0: unset, as proto3 sends it) and the
    call's remaining gRPC deadline."""
    return limits.timeout_seconds(timeout_ms or None, deadline_s)


def pooling_from_proto(value: str) -> types.Pooling | None:
    """The pooling a message names ("": the model's default)."""
    if not value:
        return None
    if value not in types.POOLINGS:
        raise errors.InvalidInput(
            "pooling", f"{errors.shown(value)} is not one of {', '.join(types.POOLINGS)}"
        )
    return value


def _request_of(
    message: pb.EncodeRequest | pb.GenerateRequest, deadline_s: float | None
) -> tuple[str, list[types.SequenceData], types.InputKind, int | None, float | None]:
    """What every request of sequences has (`SequencesRequest`'s fields, in order)."""
    sequences, kind = _sequences(message)
    version = optional_version(message)
    return message.model, sequences, kind, version, request_timeout(message.timeout_ms, deadline_s)


def encode_request_from_proto(
    message: pb.EncodeRequest,
    deadline_s: float | None = None,
    answer_limit: types.AnswerLimit | None = None,
) -> types.EncodeRequest:
    """Build the core's EncodeRequest; `deadline_s` is the call's remaining gRPC deadline,
    `answer_limit` the largest answer the call may send."""
    pooling = pooling_from_proto(message.pooling)
    return types.EncodeRequest(
        *_request_of(message, deadline_s), pooling=pooling, answer_limit=answer_limit
    )


def encode_request_from_raw(
    raw: RawEncodeRequest,
    deadline_s: float | None = None,
    answer_limit: types.AnswerLimit | None = None,
) -> types.EncodeRequest:
    """`encode_request_from_proto` of a request read from its wire bytes (raw_messages.py):
    the same request, or the same error."""
    pooling = pooling_from_proto(raw.pooling)
    sequences: list[types.SequenceData] = []
    for i, (shape, offset, count) in enumerate(raw.sequences):
        if len(shape) != 2 or shape[0] * shape[1] != count:
            _check_feature_shape(shape, count, f"inputs[{i}]")
        sequences.append(float32_values(raw.data, offset, count).reshape(shape[0], shape[1]))
    return types.EncodeRequest(
        raw.model,
        sequences,
        "features",
        _positive_version(raw.version, "version"),
        request_timeout(raw.timeout_ms, deadline_s),
        pooling=pooling,
        answer_limit=answer_limit,
    )


def encode_result_to_proto(result: types.EncodeResult) -> pb.EncodeResponse:
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
    message: pb.GenerateRequest, deadline_s: float | None = None
) -> types.GenerateRequest:
    """Build the core's GenerateRequest (beam_size 0 means greedy, max_length 0 the default)."""
    return types.GenerateRequest(
        *_request_of(message, deadline_s),
        max_length=message.max_length or None,
        beam_size=max(1, message.beam_size),
    )


def generate_result_to_proto(result: types.GenerateResult) -> pb.GenerateResponse:
    """The GenerateResponse of a core GenerateResult."""
    return pb.GenerateResponse(
        model=result.model,
        version=result.version,
        outputs=[pb.GeneratedSequence(tokens=o.tokens, text=o.text) for o in result.outputs],
    )


def stream_event_to_proto(
    event: types.TokenEvent | types.GenerateResult,
) -> pb.GenerateStreamResponse:
    """One GenerateStream message: a token as produced, or the final result."""
    if isinstance(event, types.TokenEvent):
        token = pb.TokenEvent(index=event.index, token=event.token, text=event.text)
        return pb.GenerateStreamResponse(token=token)
    return pb.GenerateStreamResponse(result=generate_result_to_proto(event))


def model_info_to_proto(info: types.ModelInfo) -> pb.ModelInfo:
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


# -- Open Inference Protocol (V2) tensors --

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
        return functools.partial(bytes_elements, data, field, shape, count)
    size = count * V2_DTYPES[datatype].itemsize
    if len(data) != size:
        raise errors.InvalidInput(
            field, f"has {len(data)} bytes but {datatype} {list(shape)} needs {size}"
        )
    return functools.partial(raw_array, data, datatype, shape)


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


def plain_parameters(
    parameters: Mapping[str, v2.InferParameter], keep_unset: bool = False
) -> dict[str, Any]:
    """V2 parameters as plain values (bool, int, float or str); one with no value set is left
    out, or kept as None with `keep_unset`."""
    values: dict[str, Any] = {}
    for name, param in parameters.items():
        which = param.WhichOneof("parameter_choice")
        if which is not None or keep_unset:
            values[name] = getattr(param, which) if which is not None else None
    return values


def v2_infer_response(
    request: v2.ModelInferRequest, version: int, outputs: list[V2Output]
) -> v2.ModelInferResponse:
    """A V2 response with the requested outputs (all when none named), as raw contents."""
    chosen = requested_outputs(outputs, [o.name for o in request.outputs])
    response = v2.ModelInferResponse(
        model_name=request.model_name, model_version=str(version), id=request.id
    )
    for output in chosen:
        response.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
        response.raw_output_contents.append(raw_contents(output))
    return response
