"""The request body size limit (413), for declared and chunked bodies alike.

A declared `Content-Length` over the limit is refused before the body is read. A chunked body is
counted as it arrives; the read that crosses the limit raises `BodyTooLargeError`, which becomes
the 413 answer (when the handler has not started answering yet). `BodySizeLimit` applies it as
ASGI middleware; the direct dispatcher (service/http_api/direct_dispatch.py) applies the same
helpers itself.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLargeError(Exception):
    """The request body passed the configured limit while being read."""


class BodySizeLimit:
    """Refuse request bodies larger than `max_bytes` with 413 and an error body naming the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared, counted = body_framing(scope)
        if declared is not None and declared > self.max_bytes:
            await refuse(scope, send, self.max_bytes)
            return
        if not counted:
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting(receive, self.max_bytes), tracking_send)
        except BodyTooLargeError:
            if started:
                raise
            await refuse(scope, send, self.max_bytes)


def body_framing(scope: Scope) -> tuple[int | None, bool]:
    """The request's declared Content-Length (None: none or unreadable), and whether its body
    must be counted as it arrives: a body without a declared length, or one that is chunked
    (the server delivers at most the declared length of any other body)."""
    declared: int | None = None
    chunked = False
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                declared = None
        elif name == b"transfer-encoding":
            chunked = True
    return declared, declared is None or chunked


def counting(receive: Receive, max_bytes: int) -> Receive:
    """`receive` that raises BodyTooLargeError on the read that takes the body past `max_bytes`."""
    received = 0

    async def counting_receive() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > max_bytes:
                raise BodyTooLargeError
        return message

    return counting_receive


async def refuse(scope: Scope, send: Send, max_bytes: int) -> None:
    """Answer 413 naming the limit, in the error shape of the API the path belongs to."""
    message = f"request body exceeds the limit of {max_bytes} bytes"
    body: dict[str, Any]
    if str(scope.get("path", "")).startswith("/v2"):
        body = {"error": f"body: {message}"}
    else:
        body = {"error": {"type": "PayloadTooLarge", "message": message, "field": "body"}}
    payload = orjson.dumps(body)
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                # NOTE: the unread rest of the body makes the connection unusable.
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
