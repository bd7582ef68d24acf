"""ASGI middleware: the inference routes answered without FastAPI's routing and dependency layers.

`POST /v1/models/{name}[/versions/{version}]/{encode,generate}` and
`POST /v2/models/{name}[/versions/{version}]/infer` carry nearly all the traffic. Their handlers
(the same ones FastAPI's routes call) are called straight from here, matched by their own route
table rows (`routing.DirectRoute`): FastAPI's route walk, exception and exit-stack middlewares,
request construction and dependency solving cost more than the rest of the front-end on a request
that computes in almost no time (`python -m bench.probes hot-routes`). Errors are answered by
the same table as FastAPI's handlers (`errors.error_response`), so answers are the same byte for
byte; anything that does not match exactly (another method, a version that is not 1–9 plain
digits) goes down the normal stack. Installed inside BodySizeLimit, so the body limit applies.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service.http_api.errors import error_response
from service.http_api.routing import DirectRoute, Route


class DirectDispatch:
    """Answer requests that `routes` match exactly with their handlers; pass the rest on."""

    def __init__(self, app: ASGIApp, routes: list[Route]) -> None:
        self.app = app
        self._routes = [DirectRoute.of(route) for route in routes]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            method, path = scope["method"], scope["path"]
            for route in self._routes:
                if route.method == method and (found := route.pattern.fullmatch(path)):
                    await self._serve(route, found.groupdict(), scope, receive, send)
                    return
        await self.app(scope, receive, send)

    @staticmethod
    async def _serve(
        route: DirectRoute, params: dict[str, str], scope: Scope, receive: Receive, send: Send
    ) -> None:
        request = Request(scope, receive)
        try:
            response = await route.handler(request, **params)
        except Exception as exc:
            answer = error_response(request, exc)
            if answer is None:
                # NOTE: a bug: ServerErrorMiddleware (outside this one) logs it and answers 500,
                # as for every route.
                raise
            response = answer
        await response(scope, receive, send)
