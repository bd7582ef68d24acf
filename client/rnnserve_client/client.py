"""`Client`: the blocking client, over REST (`http://`) or gRPC (`grpc://`), one or many servers.

    from rnnserve_client import Client

    with Client("grpc://127.0.0.1:8001") as client:
        result = client.encode("surnames", texts=["Virtanen", "Dubois"])
        print(result.labels)                       # ['Finnish', 'French']

Every call has a deadline (`timeout=`, default the client's). Load refusals (HTTP 503 +
Retry-After, gRPC RESOURCE_EXHAUSTED + `retry-after`) are retried after the time the server asks
for, while the deadline allows; an address that cannot be reached, or is not ready or draining,
is skipped for the next one of the list (see `_retry.py`). Bad input is never retried.
"""

from __future__ import annotations

import contextlib
import queue
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
import httpx

from rnnserve_client import _grpc, _http, errors
from rnnserve_client._inputs import Batch, Chunk, batch_of, chunk_of
from rnnserve_client._retry import Address, Plan, Rotation, parse_addresses
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
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MAX_ATTEMPTS = 10


# --- REST ---------------------------------------------------------------------------------------


class HttpTransport:
    """rnnserve's REST API at one address (httpx, keep-alive)."""

    def __init__(self, address: Address, headers: Mapping[str, str]) -> None:
        self.url = address.url
        self.http = httpx.Client(base_url=self.url, headers=dict(headers), timeout=None)

    def request(self, method: str, path: str, remaining: float | None, body: Any = None) -> Any:
        """One request; its JSON answer, or the error the answer (or its absence) means."""
        try:
            answer = self.http.request(method, path, json=body, timeout=remaining)
        except httpx.TimeoutException as exc:
            raise errors.DeadlineExceeded(f"no answer in time ({exc})", url=self.url) from None
        except httpx.TransportError as exc:
            raise errors.ConnectionFailed(f"{type(exc).__name__}: {exc}", url=self.url) from None
        if answer.status_code >= 400:
            raise _http.error_of(self.url, answer.status_code, answer.headers, answer.content)
        return answer.json() if answer.content else None

    def encode(
        self,
        model: str,
        batch: Batch,
        pooling: str | None,
        version: int | None,
        remaining: float | None,
    ) -> EncodeResult:
        body = _http.encode_body(batch, pooling, remaining)
        answer = self.request("POST", _http.model_path(model, version, "encode"), remaining, body)
        return _http.encode_result(answer, pooling)

    def generate(
        self,
        model: str,
        batch: Batch,
        options: tuple[int | None, int | None],
        version: int | None,
        remaining: float | None,
    ) -> GenerateResult:
        body = _http.generate_body(batch, *options, remaining)
        answer = self.request("POST", _http.model_path(model, version, "generate"), remaining, body)
        return _http.generate_result(answer)

    def generate_stream(
        self,
        model: str,
        batch: Batch,
        options: tuple[int | None, int | None],
        version: int | None,
        remaining: float | None,
    ) -> Iterator[TokenEvent | GenerateResult]:
        body = _http.generate_body(batch, *options, remaining, stream=True)
        path = _http.model_path(model, version, "generate")
        try:
            with self.http.stream("POST", path, json=body, timeout=remaining) as answer:
                if answer.status_code >= 400:
                    content = answer.read()
                    raise _http.error_of(self.url, answer.status_code, answer.headers, content)
                parser = _http.SseParser()
                for line in answer.iter_lines():
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

    def stream(
        self,
        model: str,
        chunk: Chunk,
        options: tuple[str | None, str | bytes | None],
        version: int | None,
        remaining: float | None,
    ) -> ChunkResult:
        body = _http.stream_body(chunk, *options, remaining)
        answer = self.request("POST", _http.model_path(model, version, "stream"), remaining, body)
        return _http.chunk_result(answer)

    def models(self, remaining: float | None) -> list[ModelInfo]:
        answer = self.request("GET", "/v1/models", remaining)
        return [_http.model_info(m) for m in answer["models"]]

    def model(self, name: str, remaining: float | None) -> ModelInfo:
        answer = self.request("GET", _http.model_path(name), remaining)
        return _http.model_info(answer)

    def open_session(
        self,
        model: str,
        options: tuple[str | None, bool, str | bytes | None],
        version: int | None,
        remaining: float | None,
    ) -> Session:
        body = _http.session_body(*options)
        answer = self.request("POST", _http.model_path(model, version, "sessions"), remaining, body)
        return HttpSession(self, answer)

    def close(self) -> None:
        self.http.close()


