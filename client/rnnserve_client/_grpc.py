"""rnnserve's gRPC API (rnnserve.v1) on the client side: messages, answers, errors, channels —
no I/O.

A call is a `Request`: which RPC, its message, and how its answer reads. The sync and async
transports (client.py, aio.py) make the call with grpc or grpc.aio and hand the answer back here.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, TypeVar

import grpc
import numpy as np
from google.protobuf import json_format

from rnnserve_client import _inputs, errors, results
from rnnserve_client._http import retry_after, timeout_ms
from rnnserve_client._retry import Address
from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2 as pb

T = TypeVar("T")


@dataclass(frozen=True)
class Request(Generic[T]):
    """One call of rnnserve.v1.RnnServe: the RPC's name on the stub, its (first) message, and
    how its answer reads (a stream's `read` reads its result)."""

    rpc: str
    message: Any
    read: Callable[[Any], T]


def metadata(headers: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """Headers as call metadata (gRPC keys are lower case)."""
    return tuple((key.lower(), value) for key, value in headers.items())


def channel_args(address: Address, load_balancing: str | None) -> tuple[str, list[Any]]:
    """A channel's target and options: no client-side message limit (the server enforces its
    own, 64 MiB by default, where gRPC's default would refuse answers over 4 MiB), and
    optionally a load-balancing policy (`round_robin` over every address a DNS name resolves
    to, the target then being `dns:///host:port`)."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", -1),
        ("grpc.max_send_message_length", -1),
    ]
    target = address.netloc
    if load_balancing is None:
        return target, options
    config: dict[str, Any] = {"loadBalancingConfig": [{load_balancing: {}}]}
    return f"dns:///{target}", [*options, ("grpc.service_config", json.dumps(config))]


def _float_array(array: np.ndarray) -> pb.FloatArray:
    return pb.FloatArray(shape=array.shape, values=array.ravel().tolist())


def _token(state_token: str | bytes | None) -> bytes:
    return b"" if state_token is None else _inputs.token_bytes(state_token)


def _with_version(message: Any, version: int | None) -> Any:
    if version is not None:
        message.version = version
    return message


def _fill(message: pb.EncodeRequest | pb.GenerateRequest, batch: _inputs.Batch) -> None:
    if batch.kind == "texts":
        message.texts.texts.extend(batch.items)
    elif batch.kind == "tokens":
        message.tokens.sequences.extend(pb.TokenSequence(ids=ids.tolist()) for ids in batch.items)
    else:
        message.inputs.sequences.extend(_float_array(x) for x in batch.items)


def encode(asked: _inputs.EncodeArgs) -> Request[results.EncodeResult]:
    """Encode."""
    message = pb.EncodeRequest(model=asked.model, pooling=asked.pooling or "")
    _fill(_with_version(message, asked.version), asked.batch)
    return Request("Encode", message, partial(encode_result, pooling=asked.pooling))


def generate(asked: _inputs.GenerateArgs, stream: bool = False) -> Request[results.GenerateResult]:
    """Generate, or GenerateStream with `stream`."""
    message = pb.GenerateRequest(
        model=asked.model, max_length=asked.max_length or 0, beam_size=asked.beam_size or 0
    )
    _fill(_with_version(message, asked.version), asked.batch)
    return Request("GenerateStream" if stream else "Generate", message, generate_result)


def _session_chunk(chunk: _inputs.Chunk) -> pb.SessionChunk:
    if chunk.kind == "text":
        return pb.SessionChunk(text=chunk.value)
    if chunk.kind == "tokens":
        return pb.SessionChunk(tokens=pb.TokenSequence(ids=chunk.value.tolist()))
    return pb.SessionChunk(inputs=_float_array(chunk.value))


def stream(asked: _inputs.StreamArgs) -> Request[results.ChunkResult]:
    """StreamChunk."""
    message = pb.StreamChunkRequest(
        model=asked.model,
        pooling=asked.pooling or "",
        state_token=_token(asked.state_token),
        chunk=_session_chunk(asked.chunk),
    )
    return Request("StreamChunk", _with_version(message, asked.version), chunk_result)


def models() -> Request[list[results.ModelInfo]]:
    """ListModels."""
    return Request(
        "ListModels", pb.ListModelsRequest(), lambda answer: [model_info(m) for m in answer.models]
    )


def model(name: str) -> Request[results.ModelInfo]:
    """GetModel."""
    return Request("GetModel", pb.GetModelRequest(name=name), model_info)


def open_session(asked: _inputs.SessionArgs) -> Request[results.SessionOpened]:
    """StreamSession: its first message, and how the first answer reads."""
    opening = pb.SessionOpen(
        model=asked.model,
        pooling=asked.pooling or "",
        return_state=asked.return_state,
        state_token=_token(asked.state_token),
    )
    message = pb.SessionRequest(open=_with_version(opening, asked.version))
    return Request("StreamSession", message, session_opened)


def session_chunk(chunk: _inputs.Chunk, timeout_s: float | None) -> pb.SessionRequest:
    """A chunk of a StreamSession; its deadline is its own `timeout_ms` (the stream has none)."""
    message = _session_chunk(chunk)
    message.timeout_ms = timeout_ms(timeout_s) or 0
    return pb.SessionRequest(chunk=message)


def session_ended(url: str) -> errors.ConnectionFailed:
    """The error of a session stream that ended before its answer."""
    return errors.ConnectionFailed("the session stream ended", url=url)


# --- answers ------------------------------------------------------------------------------------


def array(message: pb.FloatArray) -> Any:
    """A FloatArray as float32 numpy of its shape."""
    return np.asarray(message.values, dtype=np.float32).reshape(tuple(message.shape))


def encode_result(answer: pb.EncodeResponse, pooling: str | None) -> results.EncodeResult:
    """An EncodeResponse."""
    encodings = [array(e) for e in answer.encodings]
    scores = [array(s) for s in answer.scores]
    return results.EncodeResult(
        model=answer.model,
        version=answer.version,
        encodings=encodings if pooling == "none" else _stack(encodings),
        labels=list(answer.labels) if answer.labels else None,
        scores=_stack(scores) if scores else None,
    )


def _stack(rows: list[Any]) -> Any:
    return np.stack(rows) if rows else np.zeros((0, 0), dtype=np.float32)


def generate_result(answer: pb.GenerateResponse) -> results.GenerateResult:
    """A GenerateResponse."""
    return results.GenerateResult(
        model=answer.model,
        version=answer.version,
        outputs=[
            results.GeneratedOutput(list(o.tokens), o.text if o.HasField("text") else None)
            for o in answer.outputs
        ],
    )


def stream_event(
    message: pb.GenerateStreamResponse, request: Request[results.GenerateResult]
) -> results.TokenEvent | results.GenerateResult:
    """One message of GenerateStream: a token, or the result (last, read by `request`)."""
    if message.HasField("token"):
        token = message.token
        text = token.text if token.HasField("text") else None
        return results.TokenEvent(token.index, token.token, text)
    return request.read(message.result)


def chunk_result(answer: pb.SessionChunkResult) -> results.ChunkResult:
    """A SessionChunkResult."""
    return results.ChunkResult(
        model=answer.model,
        version=answer.version,
        steps=answer.steps,
        encoding=array(answer.encoding),
        scores=np.asarray(answer.scores, dtype=np.float32) if answer.scores else None,
        label=answer.label if answer.HasField("label") else None,
        state_token=_inputs.token_text(answer.state_token) if answer.state_token else None,
    )


def session_opened(reply: pb.SessionResponse) -> results.SessionOpened:
    """The first answer of a StreamSession."""
    opened = reply.opened
    return results.SessionOpened(
        opened.session_id, opened.model, opened.version, opened.pooling, opened.steps
    )


def session_chunk_result(reply: pb.SessionResponse) -> results.ChunkResult:
    """A StreamSession's answer to a chunk."""
    return chunk_result(reply.chunk)


def _whole_numbers(value: Any) -> Any:
    # NOTE: a protobuf Struct holds every number as a double; the REST answer has integers.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    return value


def model_info(answer: pb.ModelInfo) -> results.ModelInfo:
    """A ModelInfo message."""
    return results.ModelInfo(
        name=answer.name,
        versions=[
            results.VersionInfo(
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


@contextlib.contextmanager
def errors_mapped(url: str) -> Iterator[None]:
    """A failed call inside the block as the client's error (`error_of`)."""
    try:
        yield
    except grpc.RpcError as exc:
        raise error_of(url, exc) from None


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
