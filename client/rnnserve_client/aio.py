"""`AsyncClient`: the asyncio client, the same calls as `Client` (awaitable), same retries.

from rnnserve_client import AsyncClient

async with AsyncClient(["grpc://10.0.0.5:8001", "grpc://10.0.0.6:8001"]) as client:
    async for event in client.generate_stream("dates", texts=["25 December 2021"]):
        ...
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
import httpx

from rnnserve_client import _grpc, _http, errors
from rnnserve_client._inputs import Batch, Chunk, batch_of, chunk_of
from rnnserve_client._retry import Address, Plan, Rotation, parse_addresses
from rnnserve_client.client import DEFAULT_MAX_ATTEMPTS, DEFAULT_TIMEOUT_S
from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from rnnserve_client.results import (
    ChunkResult,
    EncodeResult,
    GenerateResult,
    ModelInfo,
    TokenEvent,
)

T = TypeVar("T")


# --- REST ---------------------------------------------------------------------------------------


class AsyncHttpTransport:
    """rnnserve's REST API at one address (httpx.AsyncClient, keep-alive)."""

    def __init__(self, address: Address, headers: Mapping[str, str]) -> None:
        self.url = address.url
        self.http = httpx.AsyncClient(base_url=self.url, headers=dict(headers), timeout=None)

    async def request(
        self, method: str, path: str, remaining: float | None, body: Any = None
    ) -> Any:
        """One request; its JSON answer, or the error the answer (or its absence) means."""
        try:
            answer = await self.http.request(method, path, json=body, timeout=remaining)
        except httpx.TimeoutException as exc:
            raise errors.DeadlineExceeded(f"no answer in time ({exc})", url=self.url) from None
        except httpx.TransportError as exc:
            raise errors.ConnectionFailed(f"{type(exc).__name__}: {exc}", url=self.url) from None
        if answer.status_code >= 400:
            raise _http.error_of(self.url, answer.status_code, answer.headers, answer.content)
        return answer.json() if answer.content else None

    async def encode(
        self,
        model: str,
        batch: Batch,
        pooling: str | None,
        version: int | None,
        remaining: float | None,
    ) -> EncodeResult:
        body = _http.encode_body(batch, pooling, remaining)
        path = _http.model_path(model, version, "encode")
        return _http.encode_result(await self.request("POST", path, remaining, body), pooling)

    async def generate(
        self,
        model: str,
        batch: Batch,
        options: tuple[int | None, int | None],
        version: int | None,
        remaining: float | None,
    ) -> GenerateResult:
        body = _http.generate_body(batch, *options, remaining)
        path = _http.model_path(model, version, "generate")
        return _http.generate_result(await self.request("POST", path, remaining, body))

    async def generate_stream(
        self,
        model: str,
        batch: Batch,
        options: tuple[int | None, int | None],
        version: int | None,
        remaining: float | None,
    ) -> AsyncGenerator[TokenEvent | GenerateResult, None]:
        body = _http.generate_body(batch, *options, remaining, stream=True)
        path = _http.model_path(model, version, "generate")
        try:
            async with self.http.stream("POST", path, json=body, timeout=remaining) as answer:
                if answer.status_code >= 400:
                    content = await answer.aread()
                    raise _http.error_of(self.url, answer.status_code, answer.headers, content)
                parser = _http.SseParser()
                async for line in answer.aiter_lines():
                    event = parser.feed(line)
                    if event is None:
                        continue
                    name, data = event
                    if name == "token":
                        yield _http.token_event(data)
                    elif name == "result":
                        yield _http.generate_result(data)
                        return
                    elif name == "error":
                        raise _http.error_from(self.url, 200, {}, data["error"])
        except httpx.TimeoutException as exc:
            raise errors.DeadlineExceeded(f"no answer in time ({exc})", url=self.url) from None
        except httpx.TransportError as exc:
            raise errors.ConnectionFailed(f"{type(exc).__name__}: {exc}", url=self.url) from None
        raise errors.ConnectionFailed("the event stream ended before its result", url=self.url)

    async def stream(
        self,
        model: str,
        chunk: Chunk,
        options: tuple[str | None, str | bytes | None],
        version: int | None,
        remaining: float | None,
    ) -> ChunkResult:
        body = _http.stream_body(chunk, *options, remaining)
        path = _http.model_path(model, version, "stream")
        return _http.chunk_result(await self.request("POST", path, remaining, body))

    async def models(self, remaining: float | None) -> list[ModelInfo]:
        answer = await self.request("GET", "/v1/models", remaining)
        return [_http.model_info(m) for m in answer["models"]]

    async def model(self, name: str, remaining: float | None) -> ModelInfo:
        return _http.model_info(await self.request("GET", _http.model_path(name), remaining))

    async def open_session(
        self,
        model: str,
        options: tuple[str | None, bool, str | bytes | None],
        version: int | None,
        remaining: float | None,
    ) -> _SessionConnection:
        body = _http.session_body(*options)
        path = _http.model_path(model, version, "sessions")
        return _HttpSession(self, await self.request("POST", path, remaining, body))

    async def close(self) -> None:
        await self.http.aclose()


