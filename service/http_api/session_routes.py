"""HTTP routes of streaming sessions:

- `POST /v1/models/{name}/sessions` (and `.../versions/{version}/sessions`): open a session.
- `POST /v1/sessions/{id}/chunks`: send one chunk; the answer covers every step so far.
- `GET /v1/sessions/{id}`, `DELETE /v1/sessions/{id}`: look at / close a session.
- `POST /v1/models/{name}/stream` (and `.../versions/{version}/stream`): stateless; the state
  travels in `state_token`, so any replica with the same key takes the next chunk.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import Request, Response

from service.core import limits
from service.core.errors import InvalidInput
from service.core.request_metrics import RequestMetrics
from service.core.sessions import ChunkResult, SessionInfo, SessionManager
from service.core.types import InputKind, SequenceData
from service.http_api import json_codecs, schemas
from service.http_api.bodies import fields_of, json_response, parse_body
from service.http_api.openapi import documented_body, errors_doc, optional_body
from service.http_api.routing import Route, path_version

_TAGS = ["streaming sessions"]
_ERRORS = errors_doc(False, 400, 404, 409, 503, 504)
_SESSION: dict[str, Any] = {
    "response_model": schemas.SessionResponse,
    "responses": _ERRORS,
    "tags": _TAGS,
}
_CHUNK: dict[str, Any] = {
    "response_model": schemas.ChunkResponse,
    "responses": _ERRORS,
    "tags": _TAGS,
}


class SessionRoutes:
    """The session handlers over `sessions` (`routes()`: their table). Bodies of more than
    `max_values` JSON values are refused before parsing."""

    def __init__(
        self, sessions: SessionManager, requests: RequestMetrics, max_values: int | None = None
    ) -> None:
        self.sessions = sessions
        self.requests = requests
        self.max_values = max_values

    def routes(self) -> list[Route]:
        """The table."""
        opening = {
            **_SESSION,
            "status_code": 201,
            "openapi_extra": optional_body(schemas.SessionBody),
        }
        stream = {**_CHUNK, "openapi_extra": documented_body(schemas.StreamBody)}
        return [
            Route("POST", "/v1/models/{name}/sessions", self.open, "open_session",
                  doc={**opening, "summary": "Open a streaming session"}),
            Route("POST", "/v1/models/{name}/versions/{version}/sessions", self.open,
                  "open_session_version",
                  doc={**opening, "summary": "Open a streaming session on one version"}),
            Route("POST", "/v1/sessions/{session_id}/chunks", self.chunk, "send_chunk",
                  doc={**_CHUNK, "summary": "Send the next chunk of a session",
                       "openapi_extra": documented_body(schemas.ChunkBody)}),
            Route("GET", "/v1/sessions/{session_id}", self.get, "get_session",
                  doc={**_SESSION, "summary": "Look at a session"}),
            Route("DELETE", "/v1/sessions/{session_id}", self.close, "close_session",
                  doc={**_SESSION, "summary": "Close a session"}),
            Route("POST", "/v1/models/{name}/stream", self.stream, "stream",
                  doc={**stream, "summary": "Encode one chunk statelessly (state in and out as "
                       "a portable token)"}),
            Route("POST", "/v1/models/{name}/versions/{version}/stream", self.stream,
                  "stream_version",
                  doc={**stream, "summary": "Encode one chunk statelessly on one version"}),
        ]  # fmt: skip

    async def open(self, request: Request, name: str, version: str | None = None) -> Response:
        """Open a session on a model (or one version of it)."""
        with self.requests.observe(name, None, "session_open") as observed:
            number = observed.version = path_version(version)
            body = parse_body(schemas.SessionBody, await request.body(), self.max_values)
            info = self.sessions.create(
                name,
                number,
                pooling=body.pooling,
                return_state=body.return_state,
                state_token=body.state_token,
            )
            observed.version = info.version
        return json_response(session_answer(info), status=201)

    async def chunk(self, request: Request, session_id: str) -> Response:
        """Feed a session its next chunk."""
        with self.requests.observe(*self._labels(session_id), "session_chunk"):
            body = parse_body(schemas.ChunkBody, await request.body(), self.max_values)
            sequence, kind = chunk_sequence(body)
            result = await self.sessions.chunk(
                session_id, sequence, kind, timeout_s=limits.timeout_seconds(body.timeout_ms)
            )
        return json_response(chunk_answer(result))

    async def get(self, request: Request, session_id: str) -> Response:
        """What a session is and how far it got."""
        with self.requests.observe(*self._labels(session_id), "session_get"):
            return json_response(session_answer(self.sessions.info(session_id)))

    async def close(self, request: Request, session_id: str) -> Response:
        """Close a session."""
        with self.requests.observe(*self._labels(session_id), "session_close"):
            return json_response(session_answer(self.sessions.close(session_id)))

    async def stream(self, request: Request, name: str, version: str | None = None) -> Response:
        """One stateless chunk: the state in and out as a token."""
        with self.requests.observe(name, None, "stream") as observed:
            number = observed.version = path_version(version)
            body = parse_body(schemas.StreamBody, await request.body(), self.max_values)
            sequence, kind = chunk_sequence(body)
            result = await self.sessions.stream(
                name,
                sequence,
                kind,
                version=number,
                pooling=body.pooling,
                state_token=body.state_token,
                timeout_s=limits.timeout_seconds(body.timeout_ms),
            )
            observed.version = result.version
        return json_response(chunk_answer(result))

    def _labels(self, session_id: str) -> tuple[str, int | None]:
        info = self.sessions.peek(session_id)
        return (info.model, info.version) if info is not None else ("", None)


def token_text(raw: bytes) -> str:
    """Raw token bytes as unpadded base64url (the JSON spelling)."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def chunk_sequence(body: schemas.ChunkBody | schemas.StreamBody) -> tuple[SequenceData, InputKind]:
    """The one sequence of a chunk body, checked with the encode path's codecs."""
    if body.inputs is not None:
        return _single(body.inputs, json_codecs.features_from_json, "inputs"), "features"
    if body.tokens is not None:
        return _single(body.tokens, json_codecs.tokens_from_json, "tokens"), "tokens"
    assert body.text is not None
    return body.text, "text"


def _single(value: Any, parse: Callable[[Any, str], list[np.ndarray]], name: str) -> np.ndarray:
    try:
        return parse([value], name)[0]
    except InvalidInput as exc:
        # NOTE: the codecs parse a batch; a chunk is one sequence, so drop the batch index.
        field = name + exc.field.removeprefix(f"{name}[0]")
        raise InvalidInput(field, exc.message.removeprefix(f"{exc.field}: ")) from None


def session_answer(info: SessionInfo) -> dict[str, Any]:
    """A SessionInfo as the JSON of `SessionResponse`."""
    return {
        "session_id": info.id,
        "model": info.model,
        "version": info.version,
        "pooling": info.pooling,
        "steps": info.steps,
    }


def chunk_answer(result: ChunkResult) -> dict[str, Any]:
    """A ChunkResult as the JSON of `ChunkResponse`."""
    answer = fields_of(result, "model", "version", "steps", "encoding", "scores", "label")
    if result.state_token is not None:
        answer["state_token"] = token_text(result.state_token)
    return answer
