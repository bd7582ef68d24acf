"""rnnserve's own HTTP API (`/v1`): encode, generate (JSON or server-sent events), model status,
management. Handlers only translate: bodies are parsed by service/http_api/json_codecs.py, the
work is the engine's, core errors are answered by service/http_api/errors.py.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import asdict
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from models.config import ModelConfig
from service.core import limits, validation
from service.core.engine import Engine
from service.core.errors import InvalidInput, ServiceError
from service.core.limits import MAX_TIMEOUT_MS
from service.core.metrics import Metrics
from service.core.request_metrics import RequestMetrics
from service.core.settings import Settings
from service.core.types import (
    POOLINGS,
    EncodeRequest,
    EncodeResult,
    GenerateRequest,
    GenerateResult,
    InputKind,
    ModelInfo,
    SequenceData,
    TokenEvent,
)
from service.http_api import json_codecs, schemas
from service.http_api.bodies import (
    fields_of,
    json_response,
    management_guard,
    present,
    read_body,
    sse,
)
from service.http_api.disconnects import unless_disconnected
from service.http_api.errors import as_core_error
from service.http_api.openapi import documented_body, errors_doc
from service.http_api.routing import Route, path_version
from service.http_api.schemas import MAX_LENGTH

_BAD = errors_doc(False, 400, 404, 413, 503, 504)
_ENCODE: dict[str, Any] = {
    "response_model": schemas.EncodeResponse,
    "responses": _BAD,
    "openapi_extra": documented_body(schemas.EncodeBody),
    "tags": ["inference"],
}
_GENERATE: dict[str, Any] = {
    "response_model": schemas.GenerateResponse,
    "responses": {
        **_BAD,
        200: {
            "description": "JSON answer, or with `stream: true` server-sent events: "
            "`token` events (TokenEventData), then one `result` event (GenerateResponse).",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
    },
    "openapi_extra": documented_body(schemas.GenerateBody),
    "tags": ["inference"],
}
_STATUS: dict[str, Any] = {
    "response_model": schemas.ModelStatus,
    "responses": errors_doc(False, 404),
    "tags": ["models"],
}
_MANAGE: dict[str, Any] = {
    "response_model": schemas.ManagementResult,
    "responses": errors_doc(False, 400, 401, 403, 404, 409, 503),
    "tags": ["management"],
}


class V1Routes:
    """The handlers of rnnserve's own API over one engine (`routes()`: their table)."""

    def __init__(self, engine: Engine, settings: Settings, metrics: Metrics) -> None:
        self.engine = engine
        self.settings = settings
        self.requests = RequestMetrics(metrics, "rest", engine.knows, as_core_error)
        self.answers = limits.answer_limit(settings, limits.JSON_BYTES_PER_NUMBER, padded=False)

    def routes(self) -> list[Route]:
        """The table. Management paths take `{name:path}` so that a name with a slash reaches
        the name check (400) instead of missing every route (404); the versioned ones come
        first, or `path` would swallow them."""
        return [
            Route("POST", "/v1/models/{name}/encode", self.encode, "encode_latest",
                  "Encode a batch of sequences with the model's serving version.",
                  {**_ENCODE, "summary": "Encode sequences"}, direct=True),
            Route("POST", "/v1/models/{name}/versions/{version}/encode", self.encode,
                  "encode_version", "Encode a batch of sequences with one version of the model.",
                  {**_ENCODE, "summary": "Encode (version)"}, direct=True),
            Route("POST", "/v1/models/{name}/generate", self.generate, "generate_latest",
                  "Generate an output sequence per input with a seq2seq model.",
                  {**_GENERATE, "summary": "Generate sequences"}, direct=True),
            Route("POST", "/v1/models/{name}/versions/{version}/generate", self.generate,
                  "generate_version", "Generate with one version of a seq2seq model.",
                  {**_GENERATE, "summary": "Generate (version)"}, direct=True),
            Route("GET", "/v1/models", self.list_models, "list_models",
                  "Every known model with its versions, states and architecture.",
                  {"response_model": schemas.ModelList, "tags": ["models"]}),
            Route("GET", "/v1/models/{name}", self.get_model, "get_model",
                  "One model: versions, states (with failure reasons) and architecture.",
                  _STATUS),
            Route("GET", "/v1/models/{name}/versions/{version}", self.get_model,
                  "get_model_version", "One version of a model.", _STATUS),
            Route("POST", "/v1/management/models/{name:path}/versions/{version}/load",
                  self.load, "load_version",
                  "Load one version of a model from the repository.", _MANAGE),
            Route("POST", "/v1/management/models/{name:path}/versions/{version}/unload",
                  self.unload, "unload_version", "Unload one version of a model.", _MANAGE),
            Route("POST", "/v1/management/models/{name:path}/load", self.load, "load_model",
                  "Load a model from the repository by name (its version policy decides "
                  "versions).", _MANAGE),
            Route("POST", "/v1/management/models/{name:path}/unload", self.unload,
                  "unload_model",
                  "Unload every version of a model (admitted work finishes first).", _MANAGE),
            Route("POST", "/v1/management/models/{name:path}/reload", self.reload,
                  "reload_model",
                  "Re-read a model from the repository: build the new, swap, let the old "
                  "finish.", _MANAGE),
        ]  # fmt: skip

    # -- inference ---------------------------------------------------------------------------

    async def encode(self, request: Request, name: str, version: str | None = None) -> Response:
        """Encode the body's sequences."""
        with self.requests.observe(name, None, "encode") as observed:
            number = observed.version = path_version(version)
            # NOTE: the model first: an unknown model's body is never read.
            _, config = self.engine.infer_config(name, number)
            typed = self._encode_request(name, number, config, await request.body())
            result = await unless_disconnected(request, self.engine.encode(typed))
            observed.version = result.version
            return json_response(encode_answer(result))

    async def generate(self, request: Request, name: str, version: str | None = None) -> Response:
        """Generate an output per sequence of the body: JSON, or events with `stream`."""
        with self.requests.observe(name, None, "generate") as observed:
            number = observed.version = path_version(version)
            _, config = self.engine.infer_config(name, number)
            typed, stream = self._generate_request(name, number, config, await request.body())
            if stream:
                observed.forget()
                return await self._stream(typed)
            result = await unless_disconnected(request, self.engine.generate(typed))
            observed.version = result.version
            return json_response(generate_answer(result))

    # NOTE: the parsed body lives only in these two: what is awaited holds numpy arrays and
    # scalars, no JSON lists (thousands per request) for the garbage collector to walk.

    def _encode_request(
        self, name: str, version: int | None, config: ModelConfig, body: bytes
    ) -> EncodeRequest:
        fields = read_body(
            schemas.EncodeBody, body, self.settings.request_values_limit, plain_encode
        )
        kind, sequences = request_sequences(
            fields, self.settings.max_sequences_per_request, config.serving.max_sequence_length
        )
        return EncodeRequest(
            model=name,
            sequences=sequences,
            kind=kind,
            version=version,
            pooling=fields["pooling"],
            timeout_s=limits.timeout_seconds(fields["timeout_ms"]),
            answer_limit=self.answers,
        )

    def _generate_request(
        self, name: str, version: int | None, config: ModelConfig, body: bytes
    ) -> tuple[GenerateRequest, bool]:
        fields = read_body(
            schemas.GenerateBody, body, self.settings.request_values_limit, plain_generate
        )
        kind, sequences = request_sequences(
            fields, self.settings.max_sequences_per_request, config.serving.max_sequence_length
        )
        typed = GenerateRequest(
            model=name,
            sequences=sequences,
            kind=kind,
            version=version,
            max_length=fields["max_length"],
            beam_size=fields["beam_size"],
            timeout_s=limits.timeout_seconds(fields["timeout_ms"]),
        )
        return typed, fields["stream"] is True

    async def _stream(self, typed: GenerateRequest) -> Response:
        # NOTE: the first item is awaited here so that errors before any token (unknown model,
        # bad input, overload) get their real status instead of a 200 event stream.
        start = time.perf_counter()
        events = self.engine.generate_stream(typed)
        try:
            first = await anext(events)
        except BaseException as exc:
            seconds = time.perf_counter() - start
            self.requests.record(typed.model, typed.version, "generate_stream", exc, seconds)
            raise
        return StreamingResponse(
            self._events(first, events, typed, start),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _events(
        self,
        first: TokenEvent | GenerateResult,
        events: AsyncGenerator[TokenEvent | GenerateResult, None],
        typed: GenerateRequest,
        start: float,
    ) -> AsyncIterator[bytes]:
        """`token` events as the engine produces them, then `result` (or `error`) and the end;
        the request is recorded when the stream ends."""
        item: TokenEvent | GenerateResult | None = first
        error: BaseException | None = None
        version = typed.version
        try:
            while item is not None:
                if isinstance(item, GenerateResult):
                    version = item.version
                    yield sse("result", generate_answer(item))
                    break
                yield sse("token", token_answer(item))
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
            await events.aclose()
            seconds = time.perf_counter() - start
            self.requests.record(typed.model, version, "generate_stream", error, seconds)

    # -- model status and management -----------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        """Every known model."""
        with self.requests.observe("", None, "list_models"):
            return json_response({"models": [model_status(m) for m in self.engine.list_models()]})

    async def get_model(self, request: Request, name: str, version: str | None = None) -> Response:
        """One model, or one version of it."""
        with self.requests.observe(name, None, "get_model") as observed:
            number = observed.version = path_version(version)
            return json_response(model_status(self.engine.model_info(name, number)))

    async def load(self, request: Request, name: str, version: str | None = None) -> Response:
        """Load a model (its policy's versions) or one version."""
        return await self._manage(request, "load", name, version)

    async def unload(self, request: Request, name: str, version: str | None = None) -> Response:
        """Unload a model or one version."""
        return await self._manage(request, "unload", name, version)

    async def reload(self, request: Request, name: str) -> Response:
        """Re-read a model from the repository."""
        return await self._manage(request, "reload", name, None)

    async def _manage(
        self, request: Request, action: str, name: str, version: str | None
    ) -> Response:
        with self.requests.observe(name, None, action) as observed:
            number = observed.version = path_version(version)
            management_guard(self.settings, request)
            validation.check_model_name(name)
            if action == "load":
                await self.engine.load(name, number)
            elif action == "unload":
                await self.engine.unload(name, number)
            else:
                await self.engine.reload(name)
            try:
                model: dict[str, Any] | None = model_status(self.engine.model_info(name))
            except ServiceError:
                model = None
            return json_response({"action": action, "model": model})


def request_sequences(
    body: Mapping[str, Any],
    limit: int,
    max_steps: int | None = None,
) -> tuple[InputKind, list[SequenceData]]:
    """The sequences of an encode/generate body's fields (`read_body`) as numpy arrays or
    strings, count (and, with `max_steps`, length) checked before conversion."""
    for name in INPUT_FIELDS:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, list) and len(value) > limit:
            raise InvalidInput(name, f"at most {limit} sequences per request, got {len(value)}")
        if name == "inputs":
            return "features", list(json_codecs.features_from_json(value, name, max_steps))
        if name == "tokens":
            return "tokens", list(json_codecs.tokens_from_json(value, name, max_steps))
        return "text", list(json_codecs.texts_from_json(value, name))
    raise InvalidInput("body", "exactly one of 'inputs', 'tokens', 'texts' is required")