class _SessionConnection:
    """An open session on one server (REST or gRPC)."""

    opened: Mapping[str, Any]

    async def send(self, chunk: Chunk, timeout: float | None) -> ChunkResult:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class _HttpSession(_SessionConnection):
    def __init__(self, transport: AsyncHttpTransport, opened: Mapping[str, Any]) -> None:
        self._transport = transport
        self.opened = opened

    async def send(self, chunk: Chunk, timeout: float | None) -> ChunkResult:
        path = f"/v1/sessions/{self.opened['session_id']}/chunks"
        body = _http.chunk_body(chunk, timeout)
        return _http.chunk_result(await self._transport.request("POST", path, timeout, body))

    async def close(self) -> None:
        # NOTE: an expired session, or a server that is gone, leaves nothing to close.
        with contextlib.suppress(errors.NotFound, errors.Unavailable):
            path = f"/v1/sessions/{self.opened['session_id']}"
            await self._transport.request("DELETE", path, 10.0)


# --- gRPC ---------------------------------------------------------------------------------------


async def _rpc(url: str, call: Awaitable[T]) -> T:
    try:
        return await call
    except grpc.RpcError as exc:
        raise _grpc.error_of(url, exc) from None


class AsyncGrpcTransport:
    """rnnserve.v1.RnnServe at one address (one grpc.aio channel, made inside the loop)."""

    def __init__(
        self, address: Address, metadata: Mapping[str, str], load_balancing: str | None
    ) -> None:
        self.url = address.url
        self.metadata = tuple((key.lower(), value) for key, value in metadata.items())
        self.channel = grpc.aio.insecure_channel(
            _grpc.target(address.host, address.port, load_balancing),
            options=_grpc.channel_options(load_balancing),
        )
        self.stub = pb_grpc.RnnServeStub(self.channel)

    async def encode(
        self,
        model: str,
        batch: Batch,
        pooling: str | None,
        version: int | None,
        remaining: float | None,
    ) -> EncodeResult:
        message = _grpc.encode_request(model, batch, pooling, version)
        call = self.stub.Encode(message, timeout=remaining, metadata=self.metadata)
        return _grpc.encode_result(await _rpc(self.url, call), pooling)

    async def generate(
        self,
        model: str,
        batch: Batch,
        options: tuple[int | None, int | None],
        version: int | None,
        remaining: float | None,
    ) -> GenerateResult:
        message = _grpc.generate_request(model, batch, *options, version)
        call = self.stub.Generate(message, timeout=remaining, metadata=self.metadata)
        return _grpc.generate_result(await _rpc(self.url, call))

    async def generate_stream(
        self,
        model: str,
        batch: Batch,
        options: tuple[int | None, int | None],
        version: int | None,
        remaining: float | None,
    ) -> AsyncGenerator[TokenEvent | GenerateResult, None]:
        message = _grpc.generate_request(model, batch, *options, version)
        call = self.stub.GenerateStream(message, timeout=remaining, metadata=self.metadata)
        try:
            async for event in call:
                yield _grpc.stream_event(event)
        except grpc.RpcError as exc:
            raise _grpc.error_of(self.url, exc) from None
        finally:
            # NOTE: a caller that stops reading early ends the decoding on the server too.
            call.cancel()

    async def stream(
        self,
        model: str,
        chunk: Chunk,
        options: tuple[str | None, str | bytes | None],
        version: int | None,
        remaining: float | None,
    ) -> ChunkResult:
        message = _grpc.stream_request(model, chunk, *options, version)
        call = self.stub.StreamChunk(message, timeout=remaining, metadata=self.metadata)
        return _grpc.chunk_result(await _rpc(self.url, call))

    async def models(self, remaining: float | None) -> list[ModelInfo]:
        call = self.stub.ListModels(
            pb.ListModelsRequest(), timeout=remaining, metadata=self.metadata
        )
        return [_grpc.model_info(m) for m in (await _rpc(self.url, call)).models]

    async def model(self, name: str, remaining: float | None) -> ModelInfo:
        call = self.stub.GetModel(
            pb.GetModelRequest(name=name), timeout=remaining, metadata=self.metadata
        )
        return _grpc.model_info(await _rpc(self.url, call))

    async def open_session(
        self,
        model: str,
        options: tuple[str | None, bool, str | bytes | None],
        version: int | None,
        remaining: float | None,
    ) -> _SessionConnection:
        # NOTE: a session stream has no deadline; an unreachable server fails the open at once.
        del remaining
        pooling, return_state, token = options
        opening = _grpc.session_open(model, pooling, return_state, token, version)
        session = _GrpcSession(self)
        try:
            await session.open(opening)
        except BaseException:
            await session.close()
            raise
        return session

    async def close(self) -> None:
        await self.channel.close()


