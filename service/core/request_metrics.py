"""Request metrics, one mechanism for every wire: each request is observed once, when it ends
(`rnnserve_requests_total` with its outcome, `rnnserve_request_duration_seconds`).

    with requests.observe(model, version, "encode") as call:
        ...                               # the request's work; an exception is its outcome
        call.version = result.version     # the version that answered, once known

A failed request for a model the server does not know is recorded with empty model and version
labels, and one for a version the model does not have with an empty version label, so that
made-up names and numbers cannot grow the number of metric series.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from service.core.metrics import Metrics, outcome_of
from service.core.types import Wire

# known(model, version): the server knows the model (and that version of it, unless None).
Known = Callable[[str, int | None], bool]
# A front-end's own exception as the core error it stands for in the outcome label (a closed
# connection is a cancelled request), or the exception itself.
AsCoreError = Callable[[BaseException], BaseException]


def request_labels(
    known: Known, model: str, version: int | None, error: BaseException | None
) -> tuple[str, int | None]:
    """(model, version) labels of one request: for a failed request, blank unless known."""
    if error is None or not model:
        return model, version
    if not known(model, None):
        return "", None
    if version is not None and not known(model, version):
        return model, None
    return model, version


@dataclass(frozen=True, slots=True)
class RequestMetrics:
    """Records the requests of one wire (`protocol` label) in `metrics`; `known` says which
    model names (and versions) may be labels, `as_core_error` reads the wire's own exceptions."""

    metrics: Metrics
    wire: Wire
    known: Known
    as_core_error: AsCoreError | None = None

    def observe(self, model: str, version: int | None, endpoint: str) -> Observed:
        """A context manager that times its block and records the request when it ends."""
        return Observed(self, model, version, endpoint)

    def record(
        self,
        model: str,
        version: int | None,
        endpoint: str,
        error: BaseException | None,
        seconds: float,
    ) -> None:
        """Count one answered request (`error`: None for a success)."""
        if error is not None and self.as_core_error is not None:
            error = self.as_core_error(error)
        model, version = request_labels(self.known, model, version, error)
        self.metrics.observe_request(
            model, version, self.wire, endpoint, outcome_of(error), seconds
        )


class Observed:
    """One request being observed (`RequestMetrics.observe`): set `version` once the answer
    names it (and `model`, where the request names it only once read); `forget()` when the
    request is recorded elsewhere (a stream, when it ends) or was never made."""

    __slots__ = ("_endpoint", "_recorded", "_requests", "_start", "model", "version")

    def __init__(
        self, requests: RequestMetrics, model: str, version: int | None, endpoint: str
    ) -> None:
        self._requests = requests
        self.model = model
        self._endpoint = endpoint
        self._recorded = False
        self._start = 0.0
        self.version = version

    def forget(self) -> None:
        """Record nothing when the block ends."""
        self._recorded = True

    def __enter__(self) -> Observed:
        self._start = time.perf_counter()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not self._recorded:
            seconds = time.perf_counter() - self._start
            self._requests.record(self.model, self.version, self._endpoint, error, seconds)
