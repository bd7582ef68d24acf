"""The inference routes answered ahead of FastAPI's stack.

`POST /v1/models/{name}[/versions/{version}]/{encode,generate}` and
`POST /v2/models/{name}[/versions/{version}]/infer` carry nearly all the traffic. The server's app
(service/http_api/app.py) hands every request to `DirectDispatch` first: these routes are matched
by their own route table rows (`routing.DirectRoute`) and their handlers (the same ones FastAPI's
routes call) called straight from here, under the body size limit; FastAPI's middleware stack,
route walk, request construction and dependency solving cost more than the rest of the front-end
on a request that computes in almost no time (`python -m bench.overhead`). Errors are answered by
the same table as FastAPI's handlers (`errors.error_response`), and a bug as FastAPI's stack
answers it (the `unexpected` handler's 500, then the exception goes on to the server's log), so
answers are the same byte for byte; anything that does not match exactly (another method, a
version that is not 1–9 plain digits) goes to `app`, FastAPI's stack.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service.http_api.body_limits import BodyTooLargeError, body_framing, counting, refuse
from service.http_api.errors import error_response
from service.http_api.routing import DirectRoute, Route

UnexpectedHandler = Callable[[Request, Exception], Awaitable[Response]]


class DirectDispatch:
    """Answer requests that `routes` match exactly with their handlers; pass the rest to `app`.

    With `max_body_bytes`, bodies over it are refused 413 (as `BodySizeLimit` does); with
    `unexpected`, an exception no error table knows is answered by it before it is raised on.
    """

    def __init__(
        self,
        app: ASGIApp,
        routes: list[Route],
        max_body_bytes: int | None = None,
        unexpected: UnexpectedHandler | None = None,
    ) -> None:
        self.app = app
        # NOTE: grouped by method and last path segment (encode, generate, infer): a request is
        # matched against the one or two patterns that can match it.
        self._routes: dict[tuple[str, str], list[DirectRoute]] = {}
        for route in routes:
            last = route.path.rpartition("/")[2]
            if "{" in last:
                raise ValueError(f"a direct route ends in a literal segment, not {route.path!r}")
            self._routes.setdefault((route.method, last), []).append(DirectRoute.of(route))
        self._max_body_bytes = max_body_bytes
        self._unexpected = unexpected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            for route in self._routes.get((scope["method"], path.rpartition("/")[2]), ()):
                if found := route.pattern.fullmatch(path):
                    await self._serve(route, found.groupdict(), scope, receive, send)
                    return
        await self.app(scope, receive, send)

    async def _serve(
        self,
        route: DirectRoute,
        params: dict[str, str],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        limit = self._max_body_bytes
        if limit is not None:
            declared, counted = body_framing(scope)
            if declared is not None and declared > limit:
                await refuse(scope, send, limit)
                return
            if counted:
                receive = counting(receive, limit)
        request = _DirectRequest(scope, receive)
        try:
            response = await route.handler(request, **params)
        except BodyTooLargeError:
            if limit is None:
                raise
            await refuse(scope, send, limit)
            return
        except Exception as exc:
            answer = error_response(request, exc)
            if answer is None:
                await self._bug(request, exc, send)
                raise
            response = answer
        await response(scope, receive, send)

    async def _bug(self, request: Request, exc: Exception, send: Send) -> None:
        """A bug's answer, as FastAPI's outermost middleware gives it (the caller raises on)."""
        if self._unexpected is not None:
            answer = await self._unexpected(request, exc)
            await answer(request.scope, request.receive, send)


class _DirectRequest(Request):
    """A request whose body is read by a plain loop over `receive` (Starlette reads it through
    an async generator); the same bytes, the same ClientDisconnect when the client leaves."""

    async def body(self) -> bytes:
        if hasattr(self, "_body"):
            return self._body
        chunks: list[bytes] = []
        receive = self.receive
        while True:
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    # NOTE: kept, as Starlette keeps it: a second read returns the same bytes.
                    self._body = b"".join(chunks)
                    return self._body
            elif message["type"] == "http.disconnect":
                raise ClientDisconnect