# -- bodies pydantic need not see: what `plain_encode` / `plain_generate` pass, the schema would
# accept unchanged (every other body goes to the schema, which names its problem) --

INPUT_FIELDS = ("inputs", "tokens", "texts")
_ENCODE_FIELDS = frozenset(schemas.EncodeBody.model_fields)
_GENERATE_FIELDS = frozenset(schemas.GenerateBody.model_fields)
_POOLINGS: tuple[str | None, ...] = (None, *POOLINGS)


def _one_input(value: dict[str, Any]) -> bool:
    return sum(value.get(name) is not None for name in INPUT_FIELDS) == 1


def _plain_timeout(value: Any) -> bool:
    return value is None or (type(value) in (int, float) and 0 < value <= MAX_TIMEOUT_MS)


def plain_encode(value: dict[str, Any]) -> bool:
    """Whether an encode body is valid as it stands: known fields, one input, a timeout in
    range, a pooling by name."""
    return (
        value.keys() <= _ENCODE_FIELDS
        and _one_input(value)
        and _plain_timeout(value.get("timeout_ms"))
        and value.get("pooling") in _POOLINGS
    )


def plain_generate(value: dict[str, Any]) -> bool:
    """Whether a generate body is valid as it stands: known fields, one input, a timeout and a
    max_length in range, an integer beam_size, a boolean stream."""
    max_length = value.get("max_length")
    return (
        value.keys() <= _GENERATE_FIELDS
        and _one_input(value)
        and _plain_timeout(value.get("timeout_ms"))
        and (max_length is None or (type(max_length) is int and 1 <= max_length <= MAX_LENGTH))
        and type(value.get("beam_size", 1)) is int
        and type(value.get("stream", False)) is bool
    )


def model_status(info: ModelInfo) -> dict[str, Any]:
    """A ModelInfo as the JSON of `ModelStatus`."""
    return asdict(info)


def encode_answer(result: EncodeResult) -> dict[str, Any]:
    """An EncodeResult as the JSON of `EncodeResponse`."""
    return fields_of(result, "model", "version", "encodings", "labels", "scores")


def generate_answer(result: GenerateResult) -> dict[str, Any]:
    """A GenerateResult as the JSON of `GenerateResponse`."""
    return {
        "model": result.model,
        "version": result.version,
        "outputs": [present(tokens=o.tokens, text=o.text) for o in result.outputs],
    }


def token_answer(event: TokenEvent) -> dict[str, Any]:
    """A TokenEvent as the JSON of `TokenEventData`."""
    return present(index=event.index, token=event.token, text=event.text)