class Session:
    """A server-held streaming session: `send` chunks in order, `close` when done (or use
    `with`). Every chunk goes to the server that opened the session; a failed chunk is not
    retried (the server's state may have moved)."""

    session_id: str
    model: str
    version: int
    pooling: str
    steps: int
    # A chunk's deadline when `send` gives none (the client's default).
    timeout: float | None = None

    def send(self, chunk: Any, *, timeout: float | None = None) -> ChunkResult:
        """One chunk (text, [time][features] numbers or [time] token ids); the encoding of
        everything so far (or of this chunk's steps, for pooling "none")."""
        result = self._send(chunk_of(chunk), self.timeout if timeout is None else timeout)
        self.steps = result.steps
        return result

    def _send(self, chunk: Chunk, timeout: float | None) -> ChunkResult:
        raise NotImplementedError

    def close(self) -> None:
        """End the session on the server."""
        raise NotImplementedError

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class HttpSession(Session):
    """A session over REST (`/v1/sessions/{id}`)."""

    def __init__(self, transport: HttpTransport, opened: Mapping[str, Any]) -> None:
        self._transport = transport
        self._closed = False
        self.session_id = opened["session_id"]
        self.model, self.version = opened["model"], opened["version"]
        self.pooling, self.steps = opened["pooling"], opened["steps"]

    def _send(self, chunk: Chunk, timeout: float | None) -> ChunkResult:
        body = _http.chunk_body(chunk, timeout)
        path = f"/v1/sessions/{self.session_id}/chunks"
        return _http.chunk_result(self._transport.request("POST", path, timeout, body))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # NOTE: an expired session, or a server that is gone, leaves nothing to close.
        with contextlib.suppress(errors.NotFound, errors.Unavailable):
            self._transport.request("DELETE", f"/v1/sessions/{self.session_id}", 10.0)


# --- gRPC ---------------------------------------------------------------------------------------


def _rpc(url: str, call: Callable[[], T]) -> T:
    try:
        return call()
    except grpc.RpcError as exc:
        raise _grpc.error_of(url, exc) from None


