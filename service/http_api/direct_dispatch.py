"""ASGI middleware: the inference routes served without FastAPI's routing and dependency layers.

`POST /v1/models/{name}[/versions/{version}]/{encode,generate}` and
`POST /v2/models/{name}[/versions/{version}]/infer` carry nearly all the traffic. Their FastAPI
endpoints (the same functions, same code) are called straight from here: the route table walk,
the exception and exit-stack middlewares, request-object construction and dependency solving
cost ~0.17 ms per request on this CPU (`python -m bench.probes hot-routes`: 1.3–1.4× the
front-end's capacity). Errors go
through the app's own exception handlers, so answers are the same byte for byte; anything that
does not match exactly (another method, a version that is not plain digits) goes down the normal
stack.
Installed inside BodySizeLimit, so the body limit applies here too.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

Endpoint = Callable[..., Awaitable[Response]]
Handler = Callable[[Request, Any], Response | Awaitable[Response]]

# The FastAPI routes served here (their own compiled path patterns are matched).
HOT_PATHS = (
    "/v1/models/{name}/encode",
    "/v1/models/{name}/versions/{version}/encode",
    "/v1/models/{name}/generate",
    "/v1/models/{name}/versions/{version}/generate",
    "/v2/models/{name}/infer",
    "/v2/models/{name}/versions/{version}/infer",
)
# A version this matches (and that is not 0) is one `http_common.VersionPath` takes, as the same
# int; anything else (0, a sign, a non-digit, 10 digits or more) takes FastAPI's stack and its
# error answers.
_VERSION = re.compile(r"[0-9]{1,9}")


class HotRoutes:
    """Call the inference endpoints among `routes` directly for exactly matching requests;
    errors through `fastapi_app`'s exception handlers."""

    def __init__(self, app: ASGIApp, fastapi_app: FastAPI, routes: list[BaseRoute]) -> None:
        self.app = app
        self.fastapi_app = fastapi_app
        by_path = {
            route.path: route
            for route in routes
            if isinstance(route, APIRoute) and "POST" in (route.methods or ())
        }
        missing = [path for path in HOT_PATHS if path not in by_path]
        if missing:
            raise ValueError(f"HotRoutes: no POST route {missing}")
        self._routes = [(by_path[path].path_regex, by_path[path].endpoint) for path in HOT_PATHS]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            for pattern, endpoint in self._routes:
                match = pattern.match(path)
                if match is None:
                    continue
                params = match.groupdict()
                version = params.get("version")
                if version is not None and not (_VERSION.fullmatch(version) and int(version)):
                    break
                await self._serve(endpoint, params, scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _serve(
        self,
        endpoint: Endpoint,
        params: dict[str, str],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        request = Request(scope, receive)
        arguments: dict[str, Any] = {"name": params["name"], "request": request}
        if "version" in params:
            arguments["version"] = int(params["version"])
        try:
            response = await endpoint(**arguments)
        except Exception as exc:
            handler = _handler_for(self.fastapi_app, exc)
            if handler is None:
                raise
            answer = handler(request, exc)
            response = await answer if inspect.isawaitable(answer) else answer
        await response(scope, receive, send)


def _handler_for(app: FastAPI, exc: Exception) -> Handler | None:
    """The app's exception handler for `exc` (nearest class in its MRO), as Starlette's
    ExceptionMiddleware picks; None for the catch-all, which ServerErrorMiddleware (outside
    this one) applies, logging the error as it does for every route."""
    for cls in type(exc).__mro__:
        if cls is Exception:
            return None
        handler = app.exception_handlers.get(cls)
        if handler is not None:
            return handler
    return None
