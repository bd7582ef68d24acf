"""Helpers shared by the two HTTP front-ends (service/rest.py, service/v2_rest.py).

JSON answers via orjson, raw-read bodies checked against their pydantic models, OpenAPI entries
for raw-read bodies, the management guard, and per-request metrics.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, TypeVar

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, BeforeValidator, ValidationError
from starlette.requests import ClientDisconnect

from service import codecs, http_errors, management, metric_labels, rest_schemas, validation
from service.errors import InvalidInput
from service.http_limits import BodyTooLargeError
from service.metrics import Metrics, outcome_of
from service.settings import Settings


def _path_version(value: object) -> object:
    # NOTE: an InvalidInput (not a ValueError) passes through pydantic to the app's handler: a
    # 400 with the message V2 gRPC gives the same version string (its field there is
    # `model_version`), counted by `handle_refused_path`.
    if not isinstance(value, str):
        return value
    return validation.parse_version(value, "path.version", http_errors.InvalidPathParameter)


# A `{version}` path parameter: 1–19 digits 0-9, at least 1 ("+1", " 1" or "1_0" are refused,
# where plain `int` would read them as 1, 1 and 10).
VersionPath = Annotated[int, BeforeValidator(_path_version)]

_B = TypeVar("_B", bound=BaseModel)
_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])


class ClientDisconnectedError(Exception):
    """The client closed the connection before its answer was ready (the work was cancelled)."""


async def unless_disconnected(request: Request, work: Awaitable[_T]) -> _T:
    """Await `work`, cancelling it when the client disconnects first.

    The engine then drops the request's queued items before compute (DESIGN §3: work whose
    client has gone is never computed). Call after the body has been read.
    """
    # NOTE: `work` runs in this task; one watcher task cancels it on disconnect (cheaper than
    # racing two tasks with asyncio.wait on every request).
    current = asyncio.current_task()
    assert current is not None
    watcher = asyncio.ensure_future(_disconnected(request))

    def gone(done: asyncio.Future[None]) -> None:
        if done.cancelled():
            return
        done.exception()  # NOTE: a failed receive is a broken connection: the client is gone too
        current.cancel()

    watcher.add_done_callback(gone)
    try:
        return await work
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            current.uncancel()
            raise ClientDisconnectedError from None
        raise
    finally:
        watcher.cancel()


async def _disconnected(request: Request) -> None:
    # NOTE: once the body is read, the server's receive() only returns on disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def json_response(value: Any, status: int = 200) -> Response:
    """A JSON answer serialised by orjson (numpy arrays included)."""
    return Response(codecs.dumps(value), status_code=status, media_type="application/json")


def documented_body(model: type[BaseModel], binary: bool = False) -> dict[str, Any]:
    """`openapi_extra` describing a request body that the route reads raw."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    content: dict[str, Any] = {"application/json": {"schema": schema}}
    if binary:
        content["application/octet-stream"] = {
            "schema": {"type": "string", "format": "binary"},
            "description": "JSON header of Inference-Header-Content-Length bytes, then tensors.",
        }
    return {"requestBody": {"required": True, "content": content}}


def errors_doc(v2: bool, *statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses` entries for error statuses of a route."""
    model = rest_schemas.V2ErrorBody if v2 else rest_schemas.ErrorBody
    return {status: {"model": model} for status in statuses}


def parse_body(model: type[_B], body: bytes, max_values: int | None = None) -> _B:
    """Parse and check a JSON body against `model`; problems become InvalidInput naming fields,
    a body of more than `max_values` JSON values PayloadTooLarge (before parsing)."""
    value = codecs.loads(body, max_values=max_values) if body else {}
    if not isinstance(value, dict):
        raise InvalidInput("body", "expected a JSON object")
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise http_errors.validation_error(exc) from None


def management_guard(settings: Settings, request: Request) -> None:
    """Allow a management call by the one rule of both wires (`management.authorize`)."""
    management.authorize(settings, request.headers.getlist("authorization"))


class RequestObserver:
    """Records requests in the metrics (outcome from the exception, if any).

    Failed requests for unknown models get blank labels (service/metric_labels.py).
    """

    def __init__(self, metrics: Metrics, protocol: str, known: metric_labels.Known) -> None:
        self.metrics = metrics
        self.protocol = protocol
        self.known = known

    def route(self, endpoint: str) -> Callable[[_F], _F]:
        """Mark a route with a `{version}` path parameter: a request refused while FastAPI reads
        its path is recorded under `endpoint` too (by `handle_refused_path`)."""

        def mark(route: _F) -> _F:
            _PATH_CHECKED[route] = (self, endpoint)
            return route

        return mark

    def record(
        self,
        model: str,
        version: int | None,
        endpoint: str,
        error: BaseException | None,
        seconds: float,
    ) -> None:
        """Count one answered request."""
        model, version = metric_labels.request_labels(self.known, model, version, error)
        if isinstance(error, ClientDisconnectedError | ClientDisconnect):
            error = asyncio.CancelledError()
        elif isinstance(error, BodyTooLargeError):
            # NOTE: a chunked body crossing the size limit: the client's fault (413), not ours.
            error = InvalidInput("body", "too large")
        self.metrics.observe_request(
            model, version, self.protocol, endpoint, outcome_of(error), seconds
        )

    @contextmanager
    def observe(self, model: str, version: int | None, endpoint: str) -> Iterator[dict[str, Any]]:
        """Time the block; the caller may set `labels["version"]` once the answer is known, or
        `labels["record"] = False` when the request is recorded elsewhere (streams)."""
        labels: dict[str, Any] = {"version": version, "record": True}
        start = time.perf_counter()
        error: BaseException | None = None
        try:
            yield labels
        except BaseException as exc:
            error = exc
            raise
        finally:
            if labels["record"]:
                self.record(model, labels["version"], endpoint, error, time.perf_counter() - start)


# Route function → (its observer, its endpoint label). Weak: apps built in tests come and go.
_PATH_CHECKED: weakref.WeakKeyDictionary[Callable[..., Any], tuple[RequestObserver, str]] = (
    weakref.WeakKeyDictionary()
)


async def handle_refused_path(request: Request, exc: Exception) -> Response:
    """The answer to an `http_errors.InvalidPathParameter`, recorded under the matched route's
    endpoint (the route's own observer never saw the request)."""
    assert isinstance(exc, http_errors.InvalidPathParameter)
    found = _PATH_CHECKED.get(request.scope.get("endpoint"))  # type: ignore[arg-type]
    if found is not None:
        observer, endpoint = found
        # NOTE: refused while routing, before any work and with no start time to measure from;
        # 0 lands in the lowest latency bucket (0.5 ms), as the few µs it took would.
        observer.record(request.path_params.get("name", ""), None, endpoint, exc, 0.0)
    return http_errors.service_error_response(exc, http_errors.is_v2(request))
