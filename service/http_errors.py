"""The HTTP error table: every core error class → status code, and the two error body shapes.

rnnserve's API answers `{"error": {"type", "message", "field"?}}`; the Open Inference Protocol
endpoints (`/v2/...`) answer `{"error": "<message>"}` as KServe and Triton clients expect.
Invalid input is 400 everywhere (FastAPI's own request-validation errors included), as Triton does.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import codecs, errors, validation

HTTP_STATUS: dict[type[errors.ServiceError], int] = {
    errors.NotFound: 404,
    errors.InvalidInput: 400,
    errors.PayloadTooLarge: 413,
    errors.NotReady: 503,
    errors.Overloaded: 503,
    errors.DeadlineExceeded: 504,
    errors.Draining: 503,
    errors.Unauthenticated: 401,
    errors.PermissionDenied: 403,
    errors.Conflict: 409,
    errors.ComputeError: 500,
}


class InvalidPathParameter(errors.InvalidInput):
    """A path parameter refused while FastAPI reads the path: the route itself never runs.
    Answered as the InvalidInput it is (the error body's type says so)."""


def status_of(exc: errors.ServiceError) -> int:
    """The HTTP status of a core error (a subclass takes its nearest listed ancestor's)."""
    for cls in type(exc).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 500


def is_v2(request: Request) -> bool:
    """Whether the request addressed the Open Inference Protocol endpoints."""
    return request.url.path.startswith("/v2")


def error_body(v2: bool, type_name: str, message: str, field: str | None = None) -> bytes:
    """The JSON error body in the shape of the API the request addressed."""
    if v2:
        return codecs.dumps({"error": message})
    detail: dict[str, Any] = {"type": type_name, "message": message}
    if field is not None:
        detail["field"] = field
    return codecs.dumps({"error": detail})


def service_error_response(exc: errors.ServiceError, v2: bool) -> Response:
    """The HTTP answer to a core error: status from the table, Retry-After when overloaded."""
    headers: dict[str, str] = {}
    if isinstance(exc, errors.Overloaded):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    elif isinstance(exc, errors.Draining | errors.NotReady):
        headers["Retry-After"] = "1"
    elif isinstance(exc, errors.Unauthenticated):
        headers["WWW-Authenticate"] = "Bearer"
    field = exc.field if isinstance(exc, errors.InvalidInput) else None
    # NOTE: the body's type is public: a path refusal is an InvalidInput like any other.
    name = "InvalidInput" if isinstance(exc, InvalidPathParameter) else type(exc).__name__
    body = error_body(v2, name, exc.message, field)
    return Response(
        body, status_code=status_of(exc), media_type="application/json", headers=headers
    )


def validation_error(exc: ValidationError | RequestValidationError) -> errors.InvalidInput:
    """The first pydantic/FastAPI validation problem as an InvalidInput naming its field, in the
    project's words (`validation.pydantic_problem`)."""
    problems = exc.errors()
    if not problems:
        return errors.InvalidInput("body", "invalid request")
    first = problems[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    field = ".".join(loc) if loc else "body"
    message = validation.pydantic_problem(first)
    if isinstance(exc, ValidationError) or len(problems) == 1:
        return errors.InvalidInput(field, message)
    return errors.InvalidInput(field, f"{message} (and {len(problems) - 1} more problems)")


async def handle_service_error(request: Request, exc: Exception) -> Response:
    """Exception handler for every `ServiceError` raised by a route."""
    assert isinstance(exc, errors.ServiceError)
    return service_error_response(exc, is_v2(request))


async def handle_validation_error(request: Request, exc: Exception) -> Response:
    """FastAPI's own request-validation errors, in the same shape and status as InvalidInput."""
    assert isinstance(exc, RequestValidationError)
    return service_error_response(validation_error(exc), is_v2(request))


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's 404/405 etc., in the error shape of the API the path belongs to."""
    assert isinstance(exc, StarletteHTTPException)
    body = error_body(is_v2(request), "HTTPError", str(exc.detail))
    return Response(
        body, status_code=exc.status_code, media_type="application/json", headers=exc.headers
    )


async def handle_client_disconnected(request: Request, exc: Exception) -> Response:
    """Nobody reads this answer; 499 (nginx's "client closed request") keeps access logs clear."""
    return Response(status_code=499)


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    """A bug: 500 with a generic message (the traceback goes to the log, never to the client)."""
    body = error_body(is_v2(request), "InternalError", "internal server error")
    return Response(body, status_code=500, media_type="application/json")
