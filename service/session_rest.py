"""REST routes of streaming sessions (an APIRouter that `service/rest.py` includes).

- `POST /v1/models/{name}/sessions` (and `.../versions/{version}/sessions`): open a session.
- `POST /v1/sessions/{id}/chunks`: send one chunk; the answer covers every step so far.
- `GET /v1/sessions/{id}`, `DELETE /v1/sessions/{id}`: look at / close a session.
- `POST /v1/models/{name}/stream` (and `.../versions/{version}/stream`): stateless; the state
  travels in `state_token`, so any replica with the same key takes the next chunk.

Core errors propagate to the app's exception handlers (one table, in `service/rest.py`).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, SkipValidation, model_validator

from service import codecs, metric_labels, rest_schemas
from service.errors import InvalidInput
from service.http_common import RequestObserver, VersionPath, documented_body, parse_body
from service.metrics import Metrics
from service.sessions import ChunkResult, SessionInfo, SessionManager
from service.types import InputKind, Sequence

StreamPooling = Literal["last", "mean", "max", "none"]


class _Body(BaseModel):
    # NOTE: unknown keys are an error so that a misspelt option is reported, not ignored.
    model_config = ConfigDict(extra="forbid")


class SessionBody(_Body):
    """Body of `POST /v1/models/{name}/sessions` (every field optional)."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"pooling": "mean", "return_state": True}]}
    )
    pooling: StreamPooling | None = Field(
        default=None,
        description="Encoding per chunk: over every step so far (last/mean/max; default: the "
        "model's) or this chunk's per-step outputs (none).",
    )
    return_state: bool = Field(
        default=False, description="Answer every chunk with a portable `state_token` too."
    )
    state_token: str | None = Field(
        default=None, description="Resume from a state token returned by an earlier chunk."
    )


class _Chunk(_Body):
    inputs: Annotated[list[list[float]] | None, SkipValidation] = Field(
        default=None, description="One feature-sequence chunk: [step][feature] floats."
    )
    tokens: Annotated[list[int] | None, SkipValidation] = Field(
        default=None, description="One token-id chunk: [step]."
    )
    text: str | None = Field(default=None, description="One text chunk.")
    timeout_ms: float | None = Field(
        default=None, gt=0, le=3_600_000, description="Deadline; past it the answer is 504."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> _Chunk:
        given = [n for n in ("inputs", "tokens", "text") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                f"exactly one of 'inputs', 'tokens', 'text' is required, got {given or 'none'}"
            )
        return self


class ChunkBody(_Chunk):
    """Body of `POST /v1/sessions/{id}/chunks`."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"inputs": [[22.7], [24.4], [25.5]]}]}
    )


class StreamBody(_Chunk):
    """Body of `POST /v1/models/{name}/stream`: a chunk and the state so far."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"inputs": [[22.7], [24.4]]},
                {"inputs": [[25.5]], "state_token": "<the state_token of the previous answer>"},
            ]
        }
    )
    pooling: StreamPooling | None = Field(default=None, description="As for sessions.")
    state_token: str | None = Field(
        default=None, description="The previous chunk's `state_token`; absent: a new stream."
    )


class SessionResponse(BaseModel):
    """A session: its id, model version, pooling and the steps it has consumed."""

    session_id: str
    model: str
    version: int
    pooling: StreamPooling
    steps: int


class ChunkResponse(BaseModel):
    """The answer to a chunk."""

    model: str
    version: int
    steps: int = Field(description="Time steps consumed so far, this chunk included.")
    encoding: list[float] | list[list[float]] = Field(
        description="Pooled over every step so far; per step of this chunk for pooling none."
    )
    scores: list[float] | None = Field(default=None, description="Head outputs, if any.")
    label: str | None = Field(default=None, description="Arg-max label of a labelled head.")
    state_token: str | None = Field(
        default=None, description="Opaque portable state (send it back with the next chunk)."
    )


def token_text(raw: bytes) -> str:
    """Raw token bytes as unpadded base64url (the JSON spelling)."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def chunk_sequence(body: _Chunk) -> tuple[Sequence, InputKind]:
    """The one sequence of a chunk body, checked with the encode path's codecs."""
    if body.inputs is not None:
        return _single(body.inputs, codecs.features_from_json, "inputs"), "features"
    if body.tokens is not None:
        return _single(body.tokens, codecs.tokens_from_json, "tokens"), "tokens"
    assert body.text is not None
    return body.text, "text"


def _single(value: Any, parse: Callable[[Any, str], list[np.ndarray]], name: str) -> np.ndarray:
    try:
        return parse([value], name)[0]
    except InvalidInput as exc:
        # NOTE: the codecs parse a batch; a chunk is one sequence, so drop the batch index.
        field = name + exc.field.removeprefix(f"{name}[0]")
        raise InvalidInput(field, exc.message.removeprefix(f"{exc.field}: ")) from None


def _json(value: dict[str, Any], status: int = 200) -> Response:
    return Response(codecs.dumps(value), status_code=status, media_type="application/json")


def _session(info: SessionInfo) -> dict[str, Any]:
    return {
        "session_id": info.id,
        "model": info.model,
        "version": info.version,
        "pooling": info.pooling,
        "steps": info.steps,
    }


