"""rnnserve's REST API (JSON) on the client side: requests, answers, errors, SSE — no I/O.

A call is a `Request`: what to send and how to read the answer. The sync and async transports
(client.py, aio.py) send it with httpx and hand the answer back here.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
import numpy as np

from rnnserve_client import _inputs, errors, results

T = TypeVar("T")

# The server refuses a timeout_ms over one hour (service/core/validation.py, MAX_TIMEOUT_MS).
MAX_TIMEOUT_MS = 3_600_000
# What closing a session may meet and ignore: it expired, or its server is gone.
SESSION_GONE = (errors.NotFound, errors.Unavailable)
SESSION_CLOSE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Request(Generic[T]):
    """One REST call: method, path, JSON body, and how its answer's JSON reads (a stream's
    `read` reads its `result` event)."""

    method: str
    path: str
    read: Callable[[Any], T]
    body: dict[str, Any] | None = None
    # The body carries the call's deadline as `timeout_ms` (the server computes nothing past it).
    timed: bool = False

    def json(self, remaining_s: float | None) -> dict[str, Any] | None:
        """The body to send with `remaining_s` left of the call's deadline."""
        ms = timeout_ms(remaining_s)
        if self.body is None or not self.timed or ms is None:
            return self.body
        return {**self.body, "timeout_ms": ms}


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


def _given(**fields: Any) -> dict[str, Any]:
    # Optional fields are left out when not given (the server applies its defaults).
    return {name: value for name, value in fields.items() if value is not None}


def _batch(batch: _inputs.Batch) -> dict[str, Any]:
    if batch.kind == "texts":
        return {"texts": batch.items}
    return {batch.kind: [item.tolist() for item in batch.items]}


def _chunk(chunk: _inputs.Chunk) -> dict[str, Any]:
    return {chunk.kind: chunk.value if chunk.kind == "text" else chunk.value.tolist()}


def _token(state_token: str | bytes | None) -> str | None:
    return None if state_token is None else _inputs.token_text(state_token)


def encode(asked: _inputs.EncodeArgs) -> Request[results.EncodeResult]:
    """`POST .../encode`."""
    body = _batch(asked.batch) | _given(pooling=asked.pooling)
    path = model_path(asked.model, asked.version, "encode")
    return Request("POST", path, partial(encode_result, pooling=asked.pooling), body, timed=True)


def generate(asked: _inputs.GenerateArgs, stream: bool = False) -> Request[results.GenerateResult]:
    """`POST .../generate` (with `stream`: answered by server-sent events)."""
    options = _given(max_length=asked.max_length, beam_size=asked.beam_size, stream=stream or None)
    path = model_path(asked.model, asked.version, "generate")
    return Request("POST", path, generate_result, _batch(asked.batch) | options, timed=True)


def stream(asked: _inputs.StreamArgs) -> Request[results.ChunkResult]:
    """`POST .../stream`."""
    options = _given(pooling=asked.pooling, state_token=_token(asked.state_token))
    path = model_path(asked.model, asked.version, "stream")
    return Request("POST", path, chunk_result, _chunk(asked.chunk) | options, timed=True)


def models() -> Request[list[results.ModelInfo]]:
    """`GET /v1/models`."""
    return Request("GET", "/v1/models", lambda answer: [model_info(m) for m in answer["models"]])


def model(name: str) -> Request[results.ModelInfo]:
    """`GET /v1/models/{name}`."""
    return Request("GET", model_path(name), model_info)


def open_session(asked: _inputs.SessionArgs) -> Request[results.SessionOpened]:
    """`POST .../sessions`."""
    options = _given(pooling=asked.pooling, state_token=_token(asked.state_token))
    path = model_path(asked.model, asked.version, "sessions")
    return Request("POST", path, session_opened, {"return_state": asked.return_state} | options)


def session_chunk(session_id: str, chunk: _inputs.Chunk) -> Request[results.ChunkResult]:
    """`POST /v1/sessions/{id}/chunks`."""
    path = f"/v1/sessions/{session_id}/chunks"
    return Request("POST", path, chunk_result, _chunk(chunk), timed=True)


