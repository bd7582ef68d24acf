"""`Client`: the blocking client, over REST (`http://`) or gRPC (`grpc://`), one or many servers.

    from rnnserve_client import Client

    with Client("grpc://127.0.0.1:8001") as client:
        result = client.encode("surnames", texts=["Virtanen", "Dubois"])
        print(result.labels)                       # ['Finnish', 'French']

Every call has a deadline (`timeout=`, default the client's). Load refusals (HTTP 503 +
Retry-After, gRPC RESOURCE_EXHAUSTED + `retry-after`) are retried after the time the server asks
for, while the deadline allows; an address that cannot be reached, or is not ready or draining,
is skipped for the next one of the list (see `_retry.py`). Bad input is never retried.

This module only does the I/O (httpx, grpc): what each call sends and how its answer reads are
`_calls.py`, `_http.py` and `_grpc.py`, shared with `AsyncClient`.
"""

from __future__ import annotations

import contextlib
import queue
import time
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, Self

import grpc
import httpx

from rnnserve_client import _calls, _grpc, _http
from rnnserve_client._base import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_TIMEOUT_S,
    ClientBase,
    SessionBase,
    answer_type,
    method,
)
from rnnserve_client._calls import Call, Event, T
from rnnserve_client._inputs import Chunk
from rnnserve_client._retry import Address
from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve_client.proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from rnnserve_client.results import ChunkResult, GenerateResult, SessionOpened

__all__ = ["DEFAULT_MAX_ATTEMPTS", "DEFAULT_TIMEOUT_S", "Client", "Session"]

# --- REST ---------------------------------------------------------------------------------------


class HttpTransport:
    """rnnserve's REST API at one address (httpx, keep-alive)."""

    def __init__(self, address: Address, headers: Mapping[str, str]) -> None:
        self.url = address.url
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=None)

    def send(self, request: _http.Request[T], remaining: float | None) -> T:
        """One request; its answer, or the error the answer (or its absence) means."""
        with _http.errors_mapped(self.url):
            answer = self.http.request(
                request.method, request.path, json=request.json(remaining), timeout=remaining
            )
        return request.read(
            _http.answer_of(self.url, answer.status_code, answer.headers, answer.content)
        )

    def unary(self, call: Call[T], remaining: float | None) -> T:
        return self.send(call.http(), remaining)

    def events(self, call: Call[GenerateResult], remaining: float | None) -> Iterator[Event]:
        request = call.http(stream=True)
        events = _http.GenerateEvents(self.url, request)
        body = request.json(remaining)
        with (
            _http.errors_mapped(self.url),
            self.http.stream(request.method, request.path, json=body, timeout=remaining) as answer,
        ):
            if answer.status_code >= 400:
                raise _http.error_of(self.url, answer.status_code, answer.headers, answer.read())
            for line in answer.iter_lines():
                if (event := events.feed(line)) is not None:
                    yield event
                if events.finished:
                    return
        events.end()

    def open_session(self, call: Call[SessionOpened], remaining: float | None) -> HttpSession:
        return HttpSession(self, self.unary(call, remaining))

    def close(self) -> None:
        self.http.close()


class HttpSession:
    """A session over REST (`/v1/sessions/{id}`)."""

    def __init__(self, transport: HttpTransport, opened: SessionOpened) -> None:
        self._transport = transport
        self.opened = opened

    def send(self, chunk: Chunk, timeout: float | None) -> ChunkResult:
        return self._transport.send(_http.session_chunk(self.opened.session_id, chunk), timeout)

    def close(self) -> None:
        with contextlib.suppress(*_http.SESSION_GONE):
            request = _http.close_session(self.opened.session_id)
            self._transport.send(request, _http.SESSION_CLOSE_TIMEOUT_S)


# --- gRPC ---------------------------------------------------------------------------------------


class GrpcTransport:
    """rnnserve.v1.RnnServe at one address (one channel: one HTTP/2 connection, or one per
    resolved address with round_robin)."""

    def __init__(
        self, address: Address, headers: Mapping[str, str], load_balancing: str | None
    ) -> None:
        self.url = address.url
        self.metadata = _grpc.metadata(headers)
        self.channel = grpc.insecure_channel(*_grpc.channel_args(address, load_balancing))
        self.stub = pb_grpc.RnnServeStub(self.channel)

    def unary(self, call: Call[T], remaining: float | None) -> T:
        request = call.grpc()
        rpc = getattr(self.stub, request.rpc)
        with _grpc.errors_mapped(self.url):
            answer = rpc(request.message, timeout=remaining, metadata=self.metadata)
        return request.read(answer)

    def events(self, call: Call[GenerateResult], remaining: float | None) -> Iterator[Event]:
        request = call.grpc(stream=True)
        rpc = getattr(self.stub, request.rpc)(
            request.message, timeout=remaining, metadata=self.metadata
        )
        try:
            with _grpc.errors_mapped(self.url):
                for message in rpc:
                    yield _grpc.stream_event(message, request)
        finally:
            # NOTE: a caller that stops reading early ends the decoding on the server too.
            rpc.cancel()

    def open_session(self, call: Call[SessionOpened], remaining: float | None) -> GrpcSession:
        # NOTE: a session stream has no deadline; an unreachable server fails the open at once.
        del remaining
        return GrpcSession(self, call.grpc())

    def close(self) -> None:
        self.channel.close()


