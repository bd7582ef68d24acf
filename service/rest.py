"""The HTTP front-end: rnnserve's REST API, health, metrics, management, offline docs.

`create_app(engine, settings, metrics)` builds the FastAPI app that also carries the Open
Inference Protocol routes (service/v2_rest.py). Routes only translate: bodies are parsed by
service/codecs.py, the work is the engine's, core errors are mapped by service/http_errors.py.
"""

from __future__ import annotations

import importlib.resources
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service import (
    codecs,
    http_errors,
    metric_labels,
    rest_schemas,
    v2_common,
    v2_rest,
    validation,
)
from service.engine import Engine
from service.errors import InvalidInput, ServiceError
from service.http_common import (
    ClientDisconnectedError,
    RequestObserver,
    VersionPath,
    documented_body,
    errors_doc,
    handle_refused_path,
    json_response,
    management_guard,
    parse_body,
    unless_disconnected,
)
from service.http_hot import HotRoutes
from service.http_limits import BodySizeLimit
from service.metrics import Metrics
from service.settings import Settings
from service.types import (
    AnswerLimit,
    EncodeRequest,
    GenerateRequest,
    GenerateResult,
    InputKind,
    ModelInfo,
    Sequence,
    TokenEvent,
)
from service.types import Protocol as WireProtocol

if TYPE_CHECKING:
    from service.sessions import SessionManager

PROTOCOL: WireProtocol = "rest"
Body = TypeVar("Body", rest_schemas.EncodeBody, rest_schemas.GenerateBody)
# Request bodies read raw (fast path) but documented from these models.
REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    rest_schemas.EncodeBody,
    rest_schemas.GenerateBody,
    rest_schemas.V2InferRequest,
    rest_schemas.V2RepositoryIndexBody,
)


def request_sequences(
    body: rest_schemas.EncodeBody | rest_schemas.GenerateBody,
    limit: int,
    max_steps: int | None = None,
) -> tuple[InputKind, list[Sequence]]:
    """The sequences of an encode/generate body as numpy arrays or strings, count (and, with
    `max_steps`, length) checked before conversion."""
    for name in ("inputs", "tokens", "texts"):
        value = getattr(body, name)
        if value is None:
            continue
        if isinstance(value, list) and len(value) > limit:
            raise InvalidInput(name, f"at most {limit} sequences per request, got {len(value)}")
        if name == "inputs":
            return "features", list(codecs.features_from_json(value, name, max_steps))
        if name == "tokens":
            return "tokens", list(codecs.tokens_from_json(value, name, max_steps))
        return "text", list(codecs.texts_from_json(value, name))
    raise InvalidInput("body", "exactly one of 'inputs', 'tokens', 'texts' is required")


def model_status(info: ModelInfo) -> dict[str, Any]:
    """A ModelInfo as the JSON of `ModelStatus`."""
    return asdict(info)