class GrpcTransport:
    """rnnserve.v1.RnnServe at one address (one channel: one HTTP/2 connection, or one per
    resolved address with round_robin)."""

    def __init__(
        self, address: Address, metadata: Mapping[str, str], load_balancing: str | None
    ) -> None:
        self.url = address.url
        self.metadata = tuple((key.lower(), value) for key, value in metadata.items())
        self.channel = grpc.insecure_channel(
            _grpc.target(address.host, address.port, load_balancing),
            options=_grpc.channel_options(load_balancing),
        )
        self.stub = pb_grpc.RnnServeStub(self.channel)

    def encode(
        self,
        model: str,
        batch: Batch,
        pooling: str | None,
        version: int | None,
        remaining: float | None,
    ) -> EncodeResult:
        message = _grpc.encode_request(model, batch, pooling, version)
        answer = _rpc(
            self.url, lambda: self.stub.Encode(message, timeout=remaining, metadata=self.metadata)
        )
        return _grpc.encode_result(answer, pooling)

    def generate(
        self,
        model: str,
        batch: Batch,
        options: tuple[int | None, int | None],
        version: int | None,
        remaining: float | None,
    ) -> GenerateResult:
        message = _grpc.generate_request(model, batch, *options, version)
        answer = _rpc(
            self.url,
            lambda: self.stub.Generate(message, timeout=remaining, metadata=self.metadata),
        )
        return _grpc.generate_result(answer)

    def generate_stream(
        self,
        model: str,
        batch: Batch,
        options: tuple[int | None, int | None],
        version: int | None,
        remaining: float | None,
    ) -> Iterator[TokenEvent | GenerateResult]:
        message = _grpc.generate_request(model, batch, *options, version)
        call = self.stub.GenerateStream(message, timeout=remaining, metadata=self.metadata)
        try:
            for event in call:
                yield _grpc.stream_event(event)
        except grpc.RpcError as exc:
            raise _grpc.error_of(self.url, exc) from None
        finally:
            # NOTE: a caller that stops reading early ends the decoding on the server too.
            call.cancel()

    def stream(
        self,
        model: str,
        chunk: Chunk,
        options: tuple[str | None, str | bytes | None],
        version: int | None,
        remaining: float | None,
    ) -> ChunkResult:
        message = _grpc.stream_request(model, chunk, *options, version)
        answer = _rpc(
            self.url,
            lambda: self.stub.StreamChunk(message, timeout=remaining, metadata=self.metadata),
        )
        return _grpc.chunk_result(answer)

    def models(self, remaining: float | None) -> list[ModelInfo]:
        answer = _rpc(
            self.url,
            lambda: self.stub.ListModels(
                pb.ListModelsRequest(), timeout=remaining, metadata=self.metadata
            ),
        )
        return [_grpc.model_info(m) for m in answer.models]

    def model(self, name: str, remaining: float | None) -> ModelInfo:
        answer = _rpc(
            self.url,
            lambda: self.stub.GetModel(
                pb.GetModelRequest(name=name), timeout=remaining, metadata=self.metadata
            ),
        )
        return _grpc.model_info(answer)

    def open_session(
        self,
        model: str,
        options: tuple[str | None, bool, str | bytes | None],
        version: int | None,
        remaining: float | None,
    ) -> Session:
        # NOTE: a session stream has no deadline; an unreachable server fails the open at once.
        del remaining
        pooling, return_state, token = options
        return GrpcSession(self, _grpc.session_open(model, pooling, return_state, token, version))

    def close(self) -> None:
        self.channel.close()


_END = None


class GrpcSession(Session):
    """A session over gRPC: the StreamSession stream is the session."""

    def __init__(self, transport: GrpcTransport, opening: pb.SessionRequest) -> None:
        self._url = transport.url
        self._requests: queue.SimpleQueue[pb.SessionRequest | None] = queue.SimpleQueue()
        self._requests.put(opening)
        self._call = transport.stub.StreamSession(
            iter(self._requests.get, _END), metadata=transport.metadata
        )
        self._closed = False
        try:
            opened = self._next().opened
        except BaseException:
            self.close()
            raise
        self.session_id = opened.session_id
        self.model, self.version = opened.model, opened.version
        self.pooling, self.steps = opened.pooling, opened.steps

    def _next(self) -> pb.SessionResponse:
        # NOTE: the stream has no deadline (a session lives as long as it is used); a chunk's
        # own deadline is its timeout_ms on the server.
        try:
            return next(self._call)
        except StopIteration:
            raise errors.ConnectionFailed("the session stream ended", url=self._url) from None
        except grpc.RpcError as exc:
            raise _grpc.error_of(self._url, exc) from None

    def _send(self, chunk: Chunk, timeout: float | None) -> ChunkResult:
        message = _grpc.session_chunk(chunk)
        message.timeout_ms = _http.timeout_ms(timeout) or 0
        self._requests.put(pb.SessionRequest(chunk=message))
        return _grpc.chunk_result(self._next().chunk)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._requests.put(_END)
        self._call.cancel()


# --- the client ---------------------------------------------------------------------------------

Transport = HttpTransport | GrpcTransport


