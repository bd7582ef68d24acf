"""`AsyncClient`: the asyncio client, the same calls as `Client` (awaitable), same retries.

from rnnserve_client import AsyncClient

async with AsyncClient(["grpc://10.0.0.5:8001", "grpc://10.0.0.6:8001"]) as client:
    async for event in client.generate_stream("dates", texts=["25 December 2021"]):
        ...

This module only does the I/O (httpx.AsyncClient, grpc.aio): what each call sends and how its
answer reads are `_calls.py`, `_http.py` and `_grpc.py`, shared with `Client`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from types import TracebackType
from typing import Any, Concatenate, ParamSpec

import grpc
import httpx

from rnnserve_client import _calls, _grpc, _http
from rnnserve_client._base import ClientBase, SessionBase, answer_type, method
from rnnserve_client._calls import Call, Event, T
from rnnserve_client._inputs import Chunk
from rnnserve_client._retry import Address
from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from rnnserve_client.results import ChunkResult, GenerateResult, SessionOpened

__all__ = ["AsyncClient", "AsyncSession"]

# --- REST ---------------------------------------------------------------------------------------


class AsyncHttpTransport:
    """rnnserve's REST API at one address (httpx.AsyncClient, keep-alive)."""

    def __init__(self, address: Address, headers: Mapping[str, str]) -> None:
        self.url = address.url
        self.http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=None)

    async def send(self, request: _http.Request[T], remaining: float | None) -> T:
        """One request; its answer, or the error the answer (or its absence) means."""
        with _http.errors_mapped(self.url):
            answer = await self.http.request(
                request.method, request.path, json=request.json(remaining), timeout=remaining
            )
        return request.read(
            _http.answer_of(self.url, answer.status_code, answer.headers, answer.content)
        )

    async def unary(self, call: Call[T], remaining: float | None) -> T:
        return await self.send(call.http(), remaining)

    async def events(
        self, call: Call[GenerateResult], remaining: float | None
    ) -> AsyncGenerator[Event, None]:
        request = call.http(stream=True)
        events = _http.GenerateEvents(self.url, request)
        stream = self.http.stream(
            request.method, request.path, json=request.json(remaining), timeout=remaining
        )
        with _http.errors_mapped(self.url):
            async with stream as answer:
                if answer.status_code >= 400:
                    content = await answer.aread()
                    raise _http.error_of(self.url, answer.status_code, answer.headers, content)
                async for line in answer.aiter_lines():
                    if (event := events.feed(line)) is not None:
                        yield event
                    if events.finished:
                        return
        events.end()

    async def open_session(
        self, call: Call[SessionOpened], remaining: float | None
    ) -> AsyncHttpSession:
        return AsyncHttpSession(self, await self.unary(call, remaining))

    async def close(self) -> None:
        await self.http.aclose()


class AsyncHttpSession:
    """A session over REST (`/v1/sessions/{id}`)."""

    def __init__(self, transport: AsyncHttpTransport, opened: SessionOpened) -> None:
        self._transport = transport
        self.opened = opened

    async def send(self, chunk: Chunk, timeout: float | None) -> ChunkResult:
        request = _http.session_chunk(self.opened.session_id, chunk)
        return await self._transport.send(request, timeout)

    async def close(self) -> None:
        request = _http.close_session(self.opened.session_id)
        with contextlib.suppress(*_http.SESSION_GONE):
            await self._transport.send(request, _http.SESSION_CLOSE_TIMEOUT_S)


# --- gRPC ---------------------------------------------------------------------------------------


class AsyncGrpcTransport:
    """rnnserve.v1.RnnServe at one address (one grpc.aio channel, made inside the loop)."""

    def __init__(
        self, address: Address, headers: Mapping[str, str], load_balancing: str | None
    ) -> None:
        self.url = address.url
        self.metadata = _grpc.metadata(headers)
        self.channel = grpc.aio.insecure_channel(*_grpc.channel_args(address, load_balancing))
        self.stub = pb_grpc.RnnServeStub(self.channel)

    async def unary(self, call: Call[T], remaining: float | None) -> T:
        request = call.grpc()
        rpc = getattr(self.stub, request.rpc)
        with _grpc.errors_mapped(self.url):
            answer = await rpc(request.message, timeout=remaining, metadata=self.metadata)
        return request.read(answer)

    async def events(
        self, call: Call[GenerateResult], remaining: float | None
    ) -> AsyncGenerator[Event, None]:
        request = call.grpc(stream=True)
        rpc = getattr(self.stub, request.rpc)(
            request.message, timeout=remaining, metadata=self.metadata
        )
        try:
            with _grpc.errors_mapped(self.url):
                async for message in rpc:
                    yield _grpc.stream_event(message, request)
        finally:
            # NOTE: a caller that stops reading early ends the decoding on the server too.
            rpc.cancel()

    async def open_session(
        self, call: Call[SessionOpened], remaining: float | None
    ) -> AsyncGrpcSession:
        # NOTE: a session stream has no deadline; an unreachable server fails the open at once.
        del remaining
        session = AsyncGrpcSession(self)
        try:
            await session.open(call.grpc())
        except BaseException:
            await session.close()
            raise
        return session

    async def close(self) -> None:
        await self.channel.close()


