"""The HTTP error table: every core error class → status code, and the two error body shapes.

rnnserve's API answers `{"error": {"type", "message", "field"?}}`; the Open Inference Protocol
endpoints (`/v2/...`) answer `{"error": "<message>"}` as KServe and Triton clients expect.
Invalid input is 400 everywhere (FastAPI's own request-validation errors included), as Triton does.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service.core import errors, validation
from service.http_api import json_codecs
from service.http_api.body_limits import BodyTooLargeError
from service.http_api.disconnects import ClientDisconnectedError

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
        return json_codecs.dumps({"error": message})
    detail: dict[str, Any] = {"type": type_name, "message": message}
    if field is not None:
        detail["field"] = field
    return json_codecs.dumps({"error": detail})


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
    body = error_body(v2, type(exc).__name__, exc.message, field)
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


def error_response(request: Request, exc: Exception) -> Response | None:
    """The answer to an exception a route raised (None: a bug, for the catch-all handler)."""
    if isinstance(exc, errors.ServiceError):
        return service_error_response(exc, is_v2(request))
    if isinstance(exc, RequestValidationError):
        return service_error_response(validation_error(exc), is_v2(request))
    if isinstance(exc, StarletteHTTPException):
        body = error_body(is_v2(request), "HTTPError", str(exc.detail))
        return Response(
            body, status_code=exc.status_code, media_type="application/json", headers=exc.headers
        )
    if isinstance(exc, ClientDisconnectedError | ClientDisconnect):
        # NOTE: nobody reads this answer; 499 (nginx's "client closed request") keeps access
        # logs clear. ClientDisconnect: the client left while its body was read (or was cut
        # off by its body deadline).
        return Response(status_code=499)
    return None


async def handle_error(request: Request, exc: Exception) -> Response:
    """The app's exception handler for every class in `HANDLED` (`error_response`)."""
    response = error_response(request, exc)
    assert response is not None
    return response


# The exception classes `error_response` answers (what the app registers `handle_error` for).
HANDLED: tuple[type[Exception], ...] = (
    errors.ServiceError,
    RequestValidationError,
    StarletteHTTPException,
    ClientDisconnectedError,
    ClientDisconnect,
)


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    """A bug: 500 with a generic message (the traceback goes to the log, never to the client)."""
    body = error_body(is_v2(request), "InternalError", "internal server error")
    return Response(body, status_code=500, media_type="application/json")


def as_core_error(exc: BaseException) -> BaseException:
    """An HTTP front-end exception as the core error it stands for in request metrics: a client
    gone is a cancelled request, a chunked body over the size limit invalid input (413)."""
    if isinstance(exc, ClientDisconnectedError | ClientDisconnect):
        return asyncio.CancelledError()
    if isinstance(exc, BodyTooLargeError):
        return errors.InvalidInput("body", "too large")
    return exc