def close_session(session_id: str) -> Request[None]:
    """`DELETE /v1/sessions/{id}`."""
    return Request("DELETE", f"/v1/sessions/{session_id}", lambda answer: None)


# --- answers ------------------------------------------------------------------------------------


def floats(values: Any) -> Any:
    """JSON numbers as float32 numpy."""
    return np.asarray(values, dtype=np.float32)


def _floats_or_none(values: Any) -> Any:
    return None if values is None else floats(values)


def encode_result(answer: Mapping[str, Any], pooling: str | None) -> results.EncodeResult:
    """The JSON of an encode answer."""
    encodings = answer["encodings"]
    return results.EncodeResult(
        model=answer["model"],
        version=answer["version"],
        encodings=[floats(e) for e in encodings] if pooling == "none" else floats(encodings),
        labels=answer.get("labels"),
        scores=_floats_or_none(answer.get("scores")),
    )


def generate_result(answer: Mapping[str, Any]) -> results.GenerateResult:
    """The JSON of a generate answer (or of the `result` event of a streamed one)."""
    return results.GenerateResult(
        model=answer["model"],
        version=answer["version"],
        outputs=[results.GeneratedOutput(o["tokens"], o.get("text")) for o in answer["outputs"]],
    )


def chunk_result(answer: Mapping[str, Any]) -> results.ChunkResult:
    """The JSON of a chunk's answer."""
    return results.ChunkResult(
        model=answer["model"],
        version=answer["version"],
        steps=answer["steps"],
        encoding=floats(answer["encoding"]),
        scores=_floats_or_none(answer.get("scores")),
        label=answer.get("label"),
        state_token=answer.get("state_token"),
    )


def session_opened(answer: Mapping[str, Any]) -> results.SessionOpened:
    """The JSON of an opened session."""
    return results.SessionOpened(
        answer["session_id"], answer["model"], answer["version"], answer["pooling"], answer["steps"]
    )


def model_info(answer: Mapping[str, Any]) -> results.ModelInfo:
    """The JSON of a model's status."""
    return results.ModelInfo(
        name=answer["name"],
        versions=[
            results.VersionInfo(v["version"], v["state"], v.get("reason"), v.get("load_seconds"))
            for v in answer["versions"]
        ],
        architecture=dict(answer.get("architecture") or {}),
    )


def answer_of(url: str, status: int, headers: Mapping[str, str], content: bytes) -> Any:
    """An answer's JSON (None when empty), or the error its status ≥ 400 means."""
    if status >= 400:
        raise error_of(url, status, headers, content)
    return json.loads(content) if content else None


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


@contextlib.contextmanager
def errors_mapped(url: str) -> Iterator[None]:
    """httpx's failures inside the block as the client's errors: no answer in time is
    DeadlineExceeded, no connection (or a broken one) ConnectionFailed."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise errors.DeadlineExceeded(f"no answer in time ({exc})", url=url) from None
    except httpx.TransportError as exc:
        raise errors.ConnectionFailed(f"{type(exc).__name__}: {exc}", url=url) from None


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


class GenerateEvents:
    """A streamed generate's answer, line by line: `token` events, then the `result` event
    (read by the request's `read`); an `error` event is raised."""

    def __init__(self, url: str, request: Request[results.GenerateResult]) -> None:
        self._url = url
        self._read = request.read
        self._sse = SseParser()
        self.finished = False

    def feed(self, line: str) -> results.TokenEvent | results.GenerateResult | None:
        """One line of the answer; the event it completes, if any."""
        event = self._sse.feed(line)
        if event is None:
            return None
        name, data = event
        if name == "token":
            return results.TokenEvent(data["index"], data["token"], data.get("text"))
        if name == "result":
            self.finished = True
            return self._read(data)
        if name == "error":
            raise error_from(self._url, 200, {}, data["error"])
        return None

    def end(self) -> None:
        """The answer ended: raise unless its result came."""
        if not self.finished:
            raise errors.ConnectionFailed("the event stream ended before its result", url=self._url)