class AsyncGrpcSession:
    """A session over gRPC: the StreamSession stream is the session."""

    opened: SessionOpened

    def __init__(self, transport: AsyncGrpcTransport) -> None:
        self._url = transport.url
        self._call = transport.stub.StreamSession(metadata=transport.metadata)

    async def _read(self) -> pb.SessionResponse:
        with _grpc.errors_mapped(self._url):
            reply = await self._call.read()
        if reply is grpc.aio.EOF:
            raise _grpc.session_ended(self._url)
        assert isinstance(reply, pb.SessionResponse)
        return reply

    async def _write(self, message: pb.SessionRequest) -> None:
        # NOTE: InvalidStateError: the stream already ended (with an error the next read reports).
        with _grpc.errors_mapped(self._url), contextlib.suppress(asyncio.InvalidStateError):
            await self._call.write(message)

    async def open(self, opening: _grpc.Request[SessionOpened]) -> None:
        await self._write(opening.message)
        self.opened = opening.read(await self._read())

    async def send(self, chunk: Chunk, timeout: float | None) -> ChunkResult:
        await self._write(_grpc.session_chunk(chunk, timeout))
        return _grpc.session_chunk_result(await self._read())

    async def close(self) -> None:
        self._call.cancel()


# --- the client ---------------------------------------------------------------------------------

AsyncTransport = AsyncHttpTransport | AsyncGrpcTransport
SessionLink = AsyncHttpSession | AsyncGrpcSession


class AsyncSession(SessionBase):
    """A server-held streaming session (`async with client.session("m") as s:`): `send` chunks
    in order; every chunk goes to the server that opened it and is not retried."""

    def __init__(self, opener: Callable[[], Awaitable[SessionLink]], timeout: float | None) -> None:
        self._opener = opener
        self.timeout = timeout
        self._link: SessionLink | None = None

    async def open(self) -> AsyncSession:
        """Open the session on the server (`async with` does)."""
        if self._link is None:
            self._link = await self._opener()
            self._opened(self._link.opened)
        return self

    async def send(self, chunk: Any, *, timeout: float | None = None) -> ChunkResult:
        """One chunk (text, [time][features] numbers or [time] token ids); the encoding of
        everything so far (or of this chunk's steps, for pooling "none")."""
        if self._link is None:
            raise RuntimeError("the session is not open (use `async with` or `await open()`)")
        return self._answered(await self._link.send(*self._chunk(chunk, timeout)))

    async def close(self) -> None:
        """End the session on the server."""
        link, self._link = self._link, None
        if link is not None:
            await link.close()

    async def __aenter__(self) -> AsyncSession:
        return await self.open()

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


P = ParamSpec("P")


def _awaiting(
    build: Callable[P, Call[T]],
) -> Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, T]]:
    """`AsyncClient`'s method for the call `build` describes: sent (retried), its answer read."""

    async def call(self: AsyncClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        made = build(*args, **kwargs)
        return await self._retrying(made.timeout, lambda t, left: t.unary(made, left))

    return method(call, build, "AsyncClient", answer_type(build))


def _yielding(
    build: Callable[P, Call[GenerateResult]],
) -> Callable[Concatenate[AsyncClient, P], AsyncIterator[Event]]:
    """`AsyncClient.generate_stream`: the call `build` describes, streamed; retried until its
    first event."""

    async def call(self: AsyncClient, /, *args: P.args, **kwargs: P.kwargs) -> AsyncIterator[Event]:
        made = build(*args, **kwargs)
        first, events = await self._retrying(
            made.timeout, lambda t, left: _started(t.events(made, left))
        )
        try:
            yield first
            async for event in events:
                yield event
        finally:
            await events.aclose()

    doc = _calls.GENERATE_STREAM_DOC
    return method(call, build, "AsyncClient", AsyncIterator[Event], name="generate_stream", doc=doc)


async def _started(
    events: AsyncGenerator[Event, None],
) -> tuple[Event, AsyncGenerator[Event, None]]:
    # The first event read (the call is retried until then), and the rest.
    return await anext(events), events


def _opening(
    build: Callable[P, Call[SessionOpened]],
) -> Callable[Concatenate[AsyncClient, P], AsyncSession]:
    """`AsyncClient.session`: the session `build` describes, opened (retried) when the session
    is entered."""

    def call(self: AsyncClient, /, *args: P.args, **kwargs: P.kwargs) -> AsyncSession:
        made = build(*args, **kwargs)

        async def opener() -> SessionLink:
            return await self._retrying(made.timeout, lambda t, left: t.open_session(made, left))

        return AsyncSession(opener, self._deadline(made.timeout))

    return method(call, build, "AsyncClient", AsyncSession)


class AsyncClient(ClientBase[AsyncTransport]):
    """The asyncio client of one rnnserve server or several (round-robin with fail-over); the
    arguments and calls of `Client`, awaitable. Connections are made on first use, inside the
    running loop."""

    encode = _awaiting(_calls.encode)
    generate = _awaiting(_calls.generate)
    generate_stream = _yielding(_calls.generate)
    stream = _awaiting(_calls.stream)
    session = _opening(_calls.session)
    models = _awaiting(_calls.models)
    model = _awaiting(_calls.model)

    async def close(self) -> None:
        """Close every connection."""
        for transport in self._disconnect():
            await transport.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _connect(self, address: Address) -> AsyncTransport:
        if address.scheme == "http":
            return AsyncHttpTransport(address, self._headers)
        return AsyncGrpcTransport(address, self._headers, self._load_balancing)

    async def _retrying(
        self, timeout: float | None, attempt: Callable[[AsyncTransport, float | None], Awaitable[T]]
    ) -> T:
        """`attempt` at the plan's addresses until it answers, or fails for good."""
        plan = self._plan(timeout)
        while True:
            with plan.attempt() as remaining:
                return await attempt(self._transport(plan.index), remaining)
            await asyncio.sleep(plan.wait)