class Client:
    """A blocking client of one rnnserve server or several (round-robin with fail-over).

    `url`: `http://host:port` (REST) or `grpc://host:port` (gRPC), or a list of addresses.
    `timeout`: each call's default deadline in seconds (retries and waits included; None: no
    deadline). `max_attempts`: tries per call at most. `headers`: sent with every request
    (gRPC: as metadata). `grpc_load_balancing="round_robin"`: spread gRPC calls over every
    address a host name resolves to (a Kubernetes headless Service), re-resolving as they change.
    """

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
        self._rotation = Rotation(len(addresses))
        self._transports: list[Transport] = [
            HttpTransport(a, headers or {})
            if a.scheme == "http"
            else GrpcTransport(a, headers or {}, grpc_load_balancing)
            for a in addresses
        ]

    def _plan(self, timeout: float | None) -> Plan:
        return Plan(self._rotation, self.timeout if timeout is None else timeout, self.max_attempts)

    def _call(self, timeout: float | None, attempt: Callable[[Transport, float | None], T]) -> T:
        plan = self._plan(timeout)
        index = plan.first()
        while True:
            plan.check_time()
            try:
                result = attempt(self._transports[index], plan.remaining())
            except errors.RnnserveError as error:
                index, wait = plan.next(index, error)
                time.sleep(wait)
                continue
            self._rotation.succeeded(index)
            return result

    def encode(
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
        """Encode sequences: `inputs` ([time][features] numbers each), `tokens` (id lists) or
        `texts`; `pooling` last|mean|max|none (default: the model's)."""
        batch = batch_of(inputs, tokens, texts)
        return self._call(timeout, lambda t, rest: t.encode(model, batch, pooling, version, rest))

    def generate(
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
        """Generate one output per input with a seq2seq model (greedy, or beam search with
        `beam_size` > 1): a sequence of outputs with `.tokens` and `.text`."""
        batch = batch_of(inputs, tokens, texts)
        options = (max_length, beam_size)
        return self._call(timeout, lambda t, rest: t.generate(model, batch, options, version, rest))

    def generate_stream(
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
    ) -> Iterator[TokenEvent | GenerateResult]:
        """Generate, yielding each `TokenEvent` as it is decoded, then the `GenerateResult`.
        Retried like `generate` until the first event arrives, never after."""
        batch = batch_of(inputs, tokens, texts)
        options = (max_length, beam_size)
        plan = self._plan(timeout)
        index = plan.first()
        while True:
            plan.check_time()
            events = self._transports[index].generate_stream(
                model, batch, options, version, plan.remaining()
            )
            try:
                first = next(events)
            except errors.RnnserveError as error:
                index, wait = plan.next(index, error)
                time.sleep(wait)
                continue
            break
        self._rotation.succeeded(index)
        yield first
        yield from events

    def stream(
        self,
        model: str,
        chunk: Any,
        state_token: str | bytes | None = None,
        *,
        pooling: str | None = None,
        version: int | None = None,
        timeout: float | None = None,
    ) -> ChunkResult:
        """Encode one more chunk of a stream whose state travels in `state_token` (None: a new
        stream); pass the result's `.state_token` with the next chunk, to any replica."""
        part = chunk_of(chunk)
        options = (pooling, state_token)
        return self._call(timeout, lambda t, rest: t.stream(model, part, options, version, rest))

    def session(
        self,
        model: str,
        *,
        pooling: str | None = None,
        version: int | None = None,
        return_state: bool = False,
        state_token: str | bytes | None = None,
        timeout: float | None = None,
    ) -> Session:
        """Open a server-held session (`with client.session("m") as s: s.send(chunk)`)."""
        options = (pooling, return_state, state_token)
        session = self._call(timeout, lambda t, rest: t.open_session(model, options, version, rest))
        session.timeout = self.timeout if timeout is None else timeout
        return session

    def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Every model the server knows, with its versions' states."""
        return self._call(timeout, lambda t, rest: t.models(rest))

    def model(self, name: str, *, timeout: float | None = None) -> ModelInfo:
        """One model: versions, states (with failure reasons), architecture."""
        return self._call(timeout, lambda t, rest: t.model(name, rest))

    def close(self) -> None:
        """Close every connection."""
        for transport in self._transports:
            transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
