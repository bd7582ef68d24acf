"""`Metrics`: every Prometheus metric of the server, on an injected `CollectorRegistry`.

Names are public (dashboards, alerts and autoscalers depend on them; DESIGN §3). Nothing here
touches prometheus-client's global registry: the caller passes the registry it will expose.

Request outcomes (`rnnserve_requests_total{outcome}`): "success", and one per error class —
"not_found", "invalid_input", "not_ready", "overloaded", "deadline_exceeded", "draining",
"unauthenticated", "permission_denied", "conflict", "compute_error", "cancelled" (client gone),
"error" (anything else). `outcome_of(exc)` gives the value for an exception.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from service import errors

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TIMESTEP_BUCKETS = (1, 16, 64, 256, 1024, 4096, 16384, 65536, 262144)
EFFICIENCY_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

MODEL_STATES = ("LOADING", "READY", "FAILED", "UNLOADING")

_OUTCOMES: dict[type[errors.ServiceError], str] = {
    errors.NotFound: "not_found",
    errors.InvalidInput: "invalid_input",
    errors.NotReady: "not_ready",
    errors.Overloaded: "overloaded",
    errors.DeadlineExceeded: "deadline_exceeded",
    errors.Draining: "draining",
    errors.Unauthenticated: "unauthenticated",
    errors.PermissionDenied: "permission_denied",
    errors.Conflict: "conflict",
    errors.ComputeError: "compute_error",
}
OUTCOMES = ("success", *_OUTCOMES.values(), "cancelled", "error")


def outcome_of(exc: BaseException | None) -> str:
    """The `outcome` label for a request that ended with `exc` (None = success)."""
    if exc is None:
        return "success"
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        # NOTE: GeneratorExit: a streaming answer closed at a yield because its client left.
        return "cancelled"
    for cls in type(exc).__mro__:
        if cls in _OUTCOMES:
            return _OUTCOMES[cls]
    return "error"


class _WithoutCreated(Collector):
    """A registry's collection less the `_created` samples of counters and histograms: one
    timestamp series per child that nobody graphs (prometheus-client's own switch,
    `disable_created_metrics`, is process-wide)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            created = family.name + "_created"
            kept = Metric(family.name, family.documentation, family.type, family.unit)
            kept.samples = [s for s in family.samples if s.name != created]
            yield kept


class Metrics:
    """All rnnserve metrics, registered on `registry` (never the global default)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._children: dict[tuple[object, ...], Any] = {}
        request = ("model", "version", "protocol", "endpoint")
        model = ("model", "version")
        self.requests_total = Counter(
            "rnnserve_requests",
            "Requests answered, by model, version, protocol, endpoint and outcome.",
            (*request, "outcome"),
            registry=registry,
        )
        self.request_duration = Histogram(
            "rnnserve_request_duration_seconds",
            "Time from request received to response ready.",
            request,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_duration = Histogram(
            "rnnserve_queue_duration_seconds",
            "Time a sequence waited in the batcher queue before its batch started.",
            model,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.compute_duration = Histogram(
            "rnnserve_compute_duration_seconds",
            "Time of one model call on the device (an encode batch, or one decode step).",
            (*model, "kind"),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "rnnserve_batch_size",
            "Sequences (rows) per model call.",
            (*model, "kind"),
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.batch_timesteps = Histogram(
            "rnnserve_batch_timesteps",
            "Real (unpadded) time steps per encode model call.",
            model,
            buckets=TIMESTEP_BUCKETS,
            registry=registry,
        )
        self.padding_efficiency = Histogram(
            "rnnserve_padding_efficiency",
            "Real time steps divided by computed (padded) time steps, per encode model call.",
            model,
            buckets=EFFICIENCY_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "rnnserve_queue_depth",
            "Sequences waiting in a model version's queue (encode batcher and decode admission).",
            (*model, "kind"),
            registry=registry,
        )
        self.inflight_requests = Gauge(
            "rnnserve_inflight_requests",
            "Requests admitted by the engine and not yet answered.",
            ("model",),
            registry=registry,
        )
        self.model_state = Gauge(
            "rnnserve_model_state",
            "1 for the current state of each model version, 0 for the others.",
            (*model, "state"),
            registry=registry,
        )
        self.model_restarts_total = Counter(
            "rnnserve_model_restarts",
            "Restarts of a READY version whose batcher or decode scheduler stopped on its own.",
            model,
            registry=registry,
        )
        self.model_load_duration = Histogram(
            "rnnserve_model_load_duration_seconds",
            "Time to load a model version (read, check, place on device, warm up).",
            model,
            buckets=LOAD_BUCKETS,
            registry=registry,
        )
        self.decode_slots_in_use = Gauge(
            "rnnserve_decode_slots_in_use",
            "Rows (greedy requests and beams) in a model version's running decode batch.",
            model,
            registry=registry,
        )
        self.sessions_active = Gauge(
            "rnnserve_sessions_active",
            "Open streaming sessions.",
            ("model",),
            registry=registry,
        )
        self.model_calls_total = Counter(
            "rnnserve_model_calls",
            "Model calls run by the executor (encode batches, decode encodes, decode steps).",
            (*model, "kind"),
            registry=registry,
        )
        self.dropped_total = Counter(
            "rnnserve_dropped_sequences",
            "Queued sequences dropped before compute, by reason (deadline, cancelled, draining).",
            (*model, "reason"),
            registry=registry,
        )
        # -- streaming sessions (service/sessions.py) --
        self.sessions_expired_total = Counter(
            "rnnserve_sessions_expired",
            "Server-held streaming sessions closed by the idle timeout.",
            ("model",),
            registry=registry,
        )
        self.sessions_refused_total = Counter(
            "rnnserve_sessions_refused",
            "Streaming sessions refused, by reason (limit, not_streamable).",
            ("model", "reason"),
            registry=registry,
        )
        self.session_chunks_total = Counter(
            "rnnserve_session_chunks",
            "Streamed chunks answered, by mode (session: server-held; token: portable state).",
            ("model", "mode"),
            registry=registry,
        )

    def exposition(self) -> bytes:
        """The Prometheus text of every metric (what `/metrics` serves), without `_created`."""
        return generate_latest(_WithoutCreated(self.registry))

    def observe_request(
        self,
        model: str,
        version: int | str | None,
        protocol: str,
        endpoint: str,
        outcome: str,
        seconds: float,
    ) -> None:
        """Count one answered request and its latency (front-ends call this once per request)."""
        v = "" if version is None else str(version)
        self.child(self.requests_total, model, v, protocol, endpoint, outcome).inc()
        self.child(self.request_duration, model, v, protocol, endpoint).observe(seconds)

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once per label set: `labels()` costs microseconds
        and per-request paths call this (label sets are bounded: unknown models are blank)."""
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def set_model_state(self, model: str, version: int, state: str | None) -> None:
        """Mark `state` as the current state of a version (None: the version is gone)."""
        for known in MODEL_STATES:
            gauge = self.model_state.labels(model, str(version), known)
            gauge.set(1.0 if known == state else 0.0)
