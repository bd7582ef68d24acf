"""uvicorn's HTTP/1.1 protocol (httptools) with deadlines for each request's headers and body.

uvicorn closes a kept-alive connection left idle between requests (`timeout_keep_alive`), but
waits without end for a connection that never sends a request, or sends part of one: its line and
headers, or a body that stops or trickles in a byte at a time. Each such connection holds a socket
and its buffers for good. Here a request has `header_timeout_s` from the connection (or, on a
kept-alive connection, from its first byte) to complete its headers, and `body_timeout_s` from
then to complete its body, one second more for every BODY_BYTES_PER_EXTRA_S bytes received (a
large body on a slow link is not cut, a trickle is). Past a deadline the client gets 408 when it
has started a request and nothing was answered yet, and the connection closes.

httptools sets no bound on a request's line and headers either (uvicorn's h11 protocol does):
past MAX_HEAD_BYTES the client gets 431 and the connection closes.

The connection also watches its requests for a client that leaves (`disconnects.Connection`):
each request's scope carries the connection, and a request task it is asked to watch is
cancelled when the connection is lost.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.http_api.disconnects import CONNECTION

# A body earns one second more per this many bytes received (a floor of 64 KiB/s, once the
# first body_timeout_s are spent).
BODY_BYTES_PER_EXTRA_S = 64 * 1024
# The request line and headers of one request, at most (uvicorn's h11 protocol takes 16 KiB).
MAX_HEAD_BYTES = 64 * 1024


def _answer(status: bytes, text: bytes) -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: " + str(len(text)).encode() + b"\r\nconnection: close\r\n\r\n" + text
    )


_TIMEOUT_ANSWER = _answer(b"408 Request Timeout", b"request timeout\n")
_HEAD_TOO_LARGE_ANSWER = _answer(
    b"431 Request Header Fields Too Large",
    f"request line and headers over {MAX_HEAD_BYTES} bytes\n".encode(),
)


def deadline_protocol(header_timeout_s: float, body_timeout_s: float) -> type[asyncio.Protocol]:
    """The protocol class to pass uvicorn as `http=`, with these deadlines."""

    class Protocol(DeadlineHttpProtocol):
        header_timeout = header_timeout_s
        body_timeout = body_timeout_s

    return Protocol


class DeadlineHttpProtocol(HttpToolsProtocol):
    """HttpToolsProtocol whose requests must arrive within their deadlines (class attributes,
    set by `deadline_protocol`)."""

    header_timeout = 10.0
    body_timeout = 60.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when the timer fires
        self._armed = False  # a deadline is in force (a request, or the first, is awaited)
        self._deadline = 0.0
        # Where the request being received is: none yet, in its line and headers, in its body.
        self._phase: Literal["idle", "headers", "body"] = "idle"
        self._head_bytes = 0
        self._completed = False  # a request ended within the bytes being parsed
        self._refused = False  # answered 431: whatever else arrives is dropped
        # Request tasks to cancel if the connection is lost → whether its loss cancelled them.
        self._watched: dict[asyncio.Task[object], bool] = {}
        self._lost = False

    # -- requests whose client may leave (disconnects.Connection) ------------------------------

    def watch(self, task: asyncio.Task[object]) -> None:
        """Cancel `task` when the connection is lost (soon, if it is already)."""
        self._watched[task] = False
        if self._lost:
            self.loop.call_soon(self._cancel, task)

    def unwatch(self, task: asyncio.Task[object]) -> bool:
        """Stop watching `task`; whether the connection's loss cancelled it."""
        return self._watched.pop(task, False)

    def _cancel(self, task: asyncio.Task[object]) -> None:
        if task in self._watched and not self._watched[task]:
            self._watched[task] = True
            task.cancel()

    # NOTE: one timer serves many requests: it is moved only when a deadline comes earlier than
    # it fires; when it fires early it sleeps again until the deadline in force (if any).

    def _arm(self, seconds: float) -> None:
        self._armed = True
        self._deadline = deadline = self.loop.time() + seconds
        if self._timer is None or self._timer_at > deadline:
            self._disarm()
            self._timer = self.loop.call_at(deadline, self._check)
            self._timer_at = deadline

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        if not self._armed:
            return
        if self.loop.time() < self._deadline:
            # NOTE: a later deadline is in force (the body's, or one moved on by on_body).
            self._timer = self.loop.call_at(self._deadline, self._check)
            self._timer_at = self._deadline
            return
        if self.transport.is_closing():
            return
        if self._phase == "headers" or (self._phase == "body" and not self.cycle.response_started):
            self.transport.write(_TIMEOUT_ANSWER)
        self.transport.close()

    # -- the connection and the parser's callbacks ---------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._lost = True
        for task in list(self._watched):
            self._cancel(task)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._completed = False
        super().data_received(data)
        # NOTE: httptools gathers a header's value until it ends, out of sight of its callbacks,
        # so the line and headers are counted here, by the bytes that left a request's head
        # unfinished; bytes that also finished a request (pipelined) are not counted.
        if self._phase == "headers" and not self._completed:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refused = True
                self._disarm()
                self.transport.write(_HEAD_TOO_LARGE_ANSWER)
                self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope[CONNECTION] = self  # type: ignore[literal-required]
        self._phase = "headers"
        self._head_bytes = 0
        if not self._armed:
            self._arm(self.header_timeout)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._phase = "body"
        self._arm(self.body_timeout)

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self._deadline += len(body) / BODY_BYTES_PER_EXTRA_S

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._phase = "idle"
        self._completed = True
        self._armed = False
