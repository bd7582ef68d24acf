"""gRPC streaming sessions: `StreamSession` (the stream is the session) and `StreamChunk`.

`RnnServeServicer` (service/grpc_api/v1_servicer.py) serves its two session RPCs with these.
Errors leave through the one gRPC table (`calls.abort_with`), which ends the stream; the session
closes with its stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import numpy as np

from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2 as pb
from service.core import errors
from service.core.sessions import ChunkResult, SessionInfo, SessionManager
from service.core.types import InputKind, SequenceData
from service.grpc_api.calls import CallRecorder, Context, DrainWatch, abort_with, deadline_of
from service.grpc_api.convert import (
    feature_sequence,
    float_array,
    optional_version,
    pooling_from_proto,
    request_timeout,
)


def chunk_from_proto(chunk: pb.SessionChunk) -> tuple[SequenceData, InputKind]:
    """The one sequence of a chunk message (wire structure checked; contents by the engine)."""
    which = chunk.WhichOneof("input")
    if which == "inputs":
        return feature_sequence(chunk.inputs, "chunk.inputs"), "features"
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
        encoding=float_array(result.encoding),
        state_token=result.state_token or b"",
    )
    if result.scores is not None:
        message.scores.extend(result.scores.tolist())
    if result.label is not None:
        message.label = result.label
    return message


def opened_to_proto(info: SessionInfo) -> pb.SessionResponse:
    """The answer to a session's `open` message."""
    return pb.SessionResponse(
        opened=pb.SessionOpened(
            session_id=info.id,
            model=info.model,
            version=info.version,
            pooling=info.pooling,
            steps=info.steps,
        )
    )


async def stream_session(
    sessions: SessionManager,
    calls: CallRecorder,
    requests: AsyncIterator[pb.SessionRequest],
    context: Context,
    until_draining: Callable[[], Awaitable[None]],
) -> AsyncIterator[pb.SessionResponse]:
    """Serve one StreamSession call: open on the first message, then answer every chunk.

    Once the server drains, the stream ends with UNAVAILABLE (`Draining`) at its next message,
    or at once while it waits for one."""
    watch = DrainWatch(until_draining)
    info: SessionInfo | None = None
    try:
        info = await _open(sessions, calls, requests, context, watch)
        if info is None:
            return
        yield opened_to_proto(info)
        while True:
            # NOTE: not `async for`: a message that does not parse (calls.ParsedRequests)
            # raises here, and must end the stream with its status like any bad chunk.
            try:
                message = await watch.read(requests)
            except errors.ServiceError as exc:
                calls.requests.record(info.model, info.version, "session_chunk", exc, 0.0)
                await abort_with(context, exc)
            if message is None:
                break
            yield await _chunk(sessions, calls, info, message, context)
    finally:
        watch.close()
        if info is not None:
            with contextlib.suppress(errors.NotFound, errors.Draining):
                sessions.close(info.id)


async def _open(
    sessions: SessionManager,
    calls: CallRecorder,
    requests: AsyncIterator[pb.SessionRequest],
    context: Context,
    watch: DrainWatch,
) -> SessionInfo | None:
    """Open the session the first message asks for (None: the client sent nothing)."""
    try:
        with calls.observe("", None, "session_open") as observed:
            first = await watch.read(requests)
            if first is None:
                observed.forget()
                return None
            if first.WhichOneof("message") != "open":
                raise errors.InvalidInput(
                    "open", "the first message of a session must be 'open' (model and options)"
                )
            opening = first.open
            observed.model = opening.model
            info = sessions.create(
                opening.model,
                optional_version(opening, "open.version"),
                pooling=pooling_from_proto(opening.pooling),
                return_state=opening.return_state,
                state_token=opening.state_token or None,
            )
            observed.version = info.version
    except Exception as exc:
        await abort_with(context, exc)
    return info


async def _chunk(
    sessions: SessionManager,
    calls: CallRecorder,
    info: SessionInfo,
    message: pb.SessionRequest,
    context: Context,
) -> pb.SessionResponse:
    """Answer one chunk message of an open session."""
    try:
        with calls.observe(info.model, info.version, "session_chunk"):
            if message.WhichOneof("message") != "chunk":
                raise errors.InvalidInput("chunk", "a session is opened once; send chunks")
            sequence, kind = chunk_from_proto(message.chunk)
            result = await sessions.chunk(
                info.id,
                sequence,
                kind,
                timeout_s=request_timeout(message.chunk.timeout_ms, deadline_of(context)),
            )
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        await abort_with(context, exc)
    return pb.SessionResponse(chunk=result_to_proto(result))


async def stream_chunk(
    sessions: SessionManager, calls: CallRecorder, request: pb.StreamChunkRequest, context: Context
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
        )
        return result_to_proto(result)

    return await calls.run(context, request.model, "stream", call, lambda r: r.version)
