"""rnnserve's gRPC API (rnnserve.v1) on the client side: messages, answers, errors, channels.

Pure functions and constants: the sync and async clients (client.py, aio.py) make the calls.
"""

from __future__ import annotations

import json
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format

from rnnserve_client import errors
from rnnserve_client._http import retry_after
from rnnserve_client._inputs import Batch, Chunk, token_bytes, token_text
from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve_client.results import (
    ChunkResult,
    EncodeResult,
    GeneratedOutput,
    GenerateResult,
    ModelInfo,
    TokenEvent,
    VersionInfo,
)


def channel_options(load_balancing: str | None) -> list[tuple[str, Any]]:
    """Channel options: no client-side message limit (the server enforces its own, 64 MiB by
    default, where gRPC's default would refuse answers over 4 MiB), and optionally a
    load-balancing policy (`round_robin` over every address a DNS name resolves to)."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", -1),
        ("grpc.max_send_message_length", -1),
    ]
    if load_balancing is not None:
        config: dict[str, Any] = {"loadBalancingConfig": [{load_balancing: {}}]}
        options.append(("grpc.service_config", json.dumps(config)))
    return options


def target(host: str, port: int, load_balancing: str | None) -> str:
    """The channel target: `dns:///host:port` when balancing over DNS, else `host:port`."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"dns:///{address}" if load_balancing is not None else address


def _float_array(array: np.ndarray) -> pb.FloatArray:
    return pb.FloatArray(shape=array.shape, values=array.ravel().tolist())


def _fill(message: pb.EncodeRequest | pb.GenerateRequest, batch: Batch) -> None:
    if batch.kind == "texts":
        message.texts.texts.extend(batch.items)
    elif batch.kind == "tokens":
        message.tokens.sequences.extend(pb.TokenSequence(ids=ids.tolist()) for ids in batch.items)
    else:
        message.inputs.sequences.extend(_float_array(x) for x in batch.items)


def encode_request(
    model: str, batch: Batch, pooling: str | None, version: int | None
) -> pb.EncodeRequest:
    """An Encode message."""
    message = pb.EncodeRequest(model=model, pooling=pooling or "")
    if version is not None:
        message.version = version
    _fill(message, batch)
    return message


def generate_request(
    model: str,
    batch: Batch,
    max_length: int | None,
    beam_size: int | None,
    version: int | None,
) -> pb.GenerateRequest:
    """A Generate / GenerateStream message."""
    message = pb.GenerateRequest(model=model, max_length=max_length or 0, beam_size=beam_size or 0)
    if version is not None:
        message.version = version
    _fill(message, batch)
    return message


def session_chunk(chunk: Chunk) -> pb.SessionChunk:
    """A chunk of a session or stream."""
    if chunk.kind == "text":
        return pb.SessionChunk(text=chunk.value)
    if chunk.kind == "tokens":
        return pb.SessionChunk(tokens=pb.TokenSequence(ids=chunk.value.tolist()))
    return pb.SessionChunk(inputs=_float_array(chunk.value))


def stream_request(
    model: str,
    chunk: Chunk,
    pooling: str | None,
    state_token: str | bytes | None,
    version: int | None,
) -> pb.StreamChunkRequest:
    """A StreamChunk message."""
    message = pb.StreamChunkRequest(
        model=model,
        pooling=pooling or "",
        state_token=b"" if state_token is None else token_bytes(state_token),
        chunk=session_chunk(chunk),
    )
    if version is not None:
        message.version = version
    return message


def session_open(
    model: str,
    pooling: str | None,
    return_state: bool,
    state_token: str | bytes | None,
    version: int | None,
) -> pb.SessionRequest:
    """The first message of a StreamSession."""
    opening = pb.SessionOpen(
        model=model,
        pooling=pooling or "",
        return_state=return_state,
        state_token=b"" if state_token is None else token_bytes(state_token),
    )
    if version is not None:
        opening.version = version
    return pb.SessionRequest(open=opening)


# --- answers ------------------------------------------------------------------------------------


def array(message: pb.FloatArray) -> Any:
    """A FloatArray as float32 numpy of its shape."""
    return np.asarray(message.values, dtype=np.float32).reshape(tuple(message.shape))


