"""The gRPC error table: every core error class → status code, and the trailing metadata that
names the error's class (a client tells NotReady from Draining under one UNAVAILABLE).

Chosen from gRPC's own code semantics, not derived from the HTTP table; tests/grpc_api/
test_error_table.py checks that every class of `errors.ALL_ERRORS` has an entry.
"""

from __future__ import annotations

from typing import cast

import grpc

from service.core import errors

GRPC_STATUS: dict[type[errors.ServiceError], grpc.StatusCode] = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotReady: grpc.StatusCode.UNAVAILABLE,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Draining: grpc.StatusCode.UNAVAILABLE,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Conflict: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ComputeError: grpc.StatusCode.INTERNAL,
}


def grpc_status(error: errors.ServiceError) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and client-safe message of a core error."""
    for cls in type(error).__mro__:
        code = GRPC_STATUS.get(cast(type[errors.ServiceError], cls))
        if code is not None:
            return code, error.message
    return grpc.StatusCode.INTERNAL, error.message


def error_metadata(exc: errors.ServiceError) -> tuple[tuple[str, str], ...]:
    """Trailing metadata of a refused call: `rnnserve-error-type` (the core error's class, as
    REST's error body names it: one gRPC code covers both NotReady and Draining),
    `rnnserve-error-field` for invalid input, `retry-after` (seconds) when overloaded."""
    entries = [("rnnserve-error-type", type(exc).__name__)]
    if isinstance(exc, errors.InvalidInput) and exc.field.isascii() and exc.field.isprintable():
        entries.append(("rnnserve-error-field", exc.field))
    if isinstance(exc, errors.Overloaded):
        entries.append(("retry-after", f"{exc.retry_after_s:g}"))
    return tuple(entries)
