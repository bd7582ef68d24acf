"""rnnserve's REST API (JSON) on the client side: request bodies, answers, errors, SSE.

Pure functions: the sync and async clients (client.py, aio.py) do the I/O with httpx.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import numpy as np

from rnnserve_client import errors
from rnnserve_client._inputs import Batch, Chunk, token_text
from rnnserve_client.results import (
    ChunkResult,
    EncodeResult,
    GeneratedOutput,
    GenerateResult,
    ModelInfo,
    TokenEvent,
    VersionInfo,
)

# The server refuses a timeout_ms over one hour (service/core/validation.py, MAX_TIMEOUT_MS).
MAX_TIMEOUT_MS = 3_600_000


def model_path(name: str, version: int | None = None, action: str | None = None) -> str:
    """`/v1/models/{name}[/versions/{version}][/{action}]`."""
    path = f"/v1/models/{quote(name, safe='')}"
    if version is not None:
        path += f"/versions/{int(version)}"
    return path if action is None else f"{path}/{action}"


def timeout_ms(remaining_s: float | None) -> int | None:
    """The request's own deadline for the server (it never computes work past it)."""
    if remaining_s is None:
        return None
    return min(MAX_TIMEOUT_MS, max(1, math.ceil(remaining_s * 1000)))


def _with_timeout(body: dict[str, Any], remaining_s: float | None) -> dict[str, Any]:
    ms = timeout_ms(remaining_s)
    if ms is not None:
        body["timeout_ms"] = ms
    return body


def _batch(batch: Batch) -> dict[str, Any]:
    if batch.kind == "texts":
        return {"texts": batch.items}
    return {batch.kind: [item.tolist() for item in batch.items]}


def encode_body(batch: Batch, pooling: str | None, remaining_s: float | None) -> dict[str, Any]:
    """Body of `POST .../encode`."""
    body = _batch(batch)
    if pooling is not None:
        body["pooling"] = pooling
    return _with_timeout(body, remaining_s)


def generate_body(
    batch: Batch,
    max_length: int | None,
    beam_size: int | None,
    remaining_s: float | None,
    stream: bool = False,
) -> dict[str, Any]:
    """Body of `POST .../generate`."""
    body = _batch(batch)
    if max_length is not None:
        body["max_length"] = max_length
    if beam_size is not None:
        body["beam_size"] = beam_size
    if stream:
        body["stream"] = True
    return _with_timeout(body, remaining_s)


def chunk_body(chunk: Chunk, remaining_s: float | None) -> dict[str, Any]:
    """Body of `POST /v1/sessions/{id}/chunks`."""
    value = chunk.value if chunk.kind == "text" else chunk.value.tolist()
    return _with_timeout({chunk.kind: value}, remaining_s)


def stream_body(
    chunk: Chunk,
    pooling: str | None,
    state_token: str | bytes | None,
    remaining_s: float | None,
) -> dict[str, Any]:
    """Body of `POST .../stream`."""
    body = chunk_body(chunk, remaining_s)
    if pooling is not None:
        body["pooling"] = pooling
    if state_token is not None:
        body["state_token"] = token_text(state_token)
    return body


def session_body(
    pooling: str | None, return_state: bool, state_token: str | bytes | None
) -> dict[str, Any]:
    """Body of `POST .../sessions`."""
    body: dict[str, Any] = {"return_state": return_state}
    if pooling is not None:
        body["pooling"] = pooling
    if state_token is not None:
        body["state_token"] = token_text(state_token)
    return body


# --- answers ------------------------------------------------------------------------------------


def floats(values: Any) -> Any:
    """JSON numbers as float32 numpy."""
    return np.asarray(values, dtype=np.float32)


def encode_result(answer: Mapping[str, Any], pooling: str | None) -> EncodeResult:
    """The JSON of an encode answer."""
    encodings = answer["encodings"]
    scores = answer.get("scores")
    return EncodeResult(
        model=answer["model"],
        version=answer["version"],
        encodings=[floats(e) for e in encodings] if pooling == "none" else floats(encodings),
        labels=answer.get("labels"),
        scores=None if scores is None else floats(scores),
    )