def encode_result(answer: pb.EncodeResponse, pooling: str | None) -> EncodeResult:
    """An EncodeResponse."""
    encodings = [array(e) for e in answer.encodings]
    scores = [array(s) for s in answer.scores]
    return EncodeResult(
        model=answer.model,
        version=answer.version,
        encodings=encodings if pooling == "none" else _stack(encodings),
        labels=list(answer.labels) if answer.labels else None,
        scores=_stack(scores) if scores else None,
    )


def _stack(rows: list[Any]) -> Any:
    return np.stack(rows) if rows else np.zeros((0, 0), dtype=np.float32)


def generate_result(answer: pb.GenerateResponse) -> GenerateResult:
    """A GenerateResponse."""
    return GenerateResult(
        model=answer.model,
        version=answer.version,
        outputs=[
            GeneratedOutput(list(o.tokens), o.text if o.HasField("text") else None)
            for o in answer.outputs
        ],
    )


def stream_event(message: pb.GenerateStreamResponse) -> TokenEvent | GenerateResult:
    """One message of GenerateStream: a token, or the result (last)."""
    if message.HasField("token"):
        token = message.token
        return TokenEvent(token.index, token.token, token.text if token.HasField("text") else None)
    return generate_result(message.result)


def chunk_result(answer: pb.SessionChunkResult) -> ChunkResult:
    """A SessionChunkResult."""
    return ChunkResult(
        model=answer.model,
        version=answer.version,
        steps=answer.steps,
        encoding=array(answer.encoding),
        scores=np.asarray(answer.scores, dtype=np.float32) if answer.scores else None,
        label=answer.label if answer.HasField("label") else None,
        state_token=token_text(answer.state_token) if answer.state_token else None,
    )


def _whole_numbers(value: Any) -> Any:
    # NOTE: a protobuf Struct holds every number as a double; the REST answer has integers.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    return value


def model_info(answer: pb.ModelInfo) -> ModelInfo:
    """A ModelInfo message."""
    return ModelInfo(
        name=answer.name,
        versions=[
            VersionInfo(
                v.version,
                v.state,
                v.reason or None,
                v.load_seconds if v.HasField("load_seconds") else None,
            )
            for v in answer.versions
        ],
        architecture=_whole_numbers(json_format.MessageToDict(answer.architecture)),
    )


# --- errors -------------------------------------------------------------------------------------

_BY_CODE: dict[grpc.StatusCode, type[errors.RnnserveError]] = {
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidInput,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.FAILED_PRECONDITION: errors.Conflict,
    grpc.StatusCode.INTERNAL: errors.ComputeError,
}


def error_of(url: str, error: grpc.RpcError) -> errors.RnnserveError:
    """The client error of a failed call: the class the server named in the trailing metadata
    (else the status code's), with the server's message."""
    code: grpc.StatusCode = error.code()
    message = error.details() or code.name
    trailing = dict(error.trailing_metadata() or ())
    named = trailing.get("rnnserve-error-type")
    where = {"url": url, "code": code.name}
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        if "retry-after" in trailing or named == "Overloaded":
            return errors.Overloaded(
                message,
                retry_after_s=retry_after(trailing.get("retry-after")),
                url=url,
                code=code.name,
            )
        # NOTE: gRPC's own "message larger than max" is no load: retrying cannot help.
        return errors.InvalidInput(message, url=url, code=code.name)
    if code == grpc.StatusCode.CANCELLED:
        # NOTE: not cancelled by this client (that never reaches here): a server that is
        # stopping cancels calls it had not started; they were never computed.
        return errors.Draining(f"the server cancelled the call ({message})", **where)
    if named is None and code == grpc.StatusCode.UNAVAILABLE:
        return errors.ConnectionFailed(message, **where)
    cls = errors.BY_TYPE.get(str(named), _BY_CODE.get(code, errors.ServerError))
    if issubclass(cls, errors.InvalidInput):
        field = trailing.get("rnnserve-error-field")
        return errors.InvalidInput(message, field=field, url=url, code=code.name)
    return cls(message, **where)
