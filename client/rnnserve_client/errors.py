"""The errors a client sees: one class per error type of the server, on both wires.

The server names the type of every refusal (REST: the error body's `type`; gRPC: trailing
metadata `rnnserve-error-type`), so `InvalidInput`, `NotReady`, `Draining`, `Overloaded`, … are
raised whichever wire carried them. `str(error)` is the server's own message (it names the field
and the limit); `url` says which server answered.
"""

from __future__ import annotations


class RnnserveError(Exception):
    """Base of every error this client raises."""

    def __init__(
        self,
        message: str,
        *,
        url: str = "",
        status: int | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.url = url
        # HTTP status (REST) or gRPC status code name (gRPC), whichever wire answered.
        self.status = status
        self.code = code

    def __str__(self) -> str:
        return self.message


class NotFound(RnnserveError):
    """Unknown model, version or session."""


class InvalidInput(RnnserveError):
    """The server refused the request as malformed or over a limit; never retried."""

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        url: str = "",
        status: int | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, url=url, status=status, code=code)
        self.field = field


class Unavailable(RnnserveError):
    """The server cannot take the request now; the client fails over to another address."""


class NotReady(Unavailable):
    """The model (or version) is loading, failed or unloading on that server."""


class Draining(Unavailable):
    """That server is shutting down."""


class ConnectionFailed(Unavailable):
    """No answer: the connection could not be made, or broke before the answer came."""


class Overloaded(RnnserveError):
    """A full queue refused the request; retried after `retry_after_s` within the deadline."""

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float = 1.0,
        url: str = "",
        status: int | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, url=url, status=status, code=code)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(RnnserveError):
    """The call's deadline passed (on the server, before its result was computed, or here)."""


class Unauthenticated(RnnserveError):
    """A management call without a valid bearer token."""


class PermissionDenied(RnnserveError):
    """The operation is disabled on the server."""


class Conflict(RnnserveError):
    """The operation conflicts with the server's current state."""


class ComputeError(RnnserveError):
    """The model failed while computing (a server-side fault)."""


class ServerError(RnnserveError):
    """Any other failure the server (or a proxy in front of it) reported."""


# The server's error type names (REST body `type`, gRPC `rnnserve-error-type`) → classes.
BY_TYPE: dict[str, type[RnnserveError]] = {
    cls.__name__: cls
    for cls in (
        NotFound,
        InvalidInput,
        NotReady,
        Draining,
        Overloaded,
        DeadlineExceeded,
        Unauthenticated,
        PermissionDenied,
        Conflict,
        ComputeError,
    )
}

# Worth another try, on another address when there is one: the request was not computed.
RETRIABLE: tuple[type[RnnserveError], ...] = (Unavailable, Overloaded)