class _GrpcSession(_SessionConnection):
    def __init__(self, transport: AsyncGrpcTransport) -> None:
        self._url = transport.url
        self._call = transport.stub.StreamSession(metadata=transport.metadata)

    async def _read(self) -> pb.SessionResponse:
        try:
            reply = await self._call.read()
        except grpc.RpcError as exc:
            raise _grpc.error_of(self._url, exc) from None
        if reply is grpc.aio.EOF:
            raise errors.ConnectionFailed("the session stream ended", url=self._url)
        assert isinstance(reply, pb.SessionResponse)
        return reply

    async def _write(self, message: pb.SessionRequest) -> None:
        try:
            await self._call.write(message)
        except grpc.RpcError as exc:
            raise _grpc.error_of(self._url, exc) from None
        except asyncio.InvalidStateError:
            # NOTE: the stream already ended (with an error the next read reports).
            pass

    async def open(self, opening: pb.SessionRequest) -> None:
        await self._write(opening)
        opened = (await self._read()).opened
        self.opened = {
            "session_id": opened.session_id,
            "model": opened.model,
            "version": opened.version,
            "pooling": opened.pooling,
            "steps": opened.steps,
        }

    async def send(self, chunk: Chunk, timeout: float | None) -> ChunkResult:
        message = _grpc.session_chunk(chunk)
        if timeout is not None:
            message.timeout_ms = _http.timeout_ms(timeout) or 0
        await self._write(pb.SessionRequest(chunk=message))
        return _grpc.chunk_result((await self._read()).chunk)

    async def close(self) -> None:
        self._call.cancel()


# --- the client ---------------------------------------------------------------------------------

AsyncTransport = AsyncHttpTransport | AsyncGrpcTransport


