"""The HTTP application: rnnserve's API, the V2 protocol, streaming sessions, health, metrics,
management and offline docs, on one FastAPI app.

`create_app` puts the route tables (service/http_api/v1_routes.py, v2_routes.py,
session_routes.py) together: as FastAPI routes, and the inference routes also in the direct
dispatcher (service/http_api/direct_dispatch.py), which sees every request before FastAPI does;
errors leave through one table (service/http_api/errors.py). No lifespan: the caller starts the
engine (as service/process/serve.py does).
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Receive, Scope, Send

from service.core.engine import Engine
from service.core.metrics import Metrics
from service.core.release import server_version
from service.core.request_metrics import RequestMetrics
from service.core.sessions import SessionManager
from service.core.settings import Settings
from service.http_api import errors, schemas
from service.http_api.bodies import json_response
from service.http_api.body_limits import BodySizeLimit
from service.http_api.direct_dispatch import DirectDispatch
from service.http_api.openapi import install_openapi
from service.http_api.routing import Route, api_router
from service.http_api.session_routes import SessionRoutes
from service.http_api.v1_routes import V1Routes
from service.http_api.v2_routes import V2Routes


def create_app(
    engine: Engine,
    settings: Settings,
    metrics: Metrics,
    sessions: SessionManager | None = None,
    direct_dispatch: bool = True,
) -> FastAPI:
    """The HTTP application over `engine`. The streaming-session routes serve `sessions`, by
    default the engine's own `engine.sessions`. `direct_dispatch` serves the inference routes
    past FastAPI's routing (same handlers; off only to compare the two in tests)."""
    app = App(
        # NOTE: no OpenTelemetry from FastAPI: rnnserve's observability is its Prometheus
        # metrics and logs, and the check alone costs every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
        title="rnnserve",
        version=server_version(),
        description="Serving recurrent neural networks (Elman, LSTM, GRU, deep, bidirectional, "
        "seq2seq) over REST and the Open Inference Protocol (KServe V2).",
        docs_url=None,
        redoc_url=None,
    )
    session_requests = RequestMetrics(metrics, "rest", engine.knows, errors.as_core_error)
    routes = [
        *operations(engine, metrics),
        *V1Routes(engine, settings, metrics).routes(),
        *V2Routes(engine, settings, metrics).routes(),
        *SessionRoutes(
            sessions or engine.sessions, session_requests, settings.request_values_limit
        ).routes(),
    ]
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    if direct_dispatch:
        app.entry = DirectDispatch(
            app.stack,
            [r for r in routes if r.direct],
            max_body_bytes=settings.max_body_bytes,
            unexpected=errors.handle_unexpected,
        )
    for handled in errors.HANDLED:
        app.add_exception_handler(handled, errors.handle_error)
    app.add_exception_handler(Exception, errors.handle_unexpected)
    app.include_router(api_router(routes))
    add_offline_docs(app)
    install_openapi(app)
    return app


class App(FastAPI):
    """FastAPI with an entry ahead of its stack: `entry` (the direct dispatcher, when set) sees
    every request first and passes what it does not serve to `stack`."""

    entry: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.entry is None:
            await super().__call__(scope, receive, send)
        else:
            await self.entry(scope, receive, send)

    async def stack(self, scope: Scope, receive: Receive, send: Send) -> None:
        """FastAPI's own way through its middlewares and routes."""
        await super().__call__(scope, receive, send)


def operations(engine: Engine, metrics: Metrics) -> list[Route]:
    """Liveness, readiness and Prometheus metrics."""

    async def healthz(request: Request) -> Response:
        ok = engine.live
        return json_response({"status": "ok" if ok else "unavailable"}, 200 if ok else 503)

    async def readyz(request: Request) -> Response:
        ok = engine.ready
        return json_response({"status": "ok" if ok else "unavailable"}, 200 if ok else 503)

    async def prometheus(request: Request) -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    tags = ["operations"]
    return [
        Route("GET", "/healthz", healthz, "healthz",
              "Live: the process answers (never depends on models).",
              {"response_model": schemas.Health, "tags": tags}),
        Route("GET", "/readyz", readyz, "readyz",
              "Ready: not draining, and the required models are READY (strict or relaxed).",
              {"response_model": schemas.Health, "tags": tags,
               "responses": {503: {"model": schemas.Health}}}),
        Route("GET", "/metrics", prometheus, "prometheus",
              "Prometheus text exposition of the server's registry.",
              {"response_class": Response, "tags": tags}),
    ]  # fmt: skip


# Swagger UI 5 (it reads OpenAPI 3.1, which FastAPI writes) and ReDoc, as the fastapi-offline
# package ships them: the docs pages load nothing from the network.
DOCS_ASSETS = importlib.resources.files("fastapi_offline") / "static"
DOCS_STATIC = "/docs/static"


def add_offline_docs(app: FastAPI) -> None:
    """`/docs` (Swagger UI) and `/redoc` (ReDoc), their assets served locally (no CDN)."""
    app.mount(DOCS_STATIC, StaticFiles(directory=str(DOCS_ASSETS)), name="docs-static")
    page: dict[str, Any] = {"openapi_url": "/openapi.json", "title": "rnnserve API"}
    swagger = get_swagger_ui_html(
        **page,
        swagger_js_url=f"{DOCS_STATIC}/swagger-ui-bundle.js",
        swagger_css_url=f"{DOCS_STATIC}/swagger-ui.css",
        swagger_favicon_url=f"{DOCS_STATIC}/favicon.png",
    )
    redoc = get_redoc_html(
        **page,
        redoc_js_url=f"{DOCS_STATIC}/redoc.standalone.js",
        redoc_favicon_url=f"{DOCS_STATIC}/favicon.png",
        with_google_fonts=False,
    )
    for path, html in (("/docs", swagger.body), ("/redoc", redoc.body)):
        app.add_api_route(path, _page(bytes(html)), methods=["GET"], include_in_schema=False)


def _page(html: bytes) -> Callable[[], Awaitable[HTMLResponse]]:
    async def page() -> HTMLResponse:
        return HTMLResponse(html)

    return page
