"""gRPC streaming sessions: `StreamSession` (the stream is the session) and `StreamChunk`.

`RnnServeServicer` (service/grpc_api.py) delegates its two session methods here. Errors leave
through the one gRPC table (`grpc_api.abort_with`), which ends the stream; the session closes
with its stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast, get_args

import grpc
import numpy as np

from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2 as pb
from service import errors
from service.grpc_api import CallRecorder, DrainWatch, abort_with, deadline_of
from service.grpc_convert import float_values, optional_version, request_timeout
from service.sessions import ChunkResult, SessionManager, StreamPooling
from service.types import InputKind, Sequence

_POOLINGS: tuple[str, ...] = get_args(StreamPooling)


def pooling_from_proto(value: str) -> StreamPooling | None:
    """The session pooling of a message ("" = the model's default)."""
    if not value:
        return None
    if value not in _POOLINGS:
        raise errors.InvalidInput(
            "pooling", f"{errors.shown(value)} is not one of {', '.join(_POOLINGS)}"
        )
    return cast(StreamPooling, value)


def chunk_from_proto(chunk: pb.SessionChunk) -> tuple[Sequence, InputKind]:
    """The one sequence of a chunk message (wire structure checked; contents by the engine)."""
    which = chunk.WhichOneof("input")
    if which == "inputs":
        shape = list(chunk.inputs.shape)
        if len(shape) != 2:
            raise errors.InvalidInput(
                "chunk.inputs.shape", f"must be [time, features], got {shape}"
            )
        if shape[0] * shape[1] != len(chunk.inputs.values):
            raise errors.InvalidInput(
                "chunk.inputs.values",
                f"has {len(chunk.inputs.values)} numbers but shape {shape} needs "
                f"{shape[0] * shape[1]}",
            )
        return float_values(chunk.inputs).reshape(shape[0], shape[1]), "features"
    if which == "tokens":
        return np.array(chunk.tokens.ids, dtype=np.int64), "tokens"
    if which == "text":
        return chunk.text, "text"
    raise errors.InvalidInput("chunk.input", "one of 'inputs', 'tokens' or 'text' is required")


def result_to_proto(result: ChunkResult) -> pb.SessionChunkResult:
    """The SessionChunkResult of a core ChunkResult."""
    message = pb.SessionChunkResult(
        model=result.model,
        version=result.version,
        steps=result.steps,
        encoding=pb.FloatArray(
            shape=list(result.encoding.shape), values=result.encoding.ravel().tolist()
        ),
        state_token=result.state_token or b"",
    )
    if result.scores is not None:
        message.scores.extend(result.scores.tolist())
    if result.label is not None:
        message.label = result.label
    return message


async def stream_session(
    sessions: SessionManager,
    calls: CallRecorder,
    requests: AsyncIterator[pb.SessionRequest],
    context: grpc.aio.ServicerContext[Any, Any],
    until_draining: Callable[[], Awaitable[None]],
) -> AsyncIterator[pb.SessionResponse]:
    """Serve one StreamSession call: open on the first message, then answer every chunk.

    Once the server drains, the stream ends with UNAVAILABLE (`Draining`) at its next message,
    or at once while it waits for one."""
    session_id: str | None = None
    model, version = "", None
    watch = DrainWatch(until_draining)
    try:
        start = time.perf_counter()
        try:
            first = await watch.read(requests)
            if first is None:
                return
            if first.WhichOneof("message") != "open":
                raise errors.InvalidInput(
                    "open", "the first message of a session must be 'open' (model and options)"
                )
            opening = first.open
            model = opening.model
            info = sessions.create(
                opening.model,
                optional_version(opening, "open.version"),
                pooling=pooling_from_proto(opening.pooling),
                return_state=opening.return_state,
                state_token=opening.state_token or None,
            )
        except Exception as exc:
            calls.observe(model, None, "session_open", exc, time.perf_counter() - start)
            await abort_with(context, exc)
        session_id, version = info.id, info.version
        calls.observe(model, version, "session_open", None, time.perf_counter() - start)
        yield pb.SessionResponse(
            opened=pb.SessionOpened(
                session_id=info.id,
                model=info.model,
                version=info.version,
                pooling=info.pooling,
                steps=info.steps,
            )
        )
        while True:
            # NOTE: not `async for`: a message that does not parse (grpc_api.ParsedRequests)
            # raises here, and must end the stream with its status like any bad chunk.
            try:
                message = await watch.read(requests)
            except errors.ServiceError as exc:
                calls.observe(model, version, "session_chunk", exc, 0.0)
                await abort_with(context, exc)
            if message is None:
                break
            start = time.perf_counter()
            try:
                if message.WhichOneof("message") != "chunk":
                    raise errors.InvalidInput("chunk", "a session is opened once; send chunks")
                sequence, kind = chunk_from_proto(message.chunk)
                result = await sessions.chunk(
                    session_id,
                    sequence,
                    kind,
                    timeout_s=request_timeout(message.chunk.timeout_ms, deadline_of(context)),
                    protocol="grpc",
                )
            except asyncio.CancelledError as exc:
                calls.observe(model, version, "session_chunk", exc, time.perf_counter() - start)
                raise
            except Exception as exc:
                calls.observe(model, version, "session_chunk", exc, time.perf_counter() - start)
                await abort_with(context, exc)
            calls.observe(model, version, "session_chunk", None, time.perf_counter() - start)
            yield pb.SessionResponse(chunk=result_to_proto(result))
    finally:
        watch.close()
        if session_id is not None:
            with contextlib.suppress(errors.NotFound, errors.Draining):
                sessions.close(session_id)


async def stream_chunk(
    sessions: SessionManager,
    calls: CallRecorder,
    request: pb.StreamChunkRequest,
    context: grpc.aio.ServicerContext[Any, Any],
) -> pb.SessionChunkResult:
    """Serve one stateless StreamChunk call (state in and out as a token)."""

    async def call() -> pb.SessionChunkResult:
        sequence, kind = chunk_from_proto(request.chunk)
        result = await sessions.stream(
            request.model,
            sequence,
            kind,
            version=optional_version(request),
            pooling=pooling_from_proto(request.pooling),
            state_token=request.state_token or None,
            timeout_s=request_timeout(request.chunk.timeout_ms, deadline_of(context)),
            protocol="grpc",
        )
        return result_to_proto(result)

    return await calls.run(context, request.model, "stream", call, lambda r: r.version)