class AsyncSession:
    """A server-held streaming session (`async with client.session("m") as s:`): `send` chunks
    in order; every chunk goes to the server that opened it and is not retried."""

    def __init__(
        self, opener: Callable[[], Awaitable[_SessionConnection]], timeout: float | None
    ) -> None:
        self._opener = opener
        # A chunk's deadline when `send` gives none (the client's default).
        self.timeout = timeout
        self._connection: _SessionConnection | None = None
        self.session_id = ""
        self.model = ""
        self.version = 0
        self.pooling = ""
        self.steps = 0

    async def open(self) -> AsyncSession:
        """Open the session on the server (`async with` does)."""
        if self._connection is None:
            self._connection = await self._opener()
            opened = self._connection.opened
            self.session_id, self.model = opened["session_id"], opened["model"]
            self.version, self.pooling = opened["version"], opened["pooling"]
            self.steps = opened["steps"]
        return self

    async def send(self, chunk: Any, *, timeout: float | None = None) -> ChunkResult:
        """One chunk (text, [time][features] numbers or [time] token ids); the encoding of
        everything so far (or of this chunk's steps, for pooling "none")."""
        if self._connection is None:
            raise RuntimeError("the session is not open (use `async with` or `await open()`)")
        result = await self._connection.send(
            chunk_of(chunk), self.timeout if timeout is None else timeout
        )
        self.steps = result.steps
        return result

    async def close(self) -> None:
        """End the session on the server."""
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()

    async def __aenter__(self) -> AsyncSession:
        return await self.open()

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class AsyncClient:
    """The asyncio client of one rnnserve server or several (round-robin with fail-over); the
    arguments and calls of `Client`, awaitable. Connections are made on first use, inside the
    running loop."""

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        headers: Mapping[str, str] | None = None,
        grpc_load_balancing: str | None = None,
    ) -> None:
        addresses = parse_addresses(url if isinstance(url, str) else tuple(url))
        if max_attempts < 1:
            raise ValueError("max_attempts is at least 1")
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.addresses = addresses
        self._headers = dict(headers or {})
        self._load_balancing = grpc_load_balancing
        self._rotation = Rotation(len(addresses))
        self._transports: list[AsyncTransport | None] = [None] * len(addresses)

    def _transport(self, index: int) -> AsyncTransport:
        transport = self._transports[index]
        if transport is None:
            address = self.addresses[index]
            transport = (
                AsyncHttpTransport(address, self._headers)
                if address.scheme == "http"
                else AsyncGrpcTransport(address, self._headers, self._load_balancing)
            )
            self._transports[index] = transport
        return transport

    def _plan(self, timeout: float | None) -> Plan:
        return Plan(self._rotation, self.timeout if timeout is None else timeout, self.max_attempts)

    async def _call(
        self, timeout: float | None, attempt: Callable[[AsyncTransport, float | None], Awaitable[T]]
    ) -> T:
        plan = self._plan(timeout)
        index = plan.first()
        while True:
            plan.check_time()
            try:
                result = await attempt(self._transport(index), plan.remaining())
            except errors.RnnserveError as error:
                index, wait = plan.next(index, error)
                await asyncio.sleep(wait)
                continue
            self._rotation.succeeded(index)
            return result

    async def encode(
        self,
        model: str,
        *,
        inputs: Any = None,
        tokens: Any = None,
        texts: Any = None,
        pooling: str | None = None,
        version: int | None = None,
        timeout: float | None = None,
    ) -> EncodeResult:
        """Encode sequences (see `Client.encode`)."""
        batch = batch_of(inputs, tokens, texts)
        return await self._call(
            timeout, lambda t, rest: t.encode(model, batch, pooling, version, rest)
        )

    async def generate(
        self,
        model: str,
        *,
        inputs: Any = None,
        tokens: Any = None,
        texts: Any = None,
        beam_size: int | None = None,
        max_length: int | None = None,
        version: int | None = None,
        timeout: float | None = None,
    ) -> GenerateResult:
        """Generate with a seq2seq model (see `Client.generate`)."""
        batch = batch_of(inputs, tokens, texts)
        options = (max_length, beam_size)
        return await self._call(
            timeout, lambda t, rest: t.generate(model, batch, options, version, rest)
        )

    async def generate_stream(
        self,
        model: str,
        *,
        inputs: Any = None,
        tokens: Any = None,
        texts: Any = None,
        beam_size: int | None = None,
        max_length: int | None = None,
        version: int | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[TokenEvent | GenerateResult]:
        """Generate, yielding tokens as decoded, then the result (see `Client.generate_stream`)."""
        batch = batch_of(inputs, tokens, texts)
        options = (max_length, beam_size)
        plan = self._plan(timeout)
        index = plan.first()
        while True:
            plan.check_time()
            events = self._transport(index).generate_stream(
                model, batch, options, version, plan.remaining()
            )
            try:
                first = await anext(events)
            except errors.RnnserveError as error:
                index, wait = plan.next(index, error)
                await asyncio.sleep(wait)
                continue
            break
        self._rotation.succeeded(index)
        try:
            yield first
            async for event in events:
                yield event
        finally:
            await events.aclose()

    async def stream(
        self,
        model: str,
        chunk: Any,
        state_token: str | bytes | None = None,
        *,
        pooling: str | None = None,
        version: int | None = None,
        timeout: float | None = None,
    ) -> ChunkResult:
        """One more chunk of a stream whose state travels in `state_token` (see
        `Client.stream`)."""
        part = chunk_of(chunk)
        options = (pooling, state_token)
        return await self._call(
            timeout, lambda t, rest: t.stream(model, part, options, version, rest)
        )

    def session(
        self,
        model: str,
        *,
        pooling: str | None = None,
        version: int | None = None,
        return_state: bool = False,
        state_token: str | bytes | None = None,
        timeout: float | None = None,
    ) -> AsyncSession:
        """A server-held session, opened by `async with` (or `await session.open()`)."""
        options = (pooling, return_state, state_token)

        async def opener() -> _SessionConnection:
            return await self._call(
                timeout, lambda t, rest: t.open_session(model, options, version, rest)
            )

        return AsyncSession(opener, self.timeout if timeout is None else timeout)

    async def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Every model the server knows, with its versions' states."""
        return await self._call(timeout, lambda t, rest: t.models(rest))

    async def model(self, name: str, *, timeout: float | None = None) -> ModelInfo:
        """One model: versions, states (with failure reasons), architecture."""
        return await self._call(timeout, lambda t, rest: t.model(name, rest))

    async def close(self) -> None:
        """Close every connection."""
        transports, self._transports = self._transports, [None] * len(self.addresses)
        for transport in transports:
            if transport is not None:
                await transport.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