def create_router(engine: Engine, settings: Settings, metrics: Metrics) -> APIRouter:
    """rnnserve's own API: inference, model status, management."""
    router = APIRouter()
    observer = RequestObserver(metrics, PROTOCOL, metric_labels.known_model(engine))
    bad = errors_doc(False, 400, 404, 413, 503, 504)
    answers = AnswerLimit(settings.max_answer_bytes, 16, False, "--max-answer-bytes")

    async def sequences_of(
        name: str, version: int | None, request: Request, schema: type[Body]
    ) -> tuple[Body, InputKind, list[Sequence]]:
        # NOTE: the model first: an unknown model's body is never read, and sequences longer
        # than the model takes are refused before numpy converts them.
        _, config = engine.infer_config(name, version)
        raw = await request.body()
        body = parse_body(schema, raw, settings.request_values_limit)
        kind, sequences = request_sequences(
            body, settings.max_sequences_per_request, config.serving.max_sequence_length
        )
        return body, kind, sequences

    async def encode(name: str, version: int | None, request: Request) -> Response:
        with observer.observe(name, version, "encode") as labels:
            body, kind, sequences = await sequences_of(
                name, version, request, rest_schemas.EncodeBody
            )
            typed = EncodeRequest(
                model=name,
                sequences=sequences,
                kind=kind,
                version=version,
                pooling=body.pooling,
                timeout_s=None if body.timeout_ms is None else body.timeout_ms / 1000,
                protocol=PROTOCOL,
                answer_limit=answers,
            )
            result = await unless_disconnected(request, engine.encode(typed))
            labels["version"] = result.version
            answer: dict[str, Any] = {
                "model": result.model,
                "version": result.version,
                "encodings": result.encodings,
            }
            if result.labels is not None:
                answer["labels"] = result.labels
            if result.scores is not None:
                answer["scores"] = result.scores
            return json_response(answer)

    async def generate(name: str, version: int | None, request: Request) -> Response:
        with observer.observe(name, version, "generate") as labels:
            body, kind, sequences = await sequences_of(
                name, version, request, rest_schemas.GenerateBody
            )
            typed = GenerateRequest(
                model=name,
                sequences=sequences,
                kind=kind,
                version=version,
                max_length=body.max_length,
                beam_size=body.beam_size,
                timeout_s=None if body.timeout_ms is None else body.timeout_ms / 1000,
                protocol=PROTOCOL,
            )
            if body.stream:
                labels["record"] = False
                return await stream(typed)
            result = await unless_disconnected(request, engine.generate(typed))
            labels["version"] = result.version
            return json_response(generate_answer(result))

    async def stream(typed: GenerateRequest) -> Response:
        # NOTE: the first item is awaited here so that errors before any token (unknown model,
        # bad input, overload) get their real status instead of a 200 event stream.
        start = time.perf_counter()
        events = engine.generate_stream(typed)
        try:
            first = await anext(events)
        except BaseException as exc:
            observer.record(
                typed.model, typed.version, "generate_stream", exc, time.perf_counter() - start
            )
            raise
        return StreamingResponse(
            sse_events(first, events, observer, typed, start),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    encode_doc: dict[str, Any] = {
        "response_model": rest_schemas.EncodeResponse,
        "responses": bad,
        "openapi_extra": documented_body(rest_schemas.EncodeBody),
        "tags": ["inference"],
    }
    generate_doc: dict[str, Any] = {
        "response_model": rest_schemas.GenerateResponse,
        "responses": {
            **bad,
            200: {
                "description": "JSON answer, or with `stream: true` server-sent events: "
                "`token` events (TokenEventData), then one `result` event (GenerateResponse).",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            },
        },
        "openapi_extra": documented_body(rest_schemas.GenerateBody),
        "tags": ["inference"],
    }

    @router.post("/v1/models/{name}/encode", summary="Encode sequences", **encode_doc)
    async def encode_latest(name: str, request: Request) -> Response:
        """Encode a batch of sequences with the model's serving version."""
        return await encode(name, None, request)

    @router.post(
        "/v1/models/{name}/versions/{version}/encode", summary="Encode (version)", **encode_doc
    )
    @observer.route("encode")
    async def encode_version(name: str, version: VersionPath, request: Request) -> Response:
        """Encode a batch of sequences with one version of the model."""
        return await encode(name, version, request)

    @router.post("/v1/models/{name}/generate", summary="Generate sequences", **generate_doc)
    async def generate_latest(name: str, request: Request) -> Response:
        """Generate an output sequence per input with a seq2seq model."""
        return await generate(name, None, request)

    @router.post(
        "/v1/models/{name}/versions/{version}/generate",
        summary="Generate (version)",
        **generate_doc,
    )
    @observer.route("generate")
    async def generate_version(name: str, version: VersionPath, request: Request) -> Response:
        """Generate with one version of a seq2seq model."""
        return await generate(name, version, request)

    @router.get("/v1/models", response_model=rest_schemas.ModelList, tags=["models"])
    async def list_models() -> Response:
        """Every known model with its versions, states and architecture."""
        with observer.observe("", None, "list_models"):
            return json_response({"models": [model_status(m) for m in engine.list_models()]})

    @router.get(
        "/v1/models/{name}",
        response_model=rest_schemas.ModelStatus,
        responses=errors_doc(False, 404),
        tags=["models"],
    )
    async def get_model(name: str) -> Response:
        """One model: versions, states (with failure reasons) and architecture."""
        with observer.observe(name, None, "get_model"):
            return json_response(model_status(engine.model_info(name)))

    @router.get(
        "/v1/models/{name}/versions/{version}",
        response_model=rest_schemas.ModelStatus,
        responses=errors_doc(False, 404),
        tags=["models"],
    )
    @observer.route("get_model")
    async def get_model_version(name: str, version: VersionPath) -> Response:
        """One version of a model."""
        with observer.observe(name, version, "get_model"):
            return json_response(model_status(engine.model_info(name, version)))

    manage_doc: dict[str, Any] = {
        "response_model": rest_schemas.ManagementResult,
        "responses": errors_doc(False, 400, 401, 403, 404, 409, 503),
        "tags": ["management"],
    }

    async def manage(action: str, name: str, version: int | None, request: Request) -> Response:
        with observer.observe(name, version, action):
            management_guard(settings, request)
            validation.check_model_name(name)
            if action == "load":
                await engine.load(name, version)
            elif action == "unload":
                await engine.unload(name, version)
            else:
                await engine.reload(name)
            try:
                model: dict[str, Any] | None = model_status(engine.model_info(name))
            except ServiceError:
                model = None
            return json_response({"action": action, "model": model})

    # NOTE: `{name:path}` so that a name with a slash reaches the name check (400) instead of
    # missing every route (404); the versioned routes come first, or `path` would swallow them.
    @router.post("/v1/management/models/{name:path}/versions/{version}/load", **manage_doc)
    @observer.route("load")
    async def load_version(name: str, version: VersionPath, request: Request) -> Response:
        """Load one version of a model from the repository."""
        return await manage("load", name, version, request)

    @router.post("/v1/management/models/{name:path}/versions/{version}/unload", **manage_doc)
    @observer.route("unload")
    async def unload_version(name: str, version: VersionPath, request: Request) -> Response:
        """Unload one version of a model."""
        return await manage("unload", name, version, request)

    @router.post("/v1/management/models/{name:path}/load", **manage_doc)
    async def load_model(name: str, request: Request) -> Response:
        """Load a model from the repository by name (its version policy decides versions)."""
        return await manage("load", name, None, request)

    @router.post("/v1/management/models/{name:path}/unload", **manage_doc)
    async def unload_model(name: str, request: Request) -> Response:
        """Unload every version of a model (admitted work finishes first)."""
        return await manage("unload", name, None, request)

    @router.post("/v1/management/models/{name:path}/reload", **manage_doc)
    async def reload_model(name: str, request: Request) -> Response:
        """Re-read a model from the repository: build the new, swap, let the old finish."""
        return await manage("reload", name, None, request)

    return router


def generate_answer(result: GenerateResult) -> dict[str, Any]:
    """A GenerateResult as the JSON of `GenerateResponse`."""
    return {
        "model": result.model,
        "version": result.version,
        "outputs": [
            {"tokens": o.tokens, "text": o.text} if o.text is not None else {"tokens": o.tokens}
            for o in result.outputs
        ],
    }


def sse(event: str, data: Any) -> bytes:
    """One server-sent event."""
    return b"event: " + event.encode() + b"\ndata: " + codecs.dumps(data) + b"\n\n"


async def sse_events(
    first: TokenEvent | GenerateResult,
    events: AsyncIterator[TokenEvent | GenerateResult],
    observer: RequestObserver,
    typed: GenerateRequest,
    start: float,
) -> AsyncIterator[bytes]:
    """`token` events as the engine produces them, then `result` (or `error`) and the end."""
    item: TokenEvent | GenerateResult | None = first
    error: BaseException | None = None
    version: int | None = typed.version
    try:
        while item is not None:
            if isinstance(item, GenerateResult):
                version = item.version
                yield sse("result", generate_answer(item))
                break
            token: dict[str, Any] = {"index": item.index, "token": item.token}
            if item.text is not None:
                token["text"] = item.text
            yield sse("token", token)
            item = await anext(events, None)
    except ServiceError as exc:
        error = exc
        field = exc.field if isinstance(exc, InvalidInput) else None
        detail = {"type": type(exc).__name__, "message": exc.message, "field": field}
        yield sse("error", {"error": detail})
    except BaseException as exc:
        error = exc
        raise
    finally:
        close = getattr(events, "aclose", None)
        if close is not None:
            await close()
        observer.record(typed.model, version, "generate_stream", error, time.perf_counter() - start)


def create_ops_router(engine: Engine, metrics: Metrics) -> APIRouter:
    """Liveness, readiness and Prometheus metrics."""
    router = APIRouter(tags=["operations"])

    @router.get("/healthz", response_model=rest_schemas.Health)
    async def healthz() -> Response:
        """Live: the process answers (never depends on models)."""
        ok = engine.live
        return json_response({"status": "ok" if ok else "unavailable"}, 200 if ok else 503)

    @router.get(
        "/readyz",
        response_model=rest_schemas.Health,
        responses={503: {"model": rest_schemas.Health}},
    )
    async def readyz() -> Response:
        """Ready: not draining, and the required models are READY (strict or relaxed)."""
        ok = engine.ready
        return json_response({"status": "ok" if ok else "unavailable"}, 200 if ok else 503)

    @router.get("/metrics", response_class=Response)
    async def prometheus() -> Response:
        """Prometheus text exposition of the server's registry."""
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return router


# Swagger UI 5 (it reads OpenAPI 3.1, which FastAPI writes) and ReDoc, as the fastapi-offline
# package ships them: the docs pages load nothing from the network.
DOCS_ASSETS = importlib.resources.files("fastapi_offline") / "static"
DOCS_STATIC = "/docs/static"


def add_offline_docs(app: FastAPI) -> None:
    """`/docs` (Swagger UI) and `/redoc` (ReDoc), their assets served locally (no CDN)."""
    app.mount(DOCS_STATIC, StaticFiles(directory=str(DOCS_ASSETS)), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="rnnserve API",
            swagger_js_url=f"{DOCS_STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_STATIC}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_STATIC}/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url="/openapi.json",
            title="rnnserve API",
            redoc_js_url=f"{DOCS_STATIC}/redoc.standalone.js",
            redoc_favicon_url=f"{DOCS_STATIC}/favicon.png",
            with_google_fonts=False,
        )


def install_openapi(app: FastAPI) -> None:
    """OpenAPI with the raw-read request bodies' models and 400 (not 422) for bad requests."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        from service.session_rest import ChunkBody, SessionBody, StreamBody

        models: tuple[type[BaseModel], ...] = (*REQUEST_MODELS, SessionBody, ChunkBody, StreamBody)
        _, defs = models_json_schema(
            [(m, "validation") for m in models],
            ref_template="#/components/schemas/{model}",
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(defs.get("$defs", {}))
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                responses = operation.get("responses", {})
                if "422" in responses:
                    responses.pop("422")
                    responses.setdefault(
                        "400",
                        {
                            "description": "Invalid request",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/ErrorBody"}
                                }
                            },
                        },
                    )
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        components.setdefault(
            "ErrorBody",
            rest_schemas.ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}"),
        )
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(
    engine: Engine,
    settings: Settings,
    metrics: Metrics,
    sessions: SessionManager | None = None,
    hot_routes: bool = True,
) -> FastAPI:
    """The HTTP application: rnnserve API, V2 REST, health, metrics, management, `/docs`.

    The streaming-session routes (service/session_rest.py) serve `sessions`, by default the
    engine's own `engine.sessions`. `hot_routes` serves the inference routes through
    service/http_hot.py (same endpoints, fewer layers; off only to compare the two in tests).
    """
    app = FastAPI(
        title="rnnserve",
        version=v2_common.server_version(),
        description="Serving recurrent neural networks (Elman, LSTM, GRU, deep, bidirectional, "
        "seq2seq) over REST and the Open Inference Protocol (KServe V2).",
        docs_url=None,
        redoc_url=None,
    )
    api = create_router(engine, settings, metrics)
    v2_api = v2_rest.create_router(engine, settings, metrics)
    # NOTE: the last added runs first: BodySizeLimit, then HotRoutes, then FastAPI's stack.
    if hot_routes:
        app.add_middleware(HotRoutes, fastapi_app=app, routes=[*api.routes, *v2_api.routes])
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_exception_handler(ServiceError, http_errors.handle_service_error)
    app.add_exception_handler(http_errors.InvalidPathParameter, handle_refused_path)
    app.add_exception_handler(RequestValidationError, http_errors.handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, http_errors.handle_http_exception)
    app.add_exception_handler(ClientDisconnectedError, http_errors.handle_client_disconnected)
    # NOTE: a client gone while its body was read (or cut off by its body deadline).
    app.add_exception_handler(ClientDisconnect, http_errors.handle_client_disconnected)
    app.add_exception_handler(Exception, http_errors.handle_unexpected)
    app.include_router(create_ops_router(engine, metrics))
    app.include_router(api)
    app.include_router(v2_api)
    from service.session_rest import create_session_router

    app.include_router(
        create_session_router(
            sessions or engine.sessions,
            metrics,
            metric_labels.known_model(engine),
            settings.request_values_limit,
        )
    )
    add_offline_docs(app)
    install_openapi(app)
    return app