class GrpcSession:
    """A session over gRPC: the StreamSession stream is the session."""

    def __init__(self, transport: GrpcTransport, opening: _grpc.Request[SessionOpened]) -> None:
        self._url = transport.url
        # The stream's messages; None ends it.
        self._requests: queue.SimpleQueue[pb.SessionRequest | None] = queue.SimpleQueue()
        self._requests.put(opening.message)
        rpc = getattr(transport.stub, opening.rpc)
        self._call = rpc(iter(self._requests.get, None), metadata=transport.metadata)
        try:
            self.opened = opening.read(self._next())
        except BaseException:
            self.close()
            raise

    def _next(self) -> pb.SessionResponse:
        # NOTE: the stream has no deadline (a session lives as long as it is used); a chunk's
        # own deadline is its timeout_ms on the server.
        with _grpc.errors_mapped(self._url):
            reply = next(self._call, None)
        if reply is None:
            raise _grpc.session_ended(self._url)
        return reply

    def send(self, chunk: Chunk, timeout: float | None) -> ChunkResult:
        self._requests.put(_grpc.session_chunk(chunk, timeout))
        return _grpc.session_chunk_result(self._next())

    def close(self) -> None:
        self._requests.put(None)
        self._call.cancel()


# --- the client ---------------------------------------------------------------------------------

Transport = HttpTransport | GrpcTransport


class _ClosedByWith:
    """`with` closes it."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Session(SessionBase, _ClosedByWith):
    """A server-held streaming session: `send` chunks in order, `close` when done (or use
    `with`). Every chunk goes to the server that opened the session; a failed chunk is not
    retried (the server's state may have moved)."""

    def __init__(self, link: HttpSession | GrpcSession, timeout: float | None) -> None:
        self._link = link
        self._closed = False
        self.timeout = timeout
        self._opened(link.opened)

    def send(self, chunk: Any, *, timeout: float | None = None) -> ChunkResult:
        """One chunk (text, [time][features] numbers or [time] token ids); the encoding of
        everything so far (or of this chunk's steps, for pooling "none")."""
        return self._answered(self._link.send(*self._chunk(chunk, timeout)))

    def close(self) -> None:
        """End the session on the server."""
        if not self._closed:
            self._closed = True
            self._link.close()


P = ParamSpec("P")


def _returning(build: Callable[P, Call[T]]) -> Callable[Concatenate[Client, P], T]:
    """`Client`'s method for the call `build` describes: sent (retried), its answer read."""

    def call(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> T:
        made = build(*args, **kwargs)
        return self._retrying(made.timeout, lambda t, left: t.unary(made, left))

    return method(call, build, "Client", answer_type(build))


def _yielding(
    build: Callable[P, Call[GenerateResult]],
) -> Callable[Concatenate[Client, P], Iterator[Event]]:
    """`Client.generate_stream`: the call `build` describes, streamed; retried until its first
    event."""

    def call(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> Iterator[Event]:
        made = build(*args, **kwargs)
        first, events = self._retrying(made.timeout, lambda t, left: _started(t.events(made, left)))
        yield first
        yield from events

    doc = _calls.GENERATE_STREAM_DOC
    return method(call, build, "Client", Iterator[Event], name="generate_stream", doc=doc)


def _started(events: Iterator[Event]) -> tuple[Event, Iterator[Event]]:
    # The first event read (the call is retried until then), and the rest.
    return next(events), events


def _opening(build: Callable[P, Call[SessionOpened]]) -> Callable[Concatenate[Client, P], Session]:
    """`Client.session`: the session `build` describes, opened (retried) before it returns."""

    def call(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> Session:
        made = build(*args, **kwargs)
        link = self._retrying(made.timeout, lambda t, left: t.open_session(made, left))
        return Session(link, self._deadline(made.timeout))

    return method(call, build, "Client", Session)


class Client(ClientBase[Transport], _ClosedByWith):
    """A blocking client of one rnnserve server or several (round-robin with fail-over).

    `url`: `http://host:port` (REST) or `grpc://host:port` (gRPC), or a list of addresses.
    `timeout`: each call's default deadline in seconds (retries and waits included; None: no
    deadline). `max_attempts`: tries per call at most. `headers`: sent with every request
    (gRPC: as metadata). `grpc_load_balancing="round_robin"`: spread gRPC calls over every
    address a host name resolves to (a Kubernetes headless Service), re-resolving as they change.
    """

    encode = _returning(_calls.encode)
    generate = _returning(_calls.generate)
    generate_stream = _yielding(_calls.generate)
    stream = _returning(_calls.stream)
    session = _opening(_calls.session)
    models = _returning(_calls.models)
    model = _returning(_calls.model)

    def close(self) -> None:
        """Close every connection."""
        for transport in self._disconnect():
            transport.close()

    def _connect(self, address: Address) -> Transport:
        if address.scheme == "http":
            return HttpTransport(address, self._headers)
        return GrpcTransport(address, self._headers, self._load_balancing)

    def _retrying(
        self, timeout: float | None, attempt: Callable[[Transport, float | None], T]
    ) -> T:
        """`attempt` at the plan's addresses until it answers, or fails for good."""
        plan = self._plan(timeout)
        while True:
            with plan.attempt() as remaining:
                return attempt(self._transport(plan.index), remaining)
            time.sleep(plan.wait)