def generate_result(answer: Mapping[str, Any]) -> GenerateResult:
    """The JSON of a generate answer (or of the `result` event of a streamed one)."""
    return GenerateResult(
        model=answer["model"],
        version=answer["version"],
        outputs=[GeneratedOutput(o["tokens"], o.get("text")) for o in answer["outputs"]],
    )


def token_event(data: Mapping[str, Any]) -> TokenEvent:
    """The data of a `token` event."""
    return TokenEvent(data["index"], data["token"], data.get("text"))


def chunk_result(answer: Mapping[str, Any]) -> ChunkResult:
    """The JSON of a chunk's answer."""
    scores = answer.get("scores")
    return ChunkResult(
        model=answer["model"],
        version=answer["version"],
        steps=answer["steps"],
        encoding=floats(answer["encoding"]),
        scores=None if scores is None else floats(scores),
        label=answer.get("label"),
        state_token=answer.get("state_token"),
    )


def model_info(answer: Mapping[str, Any]) -> ModelInfo:
    """The JSON of a model's status."""
    return ModelInfo(
        name=answer["name"],
        versions=[
            VersionInfo(v["version"], v["state"], v.get("reason"), v.get("load_seconds"))
            for v in answer["versions"]
        ],
        architecture=dict(answer.get("architecture") or {}),
    )


# --- errors -------------------------------------------------------------------------------------

_BY_STATUS: dict[int, type[errors.RnnserveError]] = {
    400: errors.InvalidInput,
    401: errors.Unauthenticated,
    403: errors.PermissionDenied,
    404: errors.NotFound,
    409: errors.Conflict,
    413: errors.InvalidInput,
    422: errors.InvalidInput,
    500: errors.ComputeError,
    # A proxy in front of the server could not reach it, or the server cannot take work now.
    502: errors.Unavailable,
    503: errors.Unavailable,
    504: errors.DeadlineExceeded,
}


def retry_after(value: str | None) -> float:
    """Seconds of a Retry-After header (delta-seconds; an HTTP date or garbage: 1 s)."""
    try:
        seconds = float(value) if value is not None else 1.0
    except ValueError:
        return 1.0
    return seconds if math.isfinite(seconds) and seconds >= 0 else 1.0


def error_of(
    url: str, status: int, headers: Mapping[str, str], body: bytes
) -> errors.RnnserveError:
    """The client error of an HTTP answer with `status` ≥ 400: the class the body's `type` names
    (else the status's), the server's message and field."""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return error_from(url, status, headers, parsed["error"])
    message = body.decode("utf-8", "replace").strip() or f"HTTP {status}"
    return error_from(url, status, headers, {"message": message})


def error_from(
    url: str, status: int, headers: Mapping[str, str], detail: Mapping[str, Any]
) -> errors.RnnserveError:
    """The client error of an error body's `{"type", "message", "field"}` (also an SSE `error`
    event's)."""
    message = str(detail.get("message") or f"HTTP {status}")
    named = detail.get("type")
    cls = errors.BY_TYPE.get(str(named), _BY_STATUS.get(status, errors.ServerError))
    if cls is errors.Unavailable and named is None and "retry-after" in headers:
        # NOTE: a 503 with Retry-After from something that is not rnnserve (a proxy) is load.
        cls = errors.Overloaded
    if issubclass(cls, errors.Overloaded):
        return errors.Overloaded(
            message, retry_after_s=retry_after(headers.get("retry-after")), url=url, status=status
        )
    if issubclass(cls, errors.InvalidInput):
        field = detail.get("field")
        return errors.InvalidInput(
            message, field=None if field is None else str(field), url=url, status=status
        )
    return cls(message, url=url, status=status)


# --- server-sent events -------------------------------------------------------------------------


@dataclass
class SseParser:
    """Server-sent events from the lines of a response: feed lines, get (event, data) pairs."""

    _event: str = "message"
    _data: list[str] = field(default_factory=list)

    def feed(self, line: str) -> tuple[str, Any] | None:
        """One line; a complete event when the line ends one."""
        if line == "":
            if not self._data:
                return None
            event, data = self._event, "\n".join(self._data)
            self._event, self._data = "message", []
            return event, json.loads(data)
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None