def _chunk(result: ChunkResult) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": result.model,
        "version": result.version,
        "steps": result.steps,
        "encoding": result.encoding,
    }
    if result.scores is not None:
        out["scores"] = result.scores
    if result.label is not None:
        out["label"] = result.label
    if result.state_token is not None:
        out["state_token"] = token_text(result.state_token)
    return out


def _optional(extra: dict[str, Any]) -> dict[str, Any]:
    """`documented_body` for a body that may be left out."""
    extra["requestBody"]["required"] = False
    return extra


def create_session_router(
    sessions: SessionManager,
    metrics: Metrics,
    known: metric_labels.Known,
    max_values: int | None = None,
) -> APIRouter:
    """The session routes over `sessions`; requests are counted in `metrics` like every route's
    (failed requests for models `known` rejects get blank labels); bodies of more than
    `max_values` JSON values are refused before parsing."""
    router = APIRouter(tags=["streaming sessions"])
    observer = RequestObserver(metrics, "rest", known)
    errors: dict[int | str, dict[str, Any]] = {
        status: {"model": rest_schemas.ErrorBody} for status in (400, 404, 409, 503, 504)
    }

    def _labels(session_id: str) -> tuple[str, int | None]:
        info = sessions.peek(session_id)
        return (info.model, info.version) if info is not None else ("", None)

    async def _open(name: str, version: int | None, request: Request) -> Response:
        with observer.observe(name, version, "session_open") as labels:
            body = parse_body(SessionBody, await request.body(), max_values)
            info = sessions.create(
                name,
                version,
                pooling=body.pooling,
                return_state=body.return_state,
                state_token=body.state_token,
            )
            labels["version"] = info.version
        return _json(_session(info), status=201)

    async def _stream(name: str, version: int | None, request: Request) -> Response:
        with observer.observe(name, version, "stream") as labels:
            body = parse_body(StreamBody, await request.body(), max_values)
            sequence, kind = chunk_sequence(body)
            result = await sessions.stream(
                name,
                sequence,
                kind,
                version=version,
                pooling=body.pooling,
                state_token=body.state_token,
                timeout_s=None if body.timeout_ms is None else body.timeout_ms / 1000.0,
                protocol="rest",
            )
            labels["version"] = result.version
        return _json(_chunk(result))

    @router.post(
        "/v1/models/{name}/sessions",
        response_model=SessionResponse,
        status_code=201,
        responses=errors,
        summary="Open a streaming session",
        openapi_extra=_optional(documented_body(SessionBody)),
    )
    async def open_session(name: str, request: Request) -> Response:
        return await _open(name, None, request)

    @router.post(
        "/v1/models/{name}/versions/{version}/sessions",
        response_model=SessionResponse,
        status_code=201,
        responses=errors,
        summary="Open a streaming session on one version",
        openapi_extra=_optional(documented_body(SessionBody)),
    )
    @observer.route("session_open")
    async def open_session_version(name: str, version: VersionPath, request: Request) -> Response:
        return await _open(name, version, request)

    @router.post(
        "/v1/sessions/{session_id}/chunks",
        response_model=ChunkResponse,
        responses=errors,
        summary="Send the next chunk of a session",
        openapi_extra=documented_body(ChunkBody),
    )
    async def send_chunk(session_id: str, request: Request) -> Response:
        with observer.observe(*_labels(session_id), "session_chunk"):
            body = parse_body(ChunkBody, await request.body(), max_values)
            sequence, kind = chunk_sequence(body)
            result = await sessions.chunk(
                session_id,
                sequence,
                kind,
                timeout_s=None if body.timeout_ms is None else body.timeout_ms / 1000.0,
                protocol="rest",
            )
        return _json(_chunk(result))

    @router.get(
        "/v1/sessions/{session_id}",
        response_model=SessionResponse,
        responses=errors,
        summary="Look at a session",
    )
    async def get_session(session_id: str) -> Response:
        with observer.observe(*_labels(session_id), "session_get"):
            return _json(_session(sessions.info(session_id)))

    @router.delete(
        "/v1/sessions/{session_id}",
        response_model=SessionResponse,
        responses=errors,
        summary="Close a session",
    )
    async def close_session(session_id: str) -> Response:
        with observer.observe(*_labels(session_id), "session_close"):
            return _json(_session(sessions.close(session_id)))

    @router.post(
        "/v1/models/{name}/stream",
        response_model=ChunkResponse,
        responses=errors,
        summary="Encode one chunk statelessly (state in and out as a portable token)",
        openapi_extra=documented_body(StreamBody),
    )
    async def stream(name: str, request: Request) -> Response:
        return await _stream(name, None, request)

    @router.post(
        "/v1/models/{name}/versions/{version}/stream",
        response_model=ChunkResponse,
        responses=errors,
        summary="Encode one chunk statelessly on one version",
        openapi_extra=documented_body(StreamBody),
    )
    @observer.route("stream")
    async def stream_version(name: str, version: VersionPath, request: Request) -> Response:
        return await _stream(name, version, request)

    return router
