"""The one error hierarchy of the serving core.

Each front-end maps these classes once, in an explicit table (HTTP status; gRPC code). Messages
are safe to show to clients: they name the field and the limit, never a stack trace.
"""

from __future__ import annotations


def shown(text: str, limit: int = 200) -> str:
    """`text` quoted for an error message, cut after `limit` characters: a client's made-up
    name can be megabytes, and gRPC carries messages in size-limited metadata."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text)} characters)"


# The longest message sent to a client: gRPC carries it in metadata (16 KiB at most, all
# metadata together), and no real refusal needs more.
MAX_MESSAGE_CHARS = 2000


class ServiceError(Exception):
    """Base of every error the core reports to a client."""

    def __init__(self, message: str) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            # NOTE: a backstop: messages echo client text through `shown`, which cuts it.
            message = f"{message[:MAX_MESSAGE_CHARS]}… ({len(message)} characters)"
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NotFound(ServiceError):
    """Unknown model, version or session."""


class InvalidInput(ServiceError):
    """The request is malformed or breaks a limit; `field` names the offending part."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class PayloadTooLarge(InvalidInput):
    """The request carries more than a size limit lets the server parse (HTTP 413; gRPC, as any
    invalid input, INVALID_ARGUMENT); the message names the limit."""


class NotReady(ServiceError):
    """The model (or version) exists but cannot take traffic now (loading, failed, unloading)."""


class Overloaded(ServiceError):
    """A bounded queue is full; the client should retry after `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before its result was ready; it was never computed."""


class Draining(ServiceError):
    """The server is shutting down and admits no new work."""


class Unauthenticated(ServiceError):
    """A management call came without a valid bearer token."""


class PermissionDenied(ServiceError):
    """The operation is disabled by configuration (e.g. management endpoints off)."""


class Conflict(ServiceError):
    """The operation conflicts with the current state (e.g. a session limit, a load in progress)."""


class ComputeError(ServiceError):
    """The model failed while computing a batch; every item of that batch gets this error."""


# NOTE: the transport tables (service/http_api/errors.py, service/grpc_api/errors.py) must cover
# every class above; tests/grpc_api/test_error_table.py checks that each subclass of ServiceError
# has an entry.
ALL_ERRORS: tuple[type[ServiceError], ...] = (
    NotFound,
    InvalidInput,
    NotReady,
    Overloaded,
    DeadlineExceeded,
    Draining,
    Unauthenticated,
    PermissionDenied,
    Conflict,
    ComputeError,
)
